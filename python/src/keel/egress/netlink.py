"""Set elements written straight over nfnetlink: the proxy's hot path.

``nft`` (and libnftables) re-read the table's chains and sets before every
command, so one insertion costs more the more agents a host has (0.6 ms with
100 agents, measured). An answer must wait for its insertion, so elements go
to the kernel here instead, as one nfnetlink batch (``NFT_MSG_DELSETELEM`` /
``NFT_MSG_NEWSETELEM``, the messages libnftnl sends) whose acknowledgement
arrives after the kernel committed it: constant cost, a few dozen
microseconds. Everything else (the ruleset, listing) goes through ``nft -j``.

The element comment is written in libnftnl's user-data format, so ``nft list``
shows it: it names the DNS name the address was inserted for.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Iterator, Sequence

from keel.egress.answers import IPAddress
from keel.egress.ruleset import FAMILY, TABLE, set_name
from keel.egress.sets import MAX_TIMEOUT, Insert, family_of
from keel.errors import KeelError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_DELSETELEM = 14
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NFPROTO_INET = 1

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_TIMEOUT = 4
NFTA_SET_ELEM_EXPIRATION = 5
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE = 1
NFTNL_UDATA_SET_ELEM_COMMENT = 0
MAX_COMMENT = 127  # bytes; longer names are cut (the comment is for people)

assert FAMILY == "inet"


class NetlinkError(KeelError):
    """The kernel refused a batch; ``errno`` says why (ENOENT: an element to replace was gone)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nested(kind: int, *children: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(children))


def _comment(name: str) -> bytes:
    text = name.encode("ascii", "replace")[:MAX_COMMENT] + b"\0"
    return struct.pack("=BB", NFTNL_UDATA_SET_ELEM_COMMENT, len(text)) + text


def element(insert: Insert, *, with_data: bool) -> bytes:
    """One ``NFTA_LIST_ELEM``: the key, and for an insertion its timeout and comment."""
    parts = [_nested(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, insert.address.packed))]
    if with_data:
        parts.append(_attr(NFTA_SET_ELEM_TIMEOUT, struct.pack(">Q", insert.timeout * 1000)))
        parts.append(_attr(NFTA_SET_ELEM_USERDATA, _comment(insert.comment)))
    return _nested(NFTA_LIST_ELEM, *parts)


def _message(kind: int, flags: int, seq: int, body: bytes, res_id: int = 0) -> bytes:
    payload = struct.pack("=BBH", NFPROTO_INET, 0, socket.htons(res_id)) + body
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def _elements_body(set_name_: str, elements: Sequence[bytes]) -> bytes:
    return (
        _attr(NFTA_SET_ELEM_LIST_TABLE, TABLE.encode() + b"\0")
        + _attr(NFTA_SET_ELEM_LIST_SET, set_name_.encode() + b"\0")
        + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, *elements)
    )


def batch(agent: str, inserts: Sequence[Insert], first_seq: int) -> tuple[bytes, list[int], int]:
    """The batch for ``inserts`` of one agent, the sequence numbers to be acknowledged,
    and how many sequence numbers it used."""
    messages: list[bytes] = []
    acked: list[int] = []
    seq = itertools.count(first_seq)
    begin = _message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, next(seq), b"", NFNL_SUBSYS_NFTABLES)
    messages.append(begin)
    for family in (4, 6):
        of_family = [i for i in inserts if i.family == family]
        if not of_family:
            continue
        name = set_name(agent, family)
        replaced = [element(i, with_data=False) for i in of_family if i.replace]
        if replaced:
            number = next(seq)
            kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM
            messages.append(
                _message(kind, NLM_F_REQUEST | NLM_F_ACK, number, _elements_body(name, replaced))
            )
            acked.append(number)
        number = next(seq)
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM
        added = [element(i, with_data=True) for i in of_family]
        messages.append(
            _message(
                kind,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                number,
                _elements_body(name, added),
            )
        )
        acked.append(number)
    end = next(seq)
    messages.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end, b"", NFNL_SUBSYS_NFTABLES))
    return b"".join(messages), acked, end - first_seq + 1


def read_acks(data: bytes) -> dict[int, int]:
    """``seq -> errno`` (0 for success) of the NLMSG_ERROR messages in ``data``."""
    results: dict[int, int] = {}
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            break
        if kind == NLMSG_ERROR and length >= 20:
            (code,) = struct.unpack_from("=i", data, offset + 16)
            results[seq] = -code
        offset += (length + 3) & ~3
    return results


def get_request(agent: str, address: IPAddress, seq: int) -> bytes:
    """``NFT_MSG_GETSETELEM`` for one address of the agent's set (what ``nft get element`` sends)."""
    key = _nested(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, address.packed))
    body = _elements_body(set_name(agent, family_of(address)), [_nested(NFTA_LIST_ELEM, key)])
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM
    return _message(kind, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def _attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            return
        yield kind & NLA_TYPE_MASK, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def _element_found(payload: bytes) -> tuple[float, str]:
    """(seconds left, comment) of the first element of a ``NFT_MSG_NEWSETELEM`` body."""
    left, comment = float(2 * MAX_TIMEOUT), ""  # no expiration: an element without timeout
    for kind, value in _attributes(payload):
        if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
            continue
        for _, element in _attributes(value):
            for field, content in _attributes(element):
                if field == NFTA_SET_ELEM_EXPIRATION and len(content) == 8:
                    left = struct.unpack(">Q", content)[0] / 1000
                elif field == NFTA_SET_ELEM_USERDATA:
                    comment = _read_comment(content)
            return left, comment
    return left, comment


def _read_comment(userdata: bytes) -> str:
    offset = 0
    while offset + 2 <= len(userdata):
        kind, length = userdata[offset], userdata[offset + 1]
        value = userdata[offset + 2 : offset + 2 + length]
        if kind == NFTNL_UDATA_SET_ELEM_COMMENT:
            return value.rstrip(b"\0").decode("ascii", "replace")
        offset += 2 + length
    return ""


def read_reply(data: bytes, seq: int) -> tuple[int | None, tuple[float, str] | None]:
    """From the messages in ``data``: the acknowledgement's errno for ``seq`` (None when it
    has not come yet) and the element the kernel sent back, if any."""
    code: int | None = None
    found: tuple[float, str] | None = None
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, message_seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            break
        if message_seq == seq:
            if kind == NLMSG_ERROR and length >= 20:
                code = -struct.unpack_from("=i", data, offset + 16)[0]
            elif kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM:
                found = _element_found(data[offset + 20 : offset + length])
        offset += (length + 3) & ~3
    return code, found


class SetWriter:
    """One nfnetlink socket that writes agents' set elements (in the current network namespace)."""

    def __init__(self, *, timeout: float = 2.0) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        self._sock.bind((0, 0))
        self._sock.settimeout(timeout)
        self._seq = 1
        self.batches = 0

    def close(self) -> None:
        self._sock.close()

    def _send(self, data: bytes) -> None:
        try:
            self._sock.send(data)
        except OSError as exc:
            raise NetlinkError(
                f"cannot write to nfnetlink: {exc.strerror}", exc.errno or 0
            ) from None

    def _recv(self) -> bytes:
        try:
            return self._sock.recv(65536)
        except TimeoutError:
            raise NetlinkError("no answer from nfnetlink", errno.ETIMEDOUT) from None
        except OSError as exc:
            raise NetlinkError(f"nfnetlink: {exc.strerror}", exc.errno or 0) from None

    def read(self, agent: str, address: IPAddress) -> tuple[float, str] | None:
        """(seconds left, comment) of ``address`` in the agent's set, or None when absent."""
        seq = self._seq
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        self._send(get_request(agent, address, seq))
        found: tuple[float, str] | None = None
        while True:
            code, element = read_reply(self._recv(), seq)
            found = found or element
            if code is not None:
                break
        if code == errno.ENOENT:
            return None
        if code:
            raise NetlinkError(
                f"the kernel would not read {address} for {agent}: {os.strerror(code)}", code
            )
        return found

    def write(self, agent: str, inserts: Sequence[Insert]) -> None:
        """Commit ``inserts`` in one transaction; returns once the kernel holds them.

        Raises :class:`NetlinkError` when the kernel refused the batch (nothing
        of it was applied: a batch is atomic).
        """
        if not inserts:
            return
        data, acked, used = batch(agent, inserts, self._seq)
        self._seq = (self._seq + used) & 0x7FFFFFFF or 1
        self._send(data)
        waiting = set(acked)
        failure = 0
        while waiting:
            for seq, code in read_acks(self._recv()).items():
                if seq in waiting:
                    waiting.discard(seq)
                    failure = failure or code
                elif code:  # an error for the batch as a whole
                    failure = failure or code
                    waiting.clear()
        self.batches += 1
        if failure:
            raise NetlinkError(
                f"the kernel refused the elements for {agent}: {os.strerror(failure)}", failure
            )
