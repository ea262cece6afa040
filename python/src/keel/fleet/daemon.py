"""The fleet daemon: this node's voice in the fleet, over the local mesh daemon.

One per host, on :mod:`keel.service`. It

- answers other nodes' requests for this node (status, its signed ledger
  head with consistency proofs, what it has witnessed, operators' commands);
- witnesses every other node's ledger every ``witness_every`` seconds
  (:mod:`keel.fleet.witness`) and hands each node its cosignature;
- serves the local verbs behind ``keel fleet status``, ``audit``,
  ``witness``, ``forget``, ``checkpoint`` and the control commands, asking the
  other nodes over the mesh.

Requests and replies travel as :mod:`keel.fleet.protocol` messages on one mesh
topic; a reply is matched to its request by id *and* by the node the mesh says
sent it. A request to a node the mesh is not connected to is not sent: that
node is reported unreachable at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from keel.api import Handler, Peer, acall
from keel.errors import BadRequest, KeelError, Refused, Unavailable
from keel.fleet import audit as fleet_audit
from keel.fleet import protocol
from keel.fleet.config import NODE_ID, FleetConfig
from keel.fleet.control import AgentCommand, authorize, parse_command
from keel.fleet.cosign import CosignatureVerifier, Cosigner, cosignatures
from keel.fleet.link import Incoming, Link, MeshLink, MeshUnavailable
from keel.fleet.local import LocalNode
from keel.fleet.protocol import FleetProtocolError, Reply, Request
from keel.fleet.rollouts import Rollouts, is_switch_verb
from keel.fleet.status import ReportError, check_report, fleet_view
from keel.fleet.store import Cosignature, FleetStore, StoreError, root_text
from keel.fleet.switching import Switches
from keel.fleet.witness import Alarm, Cosigned, Invalid, witness
from keel.ledger import core
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
        self._invalid: dict[str, str] = {}  # node -> the last reason its answer was refused
        self.rounds = 0

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
        self.link.start(self._incoming)
        shell.spawn(self._witness_loop(), name="witness")
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
            "witness_rounds": self.rounds,
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
            raise Unavailable(f"the mesh daemon in {self.config.mesh} cannot be reached: {reason}")
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

    @staticmethod
    def request(kind: str, body: Mapping[str, Any] | None = None) -> Request:
        return Request(kind, secrets.token_hex(8), body or {})

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
            return self._held_body()
        if request.type == "cosigned":
            self._take_cosignature(sender, body)
            return None
        return await self._carry_out(sender, body)

    def _held_body(self) -> dict[str, Any]:
        """What this witness holds: the largest cosigned checkpoint of each node, its alarms."""
        _, store, _, cosigner = self._parts()
        return {
            "witness_key": str(cosigner.verifier),
            "witnessed": [
                {"node": w.node, "ledger_key": w.ledger_key, "note": w.note}
                for w in store.all_witnessed()
            ],
            "alarms": [a.to_json() for a in store.alarms()],
        }

    def _take_cosignature(self, sender: str, body: Mapping[str, Any]) -> None:
        """Keep another node's cosignature of this node's checkpoint, once it verifies."""
        _, store, _, _ = self._parts()
        try:
            cosignature = self._check_cosignature(sender, body)
        except (FleetProtocolError, LedgerError) as exc:
            log.warning("fleet: a cosignature from %s was refused: %s", sender, exc)
            return
        store.save_cosignature(cosignature)

    def _check_cosignature(self, sender: str, body: Mapping[str, Any]) -> Cosignature:
        _, store, local, _ = self._parts()
        note = protocol.string(body, "note", "cosigned")
        key = CosignatureVerifier.parse(protocol.string(body, "witness_key", "cosigned"))
        checkpoint = local.verify_own(note)
        if checkpoint is None:
            raise FleetProtocolError("the cosigned note is not a checkpoint this node signed")
        pinned = store.pin_witness_key(sender, str(key), self.wall())
        if pinned != str(key):
            raise FleetProtocolError(
                f"it cosigned with {key}, not its pinned witness key {pinned} "
                "(`keel fleet forget` the node to accept a new key)"
            )
        found = cosignatures(note, [key])
        if not found:
            raise FleetProtocolError("the note carries no cosignature of its witness key")
        return Cosignature(sender, str(key), checkpoint.size, note, found[0].timestamp)

    # --- witnessing ------------------------------------------------------------------

    async def _witness_loop(self) -> None:
        link, *_ = self._parts()
        while not await link.wait_ready(5.0):
            pass
        while True:
            try:
                await self.witness_round()
            except MeshUnavailable as exc:
                log.debug("fleet: no witnessing round: %s", exc)
            except StoreError as exc:  # a full disk, say: witnessing resumes when it is writable
                log.error("fleet: a witnessing round could not keep its results: %s", exc)  # noqa: TRY400
            period = self.config.witness_every
            await asyncio.sleep(period * (0.9 + 0.2 * self.rng.random()))

    async def witness_round(self) -> None:
        """Ask every other member for its checkpoint, judge each answer, cosign or alarm."""
        link, store, _, cosigner = self._parts()
        self._node_id()
        peers = await link.peers()
        previous = {}
        requests = {}
        for peer in peers:
            node = peer["id"]
            if not peer.get("connected") or store.alarms(node):
                continue  # a node with an alarm is not cosigned again until it is forgotten
            prior = previous[node] = store.witnessed(node)
            sizes = [] if prior is None else [prior.size]
            requests[node] = self.request("checkpoint", {"from": sizes})
        answers = await self.ask(requests, self.config.request_timeout)
        notices = []
        for node, answer in answers.items():
            if isinstance(answer, str) or not answer.ok:
                continue  # unreachable or refusing: nothing learnt, nothing changes
            prior = previous[node]
            try:
                note = protocol.string(answer.body, "note", "checkpoint")
                ledger_key = protocol.string(answer.body, "ledger_key", "checkpoint")
                proofs = protocol.proofs(answer.body, "proofs", "checkpoint")
            except FleetProtocolError as exc:
                self._refused(node, str(exc))
                continue
            decision = witness(
                prior,
                node=node,
                ledger_key=ledger_key,
                note=note,
                proof=(proofs.get(prior.size) or []) if prior is not None else [],
                cosigner=cosigner,
                now=self.wall(),
                pinned_key=self.config.pinned.get(node),
            )
            if isinstance(decision, Cosigned):
                self._invalid.pop(node, None)
                store.save_witnessed(decision.witnessed, self.config.keep)
                record = decision.witnessed
                if decision.first:
                    self._record(
                        "witness_pin",
                        node,
                        {
                            "ledger_key": record.ledger_key,
                            "size": record.size,
                            "root": root_text(record.root),
                        },
                    )
                body = {"note": record.note, "witness_key": str(cosigner.verifier)}
                notices.append((node, self.request("cosigned", body).encode()))
            elif isinstance(decision, Alarm):
                self._alarm(decision)
            elif isinstance(decision, Invalid):
                self._refused(node, decision.reason)
        self.rounds += 1
        with contextlib.suppress(MeshUnavailable):
            await link.send(notices, ttl=self.config.request_timeout)

    def _alarm(self, alarm: Alarm) -> None:
        _, store, _, _ = self._parts()
        stored = store.add_alarm(alarm, self.wall())
        log.error("fleet: ALARM: node %s %s: %s", alarm.node, alarm.kind, alarm.detail)
        presented = _checkpoint_of(alarm.presented)
        self._record(
            "witness_alarm",
            alarm.node,
            {
                "alarm": stored.id,
                "kind": alarm.kind,
                "witnessed": {
                    "size": alarm.witnessed.size,
                    "root": root_text(alarm.witnessed.root),
                },
                "presented": presented,
                "ledger_key": alarm.witnessed.ledger_key,
                "presented_key": alarm.presented_key,
            },
        )

    def _refused(self, node: str, reason: str) -> None:
        if self._invalid.get(node) != reason:
            log.warning("fleet: the checkpoint of %s was not cosigned: %s", node, reason)
        self._invalid[node] = reason

    # --- local verbs ----------------------------------------------------------------

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
                requests[item["id"]] = self.request("status")
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

    async def _verb_audit(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        _, _store, local, _ = self._parts()
        timeout = _timeout(args, "timeout", self.config.request_timeout)
        me, peers = await self._members()
        others = sorted(p["id"] for p in peers)
        answers = await self.ask({n: self.request("audit") for n in others}, timeout)
        bodies: dict[str, Mapping[str, Any]] = {me: self._held_body()}
        silent = []
        for node, answer in answers.items():
            if isinstance(answer, Reply) and answer.ok:
                bodies[node] = answer.body
            else:
                silent.append(node)
        held: list[fleet_audit.HeldNote] = []
        for holder, body in bodies.items():
            try:
                held += self._held_notes(holder, body)
            except (FleetProtocolError, LedgerError) as exc:
                log.warning("fleet: the audit answer of %s is unusable: %s", holder, exc)
                silent.append(holder)
        members = [me, *others]
        requests = {
            node: self.request("checkpoint", {"from": fleet_audit.sizes_to_prove(held, node)})
            for node in others
        }
        own_sizes = fleet_audit.sizes_to_prove(held, me)
        presented: dict[str, fleet_audit.Presented] = {}
        own_task = asyncio.ensure_future(local.checkpoint(own_sizes))
        answers = await self.ask(requests, timeout)
        try:
            own = await own_task
        except KeelError as exc:
            answers[me] = Reply("own", False, error=str(exc))
        else:
            presented[me] = fleet_audit.Presented(me, own["ledger_key"], own["note"], own["proofs"])
        missing: dict[str, str] = {}
        for node, answer in answers.items():
            if isinstance(answer, str):
                missing[node] = answer
                continue
            if not answer.ok:
                missing[node] = f"it refused: {answer.error}"
                continue
            try:
                presented[node] = fleet_audit.Presented(
                    node,
                    protocol.string(answer.body, "ledger_key", "checkpoint"),
                    protocol.string(answer.body, "note", "checkpoint"),
                    protocol.proofs(answer.body, "proofs", "checkpoint"),
                )
            except FleetProtocolError as exc:
                missing[node] = f"its answer is unusable: {exc}"
        result = fleet_audit.judge(
            members, presented, held, silent=silent, pinned=self.config.pinned, missing=missing
        )
        out = result.to_json()
        out.update({"auditor": me, "time": self.wall()})
        self._record(
            "audit",
            me,
            {
                "nodes": len(members),
                "problems": {n.node: n.verdict for n in result.problems},
                "unreachable": [n.node for n in result.nodes if not n.reachable],
                "silent_witnesses": result.silent_witnesses,
            },
        )
        return out

    def _held_notes(self, holder: str, body: Mapping[str, Any]) -> list[fleet_audit.HeldNote]:
        _, store, _, _ = self._parts()
        key = str(CosignatureVerifier.parse(protocol.string(body, "witness_key", "audit")))
        me = self._node_id()
        if holder != me and store.pin_witness_key(holder, key, self.wall()) != key:
            raise FleetProtocolError(f"its witness key {key} is not the one pinned for it")
        notes = []
        for item in protocol.items(body, "witnessed", "audit", limit=10_000):
            notes.append(
                fleet_audit.HeldNote(
                    protocol.string(item, "node", "audit.witnessed"),
                    holder,
                    protocol.string(item, "ledger_key", "audit.witnessed"),
                    protocol.string(item, "note", "audit.witnessed"),
                    key,
                )
            )
        for item in protocol.items(body, "alarms", "audit", limit=10_000):
            node = protocol.string(item, "node", "audit.alarms")
            for part in ("witnessed", "presented"):
                evidence = item.get(part)
                if not isinstance(evidence, dict):
                    raise FleetProtocolError(f"audit.alarms.{part} must be an object")
                notes.append(
                    fleet_audit.HeldNote(
                        node,
                        holder,
                        protocol.string(evidence, "ledger_key", f"audit.alarms.{part}"),
                        protocol.string(evidence, "note", f"audit.alarms.{part}"),
                        None,
                        "alarm",
                    )
                )
        return notes

    async def _verb_witness(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """What this node witnessed of others, their alarms, and who cosigned this node."""
        _, store, _, cosigner = self._parts()
        return {
            "node": self.link.node_id if self.link else None,
            "witness_key": str(cosigner.verifier),
            "witnessed": [
                {
                    "node": w.node,
                    "ledger_key": w.ledger_key,
                    "size": w.size,
                    "root": root_text(w.root),
                    "at": w.at,
                    "note": w.note,
                }
                for w in store.all_witnessed()
            ],
            "alarms": [a.to_json() for a in store.alarms()],
            "cosigned_by": [
                {"witness": c.witness, "witness_key": c.witness_key, "size": c.size, "at": c.at}
                for c in store.cosignatures()
            ],
        }

    async def _verb_forget(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        _, store, _, _ = self._parts()
        node = args.get("node")
        if not isinstance(node, str) or not NODE_ID.fullmatch(node):
            raise BadRequest(f"{str(node)[:40]!r} is not a mesh node id")
        witnessed, alarms = store.forget(node)
        unpinned = store.unpin(node)
        self._invalid.pop(node, None)
        self._record(
            "witness_forget",
            node,
            {"witnessed": witnessed, "alarms": alarms, "witness_key": unpinned, "uid": peer.uid},
        )
        return {"node": node, "witnessed": witnessed, "alarms": alarms, "witness_key": unpinned}

    async def _verb_checkpoint(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """This node's checkpoint with every cosignature collected for it (the newest such)."""
        _, store, local, _ = self._parts()
        by_text: dict[str, list[Cosignature]] = {}
        for item in store.cosignatures():
            with contextlib.suppress(LedgerError):
                by_text.setdefault(core.split_note(item.note)[0], []).append(item)
        if not by_text:
            raise Refused("no other node has cosigned a checkpoint of this node yet")
        text, items = max(by_text.items(), key=lambda kv: (_size_of(kv[0]), len(kv[1])))
        lines: dict[tuple[str, int], str] = {}
        for item in items:
            for signature in core.split_note(item.note)[1]:
                lines.setdefault((signature.name, signature.key_id), signature.line())
        note = text + "\n" + "".join(lines.values())
        return {
            "note": note,
            "size": _size_of(text),
            "witnesses": [
                {"node": i.witness, "witness_key": i.witness_key, "at": i.at} for i in items
            ],
            "ledger_key": local.ledger_key(),
        }

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
        request = self.request("control", command.to_json())
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
                authorize(sender, self.config.operators, me)
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
            authorize(sender, self.config.operators, me)
        except KeelError as exc:
            self._record("command_refused", subject, {**data, "reason": str(exc)})
            raise
        self._record("command", subject, data)
        return await self._act_recorded(command, subject, data)

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


def _size_of(text: str) -> int:
    try:
        return core.Checkpoint.parse(text).size
    except LedgerError:
        return -1


def _checkpoint_of(note: str) -> dict[str, Any] | None:
    try:
        checkpoint = core.Checkpoint.parse(core.split_note(note)[0])
    except LedgerError:
        return None
    return {"size": checkpoint.size, "root": root_text(checkpoint.root)}
