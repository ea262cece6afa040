"""ACK packets are split to fit the header limit (keel.mesh.peer_link.acks)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from keel.mesh import packets
from keel.mesh.peer_link import ack_packets, acks


def mid(n: int) -> str:
    return f"{n:032x}"


def test_thousands_of_ids_fit_in_several_acks() -> None:
    ok = [mid(n) for n in range(4096)]  # 143 KB of ids: one ACK cannot carry them
    replies = list(acks(ok))
    assert len(replies) >= 3
    assert [i for r in replies for i in r.ok] == ok
    for reply in replies:
        assert len(packets.encode(reply)) < packets.MAX_HEADER + 100
        assert packets.decode(packets.encode(reply)) == reply


def test_nothing_to_answer_is_no_ack() -> None:
    assert list(acks([])) == []


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 5000),
    st.integers(0, 3000),
    st.lists(st.text(min_size=0, max_size=400), max_size=600),
)
def test_every_id_once_in_order_under_the_limit(ok: int, busy: int, reasons: list[str]) -> None:
    ok_ids = [mid(n) for n in range(ok)]
    busy_ids = [mid(10_000 + n) for n in range(busy)]
    rejected = [(mid(20_000 + n), reason) for n, reason in enumerate(reasons)]
    replies = list(acks(ok_ids, busy_ids, rejected))
    assert [i for r in replies for i in r.ok] == ok_ids
    assert [i for r in replies for i in r.busy] == busy_ids
    assert [r for reply in replies for r in reply.rejected] == [
        (i, reason[: packets.MAX_REASON]) for i, reason in rejected
    ]
    for reply in replies:
        assert reply.ok or reply.busy or reply.rejected
        packets.encode(reply)  # raises if the header is over the limit


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 3), st.integers(0, 3))
def test_ack_packets_are_the_encoded_acks(ok: int, busy: int, rejected: int) -> None:
    """The packets PeerLink.answer sends: those of ``acks``, byte for byte, fast path or not."""
    ok_ids = [mid(n) for n in range(ok)]
    busy_ids = [mid(10_000 + n) for n in range(busy)]
    refused = [(mid(20_000 + n), "no") for n in range(rejected)]
    assert list(ack_packets(ok_ids, busy_ids, refused)) == [
        packets.encode(a) for a in acks(ok_ids, busy_ids, refused)
    ]


def test_ok_ids_that_are_not_message_ids_take_the_general_way() -> None:
    odd = [mid(1), mid(2)[:16] + '","' + mid(3)[:13], "Zz", 'q"uote']
    for ok in (odd, [mid(n) for n in range(2000)] + odd):
        assert list(ack_packets(ok)) == [packets.encode(a) for a in acks(ok)]
    assert packets.encode_ok_ack([mid(1), mid(2)[:16] + '","' + mid(3)[:13]]) is None
    assert packets.encode_ok_ack([]) is None
    assert packets.encode_ok_ack([mid(7), mid(8)]) == packets.encode(packets.Ack((mid(7), mid(8))))
