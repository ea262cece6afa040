"""The fleet daemon: this node's voice in the fleet, over the local mesh daemon.

One per host, on :mod:`keel.service`. It

- answers other nodes' requests for this node (status, its signed ledger
  head with consistency proofs, what it has witnessed, operators' commands
  and switches);
- witnesses every other node's ledger every ``witness_every`` seconds and
  runs the audit (:mod:`keel.fleet.witnessing`), and runs rolling switches
  (:mod:`keel.fleet.rollouts`);
- serves the local verbs behind ``keel fleet status``, ``audit``,
  ``witness``, ``forget``, ``checkpoint``, the commands on agents, ``switch``
  and ``rollout``, asking the other nodes over the mesh.

Requests and replies travel as :mod:`keel.fleet.protocol` messages on one mesh
topic; a reply is matched to its request by id *and* by the node the mesh says
sent it. A request to a node the mesh is not connected to is not sent: that
node is reported unreachable at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from keel.api import Handler, Peer, acall
from keel.errors import BadRequest, KeelError, Refused, Unavailable
from keel.fleet import protocol
from keel.fleet.config import NODE_ID, FleetConfig
from keel.fleet.control import AgentCommand, authorize, parse_command
from keel.fleet.cosign import Cosigner
from keel.fleet.link import Incoming, Link, MeshLink, MeshUnavailable
from keel.fleet.local import LocalNode
from keel.fleet.protocol import FleetProtocolError, Reply, Request, new_request
from keel.fleet.rollouts import Rollouts, is_switch_verb
from keel.fleet.status import ReportError, check_report, fleet_view
from keel.fleet.store import FleetStore
from keel.fleet.switching import Switches
from keel.fleet.witnessing import Witnessing
from keel.ledger.errors import LedgerError
from keel.ledger.keys import create_signer, load_signer
from keel.service import Daemon, Shell

log = logging.getLogger("keel.fleet")

MIN_PREFIX = 4  # characters of a node id that name it (shorter ones could name anyone)
MAX_ANSWERING = 64  # requests from other nodes answered at once; more are refused as busy
WITNESS_KEY_FILE = "witness.key"
STATE_FILE = "fleet.db"


@dataclass
class _Waiting:
    node: str
    future: asyncio.Future[Reply]


class Fleet(Daemon):
    def __init__(
        self,
        config: FleetConfig,
        *,
        make_link: Callable[[FleetConfig], Link] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.make_link = make_link or _mesh_link
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.shell: Shell | None = None
        self.store: FleetStore | None = None
        self.link: Link | None = None
        self.local: LocalNode | None = None
        self.cosigner: Cosigner | None = None
        self.rollouts: Rollouts | None = None
        self._waiting: dict[str, _Waiting] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self.witnessing: Witnessing | None = None

    # --- life cycle -------------------------------------------------------------------

    async def start(self, shell: Shell) -> None:
        self.shell = shell
        state = self.config.state
        self.store = await asyncio.to_thread(FleetStore.open, state / STATE_FILE)
        try:
            key = state / WITNESS_KEY_FILE
            if key.exists() or key.is_symlink():
                signer = load_signer(key)
            else:
                signer = create_signer(key, self.config.witness_name)
        except (LedgerError, OSError) as exc:
            raise KeelError(f"cannot load the witness key: {exc}") from None
        if signer.name != self.config.witness_name:
            log.warning(
                "the witness key %s is named %s, not %s as the config says; it keeps its name",
                state / WITNESS_KEY_FILE,
                signer.name,
                self.config.witness_name,
            )
        self.cosigner = Cosigner(signer)
        self.link = self.make_link(self.config)
        self.local = LocalNode(self.config, mesh_status=self.link.status, wall=self.wall)
        self.rollouts = Rollouts(
            self.config,
            Switches(
                self.config.state / "switches",
                keel=self.config.keel,
                runner=self.config.switch_runner,
                safeswitch_config=self.config.safeswitch,
                current_system=self.config.current_system,
            ),
            ask=self.ask,
            record=self._record,
            wall=self.wall,
            clock=self.clock,
        )
        self.rollouts.resume()
        self.witnessing = Witnessing(
            self.config,
            store=self.store,
            local=self.local,
            cosigner=self.cosigner,
            link=self.link,
            ask=self.ask,
            record=self._record,
            node_id=self._node_id,
            members=self._members,
            wall=self.wall,
            rng=self.rng,
        )
        self.link.start(self._incoming)
        shell.spawn(self.witnessing.loop(), name="witness")
        shell.record(
            "fleet_start",
            self.config.host,
            {
                "witness_key": str(self.cosigner.verifier),
                "operators": sorted(self.config.operators),
            },
        )

    async def stop(self) -> None:
        if self.rollouts is not None:
            await self.rollouts.close()
        for task in list(self._answering):
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)
        for waiting in self._waiting.values():
            waiting.future.cancel()
        if self.link is not None:
            await asyncio.to_thread(self.link.close)
        if self.local is not None:
            self.local.close()
        if self.store is not None:
            self.store.close()

    def verbs(self) -> Mapping[str, Handler]:
        return {
            "fleet_status": self._verb_status,
            "audit": self._verb_audit,
            "witness": self._verb_witness,
            "forget": self._verb_forget,
            "checkpoint": self._verb_checkpoint,
            "command": self._verb_command,
            "switch": self._verb_switch,
            "rollout": self._verb_rollout,
        }

    def status(self) -> dict[str, Any]:
        link, store, cosigner = self.link, self.store, self.cosigner
        return {
            "node": None if link is None else link.node_id,
            "mesh": "ok" if link is not None and link.problem is None else (link and link.problem),
            "witness_key": None if cosigner is None else str(cosigner.verifier),
            "witnessed": 0 if store is None else len(store.all_witnessed()),
            "alarms": 0 if store is None else len(store.alarms()),
            "witness_rounds": 0 if self.witnessing is None else self.witnessing.rounds,
            "operators": sorted(self.config.operators),
        }

    def summary(self) -> str:
        return f"fleet: {len(self.config.operators)} operator nodes"

    # --- plumbing ---------------------------------------------------------------------

    def _record(self, kind: str, subject: str, data: Mapping[str, Any]) -> None:
        if self.shell is not None:
            self.shell.record(kind, subject, data)

    def _node_id(self) -> str:
        link = self.link
        if link is None or link.node_id is None:
            reason = "not started" if link is None else link.problem
            raise Unavailable(f"the mesh daemon at {self.config.mesh} cannot be reached: {reason}")
        return link.node_id

    def _parts(self) -> tuple[Link, FleetStore, LocalNode, Cosigner]:
        if self.link is None or self.store is None or self.local is None or self.cosigner is None:
            raise Unavailable("the fleet daemon is not started")
        return self.link, self.store, self.local, self.cosigner

    def _incoming(self, message: Incoming) -> None:
        try:
            decoded = protocol.decode(message.data)
        except FleetProtocolError as exc:
            log.warning("fleet: a malformed message from %s: %s", message.sender, exc)
            return
        if isinstance(decoded, Reply):
            waiting = self._waiting.get(decoded.re)
            if waiting is not None and waiting.node == message.sender:
                if not waiting.future.done():
                    waiting.future.set_result(decoded)
            else:
                log.debug("fleet: a reply from %s to no request of ours", message.sender)
            return
        if len(self._answering) >= MAX_ANSWERING:
            busy = Reply(decoded.id, False, error="busy: too many requests at once; try again")
            self._spawn_answer(self._send_reply(message.sender, busy))
            return
        self._spawn_answer(self._answer(message.sender, decoded))

    def _spawn_answer(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _send_reply(self, node: str, reply: Reply) -> None:
        link, *_ = self._parts()
        try:
            await link.send([(node, reply.encode())], ttl=self.config.request_timeout)
        except (MeshUnavailable, FleetProtocolError) as exc:
            log.warning("fleet: cannot answer %s: %s", node, exc)

    async def ask(self, requests: Mapping[str, Request], timeout: float) -> dict[str, Reply | str]:
        """Send each node its request; each answer is its reply or why there is none."""
        link, *_ = self._parts()
        loop = asyncio.get_running_loop()
        out: dict[str, Reply | str] = {}
        waiting = {}
        for node, request in requests.items():
            future: asyncio.Future[Reply] = loop.create_future()
            self._waiting[request.id] = _Waiting(node, future)
            waiting[node] = (request.id, future)
        try:
            await link.send(
                [(node, request.encode()) for node, request in requests.items()], ttl=timeout
            )
            futures = [future for _, future in waiting.values()]
            if futures:
                await asyncio.wait(futures, timeout=timeout)
        except MeshUnavailable as exc:
            return {node: str(exc) for node in requests}
        finally:
            for request_id, _ in waiting.values():
                self._waiting.pop(request_id, None)
        for node, (_, future) in waiting.items():
            if future.done() and not future.cancelled():
                out[node] = future.result()
            else:
                future.cancel()
                out[node] = f"no answer within {timeout:g} s"
        return out

    # --- answering other nodes -----------------------------------------------------------

    async def _answer(self, sender: str, request: Request) -> None:
        try:
            body = await self._handle(sender, request)
        except KeelError as exc:
            reply = Reply(request.id, False, error=str(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("fleet: answering a %s request from %s failed", request.type, sender)
            reply = Reply(request.id, False, error=f"internal error in {request.type}")
        else:
            if body is None:
                return
            reply = Reply(request.id, True, body)
        await self._send_reply(sender, reply)

    async def _handle(self, sender: str, request: Request) -> dict[str, Any] | None:
        _, _, local, _ = self._parts()
        body = request.body
        if request.type == "status":
            return {"report": await local.report(self._node_id())}
        if request.type == "checkpoint":
            sizes = protocol.sizes(body, "from", "checkpoint")
            answer = await local.checkpoint(sizes)
            answer["proofs"] = protocol.encode_proofs(answer["proofs"])
            return answer
        if request.type == "audit":
            return self._witness().held_body()
        if request.type == "cosigned":
            self._witness().take_cosignature(sender, body)
            return None
        return await self._carry_out(sender, body)

    # --- local verbs ----------------------------------------------------------------

    def _witness(self) -> Witnessing:
        if self.witnessing is None:
            raise Unavailable("the fleet daemon is not started")
        return self.witnessing

    async def _verb_audit(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return await self._witness().audit(_timeout(args, "timeout", self.config.request_timeout))

    async def _verb_witness(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """What this node witnessed of others, their alarms, and who cosigned this node."""
        return self._witness().view()

    async def _verb_forget(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        node = args.get("node")
        if not isinstance(node, str) or not NODE_ID.fullmatch(node):
            raise BadRequest(f"{str(node)[:40]!r} is not a mesh node id")
        return self._witness().forget(node, peer.uid)

    async def _verb_checkpoint(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """This node's checkpoint with every cosignature collected for it (the newest such)."""
        return self._witness().cosigned_checkpoint()

    async def _members(self) -> tuple[str, list[dict[str, Any]]]:
        link, *_ = self._parts()
        me = self._node_id()
        try:
            return me, await link.peers()
        except MeshUnavailable as exc:
            raise Unavailable(str(exc)) from None

    async def _verb_status(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        _, store, local, _ = self._parts()
        timeout = _timeout(args, "timeout", self.config.status_timeout)
        me, peers = await self._members()
        started = self.clock()
        errors = {}
        requests = {}
        for item in peers:
            if item.get("connected"):
                requests[item["id"]] = new_request("status")
            else:
                errors[item["id"]] = "the mesh has no connection to it"
        own, answers = await asyncio.gather(local.report(me), self.ask(requests, timeout))
        reports = {me: own}
        now = self.wall()
        for node, answer in answers.items():
            if isinstance(answer, str):
                errors[node] = answer
            elif not answer.ok:
                errors[node] = f"refused: {answer.error}"
            else:
                try:
                    reports[node] = check_report(answer.body.get("report"), node)
                except ReportError as exc:
                    errors[node] = f"sent a malformed status: {exc}"
        for node, report in reports.items():
            store.save_report(node, report, now)
        members = [me, *sorted(p["id"] for p in peers)]
        rows = fleet_view(members, reports, store.reports(), now=now, errors=errors)
        return {"node": me, "time": now, "elapsed": self.clock() - started, "nodes": rows}

    async def _verb_command(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """An operator's command for an agent on a node (this one or another)."""
        ref = args.get("node")
        if not isinstance(ref, str) or not ref:
            raise BadRequest(
                "command needs the node: its id, a unique prefix of it, or its host name"
            )
        command = parse_command({k: v for k, v in args.items() if k != "node"})
        me, peers = await self._members()
        members = [me, *(p["id"] for p in peers)]
        if not self._matches(ref, members):
            await self._verb_status({}, peer)  # learn the host names of the nodes that answer
        node = self._resolve(ref, members)
        subject = f"{command.agent}@{node}"
        requested = {**command.to_json(), "node": node, "uid": peer.uid}
        self._record("command", subject, {**requested, "by": me, "role": "asked"})
        if node == me:
            return {"node": node, **await self._act_recorded(command, subject, requested)}
        request = new_request("control", command.to_json())
        answer = (await self.ask({node: request}, self.config.control_timeout))[node]
        if isinstance(answer, str):
            self._record(
                "command_result", subject, {**requested, "outcome": "unreachable", "error": answer}
            )
            raise Unavailable(f"node {node} did not carry out `{command.describe()}`: {answer}")
        if not answer.ok:
            self._record(
                "command_result",
                subject,
                {**requested, "outcome": "refused", "error": answer.error},
            )
            raise Refused(f"node {node}: {answer.error}")
        self._record("command_result", subject, {**requested, "outcome": "done"})
        return {"node": node, **answer.body}

    async def _verb_switch(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """A rolling safe switch of ``nodes`` (canary first), run from this node."""
        assert self.rollouts is not None
        refs = args.get("nodes")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise BadRequest("switch needs nodes: a list of node ids, id prefixes or host names")
        me, peers = await self._members()
        members = [me, *(p["id"] for p in peers)]
        if not all(self._matches(ref, members) for ref in refs):
            await self._verb_status({}, peer)  # learn the host names of the nodes that answer
        nodes = [self._resolve(ref, members) for ref in refs]
        if len(set(nodes)) != len(nodes):
            raise BadRequest("a node is named twice in nodes")
        return await self.rollouts.run(me, nodes, args, peer)

    async def _verb_rollout(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """The rollout running from this node, or the last one."""
        assert self.rollouts is not None
        if self.rollouts.current is None:
            raise Refused("no rollout has run from this node since its fleet daemon started")
        return dict(self.rollouts.current)

    def _matches(self, ref: str, members: list[str]) -> list[str]:
        """The members ``ref`` names: its id, else the host name its reports give, else a
        prefix of at least :data:`MIN_PREFIX` characters of its id."""
        _, store, _, _ = self._parts()
        if ref in members:
            return [ref]
        hosts = {n: seen.report.get("host") for n, seen in store.reports().items()}
        by_host = sorted(n for n in members if hosts.get(n) == ref)
        if by_host or len(ref) < MIN_PREFIX:
            return by_host
        return sorted(n for n in members if n.startswith(ref))

    def _resolve(self, ref: str, members: list[str]) -> str:
        found = self._matches(ref, members)
        if len(found) == 1:
            return found[0]
        if not found:
            raise BadRequest(
                f"no member of the mesh is {ref[:60]!r} (by id, id prefix of {MIN_PREFIX} or more "
                "characters, or host name; "
                "`keel fleet status` lists them)"
            )
        raise BadRequest(f"{ref[:60]!r} names {len(found)} nodes: {', '.join(found)}")

    async def _carry_out(self, sender: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A command from another node: only from an operator, recorded before and after."""
        me = self._node_id()
        if is_switch_verb(body):
            try:
                authorize(sender, self.config.operators, me, await self._mesh_operators())
            except KeelError as exc:
                subject = str(body.get("verb"))
                self._record("command_refused", subject, {"by": sender, "reason": str(exc)})
                raise
            assert self.rollouts is not None
            return await self.rollouts.carry_out(sender, me, body)
        command = parse_command(body)
        subject = f"{command.agent}@{me}"
        data = {**command.to_json(), "by": sender, "role": "acted"}
        try:
            authorize(sender, self.config.operators, me, await self._mesh_operators())
        except KeelError as exc:
            self._record("command_refused", subject, {**data, "reason": str(exc)})
            raise
        self._record("command", subject, data)
        return await self._act_recorded(command, subject, data)

    async def _mesh_operators(self) -> frozenset[str] | None:
        """The mesh's operator nodes as the local mesh node's records have them (None: not
        taken here). If the mesh cannot say, none: only the config's operators count."""
        if not self.config.mesh_operators:
            return None
        try:
            _, peers = await self._members()
        except KeelError:
            return frozenset()
        return frozenset(str(p["id"]) for p in peers if p.get("operator") is True)

    async def _act_recorded(
        self, command: AgentCommand, subject: str, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        """:meth:`_act`, its outcome recorded as ``command_result``."""
        try:
            result = await self._act(command)
        except KeelError as exc:
            self._record(
                "command_result", subject, {**data, "outcome": "failed", "error": str(exc)}
            )
            raise
        self._record("command_result", subject, {**data, "outcome": "done"})
        return result

    async def _act(self, command: AgentCommand) -> dict[str, Any]:
        """Carry a command out through watch; a restart waits for the stop to finish."""
        socket = self.config.watch
        if socket is None:
            raise Refused("this node runs no watch (watch is null in its fleet config)")
        timeout = self.config.control_timeout
        deadline = self.clock() + timeout

        async def watch(verb: str, args: dict[str, Any]) -> Any:
            left = max(0.1, deadline - self.clock())
            return await acall(socket, verb, args, timeout=left, service="watch")

        if command.verb == "restart":
            await watch("stop", {"agent": command.agent})
            while True:  # watch's stop returns at once; its start during a stop would be lost
                agents = (await watch("status", {})).get("agents", {})
                if agents.get(command.agent, {}).get("state") == "stopped":
                    break
                if self.clock() > deadline:
                    raise Refused(f"{command.agent} did not stop within {timeout:g} s")
                await asyncio.sleep(0.1)
            result = await watch("start", {"agent": command.agent})
        else:
            result = await watch(command.verb, {"agent": command.agent})
        state = result.get("state") if isinstance(result, dict) else None
        return {"agent": command.agent, "verb": command.verb, "state": state}


def _mesh_link(config: FleetConfig) -> Link:
    return MeshLink(config.mesh, protocol.TOPIC, timeout=config.request_timeout)


def _timeout(args: Mapping[str, Any], key: str, default: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 300:
        raise BadRequest(f"{key} must be a number of seconds, more than 0 and at most 300")
    return float(value)
