"""keel chat's outbox: Telegram's limits with a fake clock, and replies that fit."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st
from keel.chat.outbox import (
    ANSWER_LIMIT,
    Limits,
    Outbox,
    Outgoing,
    answer,
    clip,
    compose,
    edit,
    plain,
    utf16_len,
)
from keel.telegram import CAPTION_LIMIT, TEXT_LIMIT
from keel.testing import FakeClock

PRIVATE, OTHER, GROUP = 111, 222, -100
EPS = 1e-9  # float addition of times: a limit is kept to within rounding


def message(chat: int, text: str = "hi", *, group: bool = False) -> Outgoing:
    return Outgoing("sendMessage", chat, group=group, text=text)


def drain(outbox: Outbox, clock: FakeClock, until: float) -> list[tuple[float, Outgoing]]:
    """Take everything the outbox releases up to ``until``, jumping to each next_time."""
    sent: list[tuple[float, Outgoing]] = []
    while True:
        item = outbox.take(clock())
        if item is not None:
            sent.append((clock(), item))
            continue
        at = outbox.next_time(clock())
        if at is None or at > until:
            return sent
        clock.set(max(clock(), at))


def test_one_message_a_second_per_chat_and_chats_take_turns() -> None:
    clock = FakeClock(0)
    outbox = Outbox()
    for n in range(3):
        outbox.push(message(PRIVATE, f"a{n}"))
        outbox.push(message(OTHER, f"b{n}"))
    sent = drain(outbox, clock, 100)
    assert [(t, item.text) for t, item in sent] == [
        (0, "a0"),
        (0, "b0"),
        (1, "a1"),
        (1, "b1"),
        (2, "a2"),
        (2, "b2"),
    ]
    assert outbox.next_time(clock()) is None
    assert len(outbox) == 0


def test_nothing_is_taken_before_next_time() -> None:
    clock = FakeClock(0)
    outbox = Outbox()
    outbox.push(message(PRIVATE))
    outbox.push(message(PRIVATE))
    assert outbox.take(0) is not None
    assert outbox.next_time(0) == 1
    assert outbox.take(0.999) is None
    assert outbox.take(1) is not None
    del clock


def test_a_group_gets_twenty_a_minute() -> None:
    clock = FakeClock(0)
    outbox = Outbox(Limits(queue_limit=100))
    for n in range(25):
        outbox.push(message(GROUP, str(n), group=True))
    sent = drain(outbox, clock, 1000)
    times = [t for t, _ in sent]
    assert times[:20] == list(range(20))  # one a second...
    assert times[20] == 60  # ...then the minute's window is full
    assert times[21:] == [61, 62, 63, 64]


def test_thirty_a_second_in_all() -> None:
    outbox = Outbox()
    for chat in range(1, 41):
        outbox.push(message(chat))
    taken = 0
    while outbox.take(0) is not None:
        taken += 1
    assert taken == 30
    assert outbox.next_time(0) == 1
    assert outbox.take(1) is not None


def test_answers_to_buttons_go_first() -> None:
    outbox = Outbox()
    outbox.push(message(PRIVATE, "later"))
    outbox.push(answer("q1", "Approved"))
    first = outbox.take(0)
    assert first is not None
    assert first.method == "answerCallbackQuery"
    second = outbox.take(0)
    assert second is not None
    assert second.text == "later"


def test_a_429_holds_the_chat_and_the_item_goes_again_first() -> None:
    outbox = Outbox()
    outbox.push(message(PRIVATE, "one"))
    outbox.push(message(PRIVATE, "two"))
    outbox.push(message(OTHER, "elsewhere"))
    item = outbox.take(0)
    assert item is not None
    assert item.text == "one"
    outbox.throttle(PRIVATE, 7, now=0.2)
    outbox.retry(item)
    assert item.attempts == 1
    elsewhere = outbox.take(0.2)
    assert elsewhere is not None
    assert elsewhere.text == "elsewhere"
    assert outbox.next_time(0.2) == 7.2
    again = outbox.take(7.2)
    assert again is not None
    assert again.text == "one"
    assert outbox.stats.throttled == 1


def test_a_429_for_the_bot_holds_everything() -> None:
    outbox = Outbox()
    outbox.push(message(PRIVATE))
    outbox.push(answer("q", ""))
    outbox.throttle(None, 5, now=0)
    assert outbox.take(4.9) is None
    assert outbox.next_time(0) == 5
    assert outbox.take(5) is not None


def test_a_full_queue_drops_and_the_next_message_says_how_many() -> None:
    outbox = Outbox(Limits(queue_limit=2))
    assert outbox.push(message(PRIVATE, "a"))
    assert outbox.push(message(PRIVATE, "b"))
    assert not outbox.push(message(PRIVATE, "c"))
    assert not outbox.push(message(PRIVATE, "d"))
    assert outbox.push(message(OTHER, "x"))  # one chat's flood is its own
    first = outbox.take(0)
    assert first is not None
    assert first.text == "a\n\n(2 more replies were dropped: too many at once.)"
    second = outbox.take(1)
    assert second is not None
    assert second.text == "x"
    third = outbox.take(1)
    assert third is not None
    assert third.text == "b"
    assert outbox.stats.dropped == 2


@settings(max_examples=200, deadline=None)
@given(
    pushes=st.lists(
        st.tuples(st.sampled_from([PRIVATE, OTHER, GROUP, 333]), st.floats(0, 120)),
        max_size=80,
    ),
    holds=st.lists(st.tuples(st.sampled_from([PRIVATE, None]), st.floats(0, 30)), max_size=3),
)
def test_whatever_is_queued_the_limits_hold(
    pushes: list[tuple[int, float]], holds: list[tuple[int | None, float]]
) -> None:
    clock = FakeClock(0)
    outbox = Outbox(Limits(queue_limit=1000))
    for chat, _ in pushes:
        outbox.push(message(chat, group=chat < 0))
    for held_chat, seconds in holds:
        outbox.throttle(held_chat, seconds, 0)
    sent = drain(outbox, clock, 10_000)
    assert len(sent) == len(pushes)  # everything goes, eventually
    by_chat: dict[int, list[float]] = defaultdict(list)
    for at, item in sent:
        assert item.chat is not None
        by_chat[item.chat].append(at)
    for chat_id, times in by_chat.items():
        assert all(b - a >= 1 - EPS for a, b in itertools.pairwise(times))
        if chat_id < 0:
            assert all(times[i + 20] - times[i] >= 60 - EPS for i in range(len(times) - 20))
    times = [at for at, _ in sent]
    assert all(times[i + 30] - times[i] >= 1 - EPS for i in range(len(times) - 30))
    for held, seconds in holds:
        affected = times if held is None else by_chat.get(held, [])
        assert all(t >= seconds for t in affected)


# --- what is sent ------------------------------------------------------------------------


def test_a_short_reply_is_a_message_with_its_buttons() -> None:
    item = compose(PRIVATE, False, "Restart web?", reply_to=5, buttons=(("Yes", "ok:x"),))
    assert item.method == "sendMessage"
    assert item.params() == {
        "chat_id": PRIVATE,
        "text": "Restart web?",
        "link_preview_options": {"is_disabled": True},
        "reply_parameters": {"message_id": 5, "allow_sending_without_reply": True},
        "reply_markup": {"inline_keyboard": [[{"text": "Yes", "callback_data": "ok:x"}]]},
    }


def test_a_reply_of_exactly_the_limit_is_still_a_message() -> None:
    assert compose(1, False, "x" * TEXT_LIMIT).method == "sendMessage"
    assert compose(1, False, "x" * (TEXT_LIMIT + 1)).method == "sendDocument"
    # Telegram counts UTF-16 code units: an emoji is two.
    assert compose(1, False, "😀" * (TEXT_LIMIT // 2)).method == "sendMessage"
    assert compose(1, False, "😀" * (TEXT_LIMIT // 2) + "x").method == "sendDocument"


def test_a_long_reply_is_a_file_with_its_first_line_as_caption() -> None:
    text = "host: 5000 entries\n" + "\n".join(f"line {n}" for n in range(5000))
    item = compose(PRIVATE, True, text, filename="log.txt", reply_to=3)
    assert item.method == "sendDocument"
    assert item.document == text.encode()
    assert item.filename == "log.txt"
    assert (
        item.text == "host: 5000 entries\n(too long for a message: all 5001 lines are in log.txt)"
    )
    form = item.form()
    assert form["chat_id"] == str(PRIVATE)
    assert json.loads(form["reply_parameters"])["message_id"] == 3
    assert "text" not in form
    assert form["caption"] == item.text


def test_an_empty_reply_still_says_something() -> None:
    assert compose(1, False, " \n").text == "(nothing to show)"


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=6000))
def test_any_text_fits_as_a_message_or_goes_as_a_file(text: str) -> None:
    item = compose(1, False, text)
    if item.method == "sendMessage":
        assert 1 <= utf16_len(item.text) <= TEXT_LIMIT
    else:
        assert item.document is not None
        assert utf16_len(item.document.decode()) > TEXT_LIMIT
        assert utf16_len(item.text) <= CAPTION_LIMIT
    shown = item.document.decode() if item.document else item.text
    assert "\u202e" not in shown
    assert "\x00" not in shown
    assert "\r" not in shown


def test_plain_shows_what_could_hide_or_reorder_text() -> None:
    assert plain("ok\tfine\nnext") == "ok\tfine\nnext"
    assert plain("evil\u202etxt.exe") == "evil\\u202etxt.exe"
    assert plain("a\x1b[31mred\r") == "a\\u001b[31mred\\u000d"
    assert plain("line\u2028sep\ud800") == "line\\u2028sep\\ud800"


def test_clip_counts_like_telegram_and_never_splits_a_character() -> None:
    assert clip("abcdef", 4) == "abc…"
    assert clip("abc", 3) == "abc"
    assert clip("😀😀😀", 5) == "😀😀…"
    assert utf16_len(clip("😀" * 10, 4)) <= 4


def test_edits_and_answers_are_clipped_to_their_limits() -> None:
    long_edit = edit(1, 9, "x" * 5000)
    assert long_edit.params() == {
        "chat_id": 1,
        "message_id": 9,
        "text": long_edit.text,
        "link_preview_options": {"is_disabled": True},
    }
    assert utf16_len(long_edit.text) == TEXT_LIMIT
    short = answer("q", "y" * 500)
    assert utf16_len(short.text) == ANSWER_LIMIT
    assert short.params() == {"callback_query_id": "q", "text": short.text}
    assert answer("q", "").params() == {"callback_query_id": "q"}
