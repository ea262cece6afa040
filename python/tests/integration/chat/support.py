"""keel chat's test host: a real watch (process backend), the chat daemon, the Bot API stand-in."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel import service
from keel.chat import config as chat_config
from keel.chat.daemon import Chat
from keel.watch.daemon import Watch

from tests.integration.chat.botapi import BotApi, Sent
from tests.integration.watch_support import running_watch, until, write_config

ALICE, BOB, EVE = 111, 222, 666
GROUP = -100777
TOKEN = "123456:TEST-token_abc"


def sleeper() -> dict[str, Any]:
    """An agent that runs until stopped (no probes: healthy while it runs)."""
    return {"command": [sys.executable, "-c", "import time; time.sleep(3600)"], "stop_timeout": 5}


def write_chat_config(tmp: Path, api: str, **top: Any) -> Path:
    token = tmp / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    data: dict[str, Any] = {
        "token_file": str(token),
        "allowed_users": [ALICE, BOB],
        "commands": ["status", "agents", "log", "restart"],
        "api": api,
        "watch_socket": str(tmp / "watch.sock"),
        "socket": str(tmp / "chat.sock"),
        "ledger": str(tmp / "ledger.db"),
        "host": "testhost",
        "poll_timeout": 5,
    }
    data.update(top)
    path = tmp / "chat.json"
    path.write_text(json.dumps(data))
    return path


@dataclass
class Host:
    watch: Watch
    chat: Chat
    api: BotApi

    def agent(self, name: str) -> dict[str, Any]:
        agent: dict[str, Any] = self.watch.status()["agents"][name]
        return agent

    async def reply(self, chat: int, *, after: int = 0, what: str = "a reply") -> Sent:
        """The first message to ``chat`` beyond the first ``after`` ones."""
        await until(lambda: len(self.api.to(chat)) > after, what=what)
        return self.api.to(chat)[after]

    async def settled(self) -> None:
        """Every update handled, every command finished, every reply sent."""
        await until(
            lambda: (
                self.api.pending_updates() == 0
                and not self.chat._jobs
                and len(self.chat.outbox) == 0
                and self.chat.sending == 0  # taken from the outbox, its call not returned yet
            ),
            what="the bot to settle",
        )

    async def answer(self, query_id: str) -> str:
        await until(lambda: self.api.answers.get(query_id) is not None, what="the button's answer")
        return str(self.api.answers[query_id])


@contextlib.asynccontextmanager
async def chat_host(
    tmp_path: Path,
    api: BotApi,
    *,
    agents: dict[str, Any] | None = None,
    refill: float | None = None,
    **chat: Any,
) -> AsyncIterator[Host]:
    """A real watch and the chat daemon; ``refill`` slows each person's pace (not config)."""
    watch_config = write_config(tmp_path, agents or {"web": sleeper(), "db": sleeper()})
    config = chat_config.load(write_chat_config(tmp_path, api.url, **chat))
    if refill is not None:
        config = dataclasses.replace(
            config, policy=dataclasses.replace(config.policy, refill=refill)
        )
    async with running_watch(watch_config) as watch:
        await until(
            lambda: all(a["state"] == "healthy" for a in watch.status()["agents"].values()),
            what="every agent healthy",
        )
        daemon = Chat(config)
        async with service.running("chat", daemon, config.common):
            await until(lambda: daemon.bot is not None, what="the bot to know its name")
            yield Host(watch, daemon, api)
