"""``keel chat serve`` and ``keel watch serve`` as an operator runs them: a restart from a phone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from keel.watch.children import pidfd_supported

from tests.integration.chat.botapi import BotApi, bot_api
from tests.integration.chat.support import ALICE, TOKEN, sleeper, write_chat_config
from tests.integration.test_watch_cli import KEEL, keel, wait_for
from tests.integration.watch_support import ledger_entries, write_config


def json_of(*args: str) -> dict[str, Any]:
    result = keel(*args, "--json")
    assert result.returncode == 0, result.stderr
    value: dict[str, Any] = json.loads(result.stdout)
    return value


@pytest.fixture
def api() -> Iterator[BotApi]:
    with bot_api(TOKEN) as server:
        yield server


def test_check_config(tmp_path: Path) -> None:
    path = write_chat_config(tmp_path, "http://127.0.0.1:1")
    good = keel("chat", "check-config", "--config", str(path))
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == (
        f"{path}: valid (2 allowed users; commands: agents, log, restart, status)"
    )
    listed = json_of("chat", "check-config", "--config", str(path))
    assert listed["allowed_users"] == [111, 222]
    (tmp_path / "token").write_text("ceci n'est pas un token\n")
    bad = keel("chat", "check-config", "--config", str(path))
    assert bad.returncode == 2
    assert bad.stderr.startswith(f"keel: error: {path}: token_file: ")
    assert "ceci" not in bad.stderr
    serve = keel("chat", "serve", "--config", str(path))
    assert serve.returncode == 2
    assert "Traceback" not in serve.stderr
    assert not (tmp_path / "chat.sock").exists()  # it never half-started


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not pidfd_supported(),
    reason="watch's process backend needs Linux 5.3+ (pidfd_open)",
)
def test_a_restart_from_the_chat_restarts_the_agent_under_keel_watch(
    tmp_path: Path, api: BotApi
) -> None:
    watch_config = write_config(tmp_path, {"web": sleeper(), "db": sleeper()})
    chat_config = write_chat_config(tmp_path, api.url)
    logs = (tmp_path / "watch.log").open("ab"), (tmp_path / "chat.log").open("ab")
    watch = subprocess.Popen(
        [*KEEL, "watch", "serve", "--config", str(watch_config)],
        stdout=logs[0],
        stderr=logs[0],
        start_new_session=True,
    )
    chat = subprocess.Popen(
        [*KEEL, "chat", "serve", "--config", str(chat_config)],
        stdout=logs[1],
        stderr=logs[1],
        start_new_session=True,
    )
    watch_socket, chat_socket = str(tmp_path / "watch.sock"), str(tmp_path / "chat.sock")
    try:

        def web() -> dict[str, Any]:
            agent: dict[str, Any] = json_of("status", "--socket", watch_socket)["agents"]["web"]
            return agent

        wait_for(lambda: keel("status", "--socket", watch_socket).returncode == 0, "watch up")
        wait_for(lambda: web()["state"] == "healthy", "web healthy")
        wait_for(lambda: keel("chat", "status", "--socket", chat_socket).returncode == 0, "chat up")
        wait_for(
            lambda: (
                json_of("chat", "status", "--socket", chat_socket)["telegram"]["bot"]
                == "keel_test_bot"
            ),
            "the bot to know its name",
        )
        before = web()
        api.message(ALICE, "/status")
        wait_for(lambda: len(api.to(ALICE)) == 1, "the status")
        api.message(ALICE, "/restart web")
        wait_for(lambda: len(api.to(ALICE)) == 2, "the confirmation")
        offer = api.to(ALICE)[1]
        assert offer.buttons
        waiting = json_of("chat", "status", "--socket", chat_socket)["confirmations"]["pending"]
        assert [(p["action"], p["target"], p["user"]) for p in waiting] == [
            ("restart", "web", ALICE)
        ]
        human = keel("chat", "status", "--socket", chat_socket).stdout
        assert "waiting: c1 restart web for user 111" in human
        api.press(ALICE, offer)
        wait_for(lambda: len(api.to(ALICE)) == 3, "the result")
        result = api.to(ALICE)[2]
        assert result.text.startswith("Restarted web: now "), result.text
        after = web()
        assert after["pid"] not in (None, before["pid"])
        assert json_of("chat", "status", "--socket", chat_socket)["confirmations"]["approved"] == 1
        chat.send_signal(signal.SIGTERM)
        assert chat.wait(timeout=30) == 0
    finally:
        for process in (chat, watch):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
        for log in logs:
            log.close()
    chat_log = (tmp_path / "chat.log").read_text()
    assert "Traceback" not in chat_log
    assert TOKEN not in chat_log
    entries = ledger_entries(tmp_path / "ledger.db")
    sequence = [
        (e.source, e.kind)
        for e in entries
        if (e.source, e.kind)
        in {
            ("chat", "chat_approve"),
            ("watch", "stop"),
            ("watch", "start"),
            ("chat", "chat_action"),
        }
    ]
    # The approval was on disk before watch was asked to stop (the other records are
    # written by two processes' batching recorders: their order is not promised).
    assert sequence[:2] == [("chat", "chat_approve"), ("watch", "stop")]
    assert sorted(sequence[2:]) == [("chat", "chat_action"), ("watch", "start")]
