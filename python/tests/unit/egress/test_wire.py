"""The nfnetlink messages keel writes (set elements) and reads (acks, NFLOG packets)."""

from __future__ import annotations

import ipaddress
import struct

from keel.egress import netlink, nflog
from keel.egress.sets import Insert


def attributes(data: bytes) -> list[tuple[int, bytes]]:
    found = []
    offset = 0
    while offset < len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        found.append((kind, data[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
    return found


def messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    found = []
    offset = 0
    while offset < len(data):
        length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        found.append((kind, flags, seq, data[offset + 16 : offset + length]))
        offset += length
    return found


def test_a_batch_refreshes_then_adds_per_family() -> None:
    inserts = [
        Insert(ipaddress.ip_address("192.0.2.1"), 65, ("a.test",), replace=True),
        Insert(ipaddress.ip_address("192.0.2.2"), 65, ("a.test",), replace=False),
        Insert(ipaddress.ip_address("2001:db8::1"), 35, ("a.test",), replace=False),
    ]
    data, acked, used = netlink.batch("scout", inserts, 100)
    found = messages(data)
    kinds = [kind for kind, *_ in found]
    nft = netlink.NFNL_SUBSYS_NFTABLES << 8
    assert kinds == [
        netlink.NFNL_MSG_BATCH_BEGIN,
        nft | netlink.NFT_MSG_DELSETELEM,
        nft | netlink.NFT_MSG_NEWSETELEM,
        nft | netlink.NFT_MSG_NEWSETELEM,
        netlink.NFNL_MSG_BATCH_END,
    ]
    assert [seq for _k, _f, seq, _b in found] == [100, 101, 102, 103, 104]
    assert acked == [101, 102, 103]
    assert used == 5
    # The v4 insertion: table, set, and two elements with timeout (ms) and comment.
    body = found[2][3]
    assert body[:4] == bytes([netlink.NFPROTO_INET, 0, 0, 0])
    attrs = dict(attributes(body[4:]))
    assert attrs[netlink.NFTA_SET_ELEM_LIST_TABLE] == b"keel\0"
    assert attrs[netlink.NFTA_SET_ELEM_LIST_SET] == b"scout_v4\0"
    elements = attributes(attrs[netlink.NFTA_SET_ELEM_LIST_ELEMENTS | netlink.NLA_F_NESTED])
    assert len(elements) == 2
    first = dict(attributes(elements[0][1]))
    key = dict(attributes(first[netlink.NFTA_SET_ELEM_KEY | netlink.NLA_F_NESTED]))
    assert key[netlink.NFTA_DATA_VALUE] == bytes([192, 0, 2, 1])
    assert struct.unpack(">Q", first[netlink.NFTA_SET_ELEM_TIMEOUT]) == (65_000,)
    assert first[netlink.NFTA_SET_ELEM_USERDATA] == b"\x00\x07a.test\x00"
    # The deletion names the key only.
    deleted = dict(attributes(found[1][3][4:]))
    [element] = attributes(deleted[netlink.NFTA_SET_ELEM_LIST_ELEMENTS | netlink.NLA_F_NESTED])
    assert set(dict(attributes(element[1]))) == {netlink.NFTA_SET_ELEM_KEY | netlink.NLA_F_NESTED}
    # The batch begins and ends in the nftables subsystem.
    assert found[0][3][2:4] == struct.pack("!H", netlink.NFNL_SUBSYS_NFTABLES)


def test_one_element_is_read_back_with_its_expiry_and_names() -> None:
    address = ipaddress.ip_address("2001:db8::1")
    [(kind, flags, seq, body)] = messages(netlink.get_request("scout", address, 7))
    assert kind == (netlink.NFNL_SUBSYS_NFTABLES << 8) | netlink.NFT_MSG_GETSETELEM
    assert (flags, seq) == (netlink.NLM_F_REQUEST | netlink.NLM_F_ACK, 7)
    attrs = dict(attributes(body[4:]))
    assert attrs[netlink.NFTA_SET_ELEM_LIST_SET] == b"scout_v6\0"
    # The kernel's answer: the element (key, timeout, expiration, comment), then the ack.
    element = netlink.element(
        Insert(address, 65, ("a.test", "b.test"), replace=False), with_data=True
    )
    expiration = netlink._attr(netlink.NFTA_SET_ELEM_EXPIRATION, struct.pack(">Q", 41_500))
    nested = netlink._nested(
        netlink.NFTA_SET_ELEM_LIST_ELEMENTS,
        netlink._nested(netlink.NFTA_LIST_ELEM, element[4:] + expiration),
    )
    payload = struct.pack("=BBH", netlink.NFPROTO_INET, 0, 0) + nested
    kernel = netlink._message(
        (netlink.NFNL_SUBSYS_NFTABLES << 8) | netlink.NFT_MSG_NEWSETELEM, 0, 7, payload[4:]
    )
    ack = (
        struct.pack("=IHHII", 36, netlink.NLMSG_ERROR, 0, 7, 0) + struct.pack("=i", 0) + b"\0" * 16
    )
    assert netlink.read_reply(kernel, 7) == (None, (41.5, "b.test a.test"))
    assert netlink.read_reply(kernel + ack, 7) == (0, (41.5, "b.test a.test"))
    assert netlink.read_reply(kernel + ack, 8) == (None, None)  # another request's
    absent = struct.pack("=IHHII", 36, netlink.NLMSG_ERROR, 0, 7, 0) + struct.pack("=i", -2)
    assert netlink.read_reply(absent + b"\0" * 16, 7) == (2, None)


def test_acks_are_read_by_sequence() -> None:
    def ack(seq: int, code: int) -> bytes:
        return (
            struct.pack("=IHHII", 36, netlink.NLMSG_ERROR, 0, seq, 0)
            + struct.pack("=i", -code)
            + b"\0" * 16
        )

    assert netlink.read_acks(ack(5, 0) + ack(6, 2)) == {5: 0, 6: 2}
    assert netlink.read_acks(b"\x01\x02") == {}


def nflog_message(prefix: bytes, payload: bytes) -> bytes:
    attrs = b""
    for kind, value in ((nflog.NFULA_PREFIX, prefix + b"\0"), (nflog.NFULA_PAYLOAD, payload)):
        length = 4 + len(value)
        attrs += struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)
    body = struct.pack("=BBH", 2, 0, 0) + attrs
    kind = nflog.NFNL_SUBSYS_ULOG << 8 | nflog.NFULNL_MSG_PACKET
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def ipv4_tcp(destination: str, port: int) -> bytes:
    header = bytes([0x45, 0]) + b"\0" * 7 + bytes([6]) + b"\0" * 2 + bytes(4)
    header += ipaddress.IPv4Address(destination).packed
    return header + struct.pack("!HH", 40000, port)


def ipv6_udp(destination: str, port: int) -> bytes:
    header = (
        bytes([0x60])
        + b"\0" * 5
        + bytes([17, 64])
        + bytes(16)
        + ipaddress.IPv6Address(destination).packed
    )
    return header + struct.pack("!HH", 40000, port)


def test_nflog_packets_become_blocked_flows() -> None:
    data = (
        nflog_message(b"keel-egress scout enforce", ipv4_tcp("192.0.2.9", 853))
        + nflog_message(b"keel-egress web audit", ipv6_udp("2001:db8::9", 443))
        + nflog_message(b"someone else", ipv4_tcp("192.0.2.1", 80))
        + nflog_message(b"keel-egress scout enforce", b"\x45garbage")
    )
    flows = nflog.read_packets(data)
    assert [(f.agent, f.protocol, f.address, f.port, f.enforced) for f in flows] == [
        ("scout", "tcp", "192.0.2.9", 853, True),
        ("web", "udp", "2001:db8::9", 443, False),
    ]


def test_truncated_nflog_data_is_ignored() -> None:
    message = nflog_message(b"keel-egress scout enforce", ipv4_tcp("192.0.2.9", 853))
    for cut in range(len(message)):
        assert len(nflog.read_packets(message[:cut])) <= 1
    assert nflog.read_flow(bytes([0x45]) + bytes(19)) == ("0", "0.0.0.0", None)
