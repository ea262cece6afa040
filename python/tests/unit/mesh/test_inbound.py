"""Planning a batch from a peer: dedup, a full inbox, handoffs, room checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from keel.mesh import inbound, rooms
from keel.mesh.delivery import InboxLimits
from keel.mesh.handoffs import Window
from keel.mesh.inbound import Plan
from keel.mesh.membership import Membership
from keel.mesh.packets import Msg, RoomStamp

from .test_membership import T0, A, B, C, D, join

PEER = B.node_id
ME = A.node_id
WALL = T0 / 1000
LIMITS = InboxLimits(max_messages=5, max_bytes=1000, dedup_grace=100.0)


def mesh() -> Membership:
    made = Membership.found(A, [], T0)
    for who, at in ((B, 1), (C, 2)):
        made.add(join(A, who, T0 + at))
    return made


def msg(n: int, topic: str = "jobs", size: int = 10) -> Msg:
    return Msg(f"{n:032x}", topic, int(WALL) + 60, b"x" * size)


def decide(
    messages: Sequence[Msg],
    *,
    seen: set[tuple[str, str]] | None = None,
    handed: set[tuple[str, str]] | None = None,
    inbox: tuple[int, int] = (0, 0),
    windows: Mapping[str, Sequence[Window]] | None = None,
    membership: Membership | None = None,
    addressable: inbound.Addressable | None = None,
) -> Plan:
    held = handed or set()
    return inbound.plan(
        messages,
        peer=PEER,
        me=ME,
        view=(membership or mesh()).view,
        seen=seen or set(),
        handed=held,
        inbox=inbox,
        limits=LIMITS,
        windows=windows or {},
        wall=WALL,
        addressable=addressable,
    )


def test_new_messages_are_stored_and_acknowledged_in_order() -> None:
    plan = decide([msg(1), msg(2, size=30)], inbox=(1, 5))
    assert plan.ok == [f"{1:032x}", f"{2:032x}"]
    assert [i.id for i in plan.store] == plan.ok
    assert [i.sender for i in plan.store] == [PEER, PEER]
    assert plan.store[0].keep_until == WALL + 60 + 100.0  # past any retry of it
    assert (plan.inbox_messages, plan.inbox_bytes) == (3, 45)
    assert (plan.busy, plan.rejected, plan.hand, plan.backlogged) == ([], [], [], set())


def test_duplicates_are_acknowledged_and_stored_once() -> None:
    plan = decide([msg(1), msg(1), msg(2)], seen={(PEER, f"{2:032x}")})
    assert plan.ok == [f"{1:032x}"] * 2 + [f"{2:032x}"]
    assert [i.id for i in plan.store] == [f"{1:032x}"]


def test_a_full_inbox_answers_busy() -> None:
    plan = decide([msg(1), msg(2)], inbox=(4, 0))
    assert (plan.ok, plan.busy) == ([f"{1:032x}"], [f"{2:032x}"])  # 5 messages at most
    plan = decide([msg(1, size=600), msg(2)], inbox=(0, 500))
    assert (plan.ok, plan.busy) == ([f"{2:032x}"], [f"{1:032x}"])  # 1000 bytes at most


def test_a_copy_of_a_message_an_agent_holds_is_left_unanswered() -> None:
    plan = decide([msg(1), msg(2)], handed={(PEER, f"{1:032x}")})
    assert plan.ok == [f"{2:032x}"]
    assert plan.busy == []


def test_a_copy_of_a_message_an_agent_took_from_memory_is_left_unanswered() -> None:
    """Taken (its dedup key not stored yet): as while the agent held it."""
    plan = inbound.plan(
        [msg(1), msg(2), msg(3)],
        peer=PEER,
        me=ME,
        view=mesh().view,
        seen=set(),
        handed={(PEER, f"{1:032x}")},
        taken={(PEER, f"{2:032x}")},
        inbox=(0, 0),
        limits=LIMITS,
        windows={},
        wall=WALL,
    )
    assert plan.ok == [f"{3:032x}"]
    assert [i.id for i in plan.store] == [f"{3:032x}"]
    assert (plan.busy, plan.rejected) == ([], [])


def test_subscribers_with_room_take_messages_in_order_the_rest_is_stored() -> None:
    windows = {
        "jobs": [
            Window(1, 0, 0, 10, 1000, True),  # a backlog: it takes from the inbox first
            Window(2, 1, 10, 3, 1000, False),  # room for two more
            Window(3, 0, 0, 1, 1000, False),  # room for one
        ]
    }
    plan = decide([msg(n) for n in range(5)] + [msg(9, topic="other")], windows=windows)
    assert [(stream, item.id[-1]) for stream, item in plan.hand] == [(2, "0"), (2, "1"), (3, "2")]
    assert [i.id[-1] for i in plan.store] == ["3", "4", "9"]
    assert plan.ok == [i.id for i in plan.store]  # handed ones are answered later
    assert plan.backlogged == {1, 2, 3}  # stored while they could take it: fill them later


def test_a_windows_bytes_are_counted_across_the_batch() -> None:
    windows = {"jobs": [Window(1, 0, 0, 10, 15, False)]}
    plan = decide([msg(1, size=10), msg(2, size=10), msg(3, size=10)], windows=windows)
    assert [item.id[-1] for _, item in plan.hand] == ["1", "2"]  # the second fits: 10 < 15
    assert [i.id[-1] for i in plan.store] == ["3"]


def test_room_messages_are_checked_and_keyed_by_their_author() -> None:
    membership = mesh()
    membership.add(join(A, D, T0 + 3))
    fields = rooms.create(A, name="ops", members=[B.node_id, C.node_id])
    record = membership.make(A, "room", T0 + 9, **fields)
    room = membership.view.rooms[record.body["room"]]

    def stamped(n: int, author=C, version: int | None = None) -> Msg:
        message = msg(n, topic="chat")
        stamp = rooms.stamp(
            author, room, message.id, topic="chat", expires=message.expires, payload=message.payload
        )
        if version is not None:
            stamp = RoomStamp(stamp.room, stamp.author, version, stamp.signature)
        return message._replace(room=stamp)

    good, outsider, future = stamped(1), stamped(2, author=D), stamped(3, version=9)
    plan = decide([good, outsider, future], membership=membership)
    assert plan.ok == [good.id]
    assert [i.sender for i in plan.store] == [C.node_id]  # relayed by B, written by C
    assert plan.store[0].room == room.id
    assert [(i, reason.split(":")[0]) for i, reason in plan.rejected] == [
        (outsider.id, f"author {D.node_id} is not in room {room.id}")
    ]
    assert plan.busy == [future.id]  # this node lacks the version its author saw
    assert inbound.keys([good, msg(4)], PEER) == [(C.node_id, good.id), (PEER, msg(4).id)]


def test_a_message_for_an_agent_goes_to_that_agent_only_or_is_refused() -> None:
    def addressable(agent: str, topic: str, sender: inbound.Sender) -> str | None:
        if agent not in ("notes", "ops"):
            return f"no agent {agent} on this node"
        return None if topic == "jobs" else f"agent {agent} does not take topic {topic!r}"

    windows = {
        "jobs": [
            Window(1, 0, 0, 10, 1000, False, "ops"),
            Window(2, 0, 0, 10, 1000, False, "notes"),
            Window(3, 0, 0, 10, 1000, False, None),  # the node itself
        ]
    }
    for_notes = msg(1)._replace(agent="scout", to="notes")
    for_nobody = msg(2)._replace(to="ghost")
    elsewhere = msg(3, topic="other")._replace(to="notes")
    for_the_topic = msg(4)._replace(agent="scout")
    plan = decide(
        [for_notes, for_nobody, elsewhere, for_the_topic],
        windows=windows,
        addressable=addressable,
    )
    assert [(stream, item.id[-1], item.agent, item.to) for stream, item in plan.hand] == [
        (2, "1", "scout", "notes"),  # to notes, not to the first subscriber
        (1, "4", "scout", None),  # for the topic: whoever has room
    ]
    assert plan.rejected == [
        (for_nobody.id, "no agent ghost on this node"),
        (elsewhere.id, "agent notes does not take topic 'other'"),
    ]
    # with no agents known here, every message for one is refused
    assert decide([for_notes]).rejected == [(for_notes.id, "no agent notes here")]


def test_a_room_message_goes_only_to_an_agent_in_the_room() -> None:
    membership = mesh()
    fields = rooms.create(A, name="ops", members=[B.node_id, f"notes@{A.node_id}"])
    record = membership.make(A, "room", T0 + 9, **fields)
    room = membership.view.rooms[record.body["room"]]
    message = msg(1, topic="chat")
    stamp = rooms.stamp(
        B, room, message.id, topic="chat", expires=message.expires, payload=message.payload
    )
    windows = {
        "chat": [
            Window(1, 0, 0, 10, 1000, False, "scout"),  # no member: skipped
            Window(2, 0, 0, 10, 1000, False, "notes"),
        ]
    }

    def room_reads(room_id: str, agent: str) -> bool:
        return membership.view.rooms[room_id].admits(ME, agent)

    def plan_for(windows: dict[str, list[Window]]) -> inbound.Plan:
        return inbound.plan(
            [message._replace(room=stamp)],
            peer=PEER,
            me=ME,
            view=membership.view,
            seen=set(),
            handed=set(),
            inbox=(0, 0),
            limits=LIMITS,
            windows=windows,
            wall=WALL,
            room_reads=room_reads,
        )

    plan = plan_for(windows)
    assert [stream for stream, _ in plan.hand] == [2]
    plan = plan_for({"chat": windows["chat"][:1]})  # only scout, not a member
    assert plan.hand == []
    assert [i.id for i in plan.store] == [message.id]  # stored for a reader that may read it


def test_a_subscriber_is_handed_only_what_its_receive_from_allows() -> None:
    """A stream whose agent may not receive from the sender is passed over; with no other
    taker the message is stored (for the node's other readers), never dropped."""
    windows = {
        "jobs": [
            Window(1, 0, 0, 10, 1000, False, "picky", (f"ops@{PEER}",)),
            Window(2, 0, 0, 10, 1000, False, "open", None),
        ]
    }
    from_ops = msg(1)._replace(agent="ops")
    from_scout = msg(2)._replace(agent="scout")
    plan = decide([from_ops, from_scout], windows=windows)
    assert [(stream, item.agent) for stream, item in plan.hand] == [(1, "ops"), (2, "scout")]
    only_picky = {"jobs": windows["jobs"][:1]}
    plan = decide([from_scout, from_ops], windows=only_picky)
    assert [(stream, item.agent) for stream, item in plan.hand] == [(1, "ops")]
    assert [item.agent for item in plan.store] == ["scout"]
    assert plan.ok == [from_scout.id]
    # picky is not left waiting on a backlog it may not read: ops' next message is its own
    assert plan.backlogged == set()
    for_open = decide([from_scout], windows={"jobs": [windows["jobs"][0]._replace(pending=10)]})
    assert for_open.backlogged == set()
    full = windows["jobs"][0]._replace(pending=10)
    assert decide([from_ops], windows={"jobs": [full]}).backlogged == {1}


def test_a_batch_of_senders_interleaved_goes_to_the_first_taker_with_room_each() -> None:
    """What may take a kind of message is found once a batch; who has room, per message."""
    windows = {
        "jobs": [
            Window(1, 0, 0, 2, 1000, False, "picky", (f"ops@{PEER}",)),  # room for two
            Window(2, 0, 0, 10, 1000, False, "open", None),
            Window(3, 0, 0, 10, 1000, True, "late", None),  # a backlog: never handed to
        ]
    }
    batch = [msg(n)._replace(agent="scout" if n % 2 else "ops") for n in range(6)]
    plan = decide(batch, windows=windows)
    assert [(stream, item.agent) for stream, item in plan.hand] == [
        (1, "ops"),
        (2, "scout"),
        (1, "ops"),
        (2, "scout"),
        (2, "ops"),  # picky is full: the next taker that may
        (2, "scout"),
    ]
    assert (plan.ok, plan.store) == ([], [])


def test_a_message_for_an_agent_from_a_sender_it_does_not_receive_from_is_refused() -> None:
    def addressable(agent: str, topic: str, sender: inbound.Sender) -> str | None:
        return None if sender == (PEER, "ops") else f"agent {agent} does not receive from it"

    from_ops = msg(1)._replace(agent="ops", to="notes")
    from_node = msg(2)._replace(to="notes")
    plan = decide([from_ops, from_node], addressable=addressable)
    assert [item.id for item in plan.store] == [from_ops.id]
    assert plan.rejected == [(from_node.id, "agent notes does not receive from it")]
