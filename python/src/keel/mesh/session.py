"""The mesh's secure channel, sans-I/O (h11-style).

Bytes from the socket go in with ``receive_data``; ``next_event`` returns the
next event or ``NEED_DATA``; every ``send_*`` returns the bytes to write; the
handshake replies the core produces while reading are collected by
``data_to_send``. Time comes from the ``clock`` given at construction;
``next_deadline``/``tick`` let the shell enforce the handshake timeout, the
idle timeout, keepalives and time-based rekeying without the core sleeping.

Protocol: ``Noise_XXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s`` with prologue
``b"keel-mesh/1"``, over the frames and records of ``keel.mesh.framing``.
Handshake payloads are UTF-8 JSON objects (``docs/mesh-protocol.md``):

1. initiator -> responder (readable by anyone): ``{"v": 1}``
2. responder -> initiator (encrypted): ``{"v": 1, "signing_key", "binding", "extra"}``
3. initiator -> responder (encrypted): the same, plus ``"invite": {"id", "proof"}``
   when the initiator joins with an invite token.

The initiator always knows whom it dials (``remote_static``) and refuses a
responder with another static key before revealing its own identity.
"""

from __future__ import annotations

import enum
import json
import secrets
import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, TypeVar

from keel.config import parse_json
from keel.errors import ConfigError
from keel.mesh.buffers import BufferPool
from keel.mesh.encoding import b64u_decode, b64u_encode
from keel.mesh.errors import (
    HandshakeTimeout,
    LocalProtocolError,
    PeerTimeout,
    ProtocolError,
    RemoteProtocolError,
)
from keel.mesh.framing import (
    LENGTH_SIZE,
    MAX_CLOSE_REASON,
    MAX_FRAME_SIZE,
    FrameReader,
    RecordType,
    decode_record,
    encode_frame,
    encode_record,
)
from keel.mesh.identity import NodeIdentity, NodeRecord, verify_binding
from keel.mesh.ids import KEY_SIZE, SIGNATURE_SIZE, node_id_of
from keel.mesh.invite import INVITE_ID_SIZE, PROOF_SIZE, InviteClaim, InviteToken, invite_proof
from keel.mesh.kem import Kem
from keel.mesh.noise import TAG_LEN, Buffer, CipherState, HandshakeState

PROTOCOL_NAME: Final = "Noise_XXhfs_25519+MLKEM768_ChaChaPoly_BLAKE2s"
_DATA: Final = bytes([RecordType.DATA])
_DATA_MORE: Final = bytes([RecordType.DATA_MORE])
_DATA_TYPE: Final = int(RecordType.DATA)
_DATA_MORE_TYPE: Final = int(RecordType.DATA_MORE)
_LENGTH: Final = struct.Struct(">H")  # a frame's length prefix
_RECORD_OVERHEAD: Final = LENGTH_SIZE + 1 + TAG_LEN  # a frame's length, record type and tag
_REKEY_FRAME: Final = _RECORD_OVERHEAD  # a REKEY record has no body
_SMALL: Final = 8192  # bytes: a message up to this long is sealed as one record in a few steps
_PIECES: Final = frozenset({RecordType.DATA, RecordType.DATA_MORE})  # the records of a message
PROLOGUE: Final = b"keel-mesh/1"

PROTOCOL_VERSION: Final = 1
MAX_MESSAGE_SIZE: Final = 1 << 20

T = TypeVar("T")


# The buffers of sealed messages over 8 KiB (``seal_message``; one event loop thread, all
# sessions): four MSGS packets of 1 MiB.
OUTPUTS: Final = BufferPool(keep=4, keep_bytes=5 << 20)


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


@dataclass(frozen=True)
class SessionConfig:
    handshake_timeout: float = 10.0
    keepalive_interval: float = 15.0
    idle_timeout: float = 60.0
    rekey_interval: float = 120.0
    rekey_messages: int = 65536
    max_message_size: int = MAX_MESSAGE_SIZE
    # The protocol has every receiver accept 65535-byte frames (docs/mesh-protocol.md,
    # section 4): a lower value is for tests between sessions that both use it.
    max_frame_size: int = MAX_FRAME_SIZE

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "keepalive_interval", "idle_timeout", "rekey_interval"):
            if getattr(self, name) <= 0:
                raise LocalProtocolError(f"SessionConfig.{name} must be positive")
        if self.idle_timeout <= self.keepalive_interval:
            raise LocalProtocolError("SessionConfig.idle_timeout must exceed keepalive_interval")
        if self.rekey_messages < 1 or self.max_message_size < 0:
            raise LocalProtocolError("SessionConfig.rekey_messages/max_message_size out of range")
        if not 2048 <= self.max_frame_size <= MAX_FRAME_SIZE:
            # The handshake's second message is about 1.2 KiB.
            raise LocalProtocolError(
                f"SessionConfig.max_frame_size must be in 2048..{MAX_FRAME_SIZE}"
            )


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class HandshakeComplete:
    """The peer is authenticated: its static key, node id and signing key are proven."""

    remote_static: bytes
    remote_node_id: str
    remote_signing_key: bytes
    remote_binding: bytes = field(repr=False)
    handshake_hash: bytes = field(repr=False)
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    invite: InviteClaim | None = None

    def remote_record(self) -> NodeRecord:
        return NodeRecord(
            self.remote_node_id, self.remote_static, self.remote_signing_key, self.remote_binding
        )


@dataclass(frozen=True)
class Message:
    """An application message.

    ``data`` is ``bytes``, or, when the session lends messages
    (``Session.lend_messages``), a read-only view valid until the next call
    of ``next_event``.
    """

    data: bytes | memoryview


@dataclass(frozen=True)
class Keepalive:
    pass


@dataclass(frozen=True)
class Closed:
    """The peer is gone: ``clean`` if it said so (a CLOSE record), not on a bare EOF."""

    reason: str
    clean: bool


Event = HandshakeComplete | Message | Keepalive | Closed


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


# ---------------------------------------------------------------- session


class Session:
    """One side of one connection. Build with ``Session.initiator`` / ``Session.responder``."""

    def __init__(
        self,
        role: Role,
        identity: NodeIdentity,
        *,
        kem: Kem,
        clock: Callable[[], float],
        random: Callable[[int], bytes] = secrets.token_bytes,
        config: SessionConfig | None = None,
        remote_static: bytes | None = None,
        invite: InviteToken | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.role = role
        self.identity = identity
        self.config = config or SessionConfig()
        self.clock = clock
        if role is Role.INITIATOR:
            if remote_static is None or len(remote_static) != KEY_SIZE:
                raise LocalProtocolError("an initiator must know the 32-byte static key it dials")
            if invite is not None and invite.static_key != remote_static:
                raise LocalProtocolError("the invite token is for another node's static key")
        elif invite is not None or remote_static is not None:
            raise LocalProtocolError("a responder takes no remote_static or invite")
        self.expected_remote = remote_static
        self._invite = invite
        self._extra = dict(extra or {})
        self._check_extra(self._extra)
        self._handshake = HandshakeState(
            PROTOCOL_NAME,
            initiator=role is Role.INITIATOR,
            prologue=PROLOGUE,
            s=identity.static_private,
            kem=kem,
            random=random,
        )
        self._reader = FrameReader(self.config.max_frame_size)
        self._outgoing = bytearray()
        self._events: deque[Event] = deque()
        self._state = State.HANDSHAKE
        self._error: ProtocolError | None = None
        self._closed_event: Closed | None = None
        self._started = False
        self._h2 = b""
        self._send: CipherState | None = None
        self._recv: CipherState | None = None
        self._assembly: bytearray | None = None  # where a message arriving in records is put
        self._packet_end = 0  # how much of it is filled (its first byte: a type byte); 0: none
        # Whether a Message's data may be a view of the assembly buffer, valid only
        # until the next call of next_event (the peer link decodes it at once).
        self.lend_messages = False
        self._scratch: bytearray | None = None  # one record's plaintext while it is sealed
        self._sealing: bytearray | None = None  # send_message's frames before they are copied out
        now = clock()
        self._created = now
        self._last_received = now
        self._last_sent = now
        self._send_key_since = now
        self._sent_since_rekey = 0
        self.remote: HandshakeComplete | None = None

    @classmethod
    def initiator(
        cls,
        identity: NodeIdentity,
        *,
        remote_static: bytes,
        kem: Kem,
        clock: Callable[[], float],
        random: Callable[[int], bytes] = secrets.token_bytes,
        config: SessionConfig | None = None,
        invite: InviteToken | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Session:
        return cls(
            Role.INITIATOR,
            identity,
            kem=kem,
            clock=clock,
            random=random,
            config=config,
            remote_static=remote_static,
            invite=invite,
            extra=extra,
        )

    @classmethod
    def responder(
        cls,
        identity: NodeIdentity,
        *,
        kem: Kem,
        clock: Callable[[], float],
        random: Callable[[int], bytes] = secrets.token_bytes,
        config: SessionConfig | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Session:
        return cls(
            Role.RESPONDER,
            identity,
            kem=kem,
            clock=clock,
            random=random,
            config=config,
            extra=extra,
        )

    # -- state

    @property
    def state(self) -> State:
        return self._state

    @property
    def remote_node_id(self) -> str | None:
        return self.remote.remote_node_id if self.remote else None

    # -- input

    def start(self) -> bytes:
        """The initiator's first handshake message (call once)."""
        self._check_alive()
        if self.role is not Role.INITIATOR or self._started:
            raise LocalProtocolError("start() is for an initiator, once")
        self._started = True
        payload = json.dumps({"v": PROTOCOL_VERSION}).encode()
        return self._guard(lambda: self._frame(self._handshake.write_message(payload)))

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes read from the socket; ``b""`` when the peer closed its side."""
        self._check_alive()
        self._guard(lambda: self._reader.feed(bytes(data)))

    def next_event(self) -> Event | NeedData:
        """The next event, or ``NEED_DATA``. Raises ``ProtocolError`` (then the session is dead)."""
        self._check_alive()
        return self._guard(self._next_event)

    def data_to_send(self) -> bytes:
        """Handshake replies produced while reading (empty most of the time)."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    # -- output

    def send_message(self, data: Buffer) -> bytes:
        """Encrypt one application message (split into DATA_MORE.../DATA records)."""
        return bytes(self._seal_frames((data,), keep=False))

    def seal_message(self, pieces: Sequence[Buffer]) -> bytes | memoryview:
        """The frames of one message whose bytes are ``pieces`` joined.

        The pieces are not joined: each record's plaintext (its type byte and
        up to a frame's worth of the pieces) is gathered in a buffer the
        session reuses, and sealed straight into its place in the result,
        behind its length; a REKEY frame, when one is due, goes before the
        record it precedes on the wire. The bytes are those of sealing
        ``encode_record(kind, chunk)`` chunk by chunk (docs/mesh-protocol.md).
        A message of more than 8 KiB is a view of a buffer of :data:`OUTPUTS`
        (``keel.mesh.buffers``), used again for a later message once nothing
        holds the view (the transport wrote it): a 1 MiB packet is not
        allocated and zeroed afresh each time.
        """
        frames = self._seal_frames(pieces, keep=True)
        assert not isinstance(frames, bytearray)  # kept: bytes, or a view of its own buffer
        return frames

    def _seal_frames(
        self, pieces: Sequence[Buffer], *, keep: bool
    ) -> bytes | bytearray | memoryview:
        """``seal_message``; ``keep=False``: large results are a view of a buffer the session
        reuses at its next message."""
        self._require_open("send a message")
        size = sum(map(len, pieces))
        if size > self.config.max_message_size:
            raise LocalProtocolError(
                f"message of {size} bytes exceeds the maximum of {self.config.max_message_size}",
                hint="split it at the application level",
            )
        return self._guard(lambda: self._seal_pieces(pieces, size, keep))

    def _seal_pieces(
        self, pieces: Sequence[Buffer], size: int, keep: bool
    ) -> bytes | bytearray | memoryview:
        send = self._send
        assert send is not None
        chunk = self.config.max_frame_size - TAG_LEN - 1
        if size <= min(_SMALL, chunk):  # an ACK, a small message: the copies cost less than steps
            now = self.clock()
            rekey = self._rekey_if_due(now)
            sealed = send.encrypt_with_ad(b"", b"".join((_DATA, *pieces)))
            self._sent_since_rekey += 1
            self._last_sent = now
            return b"".join((rekey, _LENGTH.pack(len(sealed)), sealed))
        records = max(1, -(-size // chunk))
        now = self.clock()
        config = self.config
        due = (
            self._sent_since_rekey + records > config.rekey_messages
            or now >= self._send_key_since + config.rekey_interval
        )
        rekeys = self._rekeys_due(records, now) if due else 0
        total = size + records * _RECORD_OVERHEAD + rekeys * _REKEY_FRAME
        if keep:  # a buffer of its own while the caller holds the result
            out = OUTPUTS.take(total)
        else:  # copied out by the caller: sealed in a buffer kept for the next (no allocation)
            if self._sealing is None or len(self._sealing) < total:
                self._sealing = bytearray(total)
            out = self._sealing
        if self._scratch is None:
            self._scratch = bytearray(chunk + 1)
        index = at = 0  # where the next record's body begins: pieces[index][at:]
        pos = 0
        encrypt, pack_length = send.encrypt_into, _LENGTH.pack_into
        with memoryview(out) as target, memoryview(self._scratch) as scratch:
            for record in range(records):
                if due:  # counted record by record: a REKEY may fall before any of them
                    if rekey := self._rekey_if_due(now):
                        target[pos : pos + len(rekey)] = rekey
                        pos += len(rekey)
                    self._sent_since_rekey += 1
                length = min(chunk, size - record * chunk)
                scratch[0] = _DATA_TYPE if record == records - 1 else _DATA_MORE_TYPE
                filled = 1
                end = 1 + length
                while filled < end:
                    piece = pieces[index]
                    left = len(piece) - at
                    if left <= end - filled:  # the rest of this piece: no view of a whole one
                        if at:
                            with memoryview(piece) as view:
                                scratch[filled : filled + left] = view[at:]
                        else:
                            scratch[filled : filled + left] = piece
                        filled += left
                        index += 1
                        at = 0
                    else:  # the record ends inside this piece
                        take = end - filled
                        with memoryview(piece) as view:
                            scratch[filled:end] = view[at : at + take]
                        filled = end
                        at += take
                stop = pos + 2 + end + TAG_LEN
                pack_length(target, pos, stop - pos - 2)
                encrypt(b"", scratch[:end], target[pos + 2 : stop])
                pos = stop
        if not due:
            self._sent_since_rekey += records
        self._last_sent = now
        assert pos == total
        return memoryview(out)[:total]

    def _rekeys_due(self, records: int, now: float) -> int:
        """How many REKEY records ``_rekey_if_due`` will put before the next ``records``."""
        sent = self._sent_since_rekey
        timed = now >= self._send_key_since + self.config.rekey_interval
        count = 0
        for _ in range(records):
            if timed or sent >= self.config.rekey_messages:
                count += 1
                sent = 0
                timed = False
            sent += 1
        return count

    def send_keepalive(self) -> bytes:
        self._require_open("send a keepalive")
        return self._guard(lambda: self._seal(RecordType.KEEPALIVE))

    def close(self, reason: str = "") -> bytes:
        """Say goodbye (a CLOSE record, once the channel is open); the session is then CLOSED."""
        if self._state is not State.OPEN:
            if self._state is State.HANDSHAKE:
                self._state = State.CLOSED
            return b""
        body = reason.encode()[:MAX_CLOSE_REASON]
        out = self._guard(lambda: self._seal(RecordType.CLOSE, body))
        self._state = State.CLOSED
        return out

    # -- time

    def next_deadline(self) -> float | None:
        """The clock value at which ``tick`` must next be called (``None``: never)."""
        config = self.config
        if self._state is State.HANDSHAKE:
            return self._created + config.handshake_timeout
        if self._state is State.OPEN:
            return min(
                self._last_received + config.idle_timeout,
                self._last_sent + config.keepalive_interval,
                self._send_key_since + config.rekey_interval,
            )
        return None

    def tick(self) -> bytes:
        """Enforce timeouts and send what is due; raises ``HandshakeTimeout``/``PeerTimeout``."""
        self._check_alive()
        return self._guard(self._tick)

    def _tick(self) -> bytes:
        now = self.clock()
        config = self.config
        if self._state is State.HANDSHAKE:
            if now >= self._created + config.handshake_timeout:
                raise HandshakeTimeout(
                    f"handshake not finished after {config.handshake_timeout:g} s",
                    hint="slow or stalled peer",
                )
            return b""
        if self._state is not State.OPEN:
            return b""
        if now >= self._last_received + config.idle_timeout:
            raise PeerTimeout(
                f"nothing received for {config.idle_timeout:g} s", hint="peer or path is gone"
            )
        out = self._rekey_if_due(now)
        if now >= self._last_sent + config.keepalive_interval:
            out += self._seal(RecordType.KEEPALIVE)
        return out

    # -- internals

    def _check_alive(self) -> None:
        if self._error is not None:
            raise type(self._error)(f"session failed earlier: {self._error}", self._error.hint)

    def _guard(self, action: Callable[[], T]) -> T:
        try:
            return action()
        except ProtocolError as exc:
            self._state = State.ERROR
            self._error = exc
            raise

    def _require_open(self, what: str) -> None:
        self._check_alive()
        if self._state is State.HANDSHAKE:
            raise LocalProtocolError(f"cannot {what} before the handshake completes")
        if self._state is not State.OPEN:
            raise LocalProtocolError(f"cannot {what}: the session is closed")

    def _frame(self, message: bytes) -> bytes:
        return encode_frame(message, self.config.max_frame_size)

    def _next_event(self) -> Event | NeedData:
        while True:
            if self._events:
                return self._events.popleft()
            if self._closed_event is not None:
                return self._closed_event
            frame = self._reader.next_frame()
            if frame is None:
                if self._reader.eof:
                    during = " during the handshake" if self._state is State.HANDSHAKE else ""
                    self._finish(Closed(f"connection closed by the peer{during}", clean=False))
                    continue
                return NEED_DATA
            if self._state is State.HANDSHAKE:
                self._on_handshake_frame(bytes(frame))
            elif self._state is State.OPEN:
                self._on_transport_frame(frame)
            # CLOSED (we closed): whatever still arrives is dropped.

    def _finish(self, event: Closed) -> None:
        self._state = State.CLOSED
        self._closed_event = event
        self._events.append(event)

    # handshake

    def _on_handshake_frame(self, frame: bytes) -> None:
        hs = self._handshake
        if self.role is Role.INITIATOR and not self._started:
            raise LocalProtocolError("call start() before feeding the responder's reply")
        payload = hs.read_message(frame)
        if self.role is Role.RESPONDER and hs.message_index == 1:
            self._parse_payload(payload, message=1)
            reply = self._identity_payload()
            self._outgoing += self._frame(hs.write_message(reply))
            self._h2 = hs.handshake_hash
        elif self.role is Role.INITIATOR and hs.message_index == 2:
            remote_static = hs.remote_static
            if remote_static != self.expected_remote:
                raise RemoteProtocolError(
                    f"the responder is {node_id_of(remote_static or bytes(KEY_SIZE))}, "
                    f"not the expected {node_id_of(self.expected_remote or bytes(KEY_SIZE))}",
                    hint="wrong static key: a man in the middle, or a stale address",
                )
            fields = self._parse_payload(payload, message=2)
            self._h2 = hs.handshake_hash
            reply = self._identity_payload(with_invite=True)
            self._outgoing += self._frame(hs.write_message(reply))
            self._open(fields, invite=None)
        elif self.role is Role.RESPONDER and hs.message_index == 3:
            fields = self._parse_payload(payload, message=3)
            claim = None
            if "invite" in fields:
                assert hs.remote_static is not None
                invite_id, proof = fields["invite"]
                claim = InviteClaim(invite_id, proof, self._h2, hs.remote_static)
            self._open(fields, invite=claim)

    def _identity_payload(self, *, with_invite: bool = False) -> bytes:
        body: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "signing_key": b64u_encode(self.identity.signing_public),
            "binding": b64u_encode(self.identity.binding),
            "extra": self._extra,
        }
        if with_invite and self._invite is not None:
            proof = invite_proof(self._invite.secret, self._h2, self.identity.static_public)
            body["invite"] = {
                "id": b64u_encode(self._invite.invite_id),
                "proof": b64u_encode(proof),
            }
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @staticmethod
    def _check_extra(extra: Mapping[str, Any]) -> None:
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(f"handshake extra must be JSON: {exc}") from None

    def _parse_payload(self, payload: bytes, *, message: int) -> dict[str, Any]:
        def bad(problem: str) -> RemoteProtocolError:
            return RemoteProtocolError(
                f"handshake message {message} payload: {problem}",
                hint="peer runs an incompatible keel version, or garbage",
            )

        try:
            body = parse_json(payload, source="JSON")
        except ConfigError as exc:
            raise bad(str(exc)) from None
        if not isinstance(body, dict):
            raise bad("not a JSON object")
        if body.get("v") != PROTOCOL_VERSION or type(body.get("v")) is not int:
            raise bad(f"unsupported protocol version {body.get('v')!r} (this side speaks 1)")
        if message == 1:
            return {}
        fields: dict[str, Any] = {}
        try:
            fields["signing_key"] = b64u_decode(body.get("signing_key"), "signing_key", KEY_SIZE)
            fields["binding"] = b64u_decode(body.get("binding"), "binding", SIGNATURE_SIZE)
            invite = body.get("invite")
            if invite is not None and message == 3 and isinstance(invite, dict):
                fields["invite"] = (
                    b64u_decode(invite.get("id"), "invite id", INVITE_ID_SIZE),
                    b64u_decode(invite.get("proof"), "invite proof", PROOF_SIZE),
                )
        except ValueError as exc:
            raise bad(str(exc)) from None
        if invite is not None and "invite" not in fields:
            raise bad("invite is only an object, in message 3")
        extra = body.get("extra", {})
        if not isinstance(extra, dict):
            raise bad("extra is not a JSON object")
        fields["extra"] = extra
        remote_static = self._handshake.remote_static
        assert remote_static is not None
        if not verify_binding(remote_static, fields["signing_key"], fields["binding"]):
            raise RemoteProtocolError(
                f"handshake message {message}: the signing key's binding does not verify",
                hint="forged identity payload",
            )
        return fields

    def _open(self, fields: dict[str, Any], invite: InviteClaim | None) -> None:
        hs = self._handshake
        remote_static = hs.remote_static
        assert remote_static is not None
        assert hs.complete
        self._send, self._recv = hs.split_for_role()
        now = self.clock()
        self._last_received = self._last_sent = self._send_key_since = now
        self._state = State.OPEN
        self.remote = HandshakeComplete(
            remote_static=remote_static,
            remote_node_id=node_id_of(remote_static),
            remote_signing_key=fields["signing_key"],
            remote_binding=fields["binding"],
            handshake_hash=hs.handshake_hash,
            extra=MappingProxyType(fields["extra"]),
            invite=invite,
        )
        self._events.append(self.remote)

    # transport

    def _on_transport_frame(self, frame: Buffer) -> None:
        recv = self._recv
        assert recv is not None
        size = len(frame) - TAG_LEN  # the record's: its type byte and body
        if size <= 0:
            raise RemoteProtocolError("transport frame shorter than its tag", hint="garbage")
        if self._packet_end:
            self._on_more(recv, frame, size)
            return
        if size + TAG_LEN >= self.config.max_frame_size:  # a full record: a long message begins?
            packet = self._assembly_for(size)
            with memoryview(packet) as view:
                recv.decrypt_into(b"", frame, view[:size])
            self._last_received = self.clock()
            if packet[0] == RecordType.DATA_MORE:
                self._check_size(size - 1)
                self._packet_end = size
                return
            plaintext: Buffer = packet
        else:
            plaintext = recv.decrypt_with_ad(b"", frame)
            self._last_received = self.clock()
        kind = plaintext[0]
        if kind == RecordType.DATA:  # the usual case: a message in one record
            self._check_size(size - 1)
            self._deliver(plaintext, size)
        elif kind == RecordType.DATA_MORE:  # a long message in records short of the most
            self._check_size(size - 1)
            self._assembly_for(size)[:size] = plaintext[:size]
            self._packet_end = size
        else:
            self._on_record(*decode_record(bytes(plaintext[:size])))

    def _assembly_for(self, size: int) -> bytearray:
        """The buffer a message in records is assembled in, with room for ``size`` bytes.

        One per session, kept: a larger one replaces it (a lent view of the
        old stays valid), at most a maximal message, a type byte and a record.
        """
        packet = self._assembly
        if packet is None or len(packet) < size:
            most = self.config.max_message_size + 1 + MAX_FRAME_SIZE
            grown = bytearray(min(most, max(size, 2 * len(packet or b""), 4 * MAX_FRAME_SIZE)))
            if packet is not None:
                grown[: self._packet_end] = packet[: self._packet_end]
            self._assembly = packet = grown
        return packet

    def _deliver(self, plaintext: Buffer, end: int) -> None:
        """A whole message: ``plaintext[1:end]``, lent as a view or copied."""
        with memoryview(plaintext) as whole:
            view = whole[1:end]
            data = view.toreadonly() if self.lend_messages else view.tobytes()
        self._events.append(Message(data))

    def _on_more(self, recv: CipherState, frame: Buffer, size: int) -> None:
        """The next record while a message arrives in records: decrypted in place behind them.

        The assembly buffer holds the first record's type byte, then the
        message so far (to ``_packet_end``). The record's type byte lands on
        the last byte so far, kept aside and put back: its body follows the
        message's without a copy.
        """
        end = self._packet_end
        at = end - 1
        packet = self._assembly_for(at + size)
        kept = packet[at]
        with memoryview(packet) as view:
            recv.decrypt_into(b"", frame, view[at : at + size])
        self._last_received = self.clock()
        kind = packet[at]
        packet[at] = kept
        if kind in _PIECES:
            end = at + size
            self._check_size(end - 1)
            if kind == RecordType.DATA:
                self._packet_end = 0
                self._deliver(packet, end)
            else:
                self._packet_end = end
            return
        record = bytes([kind]) + bytes(packet[at + 1 : at + size])
        self._on_record(*decode_record(record))

    def _on_record(self, record: RecordType, body: bytes) -> None:
        """A record that is no piece of a message (those never come here)."""
        assert self._recv is not None
        if record is RecordType.KEEPALIVE:
            self._events.append(Keepalive())
        elif record is RecordType.REKEY:
            self._recv.rekey()
        elif record is RecordType.CLOSE:
            self._packet_end = 0
            reason = body.decode("utf-8", errors="replace")
            self._finish(Closed(reason or "closed by the peer", clean=True))

    def _check_size(self, size: int) -> None:
        if size > self.config.max_message_size:
            raise RemoteProtocolError(
                f"incoming message exceeds the maximum of {self.config.max_message_size} bytes",
                hint="oversized message",
            )

    def _rekey_if_due(self, now: float) -> bytes:
        assert self._send is not None
        if (
            self._sent_since_rekey < self.config.rekey_messages
            and now < self._send_key_since + self.config.rekey_interval
        ):
            return b""
        out = self._seal_raw(RecordType.REKEY, b"", now)
        self._send.rekey()
        self._sent_since_rekey = 0
        self._send_key_since = now
        return out

    def _seal(self, kind: RecordType, body: bytes = b"") -> bytes:
        now = self.clock()
        return self._rekey_if_due(now) + self._seal_raw(kind, body, now)

    def _seal_raw(self, kind: RecordType, body: bytes, now: float) -> bytes:
        assert self._send is not None
        frame = self._frame(self._send.encrypt_with_ad(b"", encode_record(kind, body)))
        self._sent_since_rekey += 1
        self._last_sent = now
        return frame
