"""Benchmark of keel chat: what its decisions cost, and how long a reply takes.

    .venv/bin/python bench/chat/run.py [--updates 20000] [--replies 20]

1. decisions: a mix of updates (allowed commands, strangers, button presses
   with stale or foreign data) parsed (``keel.telegram.parse_update``) and
   decided by the pure core, per second; the baseline is ``json.loads`` of
   the same updates, the least any bot does with them.
2. reply latency: from an update queued at a Bot API server on loopback (the
   tests' stand-in, real HTTP) to the reply arriving there, through the real
   daemon and a real ``keel watch`` (process backend) answering ``/status``;
   one person after another, so Telegram's per-chat pace does not enter.
   The baseline is the two HTTP exchanges the path cannot avoid
   (``getUpdates`` and ``sendMessage`` on the same server, made with the same
   client), measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "python"))

from keel import service, telegram  # noqa: E402
from keel.chat import config as chat_config  # noqa: E402
from keel.chat.core import READ_ONLY, ChatCore, Policy  # noqa: E402
from keel.chat.daemon import Chat  # noqa: E402
from keel.testing import FakeClock  # noqa: E402
from keel.watch import http_client, httpwire  # noqa: E402
from tests.integration.chat.botapi import bot_api  # noqa: E402
from tests.integration.chat.support import TOKEN, sleeper, write_chat_config  # noqa: E402
from tests.integration.watch_support import running_watch, until, write_config  # noqa: E402

ALLOWED = list(range(1000, 1100))


def raw_updates(count: int, rng: random.Random) -> list[bytes]:
    updates: list[bytes] = []
    for n in range(count):
        kind = n % 4
        user = rng.choice(ALLOWED) if kind < 2 else 900_000 + n
        if kind == 3:
            update: dict[str, Any] = {
                "update_id": n,
                "callback_query": {
                    "id": str(n),
                    "from": {"id": rng.choice(ALLOWED), "is_bot": False, "first_name": "a"},
                    "message": {"message_id": 1, "chat": {"id": 5, "type": "private"}, "date": 0},
                    "data": "ok:" + "A" * 22,
                },
            }
        else:
            update = {
                "update_id": n,
                "message": {
                    "message_id": n,
                    "from": {"id": user, "is_bot": False, "first_name": "a"},
                    "chat": {"id": user, "type": "private"},
                    "date": 1_800_000_000,
                    "text": "/status" if kind == 0 else "/restart web",
                },
            }
        updates.append(json.dumps(update).encode())
    return updates


def decisions(count: int) -> tuple[float, float]:
    """Updates per second: (json.loads only, parse + decide)."""
    raws = raw_updates(count, random.Random(1))
    start = time.perf_counter()
    for raw in raws:
        json.loads(raw)
    baseline = count / (time.perf_counter() - start)
    clock = FakeClock()
    core = ChatCore(
        Policy(frozenset(ALLOWED), frozenset({*READ_ONLY, "restart"}), "bench"),
        clock=clock,
        wall=FakeClock(1_800_000_000),
        rng=random.Random(2),
    )
    start = time.perf_counter()
    for raw in raws:
        update = telegram.parse_update(json.loads(raw))
        if update is not None:
            core.handle(update)
        clock.advance(0.01)
    keel = count / (time.perf_counter() - start)
    return baseline, keel


async def latency(replies: int, tmp: Path) -> tuple[list[float], list[float]]:
    """Seconds per reply: (two bare HTTP exchanges, the whole path)."""
    with bot_api(TOKEN) as api:
        url = httpwire.parse_url(api.url)
        for user in ALLOWED[:replies]:
            api.chats[user] = "private"
        bare: list[float] = []
        for user in ALLOWED[:replies]:
            start = time.perf_counter()
            for method, params in (
                ("getUpdates", {"offset": 0, "timeout": 0}),
                ("sendMessage", {"chat_id": user, "text": "x"}),
            ):
                headers, body = telegram.json_body(params)
                await http_client.request(
                    "POST",
                    telegram.method_url(url, TOKEN, method),
                    headers=headers,
                    body=body,
                    timeout=10,
                )
            bare.append(time.perf_counter() - start)
        with api.cond:
            api.sent.clear()
        watch_config = write_config(tmp, {"web": sleeper()})
        config = chat_config.load(
            write_chat_config(tmp, api.url, allowed_users=ALLOWED, poll_timeout=30)
        )
        whole: list[float] = []
        async with running_watch(watch_config) as watch:
            await until(lambda: watch.status()["agents"]["web"]["state"] == "healthy")
            chat = Chat(config)
            async with service.running("chat", chat, config.common):
                await until(lambda: chat.bot is not None)
                await asyncio.sleep(0.2)  # the first long poll is waiting
                for user in ALLOWED[:replies]:
                    queued = time.time()
                    api.message(user, "/status")
                    await until(lambda user=user: bool(api.to(user)), timeout=30)  # type: ignore[misc]
                    whole.append(api.to(user)[0].at - queued)  # both the server's clock
        return bare, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20000)
    parser.add_argument("--replies", type=int, default=20)
    args = parser.parse_args()
    baseline, keel = decisions(args.updates)
    print(f"decisions ({args.updates} updates: commands, strangers, presses)")
    print(f"  baseline json.loads only      {baseline:12,.0f} updates/s")
    print(f"  keel parse + decide           {keel:12,.0f} updates/s")
    print(f"  ratio (keel / baseline)       {keel / baseline:12.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        bare, whole = asyncio.run(latency(min(args.replies, len(ALLOWED)), Path(tmp)))
    print(f"reply latency ({len(whole)} /status, one person after another)")
    print(f"  baseline 2 HTTP exchanges     {statistics.median(bare) * 1000:9.2f} ms median")
    print(f"  keel update -> reply          {statistics.median(whole) * 1000:9.2f} ms median")
    print(
        f"  ratio (keel / baseline)       {statistics.median(whole) / statistics.median(bare):9.2f}"
    )


if __name__ == "__main__":
    main()
