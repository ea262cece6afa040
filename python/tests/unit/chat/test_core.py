"""keel chat's pure core with a fake clock: authorization, commands, confirmations, pace."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.chat.core import (
    COMMANDS,
    DENIAL_RECORD_EVERY,
    MAX_PENDING_PER_USER,
    READ_ONLY,
    AnswerButton,
    ChatCore,
    Edit,
    Effect,
    Execute,
    Note,
    Outcome,
    Policy,
    Propose,
    Query,
    Record,
    Request,
    Say,
)
from keel.telegram import CALLBACK_DATA_LIMIT, CallbackQuery, Chat, Message, Update, User
from keel.testing import FakeClock

ALICE, BOB, EVE = 111, 222, 666
GROUP = -100500
WALL_START = 1_800_000_000.0


class Bot:
    """A core with fake clocks and helpers that speak like Telegram."""

    def __init__(self, **policy: Any) -> None:
        settings: dict[str, Any] = {
            "allowed_users": frozenset({ALICE, BOB}),
            "commands": frozenset({*READ_ONLY, "restart"}),
            "host": "box",
        }
        settings.update(policy)
        self.clock = FakeClock()
        self.wall = FakeClock(WALL_START)
        self.core = ChatCore(
            Policy(**settings), clock=self.clock, wall=self.wall, rng=random.Random(7)
        )
        self.core.username = "keel_bot"
        self.update_id = 0
        self.message_id = 0

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.wall.advance(seconds)

    def send(
        self,
        text: str,
        *,
        user: int = ALICE,
        chat: int | None = None,
        kind: str = "private",
        age: float = 0.0,
        is_bot: bool = False,
    ) -> list[Effect]:
        self.update_id += 1
        self.message_id += 1
        message = Message(
            self.message_id,
            Chat(chat if chat is not None else user, kind),
            User(user, is_bot, f"user{user}"),
            int(self.wall() - age),
            text,
        )
        return self.core.handle(Update(self.update_id, message=message))

    def press(
        self,
        data: str | None,
        *,
        user: int = ALICE,
        chat: int | None = None,
        kind: str = "private",
        message_id: int = 900,
    ) -> list[Effect]:
        self.update_id += 1
        message = Message(message_id, Chat(chat if chat is not None else user, kind), None, 0, "")
        query = CallbackQuery(f"q{self.update_id}", User(user, False, ""), message, data)
        return self.core.handle(Update(self.update_id, callback_query=query))

    def offer(self, target: str = "web", *, user: int = ALICE, state: str = "healthy/10/0") -> str:
        """/restart TARGET from ``user``, offered in ``state``; returns the approve data."""
        effects = self.send(f"/restart {target}", user=user)
        proposal = one(effects, Propose)
        offered = self.core.offer(proposal.request, "restart", target, state, "healthy, pid 10")
        say = one(offered, Say)
        self.core.shown(say.confirmation or "", 900)
        return str(say.buttons[0][1])


def of(effects: list[Effect], kind: type[Any]) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def one(effects: list[Effect], kind: type[Any]) -> Any:
    found = of(effects, kind)
    assert len(found) == 1, f"expected one {kind.__name__} in {effects}"
    return found[0]


def records(effects: list[Effect]) -> list[str]:
    return [e.kind for e in of(effects, Record)]


# --- the person, never the chat --------------------------------------------------------


def test_a_stranger_gets_no_answer_and_is_recorded_once_per_ten_minutes() -> None:
    bot = Bot()
    effects = bot.send("/status", user=EVE)
    assert of(effects, Say) == []
    assert of(effects, Query) == []
    assert records(effects) == ["chat_denied"]
    record = one(effects, Record)
    assert (record.subject, record.data) == (str(EVE), {"chat": EVE, "what": "/status"})
    assert "not in allowed_users" in one(effects, Note).text
    assert bot.send("/restart web", user=EVE) == []  # silence, not even a record
    bot.advance(DENIAL_RECORD_EVERY - 1)
    assert bot.send("/status", user=EVE) == []
    bot.advance(1)
    assert records(bot.send("hello", user=EVE)) == ["chat_denied"]
    assert bot.core.stats.denied == 4


def test_a_crowd_of_strangers_is_recorded_at_a_bounded_pace() -> None:
    bot = Bot()
    recorded = sum(len(records(bot.send("/status", user=10_000 + n))) for n in range(500))
    assert recorded == 20
    assert bot.core.stats.denied == 500
    bot.advance(30)
    assert records(bot.send("/status", user=20_000)) == ["chat_denied"]


def test_a_stranger_in_a_group_with_allowed_people_is_still_a_stranger() -> None:
    bot = Bot()
    assert of(bot.send("/agents", user=EVE, chat=GROUP, kind="supergroup"), Say) == []
    assert of(bot.send("/agents", user=ALICE, chat=GROUP, kind="supergroup"), Query) != []


def test_a_bot_is_never_allowed_even_with_an_allowed_id() -> None:
    bot = Bot()
    assert of(bot.send("/status", user=ALICE, is_bot=True), Query) == []


def test_a_strangers_button_press_gets_nothing_at_all() -> None:
    bot = Bot()
    data = bot.offer()
    effects = bot.press(data, user=EVE, chat=GROUP, kind="group")
    assert of(effects, AnswerButton) == []
    assert of(effects, Execute) == []
    assert records(effects) == ["chat_denied"]
    assert len(bot.core.pending) == 1  # still Alice's to answer


def test_messages_without_a_person_are_ignored() -> None:
    bot = Bot()
    channel_post = Message(1, Chat(-1001, "channel"), None, int(bot.wall()), "/status")
    assert bot.core.handle(Update(1, message=channel_post)) == []
    assert bot.core.handle(Update(2)) == []


# --- commands --------------------------------------------------------------------------


def test_read_only_commands_become_queries_with_a_record() -> None:
    bot = Bot()
    for name in READ_ONLY:
        effects = bot.send(f"/{name}")
        query = one(effects, Query)
        assert query.request.command == name
        assert records(effects) == ["chat_command"]
        assert one(effects, Record).data["command"] == name


def test_log_takes_a_count_from_1_to_100() -> None:
    bot = Bot()
    assert one(bot.send("/log"), Query).request.args == ("10",)
    assert one(bot.send("/log 007"), Query).request.args == ("7",)
    assert one(bot.send("/log 100"), Query).request.args == ("100",)
    for bad in ("/log 0", "/log 101", "/log x", "/log 1 2", "/log -3"):
        effects = bot.send(bad)
        assert of(effects, Query) == []
        assert "Usage: /log [N]" in one(effects, Say).text


@pytest.mark.parametrize(
    "text",
    ["/status now", "/agents all", "/restart", "/restart a b", "/restart ../x", "/restart -x"],
)
def test_bad_arguments_get_the_usage(text: str) -> None:
    bot = Bot()
    effects = bot.send(text)
    assert of(effects, Query) == []
    assert of(effects, Propose) == []
    assert "Usage:" in one(effects, Say).text


def test_unknown_and_disabled_commands_are_refused_with_the_list() -> None:
    bot = Bot(commands=frozenset(READ_ONLY))
    unknown = one(bot.send("/rm -rf /"), Say).text
    assert unknown.startswith("There is no /rm.")
    assert "/status /agents /log /fleet /help" in unknown
    disabled = one(bot.send("/restart web"), Say).text
    assert disabled.startswith("/restart is not enabled on box")
    assert of(bot.send("/restart web"), Propose) == []


def test_help_lists_what_is_enabled_and_says_where_changes_work() -> None:
    bot = Bot()
    private = one(bot.send("/help"), Say).text
    assert (
        "/restart AGENT[@NODE]: restart an agent, here or on another node (private chat only"
        in private
    )
    group = one(bot.send("/start", chat=GROUP, kind="group"), Say)
    assert group.group is True
    assert "only in a private chat" in group.text
    read_only = one(Bot(commands=frozenset({"status"})).send("/help"), Say).text
    assert "/agents" not in read_only
    assert "read-only commands only" in read_only


def test_commands_addressed_to_another_bot_are_not_ours() -> None:
    bot = Bot()
    assert one(bot.send("/status@keel_bot"), Query).request.command == "status"
    assert bot.send("/status@other_bot", chat=GROUP, kind="group") == []
    assert bot.send("/status@other_bot", user=EVE) == []  # not even a denial
    bot.core.username = None  # getMe not answered yet: a named command cannot be ours
    assert bot.send("/status@keel_bot") == []


def test_plain_text_gets_a_hint_in_private_and_nothing_in_a_group() -> None:
    bot = Bot()
    assert "/help" in one(bot.send("what is down?"), Say).text
    assert bot.send("what is down?", chat=GROUP, kind="group") == []
    assert "/help" in one(bot.send("/Ω"), Say).text  # not a command keel could have


def test_commands_are_case_insensitive() -> None:
    assert one(Bot().send("/STATUS"), Query).request.command == "status"


def test_stale_commands_are_skipped() -> None:
    bot = Bot(max_age=300)
    effects = bot.send("/restart web", age=301)
    assert of(effects, Propose) == []
    assert of(effects, Say) == []
    assert "more than max_age" in one(effects, Note).text
    assert of(bot.send("/restart web", age=299), Propose) != []
    assert bot.core.stats.stale == 1


# --- changes: private chats and confirmations ---------------------------------------------


def test_a_change_in_a_group_is_refused_and_recorded() -> None:
    bot = Bot()
    effects = bot.send("/restart web", chat=GROUP, kind="supergroup")
    assert of(effects, Propose) == []
    assert "only in a private chat" in one(effects, Say).text
    assert one(effects, Record).data["reason"] == "not a private chat"


def test_a_private_chat_that_is_not_the_persons_own_is_refused() -> None:
    # In a private chat the chat id is the person's id; anything else is not theirs.
    effects = Bot().send("/restart web", chat=BOB, kind="private")
    assert of(effects, Propose) == []


def test_an_offer_carries_two_buttons_bound_to_a_nonce() -> None:
    bot = Bot()
    proposal = one(bot.send("/restart web"), Propose)
    assert (proposal.action, proposal.target) == ("restart", "web")
    effects = bot.core.offer(proposal.request, "restart", "web", "unhealthy/42/3", "unhealthy")
    say = one(effects, Say)
    assert say.chat == ALICE
    assert say.group is False
    (approve_label, approve), (cancel_label, cancel) = say.buttons
    assert (approve_label, cancel_label) == ("Restart web", "Cancel")
    assert approve.startswith("ok:")
    assert cancel.startswith("no:")
    assert approve[3:] == cancel[3:] == say.confirmation
    assert len(approve.encode()) <= CALLBACK_DATA_LIMIT
    assert "within 60 s" in say.text
    assert "Restart web on box?" in say.text
    record = one(effects, Record)
    assert record.kind == "chat_confirm"
    assert record.data["state"] == "unhealthy/42/3"
    assert say.confirmation not in str(record.data)  # the nonce stays out of the ledger


def test_nonces_differ() -> None:
    bot = Bot()
    assert bot.offer("a") != bot.offer("b")


def test_the_owner_approves_once_and_the_action_is_bound_to_what_was_shown() -> None:
    bot = Bot()
    data = bot.offer(state="unhealthy/42/3")
    bot.advance(5)
    effects = bot.press(data)
    assert one(effects, AnswerButton).text == "Approved: restart web."
    assert "Approved; working on it." in one(effects, Edit).text
    execute = one(effects, Execute)
    assert (execute.pending.action, execute.pending.target) == ("restart", "web")
    assert execute.pending.state == "unhealthy/42/3"
    assert execute.approval.kind == "chat_approve"
    assert execute.approval.subject == str(ALICE)
    assert execute.approval.data["state"] == "unhealthy/42/3"
    assert execute.approval.data["after"] == 5.0
    assert bot.core.pending == []
    finished = bot.core.finished(execute.pending, Outcome("done", "Restarted web."))
    assert one(finished, Say).text == "Restarted web."
    assert one(finished, Record).data["result"] == "done"


def test_a_replayed_approval_does_nothing() -> None:
    bot = Bot()
    data = bot.offer()
    assert of(bot.press(data), Execute) != []
    again = bot.press(data)
    assert of(again, Execute) == []
    assert "already answered" in one(again, AnswerButton).text
    assert one(again, Record).data["reason"] == "used"


def test_another_allowed_person_pressing_the_button_does_nothing() -> None:
    bot = Bot()
    data = bot.offer(user=ALICE)
    # The message reached a group somehow; Bob, also allowed, presses it there.
    effects = bot.press(data, user=BOB, chat=GROUP, kind="group")
    assert of(effects, Execute) == []
    assert "not yours" in one(effects, AnswerButton).text
    assert one(effects, Record).data == {
        "reason": "not yours",
        "id": "c1",
        "owner": ALICE,
        "chat": GROUP,
    }
    # Bob in his own private chat: still not his.
    assert of(bot.press(data, user=BOB), Execute) == []
    # Alice's confirmation is untouched and works for her.
    assert of(bot.press(data), Execute) != []


def test_the_owner_pressing_in_another_chat_does_nothing() -> None:
    bot = Bot()
    data = bot.offer()
    assert of(bot.press(data, chat=GROUP, kind="group"), Execute) == []
    assert of(bot.press(data, chat=BOB, kind="private"), Execute) == []
    assert of(bot.press(data), Execute) != []


def test_the_person_is_checked_even_where_the_chat_matches() -> None:
    # Telegram would not deliver Bob's press on a message in Alice's private chat;
    # if anything ever did, the person still decides.
    bot = Bot()
    data = bot.offer()
    effects = bot.press(data, user=BOB, chat=ALICE, kind="private")
    assert of(effects, Execute) == []
    assert "not yours" in one(effects, AnswerButton).text


def test_a_confirmation_expires_after_the_timeout() -> None:
    bot = Bot()
    data = bot.offer()
    assert bot.core.next_deadline() == bot.clock() + 60
    bot.advance(59.999)
    assert bot.core.tick() == []
    bot.advance(0.001)
    effects = bot.press(data)
    assert of(effects, Execute) == []
    assert "expired" in one(effects, AnswerButton).text
    assert records(effects) == ["chat_expire"]
    assert "Expired: nothing was done." in one(effects, Edit).text
    assert "expired" in one(bot.press(data), AnswerButton).text  # and stays expired
    assert bot.core.next_deadline() is None


def test_tick_expires_and_edits_the_message() -> None:
    bot = Bot(confirm_timeout=10)
    bot.offer()
    bot.advance(10)
    effects = bot.core.tick()
    assert records(effects) == ["chat_expire"]
    edit = one(effects, Edit)
    assert (edit.chat, edit.message_id) == (ALICE, 900)
    assert bot.core.tick() == []
    assert bot.core.stats.expired == 1


def test_an_offer_shown_only_after_it_expired_is_edited_then() -> None:
    bot = Bot()
    proposal = one(bot.send("/restart web"), Propose)
    say = one(bot.core.offer(proposal.request, "restart", "web", "s", "s"), Say)
    bot.advance(60)
    effects = bot.core.tick()
    assert records(effects) == ["chat_expire"]
    assert of(effects, Edit) == []  # its message id is not known yet
    edit = one(bot.core.shown(say.confirmation or "", 901), Edit)
    assert (edit.chat, edit.message_id) == (ALICE, 901)
    assert edit.text.endswith("Expired: nothing was done.")


def test_an_offer_answered_before_telegram_confirmed_it_is_edited_then() -> None:
    bot = Bot()
    proposal = one(bot.send("/restart web"), Propose)
    say = one(bot.core.offer(proposal.request, "restart", "web", "s", "s"), Say)
    approved = bot.press(say.buttons[0][1])
    assert of(approved, Execute) != []
    assert of(approved, Edit) == []
    edit = one(bot.core.shown(say.confirmation or "", 902), Edit)
    assert edit.text.endswith("Approved; working on it.")
    assert bot.core.shown("unknown-nonce", 903) == []


def test_cancel_does_nothing_and_uses_the_confirmation_up() -> None:
    bot = Bot()
    data = bot.offer()
    effects = bot.press("no:" + data[3:])
    assert of(effects, Execute) == []
    assert one(effects, AnswerButton).text == "Cancelled."
    assert records(effects) == ["chat_cancel"]
    assert "Cancelled" in one(effects, Edit).text
    assert of(bot.press(data), Execute) == []


def test_buttons_that_are_not_ours_or_unknown() -> None:
    bot = Bot()
    for data in (None, "", "ok:short", "rm:" + "A" * 22, "ok:" + "A" * 22 + "x"):
        effects = bot.press(data)
        assert "not one of mine" in one(effects, AnswerButton).text
    unknown = bot.press("ok:" + "A" * 22)
    assert "unknown here" in one(unknown, AnswerButton).text
    assert one(unknown, Record).data["reason"] == "unknown"


def test_a_new_offer_for_the_same_action_supersedes_the_old_one() -> None:
    bot = Bot()
    first = bot.offer()
    second = bot.offer()
    assert first != second
    assert len(bot.core.pending) == 1
    assert "replaced" in one(bot.press(first), AnswerButton).text
    assert of(bot.press(second), Execute) != []


def test_one_restart_of_a_target_at_a_time() -> None:
    bot = Bot()
    execute = one(bot.press(bot.offer()), Execute)
    busy = bot.send("/restart web")
    assert of(busy, Propose) == []
    assert "already under way" in one(busy, Say).text
    assert of(bot.send("/restart db"), Propose) != []
    bot.core.finished(execute.pending, Outcome("failed", "no"))
    assert of(bot.send("/restart web"), Propose) != []


def test_two_approvals_for_one_target_do_not_both_act() -> None:
    bot = Bot()
    alices = bot.offer("web", user=ALICE)
    bobs = bot.offer("web", user=BOB)
    assert of(bot.press(alices), Execute) != []
    busy = bot.press(bobs, user=BOB)
    assert of(busy, Execute) == []
    assert "already under way" in one(busy, AnswerButton).text
    assert one(busy, Record).data["reason"] == "busy"
    assert "already answered" in one(bot.press(bobs, user=BOB), AnswerButton).text


def test_a_person_has_a_bounded_number_of_confirmations_waiting() -> None:
    bot = Bot()
    for n in range(MAX_PENDING_PER_USER):
        bot.offer(f"a{n}")
    proposal = one(bot.send("/restart extra"), Propose)
    effects = bot.core.offer(proposal.request, "restart", "extra", "s", "s")
    assert "Too many confirmations" in one(effects, Say).text
    assert len(bot.core.pending) == MAX_PENDING_PER_USER
    bot.offer("b0", user=BOB)  # others are not held up
    assert len(bot.core.pending) == MAX_PENDING_PER_USER + 1


# --- pace ------------------------------------------------------------------------------


def test_a_flood_gets_a_burst_one_notice_then_silence() -> None:
    bot = Bot()
    handled = notices = 0
    for _ in range(100):
        effects = bot.send("/status")
        handled += len(of(effects, Query))
        notices += sum("Too many commands" in s.text for s in of(effects, Say))
    assert (handled, notices) == (8, 1)
    assert bot.core.stats.throttled == 92
    bot.advance(3)  # one command's worth of refill
    assert of(bot.send("/status"), Query) != []
    assert of(bot.send("/status"), Query) == []  # empty again: a notice again
    bot.advance(8 * 3)
    assert sum(len(of(bot.send("/status"), Query)) for _ in range(20)) == 8
    # The others were never held up.
    assert of(bot.send("/status", user=BOB), Query) != []


def test_a_flood_of_presses_is_not_even_answered() -> None:
    bot = Bot()
    data = bot.offer()
    answered = sum(len(of(bot.press("ok:" + "B" * 22), AnswerButton)) for _ in range(50))
    assert answered < 8
    bot.advance(60)  # the confirmation expired in the meantime
    assert "expired" in one(bot.press(data), AnswerButton).text


# --- policy ------------------------------------------------------------------------------


def test_the_policy_refuses_what_the_core_cannot_honour() -> None:
    with pytest.raises(ValueError, match="unknown commands"):
        Policy(frozenset({1}), frozenset({"shell"}), "box")
    with pytest.raises(ValueError, match="confirm_timeout"):
        Policy(frozenset({1}), frozenset(), "box", confirm_timeout=61)
    assert set(READ_ONLY) == {"status", "agents", "log", "fleet"}
    assert [n for n, c in COMMANDS.items() if c.mutating] == ["restart", "switch"]


# --- a property: whatever happens, only the owner's first timely approval acts -------------

_PEOPLE = st.sampled_from([ALICE, BOB, EVE])
_STEP = st.one_of(
    st.tuples(st.just("offer"), _PEOPLE, st.sampled_from(["web", "db"])),
    st.tuples(
        st.just("press"),
        _PEOPLE,
        st.integers(0, 5),
        st.sampled_from(["ok", "no"]),
        st.sampled_from(["private", "group"]),
    ),
    st.tuples(st.just("wait"), st.floats(0, 40)),
    st.tuples(st.just("finish"), st.integers(0, 5)),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(_STEP, max_size=40))
def test_only_the_owners_first_timely_approval_ever_acts(steps: list[tuple[Any, ...]]) -> None:
    bot = Bot()
    offers: list[tuple[str, int, float]] = []  # (nonce, owner, expires)
    executed: list[str] = []
    running: list[Execute] = []
    for step in steps:
        if step[0] == "offer":
            _, user, target = step
            effects = bot.send(f"/restart {target}", user=user)
            for proposal in of(effects, Propose):
                offered = bot.core.offer(proposal.request, "restart", target, "s", "s")
                for say in of(offered, Say):
                    if say.confirmation:
                        offers.append((say.confirmation, user, bot.clock() + 60))
        elif step[0] == "press" and offers:
            _, user, index, verb, kind = step
            nonce, owner, expires = offers[index % len(offers)]
            chat = user if kind == "private" else GROUP
            effects = bot.press(f"{verb}:{nonce}", user=user, chat=chat, kind=kind)
            for execute in of(effects, Execute):
                assert user == owner
                assert kind == "private"
                assert verb == "ok"
                assert bot.clock() < expires
                assert execute.pending.nonce == nonce
                assert nonce not in executed
                executed.append(nonce)
                running.append(execute)
            if user == EVE:
                assert effects == [] or records(effects) == ["chat_denied"]
        elif step[0] == "wait":
            bot.advance(step[1])
            for effect in bot.core.tick():
                assert not isinstance(effect, Execute)
        elif step[0] == "finish" and running:
            execute = running.pop(step[1] % len(running))
            bot.core.finished(execute.pending, Outcome("done", "ok"))
    assert all(isinstance(r, Execute) for r in running)


def test_requests_know_whether_they_are_private() -> None:
    assert Request(1, "", 1, "private", 1, "status").private
    assert not Request(1, "", -5, "group", 1, "status").private
