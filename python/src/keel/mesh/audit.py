"""Message metadata for the ledger, many messages to an entry. Pure.

A node records four stages of a message's life: ``sent`` (queued in the
outbox for a peer), ``delivered`` (the peer acknowledged it), ``dead-letter``
(it expired or the peer refused it) and ``received`` (a peer's message is
this node's now). One ledger entry per message per stage made the ledger
the mesh's bottleneck (a Merkle leaf, and its JSON, per event); so
:class:`MessageBatches` gathers the events of one stage and one peer for a
short window (:data:`WINDOW`) and makes one entry of them, sooner when it
holds :data:`MAX_MESSAGES` messages or :data:`MAX_DATA_BYTES` of metadata.
Nothing of a message is left out, only its own timestamp (the entry says
when its first and last event happened)::

    kind     sent-batch | delivered-batch | dead-letter-batch | received-batch
    subject  the peer's node id (the recipient; for received-batch, the sender)
    data     {"from": NODE, "to": NODE, "count": 3, "bytes": 768,
              "first": TS, "last": TS, ["agents": [AGENT, ...],]
              "groups": [{"topic": T, "room": R or null, ["reason": WHY,]
                          ["agent": AGENT,] ["to_agent": AGENT,]
                          "ids": [ID, ...], "sizes": [BYTES, ...]}, ...]}

``ids[k]`` and ``sizes[k]`` are one message; ``count`` and ``bytes`` are the
sums over the groups. A group's ``agent`` is the agent that sent its
messages as the sending node stamped them (left out: the node itself sent
them), ``to_agent`` the agent they are for on the receiving node (left out:
the topic's readers); ``agents`` lists the sending agents of the whole
entry, sorted (left out when there are none). So whoever holds an entry's
inclusion proof holds the proof of every message it names and of which agent
sent it (:func:`messages` lists them back).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, NamedTuple

from keel.ledger.core import canonical_json, format_ts

STAGES: Final = ("sent", "delivered", "dead-letter", "received")
KINDS: Final = {stage: f"{stage}-batch" for stage in STAGES}
STAGE_OF_KIND: Final = {kind: stage for stage, kind in KINDS.items()}
WINDOW: Final = 0.1  # s: the longest an event waits before its entry is made
MAX_MESSAGES: Final = 256  # messages in one entry
MAX_DATA_BYTES: Final = 12 * 1024  # of metadata in one entry (the ledger takes 16 KiB)
MAX_REASON: Final = 200  # characters of a dead letter's reason kept
_BATCH_OVERHEAD: Final = 192  # the keys, counts and times around the groups, node ids aside


# id, peer, topic, room, size, sending agent, agent it is for (None: the node, the topic)
Message = tuple[str, str, str, str | None, int, str | None, str | None]
_GroupKey = tuple[str, str | None, str | None, str | None, str | None]  # topic room reason agent to


class Entry(NamedTuple):
    """What to record: the arguments of ``Recorder.record``."""

    kind: str
    subject: str
    data: dict[str, Any]


class _Group:
    __slots__ = ("header", "ids", "sizes")

    def __init__(self, header: dict[str, Any]) -> None:
        self.header = header
        self.ids: list[str] = []
        self.sizes: list[int] = []


class _Batch:
    __slots__ = ("bytes", "cost", "deadline", "first", "groups", "last", "total")

    def __init__(self, deadline: float, wall: float, cost: int) -> None:
        self.deadline = deadline
        self.first = self.last = wall
        self.groups: dict[_GroupKey, _Group] = {}
        self.total = 0
        self.bytes = 0
        self.cost = cost  # bytes of the entry's data so far, at most


class MessageBatches:
    """The open batches of one node, by stage and peer; makes their ledger entries.

    :meth:`add` returns the entries that are complete (a full batch),
    :meth:`due` those whose window is over at ``clock()``, :meth:`flush`
    all of them (at shutdown). ``clock`` is monotonic, ``wall`` the time
    the entries state.
    """

    def __init__(
        self,
        me: str,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
        window: float = WINDOW,
        max_messages: int = MAX_MESSAGES,
        max_bytes: int = MAX_DATA_BYTES,
    ) -> None:
        if window < 0 or max_messages < 1 or max_bytes < _BATCH_OVERHEAD + 512:
            raise ValueError(
                f"batches need window >= 0, max_messages >= 1 and max_bytes >= "
                f"{_BATCH_OVERHEAD + 512}, got {window}, {max_messages}, {max_bytes}"
            )
        self.me = me
        self.clock = clock
        self.wall = wall
        self.window = window
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._open: dict[tuple[str, str], _Batch] = {}

    def __len__(self) -> int:
        """Messages waiting for their entry (all stages)."""
        return sum(batch.total for batch in self._open.values())

    def add(
        self,
        stage: str,
        *,
        message_id: str,
        peer: str,
        topic: str,
        room: str | None,
        size: int,
        reason: str | None = None,
        agent: str | None = None,
        to: str | None = None,
    ) -> list[Entry]:
        """One message at one stage; the entries complete now (usually none)."""
        return self.add_many(stage, [(message_id, peer, topic, room, size, agent, to)], reason)

    def add_many(
        self, stage: str, items: Iterable[Message], reason: str | None = None
    ) -> list[Entry]:
        """Messages ``(id, peer, topic, room, size, agent, to)`` at one stage; the entries
        complete now."""
        kind = KINDS.get(stage)
        if kind is None:
            raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
        if reason is not None and len(reason) > MAX_REASON:
            reason = reason[: MAX_REASON - 3] + "..."
        done: list[Entry] = []
        wall = self.wall()
        opened = self._open
        max_messages, max_bytes = self.max_messages, self.max_bytes
        for message_id, peer, topic, room, size, agent, to in items:
            key = (stage, peer)
            batch = opened.get(key)
            if batch is None:
                overhead = _BATCH_OVERHEAD + len(canonical_json([self.me, peer]))
                batch = opened[key] = _Batch(self.clock() + self.window, wall, overhead)
            group_key = (topic, room, reason, agent, to)
            group = batch.groups.get(group_key)
            if message_id.isascii():
                cost = len(message_id) + 4 + len(str(size))
            else:
                cost = len(canonical_json(message_id)) + 2 + len(str(size))
            if group is None:
                header: dict[str, Any] = {"topic": topic, "room": room}
                if reason is not None:
                    header["reason"] = reason
                if agent is not None:
                    header["agent"] = agent
                    cost += len(agent) + 14  # its place in "agents":[...], at most
                if to is not None:
                    header["to_agent"] = to
                cost += len(canonical_json(header)) + 24  # "ids":[],"sizes":[] and the braces
                if batch.total and batch.cost + cost > max_bytes:
                    done.append(self._entry(key, opened.pop(key)))
                    overhead = _BATCH_OVERHEAD + len(canonical_json([self.me, peer]))
                    batch = opened[key] = _Batch(self.clock() + self.window, wall, overhead)
                group = batch.groups[group_key] = _Group(header)
            elif batch.cost + cost > max_bytes:
                done.append(self._entry(key, opened.pop(key)))
                overhead = _BATCH_OVERHEAD + len(canonical_json([self.me, peer]))
                batch = opened[key] = _Batch(self.clock() + self.window, wall, overhead)
                group = batch.groups[group_key] = _Group(group.header)
                cost += len(canonical_json(group.header)) + 24
                if agent is not None:
                    cost += len(agent) + 14
            group.ids.append(message_id)
            group.sizes.append(size)
            batch.total += 1
            batch.bytes += size
            batch.cost += cost
            batch.last = wall
            if batch.total >= max_messages:
                done.append(self._entry(key, opened.pop(key)))
        return done

    def next_deadline(self) -> float | None:
        """When the oldest open batch is due (``clock`` time), or None if none is open."""
        if not self._open:
            return None
        return min(batch.deadline for batch in self._open.values())

    def due(self) -> list[Entry]:
        """The entries of every batch whose window is over."""
        now = self.clock()
        keys = [key for key, batch in self._open.items() if batch.deadline <= now]
        return [self._entry(key, self._open.pop(key)) for key in keys]

    def flush(self) -> list[Entry]:
        """Every open batch's entry, now (the node stops)."""
        entries = [self._entry(key, batch) for key, batch in self._open.items()]
        self._open.clear()
        return entries

    def _entry(self, key: tuple[str, str], batch: _Batch) -> Entry:
        stage, peer = key
        sender, recipient = (peer, self.me) if stage == "received" else (self.me, peer)
        data: dict[str, Any] = {
            "from": sender,
            "to": recipient,
            "count": batch.total,
            "bytes": batch.bytes,
            "first": format_ts(batch.first),
            "last": format_ts(batch.last),
        }
        agents = sorted({key[3] for key in batch.groups if key[3] is not None})
        if agents:
            data["agents"] = agents
        data["groups"] = [
            {**group.header, "ids": group.ids, "sizes": group.sizes}
            for group in batch.groups.values()
        ]
        return Entry(KINDS[stage], peer, data)


def messages(kind: str, data: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The messages a batch entry names, one dict each (as the per-message entries were).

    ``{"stage", "id", "from", "to", "topic", "room", "size"}``, ``reason``
    for dead letters, ``agent`` and ``to_agent`` where the group names them. :class:`ValueError` if the entry is not a batch entry
    of this module's form.
    """
    stage = STAGE_OF_KIND.get(kind)
    if stage is None:
        raise ValueError(f"{kind!r} is not a mesh batch entry ({', '.join(KINDS.values())})")
    try:
        sender, recipient, groups = data["from"], data["to"], data["groups"]
        for group in groups:
            ids, sizes = group["ids"], group["sizes"]
            if len(ids) != len(sizes):
                raise ValueError("a group has as many ids as sizes")
            for message_id, size in zip(ids, sizes, strict=True):
                found = {
                    "stage": stage,
                    "id": message_id,
                    "from": sender,
                    "to": recipient,
                    "topic": group["topic"],
                    "room": group["room"],
                    "size": size,
                }
                for key in ("reason", "agent", "to_agent"):
                    if key in group:
                        found[key] = group[key]
                yield found
    except (KeyError, TypeError) as exc:
        raise ValueError(f"a malformed {kind} entry: {exc!r}") from None
