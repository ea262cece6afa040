"""Rolling safe switches: the asking node runs the plan, each node switches itself.

The asking (operator) node drives a :class:`~keel.fleet.rollout.Rollout`:
for each node the plan says to switch, it sends a ``control`` request with
verb ``switch``; the node checks that the asker is one of its operators,
starts ``keel switch`` outside its fleet daemon (:mod:`keel.fleet.switching`)
and answers with the switch's id; the asker then asks ``switch_status`` every
``switch_poll`` seconds until the switch has an outcome (or ``switch_timeout``
passed: ``lost``), and feeds it to the plan. Halted with ``revert`` asked,
the plan's switch-backs go out the same way (verb ``switch_back``).

Both sides record: the asking node ``rollout``, ``rollout_node`` per node
and ``rollout_result``; the acting node ``switch`` when it starts one and
``switch_result`` when it ends (also if its fleet daemon was restarted in
between: runs not yet recorded are watched again at start).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from keel.api import Peer
from keel.errors import BadRequest, Refused
from keel.fleet import rollout, switching
from keel.fleet.config import FleetConfig
from keel.fleet.protocol import Reply, Request, new_request
from keel.fleet.rollout import Finished, Revert, Rollout, Switch
from keel.fleet.switching import Run, Switches

log = logging.getLogger("keel.fleet")

SWITCH_VERBS = ("switch", "switch_status", "switch_back")
Ask = Callable[[Mapping[str, Request], float], Awaitable[dict[str, Reply | str]]]
Record = Callable[[str, str, Mapping[str, Any]], None]


class Rollouts:
    def __init__(
        self,
        config: FleetConfig,
        switches: Switches,
        *,
        ask: Ask,
        record: Record,
        wall: Callable[[], float],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.switches = switches
        self.ask = ask
        self.record = record
        self.wall = wall
        self.clock = clock
        self.current: dict[str, Any] | None = None  # the running or last rollout's report
        self._lock = asyncio.Lock()
        self._watchers: set[asyncio.Task[None]] = set()

    # --- the node that switches ------------------------------------------------------

    async def carry_out(self, sender: str, me: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """``switch``, ``switch_status`` or ``switch_back`` from an operator (checked by the caller)."""
        verb = body.get("verb")
        if verb == "switch_status":
            run = self.switches.run(switching.check_id(body.get("id")))
            return await asyncio.to_thread(self.switches.state, run)
        if verb == "switch":
            unknown = sorted(set(body) - {"verb", "target", "gate", "deadline"})
            if unknown:
                raise BadRequest(f"unknown key {unknown[0][:40]!r} in a switch")
            target = switching.parse_target(body.get("target"))
            run = await self.switches.start_switch(
                target, switching.limits(body), sender, self.wall()
            )
            data: dict[str, Any] = {
                "by": sender,
                "target": target.to_json(),
                "old": run.old,
                "role": "acted",
            }
        else:
            run = await self.switches.start_revert(
                switching.check_id(body.get("id")), sender, self.wall()
            )
            data = {"by": sender, "to": run.old, "role": "acted", "revert": True}
        self.record("switch", run.id, data)
        self.watch(run)
        return {"id": run.id, "old": run.old}

    def watch(self, run: Run) -> None:
        """Record ``run``'s outcome once it has one (a task for the daemon's lifetime)."""
        task = asyncio.get_running_loop().create_task(self._watch(run))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def resume(self) -> None:
        """Watch again the runs whose outcome is not recorded yet (the daemon restarted)."""
        for run in self.switches.unrecorded():
            self.watch(run)

    async def _watch(self, run: Run) -> None:
        while True:
            state = await asyncio.to_thread(self.switches.state, run)
            if state["state"] != "running":
                break
            await asyncio.sleep(self.config.switch_poll)
        outcome, reason = switching.outcome_of(state, run.kind)
        self.record(
            "switch_result",
            run.id,
            {
                "by": run.by,
                "outcome": outcome,
                "exit_code": state.get("exit_code"),
                "reason": reason[:2000],
                "revert": run.kind == "revert",
            },
        )
        self.switches.mark_recorded(run)

    async def close(self) -> None:
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    # --- the node that asks ----------------------------------------------------------

    async def run(
        self, me: str, nodes: list[str], args: Mapping[str, Any], peer: Peer
    ) -> dict[str, Any]:
        """Roll ``args['target']`` out over ``nodes``, canary first; the report when it ends."""
        target = switching.parse_target(args.get("target"))
        body: dict[str, Any] = {"verb": "switch", "target": target.to_json()}
        switching.limits(args)  # checked here, so a bad value fails before any node is asked
        body.update({k: args[k] for k in ("gate", "deadline") if args.get(k) is not None})
        batch = args.get("batch", 1)
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 1000:
            raise BadRequest("batch must be a whole number from 1 to 1000")
        revert = args.get("revert", False)
        if not isinstance(revert, bool):
            raise BadRequest("revert must be true or false")
        if me in nodes:
            raise BadRequest(
                "this node cannot switch itself in a rollout it runs (its fleet daemon may be "
                "restarted by the switch): run `keel rebuild switch` here, or start the rollout "
                "from another operator node"
            )
        if self._lock.locked():
            raise Refused("a rollout runs from this node already (`keel fleet rollout` shows it)")
        async with self._lock:
            plan = Rollout(nodes, batch=batch, revert=revert)
            rollout_id = secrets.token_hex(8)
            started = self.wall()
            self.current = {"id": rollout_id, "running": True, "started": started,
                            "target": target.to_json(), **plan.report()}  # fmt: skip
            self.record(
                "rollout",
                rollout_id,
                {"target": target.to_json(), "nodes": nodes, "batch": batch, "revert": revert,
                 "uid": peer.uid, "role": "asked"},
            )  # fmt: skip
            ids: dict[str, str] = {}
            await self._drive(plan, rollout_id, body, ids)
            report = {"id": rollout_id, "running": False, "started": started,
                      "ended": self.wall(), "target": target.to_json(), "switches": ids,
                      **plan.report()}  # fmt: skip
            self.current = report
            self.record(
                "rollout_result",
                rollout_id,
                {k: report[k] for k in ("outcome", "halted_by", "reason", "switched",
                                        "not_started", "reverted", "revert_failed")},
            )  # fmt: skip
            return report

    async def _drive(
        self, plan: Rollout, rollout_id: str, body: dict[str, Any], ids: dict[str, str]
    ) -> None:
        tasks: dict[asyncio.Task[tuple[str, str]], rollout.Step] = {}

        def launch(steps: list[rollout.Step]) -> None:
            for step in steps:
                if isinstance(step, Switch):
                    coro = self._switch(step.node, body, ids)
                elif isinstance(step, Revert):
                    coro = self._revert(step.node, ids)
                else:
                    continue
                tasks[asyncio.ensure_future(coro)] = step

        launch(plan.start())
        while tasks:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                step = tasks.pop(task)
                outcome, reason = task.result()
                node = step.node  # type: ignore[union-attr]
                self.record(
                    "rollout_node",
                    rollout_id,
                    {"node": node, "switch": ids.get(node), "outcome": outcome,
                     "reason": reason[:2000], "revert": isinstance(step, Revert)},
                )  # fmt: skip
                if isinstance(step, Switch):
                    steps = plan.finished(node, outcome, reason)
                else:
                    steps = plan.reverted(node, outcome == rollout.REVERTED, reason)
                if self.current is not None:
                    self.current.update(plan.report())
                launch([s for s in steps if not isinstance(s, Finished)])

    async def _switch(
        self, node: str, body: dict[str, Any], ids: dict[str, str]
    ) -> tuple[str, str]:
        answer = await self._control(node, body, self.config.request_timeout)
        if isinstance(answer, str):
            return rollout.LOST, f"it did not take the switch: {answer}"
        if not answer.ok:
            return rollout.REFUSED, f"it refused: {answer.error}"
        switch_id = answer.body.get("id")
        if not isinstance(switch_id, str):
            return rollout.LOST, "it answered without a switch id"
        ids[node] = switch_id
        return await self._follow(node, switch_id, "switch")

    async def _revert(self, node: str, ids: dict[str, str]) -> tuple[str, str]:
        answer = await self._control(
            node, {"verb": "switch_back", "id": ids[node]}, self.config.request_timeout
        )
        if isinstance(answer, str) or not answer.ok:
            why = answer if isinstance(answer, str) else answer.error
            return rollout.REVERT_FAILED, f"it did not switch back: {why}"
        return await self._follow(node, str(answer.body.get("id")), "revert")

    async def _follow(self, node: str, run_id: str, kind: str) -> tuple[str, str]:
        """Ask ``node`` about ``run_id`` until it has an outcome or the time is up."""
        deadline = self.clock() + self.config.switch_timeout
        last_problem = ""
        while self.clock() < deadline:
            await asyncio.sleep(self.config.switch_poll)
            answer = await self._control(
                node, {"verb": "switch_status", "id": run_id}, self.config.request_timeout
            )
            if isinstance(answer, str) or not answer.ok:
                # the node may be restarting its daemons for the new configuration: ask again
                last_problem = answer if isinstance(answer, str) else answer.error
                continue
            if answer.body.get("state") != "running":
                return switching.outcome_of(answer.body, kind)
        timeout = f"no outcome within {self.config.switch_timeout:g} s"
        lost = rollout.LOST if kind == "switch" else rollout.REVERT_FAILED
        return lost, timeout + (f" (last: {last_problem})" if last_problem else "")

    async def _control(self, node: str, body: dict[str, Any], timeout: float) -> Reply | str:
        return (await self.ask({node: new_request("control", body)}, timeout))[node]


def is_switch_verb(body: Mapping[str, Any]) -> bool:
    return body.get("verb") in SWITCH_VERBS
