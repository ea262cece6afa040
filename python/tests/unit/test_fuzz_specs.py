"""Bounded fuzzing of the parsers of agent specs, tiers.json, watch configs and of unit rendering.

Every input, however malformed, either parses or raises a :class:`KeelError`
whose message is one line; nothing else may escape (no TypeError, KeyError,
ValueError, UnicodeError...). Inputs are valid documents with random
mutations (values replaced by other JSON values or hostile strings, keys
dropped or added) and the same documents as bytes, flipped and cut, through
``parse_json`` as a file would be read. Accepted specs must render, and their
normalised form must parse to the same spec.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keel.agents.spec import parse_spec
from keel.agents.units import parse_tiers, render_unit
from keel.config import Section, parse_json
from keel.errors import KeelError
from keel.watch import config as watch_config

from tests.fuzz import examples
from tests.unit_values import BAD_ENV_NAMES, CARRIED, REFUSED

REPO = Path(__file__).resolve().parents[3]
TIERS_JSON = json.loads((REPO / "modules" / "tiers.json").read_text())
TIERS = parse_tiers(TIERS_JSON, source="tiers.json")

SPEC = {
    "name": "scout",
    "command": ["/usr/bin/python3", "/opt/scout/agent.py", "--port", "8702"],
    "tier": 2,
    "user": "keel-agent-scout",
    "workingDirectory": "/var/lib/keel-agents/scout",
    "environment": {"AGENT_ROLE": "web scout"},
    "environmentFiles": ["/etc/keel/agents/scout.env"],
    "readWritePaths": ["/srv/keel-scout"],
    "capabilities": ["CAP_NET_BIND_SERVICE"],
    "egress": {"allow": ["example.org", "*.wikipedia.org"]},
    "health": {
        "probes": [
            {"type": "http", "url": "http://127.0.0.1:8702/health", "expect_status": 200},
            {"type": "tcp", "port": 8702, "interval": 2, "timeout": 1},
            {"type": "exec", "command": ["/bin/true"], "failures": 2, "grace": 5},
        ],
        "watchdogSec": 10,
    },
    "resources": {"memoryMax": "256M", "cpuQuota": "50%", "tasksMax": 64},
}

WATCH = {
    "backend": "process",
    "socket": "/tmp/keel-fuzz/watch.sock",
    "ledger": None,
    "state_file": "/tmp/keel-fuzz/processes.json",
    "host": "fuzzhost",
    "metrics": "127.0.0.1:9101",
    "alerts": {"hook": {"type": "webhook", "url": "http://127.0.0.1:9/alert"}},
    "agents": {
        "web": {
            "command": ["/usr/bin/python3", "-m", "http.server"],
            "environment": {"PORT": "8080"},
            "working_directory": "/tmp",
            "stop_timeout": 2,
            "probes": [
                {"type": "http", "url": "http://127.0.0.1:8080/", "expect_status": [200, 204]},
                {"type": "exec", "command": ["/bin/true"], "interval": 1, "timeout": 0.5},
            ],
            "restart": {"backoff_initial": 1, "backoff_max": 30},
            "alerts": {"routes": ["hook"], "flap_threshold": 3},
        }
    },
}

hostile_strings = st.one_of(
    st.text(max_size=20),
    st.sampled_from(CARRIED + REFUSED + BAD_ENV_NAMES),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_strings,
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(hostile_strings, children, max_size=4),
    ),
    max_leaves=8,
)


def _positions(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``doc`` (the root is ``()``)."""
    found = [path]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _positions(value, (*path, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += _positions(value, (*path, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, document: dict[str, Any]) -> Any:
    doc: Any = copy.deepcopy(document)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        path = draw(st.sampled_from(_positions(doc)))
        if not path:
            doc = draw(json_values)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(hostile_strings)] = draw(json_values)
        else:
            parent.insert(path[-1], draw(json_values))
    return doc


@st.composite
def damaged_text(draw: st.DrawFn, document: dict[str, Any]) -> bytes:
    """A document as file bytes, with bytes flipped, inserted or cut off."""
    data = bytearray(
        json.dumps(draw(mutated(document)), ensure_ascii=draw(st.booleans())).encode(
            "utf-8", "surrogatepass"
        )
    )
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        if not data:
            break
        at = draw(st.integers(min_value=0, max_value=len(data) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "cut"]))
        if kind == "flip":
            data[at] = draw(st.integers(min_value=0, max_value=255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[at:]
    return bytes(data)


def one_line(error: KeelError) -> None:
    message = str(error)
    assert message, "an empty error message"
    assert len(message.splitlines()) == 1, message
    assert len(message) < 1000, message
    message.encode("utf-8")  # printable: no lone surrogate from the input


def spec_outcome(data: object) -> None:
    try:
        spec = parse_spec(data, source="scout.json")
    except KeelError as error:
        one_line(error)
        return
    again = parse_spec(json.loads(json.dumps(spec.to_json())), source="scout.json")
    assert again == spec
    try:
        unit = render_unit(spec, TIERS)
    except KeelError as error:  # capabilities the tier does not allow
        one_line(error)
        return
    unit.encode("utf-8")


def watch_outcome(data: object) -> None:
    try:
        with Section(data, source="watch.json") as cfg:
            watch_config.parse(cfg)
    except KeelError as error:
        one_line(error)


def tiers_outcome(data: object) -> None:
    try:
        tiers = parse_tiers(data, source="tiers.json")
    except KeelError as error:
        one_line(error)
        return
    for tier in (0, 1, 2):
        spec = parse_spec(
            {"name": "t", "command": ["/bin/true"], "tier": tier, "user": "t"}, source="t.json"
        )
        try:
            render_unit(spec, tiers).encode("utf-8")
        except KeelError as error:
            one_line(error)


def from_bytes(data: bytes, outcome: Any) -> None:
    try:
        document = parse_json(data, source="fuzz.json")
    except KeelError as error:
        one_line(error)
        return
    outcome(document)


FUZZ = settings(
    max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_the_fuzzed_documents_start_valid() -> None:
    parse_spec(SPEC, source="scout.json")
    with Section(copy.deepcopy(WATCH), source="watch.json") as cfg:
        watch_config.parse(cfg)


@FUZZ
@given(mutated(SPEC))
def test_agent_specs(data: Any) -> None:
    spec_outcome(data)


@FUZZ
@given(damaged_text(SPEC))
def test_agent_spec_files(data: bytes) -> None:
    from_bytes(data, spec_outcome)


@FUZZ
@given(mutated(TIERS_JSON))
def test_tiers_json(data: Any) -> None:
    tiers_outcome(data)


@FUZZ
@given(damaged_text(TIERS_JSON))
def test_tiers_json_files(data: bytes) -> None:
    from_bytes(data, tiers_outcome)


@FUZZ
@given(mutated(WATCH))
def test_watch_configs(data: Any) -> None:
    watch_outcome(data)


@FUZZ
@given(damaged_text(WATCH))
def test_watch_config_files(data: bytes) -> None:
    from_bytes(data, watch_outcome)


@pytest.mark.parametrize("value", CARRIED + REFUSED + BAD_ENV_NAMES, ids=ascii)
def test_each_hostile_value_in_each_place_of_a_spec(value: str) -> None:
    for path in _positions(SPEC):
        if not path:
            continue
        doc: Any = copy.deepcopy(SPEC)
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = value
        spec_outcome(doc)
        if isinstance(parent, dict):
            parent[value] = "x"
            spec_outcome(doc)
