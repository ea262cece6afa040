"""Running the gate's checks (their judging is :mod:`keel.safeswitch.checks`).

Each :meth:`Prober.run` performs one check within its timeout and returns a
verdict and a line a person can read; it never raises for anything the host
does. tcp, http and command checks are watch's own probes
(:func:`keel.watch.probes.run_check`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from keel.api import acall
from keel.errors import ApiError, Unavailable
from keel.safeswitch import checks
from keel.safeswitch.checks import CheckSpec, RunAs, WatchBaseline
from keel.safeswitch.machine import Verdict
from keel.safeswitch.runners import capture
from keel.watch import probes


async def _output(argv: list[str], timeout: float) -> str:
    return (await capture(argv, timeout=timeout))[1]


async def failed_units(timeout: float = 10.0) -> frozenset[str]:
    """The units systemd lists as failed now (empty without systemd)."""
    systemctl = shutil.which("systemctl")
    if systemctl is None or not Path("/run/systemd/system").is_dir():
        return frozenset()
    try:
        out = await _output(
            [systemctl, "list-units", "--state=failed", "--plain", "--no-legend", "--no-pager"],
            timeout,
        )
    except TimeoutError:
        return frozenset()
    return checks.parse_failed_units(out)


class CannotRunAs(Exception):
    """A check with ``user`` cannot drop to that user here (no ``setpriv``)."""


def command_argv(command: str, timeout: float, run_as: RunAs | None = None) -> tuple[str, ...]:
    """``sh -c COMMAND``, bounded by coreutils' ``timeout`` too where it exists.

    The switcher stops a check that overruns; ``timeout`` also stops one whose
    switcher was killed, which would otherwise run on, orphaned, in its session.
    With ``run_as`` the shell runs as that user (``setpriv``: its uid, gid and
    groups, no new privileges, so no ``sudo`` back to root) with its ``HOME``,
    ``USER`` and ``LOGNAME``; the rest of the environment is the switcher's.
    """
    shell: tuple[str, ...] = ("/bin/sh", "-c", command)
    if run_as is not None:
        setpriv, env = shutil.which("setpriv"), shutil.which("env")
        if setpriv is None or env is None:
            raise CannotRunAs(
                f"cannot run the check as {run_as.user}: setpriv (util-linux) or env not found"
            )
        shell = (
            setpriv, f"--reuid={run_as.uid}", f"--regid={run_as.gid}", "--init-groups",
            "--no-new-privs", "--", env, f"HOME={run_as.home}", f"USER={run_as.user}",
            f"LOGNAME={run_as.user}", *shell,
        )  # fmt: skip
    bound = shutil.which("timeout")
    if bound is None:
        return shell
    return (bound, "--kill-after=2", f"{timeout + 1:g}", *shell)


class Prober:
    def __init__(self, *, failed_before: frozenset[str] = frozenset()) -> None:
        self.failed_before = failed_before
        self.watch_baselines: dict[str, WatchBaseline] = {}

    async def run(self, name: str, spec: CheckSpec) -> tuple[Verdict, str]:
        try:
            if isinstance(spec, checks.WatchCheck):
                return await self._watch(name, spec)
            if isinstance(spec, checks.SystemCheck):
                return await self._system(spec)
            if isinstance(spec, checks.TcpCheck):
                outcome = await probes.run_check(
                    probes.TcpCheck(spec.host, spec.port), spec.timeout
                )
            elif isinstance(spec, checks.HttpCheck):
                outcome = await probes.run_check(
                    probes.HttpCheck(spec.url, spec.expect_status), spec.timeout
                )
            else:
                argv = command_argv(spec.command, spec.timeout, spec.run_as)
                outcome = await probes.run_check(probes.ExecCheck(argv), spec.timeout)
        except TimeoutError:
            return "fail", f"no answer within {spec.timeout:g} s"
        except CannotRunAs as exc:
            return "fail", str(exc)
        return ("pass" if outcome.ok else "fail"), outcome.detail

    async def _watch(self, name: str, spec: checks.WatchCheck) -> tuple[Verdict, str]:
        try:
            status = await acall(Path(spec.socket), "status", service="watch", timeout=spec.timeout)
        except Unavailable as exc:
            # watch may be restarting with the new configuration: not an answer yet.
            # One that never answers again keeps the gate from holding until the deadline.
            return "pending", f"watch not answering: {exc}"
        except ApiError as exc:
            return "fail", f"watch refused its status: {exc}"
        baseline = self.watch_baselines.setdefault(name, WatchBaseline())
        return checks.judge_watch(status, baseline)

    async def _system(self, spec: checks.SystemCheck) -> tuple[Verdict, str]:
        systemctl = shutil.which("systemctl")
        if systemctl is None:
            return "fail", "systemctl not found"
        state = await _output([systemctl, "is-system-running"], spec.timeout)
        failed: frozenset[str] = frozenset()
        if state.strip() == "degraded":
            failed = await failed_units(spec.timeout)
        return checks.judge_system(
            state, failed, self.failed_before, allow_degraded=spec.allow_degraded
        )
