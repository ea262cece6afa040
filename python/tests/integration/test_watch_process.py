"""watch with the process backend: real processes, real probes, real alert routes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from keel.watch.children import pidfd_supported
from keel.watch.daemon import Watch

from tests.integration.watch_support import (
    agent_entry,
    cgroups_available,
    cleaned_up,
    escaping_agent,
    free_port,
    http_stub,
    ledger_entries,
    running_watch,
    tagged,
    telegram_answer,
    until,
    write_config,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not pidfd_supported(),
    reason="the process backend needs Linux 5.3+ (pidfd_open)",
)


def get(url: str) -> None:
    with urllib.request.urlopen(url, timeout=2) as response:
        response.read()


def status(watch: Watch, name: str) -> dict[str, Any]:
    agent: dict[str, Any] = watch.status()["agents"][name]
    return agent


async def healthy(watch: Watch, name: str, what: str = "") -> dict[str, Any]:
    await until(lambda: status(watch, name)["state"] == "healthy", what=what or f"{name} healthy")
    return status(watch, name)


def test_crash_is_restarted_at_once_and_recorded(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, {"web": agent_entry(port)})

    async def scenario() -> None:
        async with running_watch(config) as watch:
            first = await healthy(watch, "web")
            os.kill(first["pid"], signal.SIGKILL)
            await until(
                lambda: (
                    status(watch, "web")["restarts"] == 1
                    and status(watch, "web")["state"] == "healthy"
                ),
                what="restart",
            )
            second = status(watch, "web")
            assert second["pid"] != first["pid"]
            assert second["last_error"] == "killed by signal 9 (SIGKILL)"
            assert second["failures_in_a_row"] == 1
            assert 'restart_latency_seconds_count{backoff="no"} 1' in watch.render_metrics()

    asyncio.run(scenario())
    kinds = [(e.kind, e.subject) for e in ledger_entries(tmp_path / "ledger.db")]
    assert ("failure", "web") in kinds
    assert ("restart", "web") in kinds
    restart = next(e for e in ledger_entries(tmp_path / "ledger.db") if e.kind == "restart")
    assert restart.data["cause"] == "killed by signal 9 (SIGKILL)"
    assert restart.data["waited"] == 0


def test_exit_codes_are_reported(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, {"web": agent_entry(port)})

    async def scenario() -> None:
        async with running_watch(config) as watch:
            await healthy(watch, "web")
            await asyncio.to_thread(_crash, f"http://127.0.0.1:{port}/crash?code=42")
            await until(lambda: status(watch, "web")["restarts"] == 1, what="restart")
            assert status(watch, "web")["last_error"] == "exited with status 42"

    asyncio.run(scenario())


def _crash(url: str) -> None:
    with contextlib.suppress(OSError):  # the agent exits before it answers
        get(url)


def test_a_hung_agent_is_stopped_and_restarted(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, {"web": agent_entry(port)})

    async def scenario() -> None:
        async with running_watch(config) as watch:
            first = await healthy(watch, "web")
            await asyncio.to_thread(get, f"http://127.0.0.1:{port}/hang")
            await until(lambda: status(watch, "web")["restarts"] == 1, what="hang restart")
            await healthy(watch, "web", "healthy again after the hang")
            after = status(watch, "web")
            assert after["pid"] != first["pid"]
            assert after["last_error"].startswith("probe http failed 2 times in a row: timeout")
            failures = re.search(
                r'keel_watch_probe_failures_total\{agent="web",probe="http"\} (\d+)',
                watch.render_metrics(),
            )
            assert failures is not None
            assert int(failures.group(1)) >= 2  # the two timeouts, and refusals while starting

    asyncio.run(scenario())
    probes = [e.data for e in ledger_entries(tmp_path / "ledger.db") if e.kind == "probe"]
    assert {"probe": "http", "state": "failing", "detail": "timeout after 0.4s"} in probes


def test_a_stopped_process_counts_as_hung(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, {"web": agent_entry(port)})

    async def scenario() -> None:
        async with running_watch(config) as watch:
            first = await healthy(watch, "web")
            os.kill(first["pid"], signal.SIGSTOP)
            await until(lambda: status(watch, "web")["restarts"] == 1, what="restart")
            await healthy(watch, "web")

    asyncio.run(scenario())


def test_a_slow_start_within_grace_is_not_a_failure(tmp_path: Path) -> None:
    port = free_port()
    entry = agent_entry(port, "--start-delay", "1.5")
    entry["probes"][0]["grace"] = 5
    config = write_config(tmp_path, {"slow": entry})

    async def scenario() -> None:
        async with running_watch(config) as watch:
            await until(lambda: status(watch, "slow")["last_probe"] is not None, what="a probe")
            assert status(watch, "slow")["state"] == "starting"
            await healthy(watch, "slow")
            assert status(watch, "slow")["restarts"] == 0
            assert status(watch, "slow")["last_error"] is None

    asyncio.run(scenario())


def test_a_start_too_slow_for_its_grace_is_restarted(tmp_path: Path) -> None:
    port = free_port()
    entry = agent_entry(port, "--start-delay", "30")
    entry["probes"][0]["grace"] = 0.5
    config = write_config(tmp_path, {"slow": entry})

    async def scenario() -> None:
        async with running_watch(config) as watch:
            await until(lambda: status(watch, "slow")["restarts"] >= 1, what="restart")
            assert "connection refused" in status(watch, "slow")["last_error"]

    asyncio.run(scenario())


def test_a_crash_loop_backs_off_and_keeps_trying(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "loop": {
                "command": ["sh", "-c", "exit 7"],
                "restart": {"backoff_initial": 0.2, "backoff_max": 0.8, "stable_after": 60},
            }
        },
    )

    async def scenario() -> None:
        async with running_watch(config) as watch:
            await until(lambda: status(watch, "loop")["restarts"] >= 6, what="six restarts")
            assert status(watch, "loop")["failures_in_a_row"] >= 6

    asyncio.run(scenario())
    restarts = [e.data for e in ledger_entries(tmp_path / "ledger.db") if e.kind == "restart"]
    waited = [r["waited"] for r in restarts[:6]]
    assert waited[0] == 0  # the first restart is immediate...
    assert all(w > 0 for w in waited[1:])  # ...the rest back off, up to the cap:
    decisions = [
        e.data["decision"] for e in ledger_entries(tmp_path / "ledger.db") if e.kind == "failure"
    ]
    assert decisions[:5] == [
        "restart",
        "back off 0.2s",
        "back off 0.4s",
        "back off 0.8s",
        "back off 0.8s",
    ]


def test_a_command_that_cannot_run_is_a_failure_with_a_reason(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "ghost": {
                "command": [str(tmp_path / "no-such-program")],
                "restart": {"backoff_initial": 5},
            }
        },
    )

    async def scenario() -> None:
        async with running_watch(config) as watch:
            await until(lambda: status(watch, "ghost")["state"] == "backoff", what="backoff")
            error = status(watch, "ghost")["last_error"]
            assert error.startswith("failed to start: ")
            assert "No such file or directory" in error

    asyncio.run(scenario())


def test_flapping_agent_alerts_once_per_incident_on_a_webhook(tmp_path: Path) -> None:
    port = free_port()
    entry = agent_entry(port)
    entry["restart"] = {"stable_after": 0.5}
    entry["alerts"] = {
        "routes": ["hook"],
        "resolve_after": 0.5,
        "flap_threshold": 3,
        "flap_window": 600,
    }

    with http_stub(lambda server, path, body: (200, {"ok": True})) as hook:
        config = write_config(
            tmp_path,
            {"web": entry},
            alerts={"hook": {"type": "webhook", "url": hook.url + "/alert"}},
        )

        async def scenario() -> None:
            async with running_watch(config) as watch:
                for n in range(1, 5):
                    before = await healthy(watch, "web")
                    os.kill(before["pid"], signal.SIGKILL)

                    def restarted(n: int = n) -> bool:
                        return bool(status(watch, "web")["restarts"] == n)

                    await until(restarted, what="restart")
                    await until(lambda: status(watch, "web")["incident"] is None, what="resolve")
                await watch.router.drain(10)

        asyncio.run(scenario())
    kinds = [body["kind"] for _, _, body in hook.requests]
    # Two incidents alert open and resolve; the third starts flapping: one alert, then quiet.
    assert kinds == ["open", "resolve", "open", "resolve", "flapping"]
    body = hook.requests[0][2]
    assert body["agent"] == "web"
    assert body["host"] == "testhost"
    assert body["source"] == "keel-watch"
    assert "killed by signal 9" in body["text"]


def test_dead_and_throttling_alert_routes_never_delay_supervision(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    token = "123456:ABC-secret-token_xyz"
    (tmp_path / "token").write_text(token + "\n")
    port = free_port()
    dead_port = free_port()  # nothing listens there
    entry = agent_entry(port)
    entry["restart"] = {"stable_after": 0.5}
    entry["alerts"] = {"routes": ["dead", "tg"], "resolve_after": 0.5}
    with http_stub(telegram_answer(throttle_first=1, retry_after=2)) as telegram:
        config = write_config(
            tmp_path,
            {"web": entry},
            alerts={
                "dead": {
                    "type": "webhook",
                    "url": f"http://127.0.0.1:{dead_port}/x",
                    "attempts": 3,
                    "retry_initial": 0.2,
                },
                "tg": {
                    "type": "telegram",
                    "token_file": str(tmp_path / "token"),
                    "chat_id": -100123,
                    "api": telegram.url,
                },
            },
        )

        async def scenario() -> None:
            async with running_watch(config) as watch:
                first = await healthy(watch, "web")
                os.kill(first["pid"], signal.SIGKILL)
                # The restart happens while both routes are still failing or waiting.
                await until(lambda: status(watch, "web")["restarts"] == 1, what="restart")
                assert watch.router.sent == {"dead": 0, "tg": 0}
                assert len(telegram.requests) <= 1
                await until(lambda: watch.router.sent["tg"] == 2, timeout=60, what="open+resolve")
                await until(lambda: watch.router.dropped["dead"] == 2, timeout=60, what="drops")
                text = json.dumps(watch.status())
                assert token not in text

        asyncio.run(scenario())
    # 429 first, honoured: the second attempt came at least retry_after (2 s) later.
    (t_first, path, body), (t_second, _, _) = telegram.requests[:2]
    assert t_second - t_first >= 2
    assert path == f"/bot{token}/sendMessage"
    assert body["chat_id"] == "-100123"
    assert body["text"].startswith("[testhost] web failed: killed by signal 9")
    entries = ledger_entries(tmp_path / "ledger.db")
    alerts = [e.data for e in entries if e.kind == "alert"]
    assert any(
        a["route"] == "tg"
        and a["alert"] == "open"
        and a["outcome"] == "sent"
        and a["attempts"] == 2
        for a in alerts
    )
    dropped = [a for a in alerts if a["route"] == "dead"]
    assert dropped
    assert all(a["outcome"] == "dropped" for a in dropped)
    assert "gave up after 3 attempts" in dropped[0]["reason"]
    # The token appears nowhere but in the request path the API needs.
    assert token not in caplog.text
    assert not any(token in json.dumps(e.data) for e in entries)


def test_one_hundred_agents_at_once(tmp_path: Path) -> None:
    agents = {f"a{i:03d}": {"command": ["sleep", "600"], "stop_timeout": 1} for i in range(100)}
    config = write_config(tmp_path, agents)

    async def scenario() -> None:
        async with running_watch(config) as watch:
            await until(
                lambda: all(a["state"] == "healthy" for a in watch.status()["agents"].values()),
                what="100 agents running",
            )
            pids = {name: a["pid"] for name, a in watch.status()["agents"].items()}
            for pid in pids.values():
                os.kill(pid, signal.SIGKILL)
            await until(
                lambda: all(
                    a["restarts"] == 1 and a["state"] == "healthy"
                    for a in watch.status()["agents"].values()
                ),
                what="100 restarts",
            )
            for name, agent in watch.status()["agents"].items():
                assert agent["pid"] != pids[name]
                assert agent["failures_in_a_row"] == 1

    asyncio.run(scenario())
    # Stopping watch stopped its agents (the process backend is their only supervisor).
    assert json.loads((tmp_path / "processes.json").read_text()) == {"agents": {}}


def test_operator_stop_and_start_over_the_control_socket(tmp_path: Path) -> None:
    from keel.api import acall

    port = free_port()
    config = write_config(tmp_path, {"web": agent_entry(port)})
    sock = tmp_path / "watch.sock"

    async def scenario() -> None:
        async with running_watch(config) as watch:
            first = await healthy(watch, "web")
            result = await acall(sock, "stop", {"agent": "web"})
            assert result == {"agent": "web", "state": "stopped"}
            await until(lambda: status(watch, "web")["pid"] is None, what="stopped")
            with pytest.raises(OSError):
                os.kill(first["pid"], 0)
            assert status(watch, "web")["restarts"] == 0
            await acall(sock, "start", {"agent": "web"})
            await healthy(watch, "web")
            with pytest.raises(Exception, match="no agent named 'nope'"):
                await acall(sock, "stop", {"agent": "nope"})

    asyncio.run(scenario())


# --- everything an agent starts goes with it ----------------------------------------------


def test_stopping_or_crashing_an_agent_ends_what_left_its_process_group(tmp_path: Path) -> None:
    from keel.api import acall
    from keel.watch.process_backend import ProcessBackend

    reason = cgroups_available()
    if reason is not None:
        pytest.skip(f"no cgroup for agents here: {reason}")
    sock = tmp_path / "watch.sock"

    async def scenario(marker: int) -> None:
        config = write_config(tmp_path, {"dbl": escaping_agent(marker)})
        async with running_watch(config) as watch:
            backend = watch.backend
            assert isinstance(backend, ProcessBackend)
            assert backend.cgroups is not None
            tree = backend.cgroups.path
            await until(lambda: len(tagged(marker)) == 4, what="the agent and its three escapees")
            members = (tree / "dbl" / "cgroup.procs").read_text().split()
            assert sorted(tagged(marker)) == sorted(int(pid) for pid in members)

            await acall(sock, "stop", {"agent": "dbl"})
            await until(lambda: not tagged(marker), what="every process of the agent gone")
            assert status(watch, "dbl")["state"] == "stopped"

            await acall(sock, "start", {"agent": "dbl"})
            await until(lambda: len(tagged(marker)) == 4, what="four processes again")
            before = set(tagged(marker))
            # A crash of the agent itself takes what it left behind with it.
            os.kill(status(watch, "dbl")["pid"], signal.SIGKILL)
            await until(lambda: status(watch, "dbl")["restarts"] == 1, what="the restart")
            await until(lambda: len(tagged(marker)) == 4, what="the new instance's four")
            assert not before & set(tagged(marker))
        # Watch stopped (as on SIGTERM): its agents and their cgroups are gone.
        assert tagged(marker) == []
        assert not tree.exists()

    with cleaned_up(random.randrange(10**8, 10**9)) as marker:
        asyncio.run(scenario(marker))


def test_without_cgroups_what_keeps_its_environment_is_found(tmp_path: Path) -> None:
    from keel.api import acall

    sock = tmp_path / "watch.sock"

    async def scenario(marker: int) -> None:
        config = write_config(tmp_path, {"dbl": escaping_agent(marker)})
        async with running_watch(config, cgroups=False) as watch:
            await until(lambda: len(tagged(marker)) == 4, what="the agent and its three escapees")
            await acall(sock, "stop", {"agent": "dbl"})
            await until(lambda: status(watch, "dbl")["state"] == "stopped", what="stopped")
            # The documented limit: a process that left the process group *and*
            # dropped the environment (env -i) escapes the marker.
            await until(lambda: len(tagged(marker)) == 1, what="all but the env -i one gone")
            (survivor,) = tagged(marker)
            assert Path(f"/proc/{survivor}/environ").read_bytes() == b""

    with cleaned_up(random.randrange(10**8, 10**9)) as marker:
        asyncio.run(scenario(marker))


def test_a_cgroup_is_emptied_without_cgroup_kill_and_never_with_watch_in_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from keel.watch import scopes
    from keel.watch.children import Child

    reason = cgroups_available()
    if reason is not None:
        pytest.skip(f"no cgroup for agents here: {reason}")

    async def scenario(marker: int) -> None:
        tree, _ = scopes.CgroupTree.create()
        assert tree is not None
        cgroup = tree.agent("forks")
        script = f"sleep 600.{marker} & sleep 600.{marker} & exec sleep 600.{marker}"
        child = Child.spawn(["sh", "-c", script], scope=cgroup)
        await until(lambda: len(tagged(marker)) == 3, what="three processes")
        # As on a kernel older than 5.14: no cgroup.kill, so one SIGKILL per process.
        real_write = scopes._write_quietly
        monkeypatch.setattr(
            scopes,
            "_write_quietly",
            lambda path, text: False if path.name == "cgroup.kill" else real_write(path, text),
        )
        # Even with watch inside the cgroup (if moving back out had failed), the
        # kill spares watch and ends the rest.
        (cgroup.path / "cgroup.procs").write_text("0")
        try:
            cgroup.kill()
        finally:
            (tree.home / "cgroup.procs").write_text("0")
        assert await child.wait() == -signal.SIGKILL
        await until(cgroup.empty, what="the cgroup empty")
        assert tagged(marker) == []
        await tree.remove()
        assert not tree.path.exists()

    with cleaned_up(random.randrange(10**8, 10**9)) as marker:
        asyncio.run(scenario(marker))
