"""The D-Bus reading shortcuts of the systemd backend, checked against jeepney's full parse."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jeepney import DBusAddress, new_signal
from jeepney.low_level import Endianness, Header
from keel.watch.dbus import Signal, _split_messages, properties_changed
from keel.watch.systemd_backend import WANTED

UNIT_PATH = "/org/freedesktop/systemd1/unit/web_2eservice"


def signal(interface: str, props: dict[str, tuple[str, Any]], endian: Endianness) -> Signal:
    emitter = DBusAddress(UNIT_PATH, interface="org.freedesktop.DBus.Properties")
    message = new_signal(emitter, "PropertiesChanged", "sa{sv}as", (interface, props, []))
    message.header.endianness = endian
    raw = message.serialise(7)
    header, body_start = Header.from_buffer(raw)
    return Signal(header, raw, body_start)


SYSTEMD_LIKE = {
    "Job": ("(uo)", (0, "/")),
    "Conditions": ("a(sbbsi)", [("ConditionPathExists", False, False, "/x", 1)]),
    "Names": ("as", ["web.service", "ActiveState"]),  # a decoy string value
    "ActiveState": ("s", "failed"),
    "SubState": ("s", "failed"),
    "InactiveExitTimestampMonotonic": ("t", 123456789012),
    "StatusErrno": ("i", -5),
    "MainPID": ("u", 0),
    "ExecMainCode": ("i", 2),
    "ExecMainStatus": ("i", 9),
    "Result": ("s", "signal"),
    "Nested": ("v", ("a{sv}", {"Result": ("s", "decoy")})),
}


@pytest.mark.parametrize("endian", [Endianness.little, Endianness.big])
def test_wanted_properties_are_read_as_a_full_parse_would(endian: Endianness) -> None:
    sig = signal("org.freedesktop.systemd1.Unit", SYSTEMD_LIKE, endian)
    interface, found = properties_changed(sig, WANTED)
    assert interface == "org.freedesktop.systemd1.Unit"
    assert found == {
        "ActiveState": "failed",
        "SubState": "failed",
        "InactiveExitTimestampMonotonic": 123456789012,
        "MainPID": 0,
        "ExecMainCode": 2,
        "ExecMainStatus": 9,
        "Result": "signal",
    }
    body = sig.body()
    assert body[0] == interface
    assert {k: body[1][k][1] for k in found} == found


def test_absent_properties_are_absent() -> None:
    sig = signal("org.freedesktop.systemd1.Service", {"StatusText": ("s", "ok")}, Endianness.little)
    assert properties_changed(sig, WANTED) == ("org.freedesktop.systemd1.Service", {})


BASIC = st.one_of(
    st.tuples(st.just("s"), st.text(max_size=20)),
    st.tuples(st.just("u"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("i"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("t"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("b"), st.booleans()),
    st.tuples(st.just("as"), st.lists(st.text(max_size=8), max_size=3)),
    st.tuples(st.just("(uo)"), st.tuples(st.integers(0, 9), st.just("/a/b"))),
)
NAMES = st.sampled_from([*WANTED, "Other", "Job", "NRestarts", "StatusText"])


@settings(deadline=None)  # a loaded machine is slow, not wrong
@given(
    props=st.dictionaries(NAMES, BASIC, max_size=12),
    endian=st.sampled_from([Endianness.little, Endianness.big]),
)
def test_extraction_agrees_with_jeepney_on_any_property_set(
    props: dict[str, tuple[str, Any]], endian: Endianness
) -> None:
    sig = signal("org.freedesktop.systemd1.Unit", props, endian)
    _, found = properties_changed(sig, WANTED)
    expected = {name: value for name, (kind, value) in props.items() if WANTED.get(name) == kind}
    assert found == expected


def test_messages_are_split_from_a_stream() -> None:
    one = signal("a.b", {"X": ("s", "1")}, Endianness.little).raw
    two = signal("a.c", {"Y": ("u", 2)}, Endianness.little).raw
    buffer = bytearray(one + two[:10])
    assert _split_messages(buffer) == [one]
    assert bytes(buffer) == two[:10]
    buffer += two[10:]
    assert _split_messages(buffer) == [two]
    assert buffer == bytearray()
