"""The daemon shell: start, status, verbs, stop, failures, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from keel import api, service
from keel.api import Handler, Peer
from keel.config import Section
from keel.errors import ConfigError, KeelError, Refused, Unavailable


class Sample(service.Daemon):
    def __init__(self, *, fail_start: bool = False, crash_task: bool = False) -> None:
        self.fail_start = fail_start
        self.crash_task = crash_task
        self.events: list[str] = []
        self.shell: service.Shell | None = None

    async def start(self, shell: service.Shell) -> None:
        self.events.append("start")
        self.shell = shell
        if self.fail_start:
            raise KeelError("the port is taken")
        shell.record("sample_start", "host", {"n": 1})
        if self.crash_task:

            async def crash() -> None:
                raise RuntimeError("a bug")

            shell.spawn(crash(), name="crasher")

    async def stop(self) -> None:
        self.events.append("stop")

    def verbs(self) -> Mapping[str, Handler]:
        async def double(args: dict[str, Any], peer: Peer) -> Any:
            if not isinstance(args.get("n"), int):
                raise Refused("n must be an integer")
            return args["n"] * 2

        return {"double": double}

    def status(self) -> dict[str, Any]:
        return {"things": 3}


def common(tmp_path: Path, ledger: bool = True) -> service.Common:
    return service.Common(
        socket=tmp_path / "run" / "sample.sock",
        ledger=tmp_path / "ledger.db" if ledger else None,
        checkpoint_every=None,
    )


def test_a_daemon_serves_status_and_its_verbs_then_stops(tmp_path: Path) -> None:
    daemon = Sample()
    settings = common(tmp_path)

    async def scenario() -> int:
        async def client(shell: service.Shell) -> None:
            status = await api.acall(settings.socket, "status")
            assert status["things"] == 3
            assert status["service"]["name"] == "sample"
            assert status["service"]["pid"] == os.getpid()
            assert status["service"]["ledger"]["state"] == "ok"
            assert await api.acall(settings.socket, "double", {"n": 21}) == 42
            with pytest.raises(Refused, match="n must be an integer"):
                await api.acall(settings.socket, "double", {"n": "x"})
            shell.request_stop("test done")

        def ready(shell: service.Shell) -> None:
            asyncio.get_running_loop().create_task(client(shell))

        return await service.serve("sample", daemon, settings, ready=ready)

    assert asyncio.run(scenario()) == 0
    assert daemon.events == ["start", "stop"]
    assert not settings.socket.exists()
    from keel.ledger import Ledger

    with Ledger.open(settings.ledger or Path(), create=False) as ledger:
        assert [e.kind for _, e in ledger.entries()] == ["sample_start"]


def test_a_start_that_fails_is_stopped_again_and_exits_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = Sample(fail_start=True)
    settings = common(tmp_path, ledger=False)
    assert asyncio.run(service.serve("sample", daemon, settings)) == service.EXIT_FAILED
    assert daemon.events == ["start", "stop"]
    assert not settings.socket.exists()
    assert "cannot start: the port is taken" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.allow_traceback(
    "a background task with a bug on purpose: the daemon logs its traceback and stops",
    match=r'raise RuntimeError\("a bug"\)',
)
def test_a_background_task_that_dies_stops_the_daemon(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = Sample(crash_task=True)
    code = asyncio.run(service.serve("sample", daemon, common(tmp_path, ledger=False)))
    assert code == service.EXIT_FAILED
    assert daemon.events == ["start", "stop"]
    assert "background task sample:crasher failed" in caplog.text


def test_a_taken_socket_fails_the_start_cleanly(tmp_path: Path) -> None:
    settings = common(tmp_path, ledger=False)

    async def scenario() -> int:
        async with api.ControlServer(settings.socket, {}):
            return await service.serve("sample", Sample(), settings)

    assert asyncio.run(scenario()) == service.EXIT_FAILED


def test_read_common_defaults_and_nulls(tmp_path: Path) -> None:
    with Section({"socket": "/run/keel/x.sock"}, source="x.json") as cfg:
        settings = service.read_common(cfg, "x")
    assert settings.socket == Path("/run/keel/x.sock")
    assert settings.ledger is not None
    assert settings.checkpoint_every == 300
    with Section({"ledger": None, "checkpoint_every": None}, source="x.json") as cfg:
        settings = service.read_common(cfg, "x")
    assert settings.ledger is None
    assert settings.checkpoint_every is None
    with pytest.raises(ConfigError, match=r"x.json: checkpoint_every: expected a number > 0"):
        service.read_common(Section({"checkpoint_every": 0}, source="x.json"), "x")


SERVE = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from keel import service, sd

    class Idle(service.Daemon):
        async def start(self, shell):
            print("ready", flush=True)
        async def stop(self):
            print("stopped", flush=True)

    sd.setup_logging("idle")
    common = service.Common(socket=Path(sys.argv[1]), ledger=None, checkpoint_every=None)
    sys.exit(asyncio.run(service.serve("idle", Idle(), common)))
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_quietly_even_when_sigint_was_ignored(tmp_path: Path, signum: int) -> None:
    # `trap '' INT` leaves SIGINT ignored across exec, as for a background job or nohup.
    script = 'trap "" INT; exec "$@"'
    process = subprocess.Popen(
        ["sh", "-c", script, "sh", sys.executable, "-c", SERVE, str(tmp_path / "idle.sock")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signum)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0
    assert out == "stopped\n"
    assert "Traceback" not in err


@pytest.mark.parametrize("key", ["socket", "ledger"])
def test_read_common_refuses_paths_no_kernel_can_take(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"x.json: {key}: .*contains a NUL character"):
        service.read_common(Section({key: "/tmp/w\x00.sock"}, source="x.json"), "x")


def test_read_common_refuses_a_socket_path_the_kernel_cannot_bind() -> None:
    long = "/run/" + "s" * 110 + ".sock"
    with pytest.raises(ConfigError, match=r"x.json: socket: 120 bytes long; .* at most 107"):
        service.read_common(Section({"socket": long}, source="x.json"), "x")


EXHAUST = textwrap.dedent(
    """
    import asyncio, os, resource, sys
    from pathlib import Path
    from keel import service, sd

    class Greedy(service.Daemon):
        held = []
        async def start(self, shell):
            pass
        async def stop(self):
            pass
        def verbs(self):
            async def exhaust(args, peer):
                try:
                    while True:
                        self.held.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    pass
                return len(self.held)
            return {"exhaust": exhaust}

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    sd.setup_logging("greedy")
    common = service.Common(socket=Path(sys.argv[1]), ledger=None, checkpoint_every=None)
    sys.exit(asyncio.run(service.serve("greedy", Greedy(), common)))
    """
)


def test_a_daemon_out_of_descriptors_still_answers_on_its_control_socket(tmp_path: Path) -> None:
    path = tmp_path / "greedy.sock"
    process = subprocess.Popen(
        [sys.executable, "-c", EXHAUST, str(path)], stderr=subprocess.PIPE, text=True
    )
    try:
        status: Any = None
        for _ in range(600):  # the socket appears once the daemon serves (up to a minute)
            try:
                status = api.call(path, "status", timeout=30)
                break
            except Unavailable:
                process.poll()
                assert process.returncode is None, process.stderr.read() if process.stderr else ""
                time.sleep(0.1)
        assert status is not None
        with api.Connection(path, timeout=30) as first:
            assert first.call("exhaust") > 0  # every descriptor the limit allows is taken now
            # A new connection: the first accept fails (no descriptor), the shell hands
            # its spares back, and asyncio's next accept (a second later) takes it.
            assert api.call(path, "status", timeout=30)["service"]["name"] == "greedy"
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert "socket.accept() out of system resource (Too many open files;" in err
    assert "Traceback" not in err
