"""``/switch TARGET`` from the chat, against the Bot API stand-in and safeswitch's generation lab.

The chat runs the request as a child (``switch_runner: process``): the same
``keel switch request INSTANCE`` that ``keel-switch@INSTANCE.service`` runs
as root, with the same checks, result file and ledger entries. What the
process runner does not show (polkit letting keel-chat start the unit, and
nothing else) is the system test's (tests/system/test_chat_switch_in_container.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keel.watch.children import pidfd_supported

from tests.integration.chat.botapi import BotApi, bot_api
from tests.integration.chat.support import ALICE, GROUP, TOKEN, Host, chat_host
from tests.integration.safeswitch.lab import KEEL, Lab
from tests.integration.watch_support import ledger_entries

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not pidfd_supported(),
    reason="watch's process backend needs Linux 5.3+ (pidfd_open)",
)


@pytest.fixture
def api() -> Iterator[BotApi]:
    with bot_api(TOKEN) as server:
        yield server


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    """old runs, with a specialisation `next`; `broken` breaks the health check; `other`."""
    lab = Lab(tmp_path / "lab")
    old = lab.system("old")
    lab.system("new")
    lab.system("broken", "break")
    other = lab.system("other")
    for system in (old, other):
        (system / "specialisation").mkdir()
        (system / "specialisation" / "next").symlink_to(lab.root / "systems" / "new")
    lab.boot(old)
    lab.config(
        ledger=str(tmp_path / "ledger.db"),
        state_dir=str(lab.root / "state"),
        targets={
            "next": {"specialisation": "next"},
            "broken": {"system": str(lab.root / "systems" / "broken")},
            "back": {"system": str(old)},
            "gone": {"system": str(lab.root / "systems" / "gone")},
        },
    )
    return lab


def switch_chat(lab: Lab) -> dict[str, Any]:
    return {
        "commands": ["status", "switch"],
        "safeswitch_config": str(lab.config_path),
        "switch_runner": "process",
        "keel": KEEL,
    }


async def offer(host: Host, target: str) -> tuple[int, int]:
    before = len(host.api.to(ALICE))
    host.api.message(ALICE, f"/switch {target}")
    sent = await host.reply(ALICE, after=before, what=f"the confirmation of {target}")
    assert sent.buttons, sent.text
    return before, before


async def approve(host: Host, target: str) -> str:
    """Alice confirms a switch to ``target``; the bot's last word on it."""
    before, index = await offer(host, target)
    query = host.api.press(ALICE, host.api.to(ALICE)[index])
    assert await host.answer(query) == f"Approved: switch {target}."
    result = await host.reply(ALICE, after=before + 1, what=f"the outcome of {target}")
    return result.text


def test_switch_to_a_declared_target_from_the_chat(tmp_path: Path, api: BotApi, lab: Lab) -> None:
    old, new = lab.running(), str(lab.root / "systems" / "new")

    async def scenario() -> None:
        async with chat_host(tmp_path, api, **switch_chat(lab)) as host:
            api.message(ALICE, "/switch")
            listing = (await host.reply(ALICE, what="the targets")).text
            assert listing.splitlines()[0] == f"testhost runs {old}."
            assert f"next: specialisation next -> {new}" in listing
            assert "back: system " in listing
            # In a group: no switch, and no offer.
            api.message(ALICE, "/switch next", chat=GROUP, chat_type="supergroup")
            refused = await host.reply(GROUP, what="the refusal in the group")
            assert "only in a private chat" in refused.text
            before, index = await offer(host, "next")
            text = api.to(ALICE)[index].text
            assert text.startswith("Switch to next on testhost?\nNow: running old; next ")
            assert f"(specialisation next) is {new}" in text
            assert "if the running system or next changes before you do" in text
            assert [b["text"] for b in api.to(ALICE)[index].buttons] == [
                "Switch to next",
                "Cancel",
            ]
            query = api.press(ALICE, api.to(ALICE)[index])
            assert await host.answer(query) == "Approved: switch next."
            result = await host.reply(ALICE, after=before + 1, what="the outcome")
            assert result.text.startswith("Switched testhost to next: committed (switch ")
            assert f"{new} runs and is the boot default, generation system-2-link." in result.text
            await host.settled()

    asyncio.run(scenario())
    assert lab.running() == new
    assert lab.boot_default() == new
    entries = ledger_entries(tmp_path / "ledger.db")
    order = [
        (e.source, e.kind)
        for e in entries
        if e.kind in ("chat_approve", "request", "started", "committed", "chat_action")
    ]
    assert order == [
        ("chat", "chat_approve"),
        ("safeswitch", "request"),
        ("safeswitch", "started"),
        ("safeswitch", "committed"),
        ("chat", "chat_action"),
    ]
    request = next(e for e in entries if e.kind == "request")
    assert request.data == {"target": "next", "unit": request.data["unit"], "old": old, "new": new}
    assert str(request.data["unit"]).startswith("keel-switch@next:")
    action = next(e for e in entries if e.kind == "chat_action")
    assert action.data["result"] == "done"
    assert action.data["request"] == request.subject
    assert action.data["outcome"] == "committed"
    started = next(e for e in entries if e.kind == "started")
    assert action.data["switch"] == started.subject


def test_a_switch_that_breaks_the_host_is_rolled_back_and_said_so(
    tmp_path: Path, api: BotApi, lab: Lab
) -> None:
    old = lab.running()

    async def scenario() -> None:
        async with chat_host(tmp_path, api, **switch_chat(lab)) as host:
            text = await approve(host, "broken")
            assert text.startswith("Switch of testhost to broken ROLLED BACK (switch ")
            assert "check health failed" in text
            assert text.endswith(f"{old} runs again.")
            await host.settled()

    asyncio.run(scenario())
    assert lab.running() == old
    action = next(e for e in ledger_entries(tmp_path / "ledger.db") if e.kind == "chat_action")
    assert (action.data["result"], action.data["outcome"]) == ("failed", "rolled-back")


def test_a_confirmation_is_bound_to_the_running_system_and_the_target(
    tmp_path: Path, api: BotApi, lab: Lab
) -> None:
    old = lab.running()
    other = lab.root / "systems" / "other"

    async def scenario() -> None:
        async with chat_host(tmp_path, api, **switch_chat(lab)) as host:
            before, index = await offer(host, "next")
            # Someone switched the host meanwhile: the confirmation no longer holds.
            os.symlink(other, lab.root / "current.tmp")
            os.replace(lab.root / "current.tmp", lab.current)
            api.press(ALICE, api.to(ALICE)[index])
            result = await host.reply(ALICE, after=before + 1, what="the refusal")
            assert result.text.startswith("Not done: running other; next ")
            assert "which is not what you confirmed. Send /switch next again" in result.text
            # Unknown and unavailable targets are not offered at all.
            count = len(api.to(ALICE))
            api.message(ALICE, "/switch nope")
            unknown = await host.reply(ALICE, after=count, what="the unknown target")
            assert unknown.text == (
                "Cannot switch to nope: no target named nope is declared here "
                "(targets: back, broken, gone, next)"
            )
            api.message(ALICE, "/switch gone")
            missing = await host.reply(ALICE, after=count + 1, what="the unavailable target")
            assert missing.text == (
                f"Cannot switch to gone: gone (system {lab.root}/systems/gone) is not "
                f"available: {lab.root}/systems/gone does not exist"
            )
            api.message(ALICE, "/switch ../etc")
            usage = await host.reply(ALICE, after=count + 2, what="the usage")
            assert usage.text.startswith("Usage: /switch [TARGET]: one target's name")
            await host.settled()

    asyncio.run(scenario())
    assert lab.running() == str(other)
    assert "test" not in " ".join(lab.calls())  # nothing was activated
    kinds = [e.kind for e in ledger_entries(tmp_path / "ledger.db") if e.source == "safeswitch"]
    assert kinds == []  # refused by the chat before root was asked
    assert old != str(other)
