"""``keel switch rollback``: by the timer, by an operator during a switch, or to an older generation.

Three cases, decided from the state file and the lock:

1. ``--switch-id ID`` (what the rollback timer runs): roll back switch ID if
   it is still in progress, else do nothing (it committed or was rolled back
   already). Exit 0 either way, 3 if the rollback fails.
2. A switch is in progress and its switcher runs: it is asked to roll back
   (SIGTERM, which the switcher treats as "roll back now"), and this command
   waits for it and reports. If the switcher is gone, this command takes the
   switch over and rolls it back itself.
3. No switch in progress: move the host back to the profile's previous
   generation (or to ``--to SYSTEM``): activate it, point the profile at it,
   make it the boot default. No gate: this is the way back, not a new switch.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from keel.errors import KeelError, UsageError
from keel.ledger.recorder import LedgerUnavailable, Recorder
from keel.safeswitch import machine as m
from keel.safeswitch.config import SafeswitchConfig
from keel.safeswitch.evidence import RECORD_TIMEOUT, SOURCE, Evidence, Unfinished
from keel.safeswitch.generations import Generation, Profile, nix_env_for, resolve_system
from keel.safeswitch.report import HostFacts, Output, host_state
from keel.safeswitch.runners import STOP_TIMEOUT, Runners, runners
from keel.safeswitch.state import Lock, StateFile, SwitchState
from keel.safeswitch.switcher import (
    Alerter,
    Result,
    _alert_settings,
    failure_detail,
    new_switch_id,
    start_system,
    take_over,
)


async def wait_until(monotonic: float, clock: Callable[[], float] = time.monotonic) -> None:
    """Sleep until the system-wide monotonic clock reaches ``monotonic``."""
    while (left := monotonic - clock()) > 0:
        await asyncio.sleep(min(left, 60.0))


def _as_rollback(result: Result) -> Result:
    """The rollback command succeeds (exit 0) when the host is back on the old system."""
    if result.phase is m.Phase.ROLLED_BACK:
        return replace(result, exit_code=0)
    return result


async def by_timer(files: StateFile, switch_id: str, out: Output) -> Result:
    result = await take_over(files, switch_id=switch_id, by="timer", out=out)
    if result is not None:
        return _as_rollback(result)
    state = files.read()
    what = (
        f"it ended {state.phase.value}"
        if state is not None and state.id == switch_id
        else "it is no longer the current switch"
    )
    message = f"switch {switch_id}: nothing to roll back ({what})"
    out.line(message)
    phase = state.phase if state is not None and state.id == switch_id else m.Phase.REFUSED
    return Result(phase, 0, state, message)


async def by_operator(
    config: SafeswitchConfig,
    *,
    to: Path | None,
    out: Output,
    rng: random.Random | None = None,
) -> Result:
    files = StateFile(config.run_dir)
    state = files.read()
    if state is not None and state.in_progress:
        if to is not None and os.path.realpath(to) != state.old:
            raise UsageError(
                f"switch {state.id} is in progress: `keel switch rollback` returns to its old "
                f"system {state.old}; --to is for when no switch is in progress"
            )
        switcher = state.switcher
        if Lock(files.run_dir).held_elsewhere() and switcher is not None and switcher.alive():
            return await _ask_switcher(files, state, out)
        result = await take_over(files, switch_id=state.id, by="operator", out=out)
        if result is not None:
            return _as_rollback(result)
    return await to_generation(config, to=to, out=out, rng=rng)


async def _ask_switcher(files: StateFile, state: SwitchState, out: Output) -> Result:
    assert state.switcher is not None
    out.line(f"switch {state.id}: asking its switcher (pid {state.switcher.pid}) to roll back")
    state.switcher.signal(signal.SIGTERM)
    lock = Lock(files.run_dir)
    limits = state.limits
    deadline = (
        time.monotonic() + limits.rollback_timeout + limits.commit_timeout + STOP_TIMEOUT + 30
    )
    while lock.held_elsewhere():
        if time.monotonic() > deadline:
            message = (
                f"the switcher (pid {state.switcher.pid}) did not finish; see `keel switch status`"
            )
            return Result(m.Phase.NEEDS_OPERATOR, 3, files.read(), message)
        await asyncio.sleep(0.05)
    final = files.read()
    if final is None or final.id != state.id:
        return Result(m.Phase.NEEDS_OPERATOR, 3, final, "the switch state is gone; see the ledger")
    if final.phase is m.Phase.ROLLED_BACK:
        message = f"rolled back: {final.old} is running again ({final.reason})"
        out.line(message)
        return Result(final.phase, 0, final, message)
    if final.phase is m.Phase.COMMITTED:
        message = f"switch {final.id} committed before it could be rolled back"
        out.line(message)
        return Result(final.phase, 2, final, message)
    message = f"switch {final.id} ended {final.phase.value}: {final.reason}"
    out.line(message)
    return Result(final.phase, 3, final, message)


async def to_generation(
    config: SafeswitchConfig,
    *,
    to: Path | None,
    out: Output,
    rng: random.Random | None = None,
) -> Result:
    """Move the host back to an older generation (no switch in progress)."""
    lock = Lock(config.run_dir)
    if not lock.try_acquire():
        return _refused(out, "a switch is in progress (see `keel switch status`)")
    try:
        return await _to_generation(config, to=to, out=out, rng=rng)
    finally:
        lock.release()


async def _to_generation(
    config: SafeswitchConfig,
    *,
    to: Path | None,
    out: Output,
    rng: random.Random | None,
) -> Result:
    profile = Profile(config.profile)
    runner = runners(config.timer)
    if (problem := runner.available()) is not None:
        return _refused(out, problem)
    try:
        current = resolve_system(config.current)
    except KeelError as exc:
        return _refused(out, f"the running system is unknown: {exc} (--current)")
    if to is not None:
        try:
            target = resolve_system(to)
        except KeelError as exc:
            return _refused(out, str(exc))
        generation = next((g for g in reversed(profile.generations()) if g.system == target), None)
    else:
        generation = profile.previous()
        if generation is None:
            return _refused(out, f"{config.profile} has no generation older than the current one")
        target = generation.system
    rollback_id = new_switch_id(time.time(), rng or random.Random())
    where = f"generation {generation.link}" if generation else target
    out.line(f"rollback {rollback_id}: {current} -> {where}")
    recorder = Recorder(config.ledger, SOURCE)
    alerter = Alerter(
        _alert_settings(config.alerts), host=config.host, record=recorder.record, out=out
    )
    await recorder.start()
    data = {"old": current, "new": target, "by": "operator", "reason": "keel switch rollback"}
    evidence = Evidence(config.state_dir)
    unfinished = Unfinished(
        id=rollback_id,
        kind="rollback",
        phase="rolling-back",
        old=current,
        new=target,
        started_at=time.time(),
        ledger=str(config.ledger) if config.ledger else None,
    )
    try:
        evidence.write(unfinished)
    except OSError as exc:
        out.line(f"  note: cannot keep the rollback's trace in {evidence.dir} ({exc.strerror})")
    try:
        problem = await _activate_and_boot(
            runner,
            config=config,
            rollback_id=rollback_id,
            target=target,
            profile=profile,
            generation=generation,
        )
        evidence.remove(rollback_id)  # decided, either way (a killed rollback leaves it)
        if problem is None:
            await _record(recorder, "rolled-back", rollback_id, data, out)
            message = f"rolled back: {target} is running and is the boot default"
            out.line(message)
            return Result(m.Phase.ROLLED_BACK, 0, None, message)
        data["reason"] = f"keel switch rollback failed: {problem}"
        await _record(recorder, "rollback-failed", rollback_id, data, out)
        alerter.send(rollback_id, "rollback-failed", f"rollback to {target} failed: {problem}")
        facts = HostFacts(
            running=os.path.realpath(config.current) if config.current.exists() else None,
            current_link=str(config.current),
            profile=str(config.profile),
            profile_system=profile.system(),
            profile_link=profile.target(),
        )
        details = host_state(facts, old=target, gcroot=None, log=None)
        message = f"ROLLBACK FAILED, the host needs an operator: {problem}"
        out.line(message)
        for line in details:
            out.line("  " + line)
        return Result(m.Phase.NEEDS_OPERATOR, 3, None, message, details)
    finally:
        await alerter.close()
        await recorder.close()


async def _activate_and_boot(
    runner: Runners,
    *,
    config: SafeswitchConfig,
    rollback_id: str,
    target: str,
    profile: Profile,
    generation: Generation | None,
) -> str | None:
    """Activate ``target``, point the profile at it, make it the boot default; or say why not."""
    for verb, name in (("test", "rollback"), ("boot", "boot")):
        if verb == "boot":
            try:
                if generation is not None:
                    profile.point_to(generation.link)
                else:
                    await asyncio.to_thread(
                        profile.add, target, nix_env=nix_env_for(profile, target)
                    )
            except (KeelError, OSError) as exc:
                return f"cannot point {profile.path} at {target}: {exc}"
        activation, log_path = await start_system(
            runner, config.run_dir, rollback_id, verb=verb, system=target, name=name
        )
        try:
            async with asyncio.timeout(config.limits.rollback_timeout):
                code = await activation.wait()
        except TimeoutError:
            await activation.stop()
            return f"switch-to-configuration {verb} did not finish within {config.limits.rollback_timeout:g} s (log: {log_path})"
        if code != 0:
            return failure_detail(verb, code, log_path)
    return None


async def _record(
    recorder: Recorder, kind: str, subject: str, data: dict[str, str], out: Output
) -> None:
    try:
        await recorder.record_durable(kind, subject, data, timeout=RECORD_TIMEOUT)
    except LedgerUnavailable as exc:
        out.line(f"  note: the ledger did not take the {kind!r} entry: {exc}")


def _refused(out: Output, reason: str) -> Result:
    message = f"refused, nothing changed: {reason}"
    out.line(message)
    return Result(m.Phase.REFUSED, 2, None, message)
