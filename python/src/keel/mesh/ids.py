"""Names on the mesh: node ids, message ids, topics, and the sizes of keys. Pure.

Nothing here needs a cryptographic library (a node id is a BLAKE2s digest,
which :mod:`hashlib` has), so the agents' client (:mod:`keel.mesh.client`)
and the wire codecs check names without loading one::

    node_id = lowercase(base32(BLAKE2s-256("keel-mesh/1 node-id" || 0x00 || static_public)[:20]))

32 characters of ``[a-z2-7]``, no padding (``docs/mesh-protocol.md``, section 2).
A message id is 16 bytes, 32 lowercase hex digits; a topic is 1 to 128
characters of ``[A-Za-z0-9._:/@+=-]``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Final

from keel.config import shorten

KEY_SIZE: Final = 32  # X25519 and Ed25519 keys
SIGNATURE_SIZE: Final = 64  # Ed25519
NODE_ID_LABEL: Final = b"keel-mesh/1 node-id\x00"
NODE_ID_BYTES: Final = 20
NODE_ID_RE: Final = re.compile(r"[a-z2-7]{32}")
MESSAGE_ID_BYTES: Final = 16
MAX_TOPIC: Final = 128
MAX_AGENT: Final = 20  # an agent's name: keel-agent-<name> stays a 31-character user name
_AGENT_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,19}")
_MESSAGE_ID_RE = re.compile(r"[0-9a-f]{32}")
_TOPIC_RE = re.compile(r"[A-Za-z0-9._:/@+=-]+")


def node_id_of(static_public: bytes) -> str:
    """The node id of an X25519 static public key."""
    if len(static_public) != KEY_SIZE:
        raise ValueError(f"an X25519 public key is {KEY_SIZE} bytes, got {len(static_public)}")
    digest = hashlib.blake2s(NODE_ID_LABEL + static_public).digest()[:NODE_ID_BYTES]
    return base64.b32encode(digest).decode("ascii").lower()


def is_node_id(text: object) -> bool:
    return isinstance(text, str) and NODE_ID_RE.fullmatch(text) is not None


def is_agent_name(text: object) -> bool:
    """An agent's name as the mesh carries it: 1 to 20 of ``[a-z0-9_-]``, a letter first."""
    return isinstance(text, str) and _AGENT_RE.fullmatch(text) is not None


def parse_address(text: str) -> tuple[str | None, str]:
    """``NODE_ID`` or ``AGENT@NODE_ID`` -> (agent or None, node id); ``ValueError`` if neither."""
    agent, sep, node = text.rpartition("@")
    if not sep:
        agent, node = "", text
    elif not is_agent_name(agent):
        raise ValueError(
            f"{shorten(repr(text))}: the agent in AGENT@NODE_ID is 1 to {MAX_AGENT} of a-z, 0-9, "
            "'_' and '-', starting with a letter"
        )
    if not is_node_id(node):
        raise ValueError(f"{shorten(repr(text))} is not a node id (or AGENT@NODE_ID)")
    return agent or None, node


class _Entropy:
    """Random bytes from the OS, drawn ``BLOCK`` at a time (one system call per block,
    not per id); thread-safe, and a forked child never hands out its parent's."""

    BLOCK: Final = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._block = b""
        self._at = 0

    def take(self, count: int) -> bytes:
        with self._lock:
            at = self._at
            if at + count > len(self._block):
                self._block, at = secrets.token_bytes(max(count, self.BLOCK)), 0
            self._at = at + count
            return self._block[at : at + count]

    def forget(self) -> None:
        """In a forked child: what is left of the block is the parent's too."""
        self._lock = threading.Lock()
        self._block, self._at = b"", 0


_ENTROPY: Final = _Entropy()
os.register_at_fork(after_in_child=_ENTROPY.forget)


def new_message_id_bytes(
    random: Callable[[int], bytes] = _ENTROPY.take, clock: Callable[[], float] = time.time
) -> bytes:
    """A fresh id's 16 bytes: 6 bytes of Unix time in milliseconds (big-endian), then 10
    random bytes.

    Receivers take any 16 bytes; time-ordered ids just keep the stores'
    ``(sender, id)`` indexes growing at their end, so inserting one touches
    one page instead of a random page of a week-long table.
    """
    millis = int(clock() * 1000) & 0xFFFF_FFFF_FFFF
    return millis.to_bytes(6, "big") + random(MESSAGE_ID_BYTES - 6)


def new_message_id(
    random: Callable[[int], bytes] = _ENTROPY.take, clock: Callable[[], float] = time.time
) -> str:
    """A fresh id (:func:`new_message_id_bytes`) as 32 hex digits."""
    return new_message_id_bytes(random, clock).hex()


def is_message_id(value: object) -> bool:
    return isinstance(value, str) and _MESSAGE_ID_RE.fullmatch(value) is not None


def check_topic(topic: object) -> str:
    """A topic: 1 to 128 characters of ``[A-Za-z0-9._:/@+=-]``; ``ValueError`` otherwise."""
    if (
        not isinstance(topic, str)
        or not 0 < len(topic) <= MAX_TOPIC
        or _TOPIC_RE.fullmatch(topic) is None
    ):
        raise ValueError(
            f"topic {shorten(repr(topic))} must be 1 to {MAX_TOPIC} characters of letters, digits and ._:/@+=-"
        )
    return topic
