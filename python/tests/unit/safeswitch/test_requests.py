"""keel-switch@INSTANCE: the request's grammar, its escaping, the units and the polkit rule."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.errors import UsageError
from keel.safeswitch import evidence, requests, units
from keel.safeswitch.state import DamagedState

OLD = requests.digest("/nix/store/aaaa-nixos-system-web1-old")
NEW = requests.digest("/nix/store/bbbb-nixos-system-web1-new")


def test_digest_is_128_bits_of_sha256_in_hex() -> None:
    assert requests.digest("/nix/store/x") == hashlib.sha256(b"/nix/store/x").hexdigest()[:32]
    assert len(OLD) == 32
    assert set(OLD) <= set("0123456789abcdef")
    assert OLD != NEW


def test_an_instance_round_trips_through_its_unit_name() -> None:
    instance = requests.Instance("no-gpu.v2", OLD, NEW, "0b5d2c71a3e48f60")
    unit = instance.unit()
    assert unit == f"keel-switch@no\\x2dgpu.v2:{OLD}:{NEW}:0b5d2c71a3e48f60.service"
    escaped = unit.removeprefix("keel-switch@").removesuffix(".service")
    assert requests.parse_instance(escaped) == instance
    assert len(unit) <= 255  # systemd's limit for a unit name, with the longest target name
    longest = requests.Instance("_" + "-" * 31, OLD, NEW, "f" * 16)
    assert len(longest.unit()) <= 255


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="no systemd-escape")
def test_escaping_is_systemd_escapes() -> None:
    for text in ("next", "no-gpu.v2", f"a-b_c.d:{OLD}:{NEW}:0123456789abcdef"):
        done = subprocess.run(
            ["systemd-escape", text], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert requests.systemd_escape(text) == done


@pytest.mark.parametrize(
    "escaped",
    [
        "",
        "next",
        f"next:{OLD}:{NEW}",  # no request id
        f"next:{OLD}:{NEW}:0123456789abcdef:more",
        f"next:{OLD.upper()}:{NEW}:0123456789abcdef",  # digests are lower case
        f"next:{OLD[:31]}:{NEW}:0123456789abcdef",
        f"next:{OLD}:{NEW}:0123456789abcde",
        f"no-gpu:{OLD}:{NEW}:0123456789abcdef",  # a raw '-' is not how systemd escapes it
        f"no\\x2Dgpu:{OLD}:{NEW}:0123456789abcdef",  # upper-case hex: not canonical
        f"\\x6eext:{OLD}:{NEW}:0123456789abcdef",  # 'n' escaped: not canonical
        f"..\\x2f..\\x2fetc:{OLD}:{NEW}:0123456789abcdef",
        f"-next:{OLD}:{NEW}:0123456789abcdef",  # '/next'
        f"next\\:{OLD}:{NEW}:0123456789abcdef",
        f"next\\x0a:{OLD}:{NEW}:0123456789abcdef",
        f"{'a' * 33}:{OLD}:{NEW}:0123456789abcdef",  # names are at most 32
        f"next:{OLD}:{NEW}:0123456789abcdef\\",
        f"next:{OLD}:{NEW}:0123456789abcdef\\xff",
    ],
)
def test_anything_but_a_canonical_request_is_refused(escaped: str) -> None:
    with pytest.raises(UsageError, match="is not a keel switch request"):
        requests.parse_instance(escaped)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_parsing_never_fails_any_other_way(text: str) -> None:
    try:
        instance = requests.parse_instance(text)
    except UsageError as exc:
        message = str(exc)
    else:
        assert instance.unit() == f"keel-switch@{text}.service"
        return
    assert "\n" not in message


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{16}", fullmatch=True),
)
def test_every_declared_name_makes_a_parsable_unit(name: str, request: str) -> None:
    instance = requests.Instance(name, OLD, NEW, request)
    escaped = instance.unit().removeprefix("keel-switch@").removesuffix(".service")
    assert requests.parse_instance(escaped) == instance


def test_results_are_named_by_the_request_only(tmp_path: Path) -> None:
    results = requests.Results(tmp_path)
    with pytest.raises(ValueError, match="not a request id"):
        results.path("../../etc/passwd")
    assert results.read("0123456789abcdef") is None
    results.write("0123456789abcdef", {"state": "running"})
    assert results.read("0123456789abcdef") == {"state": "running"}
    (tmp_path / "requests" / "fedcba9876543210.json").write_text('{"state": "bogus"}')
    with pytest.raises(Exception, match="not a result keel wrote"):
        results.read("fedcba9876543210")
    for n in range(5):
        results.write(f"{n:016x}", {"state": "done"})
    results.prune(keep=3)
    assert len(list((tmp_path / "requests").glob("*.json"))) == 3


def test_the_polkit_rule_lets_named_users_start_the_template_only() -> None:
    rule = units.polkit_rule(["keel-chat", "ops", "keel-chat"])
    assert '["keel-chat","ops"].indexOf(subject.user) >= 0' in rule
    assert 'action.lookup("verb") === "start"' in rule
    assert '"org.freedesktop.systemd1.manage-units"' in rule
    pattern = units.UNIT_PATTERN
    unit = requests.Instance("no-gpu", OLD, NEW, "0123456789abcdef").unit()
    assert re.search(pattern, unit)
    for other in ("ssh.service", "keel-switch@x.service.d", "keel-switch@x.timer",
                  "keel-switch@a b.service", "xkeel-switch@a.service", "keel-switch@.service"):  # fmt: skip
        assert not re.search(pattern, other), other
    assert f"/{pattern}/" in rule


def test_the_template_runs_keel_switch_request_and_survives_a_switch() -> None:
    text = units.template_unit("/opt/keel/bin/keel")
    assert "ExecStart=/opt/keel/bin/keel switch request %i" in text.splitlines()
    assert "X-RestartIfChanged=false" in text
    assert "X-StopOnRemoval=false" in text
    assert "Type=oneshot" in text
    with_config = units.template_unit("/k", "/etc/keel/safeswitch.json")
    assert "ExecStart=/k switch request --config /etc/keel/safeswitch.json %i" in with_config


def test_evidence_is_read_back_strictly() -> None:
    good = evidence.Unfinished("s1", "switch", "gating", "/a", "/b", 1.0, None, ("/r",), "boot")
    assert evidence.Unfinished.from_json(json.loads(json.dumps(good.to_json()))) == good
    for change in (
        {"version": 2},
        {"kind": "rebuild"},
        {"started_at": "yesterday"},
        {"gcroots": "/r"},
        {"ledger": 5},
        {"extra": 1},
        {"id": None},
    ):
        with pytest.raises(DamagedState):
            evidence.Unfinished.from_json(good.to_json() | change)
