"""The watch daemon: the asyncio shell around one policy per agent.

It feeds each :class:`~keel.watch.policy.AgentPolicy` from the backend (started,
exited, stopped elsewhere), from probe tasks and from one timer task, and
carries out the actions the policy returns, in order: start and stop through
the backend, alerts through the router (never waiting for them), records into
the ledger (never waiting for it either), latencies into the metrics.

Probes of an agent run as tasks of the agent's current instance: created when
it is reported running, cancelled when it stops, so a result can never be
credited to the wrong process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from keel.api import Handler, Peer
from keel.errors import KeelError
from keel.service import Daemon, Shell
from keel.telegram import read_token
from keel.watch import metrics, probe_engine
from keel.watch.alert_router import AlertRouter
from keel.watch.alert_routes import Alert, TelegramRoute
from keel.watch.backend import Backend
from keel.watch.config import AgentConfig, WatchConfig
from keel.watch.policy import (
    Action,
    AgentPolicy,
    HoldAgent,
    LedgerRecord,
    Restarted,
    SendAlert,
    StartAgent,
    StopAgent,
)
from keel.watch.probes import Outcome, ProbeSpec, run_check

log = logging.getLogger("keel.watch")


class AgentRuntime:
    """One agent: its config, its policy, its probe tasks and counters."""

    def __init__(self, config: AgentConfig, policy: AgentPolicy) -> None:
        self.config = config
        self.policy = policy
        self.probe_tasks: list[asyncio.Task[None]] = []
        self.engine_keys: list[tuple[str, str, int]] = []
        self.probing_instance = 0
        self.probe_failures = dict.fromkeys((p.name for p in config.probes), 0)
        self.last_probe: tuple[str, bool, float, str] | None = None  # name, ok, wall, detail


class Watch(Daemon):
    """The watch daemon (run by :func:`keel.service.main`, which gives it its shell)."""

    def __init__(
        self,
        config: WatchConfig,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.clock = clock
        self.wall = wall
        rng = rng or random.Random()
        self.agents = {
            name: AgentRuntime(agent, AgentPolicy(agent.rules, rng=rng))
            for name, agent in config.agents.items()
        }
        self.shell: Shell | None = None
        tokens = {
            name: read_token(route.token_file)
            for name, route in config.routes.items()
            if isinstance(route, TelegramRoute)
        }
        self.router = AlertRouter(config.routes, tokens, record=self.record, rng=rng)
        self.latency = {"no": metrics.Histogram(), "yes": metrics.Histogram()}
        self.engine = probe_engine.ProbeEngine(self._engine_results, clock=clock)
        self.metrics: metrics.MetricsServer | None = None
        if config.metrics is not None:
            self.metrics = metrics.MetricsServer(*config.metrics, self.render_metrics)
        self.started_at = wall()
        self._timer_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._timer_target: float | None = None

    # --- life cycle -----------------------------------------------------------------

    async def start(self, shell: Shell) -> None:
        """Open everything, adopt running agents, start the rest."""
        self.shell = shell
        self.router.start()
        self.engine.start()
        await self.backend.open(self)
        if self.metrics is not None:
            await self.metrics.start()
            log.info("metrics on http://%s:%d/metrics", *self.metrics.address or ("?", 0))
        self.record(
            "watch_start",
            self.config.host,
            {"agents": len(self.agents), "backend": self.config.backend},
        )
        for name, runtime in self.agents.items():
            found = await self.backend.find(name)
            if found is not None:
                self._feed(name, runtime.policy.adopt(self.clock(), found.pid, found.since))
                self.record("adopt", name, {"pid": found.pid})
            else:
                self._feed(name, runtime.policy.supervise(self.clock()))
        self._timer_task = shell.spawn(self._timers(), name="timers")
        log.info(
            "supervising %d agent%s with the %s backend",
            len(self.agents),
            "" if len(self.agents) == 1 else "s",
            self.config.backend,
        )

    async def stop(self) -> None:
        self.record("watch_stop", self.config.host, {"agents": len(self.agents)})
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
        for runtime in self.agents.values():
            self._cancel_probes(runtime)
        await self.engine.close()
        await self.backend.close()
        if self.metrics is not None:
            await self.metrics.close()
        await self.router.drain(2.0)
        await self.router.close()

    def summary(self) -> str:
        return f"supervising {len(self.agents)} agents"

    def verbs(self) -> Mapping[str, Handler]:
        return {"start": self._start_verb, "stop": self._stop_verb, "restart": self._restart_verb}

    def record(self, kind: str, subject: str, data: Mapping[str, Any]) -> None:
        if self.shell is not None:
            self.shell.record(kind, subject, data)

    # --- events from the backend (backend.Events) ------------------------------------

    def agent_started(self, name: str, pid: int | None) -> None:
        runtime = self.agents.get(name)
        if runtime is not None:
            self._feed(name, runtime.policy.started(self.clock(), pid))

    def agent_exited(self, name: str, cause: str) -> None:
        runtime = self.agents.get(name)
        if runtime is not None:
            self._feed(name, runtime.policy.exited(self.clock(), cause))

    def agent_stopped_externally(self, name: str) -> None:
        runtime = self.agents.get(name)
        if runtime is not None:
            self._feed(name, runtime.policy.stopped_externally(self.clock()))

    # --- carrying out actions --------------------------------------------------------

    def _feed(self, name: str, actions: list[Action]) -> None:
        runtime = self.agents[name]
        for action in actions:
            if isinstance(action, StartAgent):
                self.backend.start(name)
            elif isinstance(action, StopAgent):
                self.backend.stop(name, action.reason, timeout=runtime.config.stop_timeout)
            elif isinstance(action, HoldAgent):
                self.backend.hold(name)
            elif isinstance(action, SendAlert):
                self._alert(runtime, action)
            elif isinstance(action, LedgerRecord):
                self._log_record(action)
                self.record(action.kind, action.agent, action.data)
            elif isinstance(action, Restarted):
                self.latency["yes" if action.backoff else "no"].observe(action.downtime)
        self._sync_probes(runtime)
        deadline = runtime.policy.next_deadline()
        if deadline is not None and (self._timer_target is None or deadline < self._timer_target):
            self._wake.set()

    def _alert(self, runtime: AgentRuntime, action: SendAlert) -> None:
        log.warning("alert %s (%s): %s", action.kind, action.incident, action.text)
        alert = Alert(
            action.agent, action.incident, action.kind, action.text, self.config.host, self.wall()
        )
        self.router.send(alert, runtime.policy.rules.alerts.routes)

    def _log_record(self, record: LedgerRecord) -> None:
        data = record.data
        if record.kind == "failure":
            log.warning(
                "agent %s: %s (failure %s in a row; %s)",
                record.agent,
                data.get("cause"),
                data.get("failures_in_a_row"),
                data.get("decision"),
            )
        elif record.kind == "restart":
            log.info("agent %s: restart #%s", record.agent, data.get("restarts"))
        elif record.kind == "probe":
            log.info(
                "agent %s: probe %s is %s%s",
                record.agent,
                data.get("probe"),
                data.get("state"),
                f" ({data['detail']})" if data.get("detail") else "",
            )
        else:
            log.info("agent %s: %s %s", record.agent, record.kind, dict(data))

    # --- timers ------------------------------------------------------------------------

    async def _timers(self) -> None:
        while True:
            now = self.clock()
            earliest: float | None = None
            for name, runtime in self.agents.items():
                deadline = runtime.policy.next_deadline()
                if deadline is None:
                    continue
                if deadline <= now:
                    self._feed(name, runtime.policy.tick(now))
                    deadline = runtime.policy.next_deadline()
                    if deadline is None:
                        continue
                if earliest is None or deadline < earliest:
                    earliest = deadline
            self._timer_target = earliest
            self._wake.clear()
            timeout = None if earliest is None else max(0.0, earliest - self.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    # --- probes --------------------------------------------------------------------------

    def _sync_probes(self, runtime: AgentRuntime) -> None:
        policy = runtime.policy
        if policy.running:
            if runtime.probing_instance == policy.instance:
                return
            self._cancel_probes(runtime)
            runtime.probing_instance = policy.instance
            started = self.clock()
            name = runtime.config.name
            for spec in runtime.config.probes:
                key = (name, spec.name, policy.instance)
                if probe_engine.supported(spec.check):
                    self.engine.schedule(
                        key,
                        spec.check,
                        interval=spec.interval,
                        timeout=spec.timeout,
                        grace=spec.grace,
                        started=started,
                    )
                    runtime.engine_keys.append(key)
                else:
                    runtime.probe_tasks.append(
                        asyncio.create_task(
                            self._probe(runtime, spec, policy.instance, started),
                            name=f"probe:{name}:{spec.name}",
                        )
                    )
        elif runtime.probing_instance:
            self._cancel_probes(runtime)

    def _cancel_probes(self, runtime: AgentRuntime) -> None:
        # This may be the calling probe task itself (its result stopped the agent):
        # it then ends at its next await.
        for task in runtime.probe_tasks:
            task.cancel()
        for key in runtime.engine_keys:
            self.engine.cancel(key)
        runtime.probe_tasks = []
        runtime.engine_keys = []
        runtime.probing_instance = 0

    def _probe_done(
        self, runtime: AgentRuntime, probe: str, instance: int, outcome: Outcome, at: float
    ) -> None:
        if not outcome.ok:
            runtime.probe_failures[probe] += 1
        runtime.last_probe = (probe, outcome.ok, self.wall() - (self.clock() - at), outcome.detail)
        actions = runtime.policy.probe_result(at, instance, probe, outcome.ok, outcome.detail)
        # Even without actions the result may move a deadline (healthy since now).
        self._feed(runtime.config.name, actions)

    def _engine_results(self, batch: list[probe_engine.Result]) -> None:
        for result in batch:
            key = result.key
            assert isinstance(key, tuple)
            name, probe, instance = key
            runtime = self.agents.get(str(name))
            if runtime is not None and instance == runtime.probing_instance:
                self._probe_done(runtime, str(probe), int(instance), result.outcome, result.at)

    async def _probe(
        self, runtime: AgentRuntime, spec: ProbeSpec, instance: int, started: float
    ) -> None:
        """The asyncio path, for checks the engine does not take (https, host names, exec)."""
        fast = min(spec.interval, probe_engine.FAST_PROBE)
        due = started + fast
        passed = False
        while True:
            delay = due - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            outcome = await run_check(spec.check, spec.timeout)
            now = self.clock()
            passed = passed or outcome.ok
            self._probe_done(runtime, spec.name, instance, outcome, now)
            in_grace = now < started + spec.grace
            due += fast if (not passed and in_grace) else spec.interval
            due = max(due, now)

    # --- the control API ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now_mono, now_wall = self.clock(), self.wall()

        def wall_of(t: float | None) -> float | None:
            return None if t is None else round(now_wall - (now_mono - t), 3)

        agents: dict[str, Any] = {}
        for name, runtime in self.agents.items():
            st = runtime.policy.status()
            last = runtime.last_probe
            agents[name] = {
                "state": st.state,
                "pid": st.pid,
                "restarts": st.restarts,
                "since": wall_of(st.running_since),
                "uptime": None
                if st.running_since is None
                else round(now_mono - st.running_since, 3),
                "failures_in_a_row": st.failures_in_a_row,
                "last_error": st.last_error,
                "last_error_at": wall_of(st.last_error_at),
                "last_probe": None
                if last is None
                else {"probe": last[0], "ok": last[1], "at": round(last[2], 3), "detail": last[3]},
                "backoff_until": wall_of(st.backoff_until),
                "incident": st.incident,
                "flapping": st.flapping,
                "probes": {
                    p.name: {"ok": p.ok, "at": wall_of(p.at), "detail": p.detail} for p in st.probes
                },
                "target": runtime.config.unit or list(runtime.config.command),
            }
        result: dict[str, Any] = {
            "agents": agents,
            "backend": self.config.backend,
            "host": self.config.host,
            "started_at": round(self.started_at, 3),
            "alerts": {
                name: {"sent": self.router.sent[name], "dropped": self.router.dropped[name]}
                for name in self.router.routes
            },
        }
        if self.metrics is not None and self.metrics.address is not None:
            result["metrics"] = "http://{}:{}/metrics".format(*self.metrics.address)
        return result

    def _agent_arg(self, args: dict[str, Any]) -> AgentRuntime:
        name = args.get("agent")
        if not isinstance(name, str) or name not in self.agents:
            known = ", ".join(sorted(self.agents)) or "none"
            raise KeelError(f"no agent named {name!r} (watch supervises: {known})")
        return self.agents[name]

    async def _start_verb(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        runtime = self._agent_arg(args)
        self._feed(runtime.config.name, runtime.policy.request_start(self.clock()))
        return {"agent": runtime.config.name, "state": runtime.policy.state()}

    async def _stop_verb(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        runtime = self._agent_arg(args)
        self._feed(runtime.config.name, runtime.policy.request_stop(self.clock()))
        return {"agent": runtime.config.name, "state": runtime.policy.state()}

    async def _restart_verb(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """A stop and a start in one step: the start follows the exit (keel chat's /restart)."""
        runtime = self._agent_arg(args)
        name, now = runtime.config.name, self.clock()
        self._feed(name, runtime.policy.request_stop(now))
        self._feed(name, runtime.policy.request_start(now))
        return {"agent": name, "state": runtime.policy.state()}

    # --- metrics -------------------------------------------------------------------------

    def render_metrics(self) -> str:
        samples = [
            metrics.AgentSample(
                name,
                runtime.policy.state(),
                runtime.policy.restarts,
                runtime.probe_failures,
            )
            for name, runtime in self.agents.items()
        ]
        return metrics.render(samples, self.latency)
