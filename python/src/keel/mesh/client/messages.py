"""What the client hands an agent, and what it remembers to hand each message once."""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from keel.errors import BadRequest
from keel.mesh.arguments import MAX_TTL, too_big
from keel.mesh.ids import check_topic, parse_address
from keel.mesh.local import Delivered
from keel.mesh.packets import MAX_PAYLOAD

REMEMBERED_IDS: Final = 1 << 17


@dataclass(frozen=True)
class Received:
    id: str
    sender: str  # the node it came from
    topic: str
    room: str | None
    data: bytes = field(repr=False)
    received: float
    agent: str | None = None  # the agent that sent it, as its node stamped it (None: the node)


class Returned:
    """The (sender, id) of messages handed to the agent, the latest ``REMEMBERED_IDS``.

    Shared by every way a client receives (``recv`` and its subscriptions),
    from any thread: a message the daemon hands out again (a lease ran out,
    the daemon restarted before an acknowledgement reached it) is
    acknowledged and not returned twice.
    """

    def __init__(self, remember: int = REMEMBERED_IDS) -> None:
        self.remember = remember
        self._keys: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, sender: str, message_id: str) -> bool:
        """True the first time this message is seen (and remembers it)."""
        return self.first_times([(sender, message_id)])[0]

    def first_times(self, keys: Sequence[tuple[str, str]]) -> list[bool]:
        """``first_time`` of each (sender, id) in turn, under one lock (a frame's messages)."""
        seen = self._keys
        out = []
        with self._lock:
            for key in keys:
                fresh = key not in seen
                if fresh:
                    seen[key] = None
                out.append(fresh)
            while len(seen) > self.remember:
                seen.popitem(last=False)
        return out


def received(item: Delivered, topic: str) -> Received:
    """``Received(...)`` of a delivered message, equal to it, made without the frozen
    dataclass's ``__init__`` (one ``object.__setattr__`` per field): a subscription makes
    one per message it hands out."""
    message: Received = _new(Received)
    message.__dict__.update(
        id=item.id,
        sender=item.sender,
        topic=topic,
        room=item.room,
        data=item.payload,
        received=item.received,
        agent=item.agent,
    )
    return message


_new = object.__new__


def check_message(to: str, topic: str, data: bytes) -> tuple[str | None, str]:
    """Refuse what the daemon would refuse of any message, before sending any of it;
    ``to`` (``NODE_ID`` or ``AGENT@NODE_ID``) as (agent or None, node id)."""
    try:
        address = parse_address(to)
    except ValueError as exc:
        raise BadRequest(f"to {exc}") from None
    try:
        check_topic(topic)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    check_size(data)
    return address


def check_size(data: bytes) -> None:
    """Refuse a payload the daemon would refuse, before sending any of it."""
    if len(data) > MAX_PAYLOAD:
        raise BadRequest(too_big(len(data)))


def ttl_ms(ttl: float | None) -> int:
    """The binary stream's TTL: milliseconds, 0 for the daemon's default."""
    if ttl is None:
        return 0
    if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL):
        raise BadRequest(
            f"ttl must be a positive number of seconds, at most {MAX_TTL}, got {ttl!r}"
        )
    return max(1, round(ttl * 1000))
