"""Witnessing the other nodes' ledgers, and the audit over what every node holds.

The fleet daemon's part that keeps the one audit record (docs/fleet.md, "The
audit"): a witnessing round asks every connected member for its signed
checkpoint and a consistency proof, cosigns or raises an alarm
(:mod:`keel.fleet.witness`) and hands each node its cosignature; the audit
gathers what every node holds and every node's current checkpoint and judges
them (:mod:`keel.fleet.audit`). The mesh is reached through the daemon's
``ask`` and link; nothing here knows the mesh's insides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from keel.errors import KeelError, Refused
from keel.fleet import audit as fleet_audit
from keel.fleet import protocol
from keel.fleet.config import FleetConfig
from keel.fleet.cosign import CosignatureVerifier, Cosigner, cosignatures
from keel.fleet.link import Link, MeshUnavailable
from keel.fleet.local import LocalNode
from keel.fleet.protocol import FleetProtocolError, Reply, Request, new_request
from keel.fleet.store import Cosignature, FleetStore, StoreError, root_text
from keel.fleet.witness import Alarm, Cosigned, Invalid, witness
from keel.ledger import core
from keel.ledger.errors import LedgerError

log = logging.getLogger("keel.fleet")

Ask = Callable[[Mapping[str, Request], float], Awaitable[dict[str, Reply | str]]]
Record = Callable[[str, str, Mapping[str, Any]], None]


class Witnessing:
    def __init__(
        self,
        config: FleetConfig,
        *,
        store: FleetStore,
        local: LocalNode,
        cosigner: Cosigner,
        link: Link,
        ask: Ask,
        record: Record,
        node_id: Callable[[], str],
        members: Callable[[], Awaitable[tuple[str, list[dict[str, Any]]]]],
        wall: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.config = config
        self.store = store
        self.local = local
        self.cosigner = cosigner
        self.link = link
        self.ask = ask
        self.record = record
        self.node_id = node_id
        self.members = members
        self.wall = wall
        self.rng = rng
        self.rounds = 0
        self._invalid: dict[str, str] = {}  # node -> the last reason its answer was refused

    def held_body(self) -> dict[str, Any]:
        """What this witness holds: the largest cosigned checkpoint of each node, its alarms."""
        return {
            "witness_key": str(self.cosigner.verifier),
            "witnessed": [
                {"node": w.node, "ledger_key": w.ledger_key, "note": w.note}
                for w in self.store.all_witnessed()
            ],
            "alarms": [a.to_json() for a in self.store.alarms()],
        }

    def take_cosignature(self, sender: str, body: Mapping[str, Any]) -> None:
        """Keep another node's cosignature of this node's checkpoint, once it verifies."""
        try:
            cosignature = self._check_cosignature(sender, body)
        except (FleetProtocolError, LedgerError) as exc:
            log.warning("fleet: a cosignature from %s was refused: %s", sender, exc)
            return
        self.store.save_cosignature(cosignature)

    def _check_cosignature(self, sender: str, body: Mapping[str, Any]) -> Cosignature:
        note = protocol.string(body, "note", "cosigned")
        key = CosignatureVerifier.parse(protocol.string(body, "witness_key", "cosigned"))
        checkpoint = self.local.verify_own(note)
        if checkpoint is None:
            raise FleetProtocolError("the cosigned note is not a checkpoint this node signed")
        pinned = self.store.pin_witness_key(sender, str(key), self.wall())
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

    async def loop(self) -> None:
        while not await self.link.wait_ready(5.0):
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
        self.node_id()
        peers = await self.link.peers()
        previous = {}
        requests = {}
        for peer in peers:
            node = peer["id"]
            if not peer.get("connected") or self.store.alarms(node):
                continue  # a node with an alarm is not cosigned again until it is forgotten
            prior = previous[node] = self.store.witnessed(node)
            sizes = [] if prior is None else [prior.size]
            requests[node] = new_request("checkpoint", {"from": sizes})
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
                cosigner=self.cosigner,
                now=self.wall(),
                pinned_key=self.config.pinned.get(node),
            )
            if isinstance(decision, Cosigned):
                self._invalid.pop(node, None)
                self.store.save_witnessed(decision.witnessed, self.config.keep)
                record = decision.witnessed
                if decision.first:
                    self.record(
                        "witness_pin",
                        node,
                        {
                            "ledger_key": record.ledger_key,
                            "size": record.size,
                            "root": root_text(record.root),
                        },
                    )
                body = {"note": record.note, "witness_key": str(self.cosigner.verifier)}
                notices.append((node, new_request("cosigned", body).encode()))
            elif isinstance(decision, Alarm):
                self._alarm(decision)
            elif isinstance(decision, Invalid):
                self._refused(node, decision.reason)
        self.rounds += 1
        with contextlib.suppress(MeshUnavailable):
            await self.link.send(notices, ttl=self.config.request_timeout)

    def _alarm(self, alarm: Alarm) -> None:
        stored = self.store.add_alarm(alarm, self.wall())
        log.error("fleet: ALARM: node %s %s: %s", alarm.node, alarm.kind, alarm.detail)
        presented = _checkpoint_of(alarm.presented)
        self.record(
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

    async def audit(self, timeout: float) -> dict[str, Any]:
        """Every node's current checkpoint against what the others hold (:mod:`keel.fleet.audit`)."""
        me, peers = await self.members()
        others = sorted(p["id"] for p in peers)
        answers = await self.ask({n: new_request("audit") for n in others}, timeout)
        bodies: dict[str, Mapping[str, Any]] = {me: self.held_body()}
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
            node: new_request("checkpoint", {"from": fleet_audit.sizes_to_prove(held, node)})
            for node in others
        }
        own_sizes = fleet_audit.sizes_to_prove(held, me)
        presented: dict[str, fleet_audit.Presented] = {}
        own_task = asyncio.ensure_future(self.local.checkpoint(own_sizes))
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
        self.record(
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
        key = str(CosignatureVerifier.parse(protocol.string(body, "witness_key", "audit")))
        me = self.node_id()
        if holder != me and self.store.pin_witness_key(holder, key, self.wall()) != key:
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

    def view(self) -> dict[str, Any]:
        """What this node witnessed of others, their alarms, and who cosigned this node."""
        return {
            "node": self.link.node_id,
            "witness_key": str(self.cosigner.verifier),
            "witnessed": [
                {
                    "node": w.node,
                    "ledger_key": w.ledger_key,
                    "size": w.size,
                    "root": root_text(w.root),
                    "at": w.at,
                    "note": w.note,
                }
                for w in self.store.all_witnessed()
            ],
            "alarms": [a.to_json() for a in self.store.alarms()],
            "cosigned_by": [
                {"witness": c.witness, "witness_key": c.witness_key, "size": c.size, "at": c.at}
                for c in self.store.cosignatures()
            ],
        }

    def forget(self, node: str, uid: int) -> dict[str, Any]:
        witnessed, alarms = self.store.forget(node)
        unpinned = self.store.unpin(node)
        self._invalid.pop(node, None)
        self.record(
            "witness_forget",
            node,
            {"witnessed": witnessed, "alarms": alarms, "witness_key": unpinned, "uid": uid},
        )
        return {"node": node, "witnessed": witnessed, "alarms": alarms, "witness_key": unpinned}

    def cosigned_checkpoint(self) -> dict[str, Any]:
        """This node's checkpoint with every cosignature collected for it (the newest such)."""
        by_text: dict[str, list[Cosignature]] = {}
        for item in self.store.cosignatures():
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
            "ledger_key": self.local.ledger_key(),
        }


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
