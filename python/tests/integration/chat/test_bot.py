"""keel chat against the Bot API stand-in and a real watch: the holes other ops bots have."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from keel.ledger import Ledger
from keel.watch.children import pidfd_supported

from tests.integration.chat.botapi import BotApi, bot_api
from tests.integration.chat.support import ALICE, BOB, EVE, GROUP, TOKEN, Host, chat_host
from tests.integration.watch_support import ledger_entries, until

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not pidfd_supported(),
    reason="watch's process backend needs Linux 5.3+ (pidfd_open)",
)


@pytest.fixture
def api() -> Iterator[BotApi]:
    with bot_api(TOKEN) as server:
        yield server


def kinds(tmp_path: Path, source: str = "chat") -> list[str]:
    return [e.kind for e in ledger_entries(tmp_path / "ledger.db") if e.source == source]


async def confirmation(host: Host, target: str = "web") -> tuple[int, int]:
    """Alice asks to restart ``target``; returns (her message count before, the offer's index)."""
    before = len(host.api.to(ALICE))
    host.api.message(ALICE, f"/restart {target}")
    offer = await host.reply(ALICE, after=before, what="the confirmation")
    assert offer.buttons, f"no buttons on {offer.text!r}"
    return before, before


def test_read_only_commands_answer_allowed_people(tmp_path: Path, api: BotApi) -> None:
    async def scenario() -> None:
        async with chat_host(tmp_path, api) as host:
            api.message(ALICE, "/status")
            status = await host.reply(ALICE)
            assert status.text.startswith("testhost: all 2 agents healthy.")
            api.message(BOB, "/agents@keel_test_bot", chat=GROUP, chat_type="supergroup")
            agents = await host.reply(GROUP)
            lines = agents.text.splitlines()
            assert lines[0] == "testhost, 2 agents:"
            assert lines[1].startswith("db: healthy, pid ")
            assert lines[2].startswith("web: healthy, pid ")
            api.message(ALICE, "/log 3")
            log = await host.reply(ALICE, after=1)
            assert log.text.startswith("testhost: ledger entries ")
            assert len(log.text.splitlines()) == 4
            api.message(ALICE, "/help")
            assert "/restart AGENT" in (await host.reply(ALICE, after=2)).text
            await host.settled()
            assert host.chat.status()["handled"] == {"status": 1, "agents": 1, "log": 1, "help": 1}

    asyncio.run(scenario())
    assert kinds(tmp_path).count("chat_command") == 3  # help is not an action


def test_strangers_get_nothing_whatever_they_send(tmp_path: Path, api: BotApi) -> None:
    async def scenario() -> None:
        async with chat_host(tmp_path, api) as host:
            web = host.agent("web")["pid"]
            api.message(EVE, "/status")
            api.message(EVE, "/restart web")
            api.message(EVE, "/agents", chat=GROUP, chat_type="group")
            api.message(ALICE, "/status", chat=GROUP, chat_type="group")
            await host.reply(GROUP, what="Alice's answer in the group")
            await host.settled()
            assert api.to(EVE) == []
            assert len(api.to(GROUP)) == 1  # Alice's, not Eve's
            assert host.agent("web")["pid"] == web
            assert host.chat.status()["denied"] == 3

    asyncio.run(scenario())
    denied = [e for e in ledger_entries(tmp_path / "ledger.db") if e.kind == "chat_denied"]
    assert [(e.subject, e.data["what"]) for e in denied] == [(str(EVE), "/status")]


def test_restart_after_confirmation_once_and_a_replay_does_nothing(
    tmp_path: Path, api: BotApi
) -> None:
    async def scenario() -> None:
        async with chat_host(tmp_path, api) as host:
            old = host.agent("web")
            before, index = await confirmation(host)
            offer = api.to(ALICE)[index]
            assert "Restart web on testhost?" in offer.text
            assert f"Now: healthy, pid {old['pid']}, 0 restarts" in offer.text
            assert [b["text"] for b in offer.buttons] == ["Restart web", "Cancel"]
            query = api.press(ALICE, offer)
            assert await host.answer(query) == "Approved: restart web."
            result = await host.reply(ALICE, after=before + 1, what="the result")
            assert result.text.startswith("Restarted web: now ")
            assert result.reply_to == offer.message_id
            new = host.agent("web")
            assert new["pid"] != old["pid"]
            assert new["pid"] is not None
            await until(lambda: offer.buttons == [], what="the buttons to go")
            assert offer.current.endswith("Approved; working on it.")
            # The edit took the buttons away; a client that still shows them sends them again.
            again = api.press(ALICE, offer)
            assert "already answered" in await host.answer(again)
            await host.settled()
            assert host.agent("web")["pid"] == new["pid"]

    asyncio.run(scenario())
    chat = kinds(tmp_path)
    assert [k for k in chat if k.startswith("chat_") and k not in ("chat_start", "chat_stop")] == [
        "chat_command",
        "chat_confirm",
        "chat_approve",
        "chat_action",
        "chat_press_refused",
    ]
    entries = ledger_entries(tmp_path / "ledger.db")
    approve = next(i for i, e in enumerate(entries) if e.kind == "chat_approve")
    stop = next(i for i, e in enumerate(entries) if e.source == "watch" and e.kind == "stop")
    assert approve < stop  # the approval is on record before anything is done
    action = next(e for e in entries if e.kind == "chat_action")
    assert action.data["result"] == "done"


def test_a_group_member_pressing_someone_elses_button_does_nothing(
    tmp_path: Path, api: BotApi
) -> None:
    async def scenario() -> None:
        async with chat_host(tmp_path, api) as host:
            web = host.agent("web")["pid"]
            # In the group, a change is refused outright: no buttons there to press.
            api.message(ALICE, "/restart web", chat=GROUP, chat_type="supergroup")
            refusal = await host.reply(GROUP)
            assert "only in a private chat" in refusal.text
            assert refusal.buttons == []
            _, index = await confirmation(host)
            offer = api.to(ALICE)[index]
            # Bob (allowed) presses Alice's button where it was relayed to the group,
            # then in his own chat; Eve (a stranger) presses it too.
            bob_group = api.press(BOB, offer, chat=GROUP, chat_type="supergroup")
            bob_private = api.press(BOB, offer, chat=BOB, chat_type="private")
            eve = api.press(EVE, offer, chat=GROUP, chat_type="supergroup")
            assert "not yours" in await host.answer(bob_group)
            assert "not yours" in await host.answer(bob_private)
            await host.settled()
            assert api.answers[eve] is None  # a stranger gets nothing, not even an answer
            assert host.agent("web")["pid"] == web
            assert offer.buttons  # still open for Alice
            query = api.press(ALICE, offer)
            assert await host.answer(query) == "Approved: restart web."
            await until(lambda: host.agent("web")["pid"] not in (web, None), what="restart")

    asyncio.run(scenario())
    refused = [e for e in ledger_entries(tmp_path / "ledger.db") if e.kind == "chat_press_refused"]
    assert [(e.subject, e.data["reason"], e.data["owner"]) for e in refused] == [
        (str(BOB), "not yours", ALICE),
        (str(BOB), "not yours", ALICE),
    ]
    assert "chat_refused" in kinds(tmp_path)


def test_a_confirmation_expires_and_then_does_nothing(tmp_path: Path, api: BotApi) -> None:
    async def scenario() -> None:
        async with chat_host(tmp_path, api, confirm_timeout=1) as host:
            web = host.agent("web")["pid"]
            _, index = await confirmation(host)
            offer = api.to(ALICE)[index]
            await until(
                lambda: "Expired: nothing was done." in offer.current, what="the expiry edit"
            )
            assert offer.buttons == []
            query = api.press(ALICE, offer)
            assert "expired" in await host.answer(query)
            await host.settled()
            assert host.agent("web")["pid"] == web

    asyncio.run(scenario())
    assert "chat_expire" in kinds(tmp_path)
    assert "chat_approve" not in kinds(tmp_path)


def test_a_confirmation_is_bound_to_the_state_it_was_shown_for(tmp_path: Path, api: BotApi) -> None:
    async def scenario() -> None:
        async with chat_host(tmp_path, api) as host:
            before, index = await confirmation(host)
            offer = api.to(ALICE)[index]
            first = host.agent("web")["pid"]
            os.kill(first, signal.SIGKILL)  # watch restarts it: a new pid, one restart more
            await until(
                lambda: (
                    host.agent("web")["state"] == "healthy" and host.agent("web")["pid"] != first
                ),
                what="watch's own restart",
            )
            second = host.agent("web")["pid"]
            api.press(ALICE, offer)
            result = await host.reply(ALICE, after=before + 1, what="the refusal")
            assert result.text.startswith("Not done: web changed since you were asked (now healthy")
            await host.settled()
            assert host.agent("web")["pid"] == second
            assert host.agent("web")["restarts"] == 1  # watch's, not the chat's

    asyncio.run(scenario())
    action = next(e for e in ledger_entries(tmp_path / "ledger.db") if e.kind == "chat_action")
    assert action.data["result"] == "refused"


def test_restart_is_refused_where_it_is_not_enabled(tmp_path: Path, api: BotApi) -> None:
    async def scenario() -> None:
        async with chat_host(tmp_path, api, commands=["status"]) as host:
            api.message(ALICE, "/restart web")
            assert (await host.reply(ALICE)).text.startswith("/restart is not enabled on testhost")
            api.message(ALICE, "/shell rm -rf /")
            assert (await host.reply(ALICE, after=1)).text.startswith("There is no /shell.")

    asyncio.run(scenario())


def test_a_flood_of_updates(tmp_path: Path, api: BotApi) -> None:
    async def scenario() -> None:
        # No refill during the flood, however slow the machine: exactly the burst.
        carol = 333
        async with chat_host(tmp_path, api, refill=3600, allowed_users=[ALICE, BOB, carol]) as host:
            web = host.agent("web")["pid"]
            for n in range(150):
                api.message(ALICE, "/status")
                api.message(EVE, f"/restart web {n}")
                last = api.message(BOB, "/agents", chat=GROUP, chat_type="group")
            await host.settled()
            for chat in (ALICE, GROUP):  # a burst of 8, one notice, then silence
                texts = [s.text for s in api.to(chat)]
                assert len(texts) == 9
                assert sum(t.startswith("Too many commands at once") for t in texts) == 1
            assert api.to(EVE) == []
            assert api.flood_refusals == 0  # Telegram's pace was kept throughout
            await until(lambda: api.confirmed >= last, what="every update confirmed")
            assert host.chat.status()["updates"] == 450
            assert host.agent("web")["pid"] == web
            # Still answering: a person who did not flood (buckets are per person).
            api.message(carol, "/status")
            assert (await host.reply(carol)).text.startswith("testhost: all 2 agents healthy.")
            api.message(ALICE, "/status")  # and the flooders stay ignored
            await host.settled()
            assert len(api.to(ALICE)) == 9

    asyncio.run(scenario())
    denied = [e for e in ledger_entries(tmp_path / "ledger.db") if e.kind == "chat_denied"]
    assert len(denied) == 1  # one stranger, one record per ten minutes


def test_429_with_retry_after_on_a_reply(tmp_path: Path, api: BotApi) -> None:
    async def scenario() -> None:
        async with chat_host(tmp_path, api) as host:
            api.throttle_next("sendMessage", retry_after=2)
            api.message(ALICE, "/status")
            status = await host.reply(ALICE)
            assert status.text.startswith("testhost: all 2 agents healthy.")
            first, second = api.calls_of("sendMessage")[:2]
            assert first.status == 429
            assert second.status == 200
            # Sent again only once the 429 arrived and retry_after passed.
            assert second.at - first.at >= 2
            assert host.chat.status()["outbox"]["throttled"] == 1

    asyncio.run(scenario())


def test_429_with_retry_after_on_polling(tmp_path: Path, api: BotApi) -> None:
    async def scenario() -> None:
        async with chat_host(tmp_path, api) as host:
            api.throttle_next("getUpdates", retry_after=2)
            await until(
                lambda: any(c.status == 429 for c in api.calls_of("getUpdates")), what="the 429"
            )
            api.message(ALICE, "/status")
            await host.reply(ALICE)
            polls = api.calls_of("getUpdates")
            throttled = next(i for i, c in enumerate(polls) if c.status == 429)
            assert polls[throttled + 1].at - polls[throttled].at >= 2
            assert host.chat.status()["telegram"]["state"] == "polling"

    asyncio.run(scenario())


def test_long_output_goes_as_a_file(tmp_path: Path, api: BotApi) -> None:
    ledger = Ledger.open(tmp_path / "ledger.db")
    for n in range(120):
        ledger.append(source="test", kind="filler", subject=f"s{n}", data={"pad": "x" * 60})
    ledger.close()

    async def scenario() -> None:
        async with chat_host(tmp_path, api) as host:
            api.message(ALICE, "/log 100")
            reply = await host.reply(ALICE)
            assert reply.document is not None
            assert reply.filename == "log.txt"
            text = reply.document.decode()
            assert len(text.splitlines()) == 101
            assert reply.text.startswith("testhost: ledger entries ")
            assert "(too long for a message: all 101 lines are in log.txt)" in reply.text

    asyncio.run(scenario())


def test_a_refused_token_is_reported_and_the_daemon_stays_up(tmp_path: Path) -> None:
    from keel import service
    from keel.chat import config as chat_config
    from keel.chat.daemon import Chat

    from tests.integration.chat.support import write_chat_config

    async def scenario(server: BotApi) -> None:
        config = chat_config.load(write_chat_config(tmp_path, server.url))
        chat = Chat(config)
        async with service.running("chat", chat, config.common):
            await until(
                lambda: chat.status()["telegram"]["problem"] is not None, what="the problem"
            )
            problem = chat.status()["telegram"]["problem"]
            assert problem.startswith("getMe: Telegram 401: Unauthorized: the bot token in ")
            assert TOKEN not in problem
            assert chat.status()["telegram"]["state"] == "failing"

    with bot_api("654321:other-token") as server:
        asyncio.run(scenario(server))


def test_no_action_without_a_record_of_its_approval(tmp_path: Path, api: BotApi) -> None:
    unwritable = tmp_path / "not-a-ledger"
    unwritable.mkdir()  # a directory: the chat's recorder cannot open it

    async def scenario() -> None:
        async with chat_host(tmp_path, api, ledger=str(unwritable)) as host:
            web = host.agent("web")["pid"]
            before, index = await confirmation(host)
            api.press(ALICE, api.to(ALICE)[index])
            result = await host.reply(ALICE, after=before + 1, what="the refusal")
            assert result.text.startswith("Not done: the ledger cannot record your approval")
            await host.settled()
            assert host.agent("web")["pid"] == web
            assert host.chat.status()["confirmations"]["approved"] == 1

    asyncio.run(scenario())
    assert "stop" not in kinds(tmp_path, source="watch")
