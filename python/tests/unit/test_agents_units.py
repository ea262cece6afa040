from __future__ import annotations

import collections
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.agents import install
from keel.agents.spec import AgentSpec, parse_spec
from keel.agents.units import (
    Tiers,
    format_seconds,
    load_tiers,
    packaged_tiers,
    parse_tiers,
    quote_assignment,
    quote_exec_arg,
    render_unit,
    service_directives,
)
from keel.cli import main
from keel.errors import ConfigError

from tests.fuzz import examples
from tests.unit_values import INJECTION, carried_text, env_names

REPO = Path(__file__).resolve().parents[3]
TIERS_JSON = REPO / "modules" / "tiers.json"


def spec(**extra: Any) -> AgentSpec:
    data = {"name": "web", "command": ["/usr/bin/python3", "/srv/web/app.py"], "tier": 2}
    return parse_spec({**data, **extra}, source="web.json")


def unit_lines(text: str, section: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"[{section}]") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
    return [line for line in lines[start:end] if line]


def test_packaged_tiers_is_modules_tiers_json() -> None:
    assert json.loads(packaged_tiers().read_text()) == json.loads(TIERS_JSON.read_text())


def test_tier_two_keeps_every_tier_one_directive() -> None:
    tiers = load_tiers()
    tier1, tier2 = tiers.tiers[1].service, tiers.tiers[2].service
    assert {k: tier2[k] for k in tier1} == tier1
    assert tiers.tiers[0].service == {}
    assert tiers.common_service["Restart"] == "always"
    assert tier2["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert tier2["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    for directive in (
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "NoNewPrivileges",
        "CapabilityBoundingSet",
    ):
        assert directive in tier1


def test_render_tier_two_unit() -> None:
    text = render_unit(
        spec(
            environment={"MODEL": "small one", "PCT": "100%", "Q": 'say "hi"'},
            environmentFiles=["/etc/keel/agents/web.env"],
            readWritePaths=["/srv/web"],
            resources={"memoryMax": "256M", "cpuQuota": "50%", "tasksMax": 16},
            health={"watchdogSec": 2.5},
        ),
        load_tiers(),
    )
    assert text.startswith("# keel agent 'web', tier 2: untrusted")
    assert unit_lines(text, "Unit") == [
        "Description=keel agent web (tier 2)",
        "After=network.target",
    ]
    service = unit_lines(text, "Service")
    for line in (
        "Restart=always",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "User=keel-agent-web",
        "ExecStart=/usr/bin/python3 /srv/web/app.py",
        "StateDirectory=keel-agents/web",
        "WorkingDirectory=/var/lib/keel-agents/web",
        'Environment="MODEL=small one"',
        'Environment="PCT=100%%"',
        'Environment="Q=say \\"hi\\""',
        "EnvironmentFile=/etc/keel/agents/web.env",
        "ReadWritePaths=/srv/web",
        "MemoryMax=256M",
        "CPUQuota=50%",
        "TasksMax=16",
        "WatchdogSec=2.5s",
    ):
        assert line in service
    # The agent's own directives come after the tier's, so they win on a clash.
    assert service.index("ProtectSystem=strict") < service.index("User=keel-agent-web")
    assert unit_lines(text, "Install") == ["WantedBy=multi-user.target"]


def test_tier_zero_unit_has_no_sandbox() -> None:
    text = render_unit(spec(tier=0, user="root"), load_tiers())
    service = unit_lines(text, "Service")
    assert "User=root" in service
    assert not [line for line in service if line.startswith(("Protect", "Private", "SystemCall"))]


def test_agent_directives_override_tier_directives() -> None:
    data = json.loads(TIERS_JSON.read_text())
    data["tiers"]["1"]["serviceConfig"]["WorkingDirectory"] = "/"
    tiers = parse_tiers(data, source="t.json")
    assert (
        service_directives(spec(tier=1, workingDirectory="/srv"), tiers)["WorkingDirectory"]
        == "/srv"
    )


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [
        ("/usr/bin/python3", "/usr/bin/python3"),
        ("--port=8080", "--port=8080"),
        ("two words", '"two words"'),
        ("100%", '"100%%"'),
        ("$HOME", '"$$HOME"'),
        ('say "x"', '"say \\"x\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("", '""'),
        ("line\nbreak", '"line\\nbreak"'),
        ("x\rExecStartPre=+/evil", '"x\\rExecStartPre=+/evil"'),
        ("\x01\x1f\x7f", '"\\x01\\x1f\\x7f"'),
        ("\a\b\f\t\v", '"\\a\\b\\f\\t\\v"'),
        ("\u2028\u202e\U000e0001", '"\\u2028\\u202e\\U000e0001"'),
        ("日本 é", '"日本 é"'),
        (";", '";"'),
        ("it's", '"it\'s"'),
    ],
)
def test_exec_arguments_are_quoted_for_systemd(arg: str, quoted: str) -> None:
    assert quote_exec_arg(arg) == quoted


def test_environment_values_keep_dollars_literal() -> None:
    # systemd does not expand $ in Environment=, only % specifiers.
    assert quote_assignment("A", "$x 5%") == '"A=$x 5%%"'


def bad_tiers(mutate: Any) -> str:
    data = json.loads(TIERS_JSON.read_text())
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_tiers(data, source="tiers.json")
    return str(info.value)


def test_bad_tiers_files_name_the_key() -> None:
    assert "tiers.json: version: this keel reads version 1, got 2" in bad_tiers(
        lambda d: d.update(version=2)
    )
    assert "tiers.2.serviceConfig.ProtectHome: expected a string" in bad_tiers(
        lambda d: d["tiers"]["2"]["serviceConfig"].update(ProtectHome={"x": 1})
    )
    assert "tiers.1.serviceConfig.protect_home: not a systemd directive name" in bad_tiers(
        lambda d: d["tiers"]["1"]["serviceConfig"].update(protect_home=True)
    )
    assert 'tiers.1.serviceConfig.X: "a\\nb" contains "\\n": values in tiers.json' in bad_tiers(
        lambda d: d["tiers"]["1"]["serviceConfig"].update(X="a\nb")
    )
    assert "tiers: tier 2 is not defined" in bad_tiers(lambda d: d["tiers"].pop("2"))
    assert "tiers.3: tiers are named" in bad_tiers(lambda d: d["tiers"].update({"3": {}}))
    assert "common.serviceConfig.Restart: a list must hold strings only" in bad_tiers(
        lambda d: d["common"]["serviceConfig"].update(Restart=[1])
    )
    assert "tiers.0.sandbox: unknown key" in bad_tiers(lambda d: d["tiers"]["0"].update(sandbox={}))


def test_render_unit_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "web.json"
    path.write_text(json.dumps(spec().to_json()))
    assert main(["agents", "render-unit", str(path)]) == 0
    assert capsys.readouterr().out == render_unit(spec(), load_tiers())


def test_render_unit_cli_reports_bad_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "web.json"
    path.write_text(json.dumps({**spec().to_json(), "tier": 5}))
    assert main(["agents", "render-unit", str(path)]) == 2
    assert capsys.readouterr().err == f"keel: error: {path}: tier: expected 0, 1 or 2, got 5\n"


def test_render_unit_cli_with_own_tiers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "web.json"
    path.write_text(json.dumps(spec().to_json()))
    data = copy.deepcopy(json.loads(TIERS_JSON.read_text()))
    data["tiers"]["2"]["serviceConfig"] = {"ProtectSystem": "full"}
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps(data))
    assert main(["agents", "render-unit", "--tiers", str(tiers), str(path)]) == 0
    service = unit_lines(capsys.readouterr().out, "Service")
    assert "ProtectSystem=full" in service
    assert "PrivateDevices=yes" not in service


def test_install_plan_is_idempotent(tmp_path: Path) -> None:
    tiers = load_tiers()
    units, specs = tmp_path / "units", tmp_path / "specs"
    web = spec(readWritePaths=[str(tmp_path / "data")])
    first = install.plan([web], tiers, unit_dir=units, spec_dir=specs, user_exists=lambda u: False)
    assert first.users == [("keel-agent-web", "/var/lib/keel-agents/web")]
    assert first.directories == [(tmp_path / "data", "keel-agent-web")]
    assert [p for p, _ in first.files] == [specs / "web.json", units / "keel-agent-web.service"]
    assert first.changed_units == ["keel-agent-web.service"]
    assert first.describe()[-2:] == [
        "systemctl daemon-reload",
        "systemctl enable keel-agent-web.service; systemctl restart keel-agent-web.service",
    ]
    # What apply() would leave behind: the files, the user, the directory.
    for path, content in first.files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (tmp_path / "data").mkdir()
    second = install.plan([web], tiers, unit_dir=units, spec_dir=specs, user_exists=lambda u: True)
    assert (second.users, second.directories, second.files, second.changed_units) == (
        [],
        [],
        [],
        [],
    )
    assert second.describe() == [
        "systemctl enable keel-agent-web.service; systemctl start keel-agent-web.service"
    ]
    # A changed spec rewrites its files and restarts only its unit.
    changed = spec(readWritePaths=[str(tmp_path / "data")], environment={"X": "1"})
    third = install.plan(
        [changed], tiers, unit_dir=units, spec_dir=specs, user_exists=lambda u: True
    )
    assert third.changed_units == ["keel-agent-web.service"]
    assert json.loads((specs / "web.json").read_text()) == web.to_json()


def test_install_dry_run_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "web.json"
    path.write_text(json.dumps(spec().to_json()))
    units, specs = tmp_path / "units", tmp_path / "specs"
    argv = [
        "agents",
        "install",
        "--dry-run",
        "--unit-dir",
        str(units),
        "--spec-dir",
        str(specs),
        str(path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"would write {units / 'keel-agent-web.service'}" in out
    assert (
        out[-1]
        == "would systemctl enable keel-agent-web.service; systemctl restart keel-agent-web.service"
    )
    assert not units.exists()
    assert not specs.exists()


def test_install_refuses_bad_specs_before_touching_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(spec().to_json()))
    bad.write_text(json.dumps({**spec(name="other").to_json(), "readWritePaths": ["rel"]}))
    units = tmp_path / "units"
    argv = ["agents", "install", "--unit-dir", str(units), str(good), str(bad)]
    assert main(argv) == 2
    assert 'bad.json: readWritePaths[0]: "rel" is not an absolute path' in capsys.readouterr().err
    assert not units.exists()


def test_list_without_agents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agents", "list", "--json", "--spec-dir", str(tmp_path / "none")]) == 0
    assert json.loads(capsys.readouterr().out) == {"agents": {}}


def test_declared_capabilities_replace_the_empty_set() -> None:
    tiers = load_tiers()
    web = spec(tier=1, capabilities=["CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"])
    assert web.capabilities == ("CAP_NET_BIND_SERVICE", "CAP_NET_RAW")
    lines = unit_lines(render_unit(web, tiers), "Service")
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_RAW" in lines
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_RAW" in lines
    assert "CapabilityBoundingSet=" not in lines  # the tier's empty set is replaced
    # Tier 0 keeps systemd's bounding set; the declared ones become ambient.
    ops = service_directives(spec(tier=0, capabilities=["CAP_NET_BIND_SERVICE"]), tiers)
    assert ops["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert "CapabilityBoundingSet" not in ops
    # Without a declaration, tiers 1 and 2 have none at all.
    assert service_directives(spec(tier=2), tiers)["CapabilityBoundingSet"] == ""


def test_tier_two_may_declare_only_what_tiers_json_allows() -> None:
    tiers = load_tiers()
    assert tiers.tiers[2].capabilities == frozenset({"CAP_NET_BIND_SERVICE"})
    assert tiers.tiers[1].capabilities is None
    lines = unit_lines(render_unit(spec(capabilities=["CAP_NET_BIND_SERVICE"]), tiers), "Service")
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in lines
    with pytest.raises(
        ConfigError,
        match=r"web.json: capabilities\[0\]: tier 2 agents may declare only CAP_NET_BIND_SERVICE; CAP_SYS_ADMIN",
    ):
        render_unit(spec(capabilities=["CAP_SYS_ADMIN"]), tiers)
    with pytest.raises(
        ConfigError, match=r'capabilities\[0\]: "CAP_FLY" is not a Linux capability'
    ):
        render_unit(spec(tier=1, capabilities=["CAP_FLY"]), tiers)


@pytest.mark.parametrize("bad", ["net_bind_service", "CAP_net", "", 7])
def test_capability_names_are_checked(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"web.json: capabilities\[0\]"):
        spec(capabilities=[bad])


def test_capability_bits_cover_tiers_json() -> None:
    from keel.agents.units import CAPABILITY_BITS, capability_mask

    known = load_tiers().known_capabilities
    assert {f"CAP_{name}" for name in CAPABILITY_BITS} == known
    assert sorted(CAPABILITY_BITS.values()) == list(range(len(known)))
    assert capability_mask(["CAP_NET_BIND_SERVICE", "CAP_NET_RAW"]) == (1 << 10) | (1 << 13)


def test_tier_capabilities_must_be_known() -> None:
    data = json.loads(TIERS_JSON.read_text())
    data["tiers"]["2"]["capabilities"] = ["CAP_FLY"]
    with pytest.raises(
        ConfigError, match=r'tiers.2.capabilities: "CAP_FLY" is not in the top-level list'
    ):
        parse_tiers(data, source="tiers.json")


# --- hostile values (issue 8) -------------------------------------------------------------

_UNIT_LINE = re.compile(r"(#[^\n]*|\[(Unit|Service|Install)\]|[A-Z][A-Za-z0-9]*=[^\n]*|)\Z")


def expected_directive_lines(web: AgentSpec, tiers: Tiers) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    unit = {"Description": "", **tiers.unit_directives(web.tier)}
    for directives in (unit, service_directives(web, tiers), {"WantedBy": ""}):
        for key, value in directives.items():
            counts[key] += len(value) if isinstance(value, list) else 1
    return counts


@settings(max_examples=examples(200), deadline=None)
@given(
    args=st.lists(carried_text(), max_size=6),
    env=st.dictionaries(env_names(), carried_text(), max_size=6),
    tier=st.sampled_from([0, 1, 2]),
)
def test_a_unit_holds_only_the_lines_keel_rendered(
    args: list[str], env: dict[str, str], tier: int
) -> None:
    web = spec(tier=tier, user="root" if tier == 0 else "keel-agent-web")
    web = parse_spec(
        {**web.to_json(), "command": ["/bin/echo", *args], "environment": env}, source="web.json"
    )
    tiers = load_tiers()
    text = render_unit(web, tiers)
    lines = text.split("\n")
    assert lines.pop() == ""
    for line in lines:
        assert _UNIT_LINE.match(line), line
        assert line.isprintable(), ascii(line)
        assert not line.endswith("\\"), line  # no continuation
    directives = collections.Counter(
        line.split("=", 1)[0] for line in lines if line and line[0].isupper()
    )
    assert directives == expected_directive_lines(web, tiers)


def test_the_issues_injection_stays_one_environment_value() -> None:
    web = spec(environment={"A": INJECTION})
    service = unit_lines(render_unit(web, load_tiers()), "Service")
    assert 'Environment="A=x\\rExecStartPre=+/nonexistent/evil-as-root\\rUser=root\\r#"' in service
    assert not [line for line in service if line.startswith("ExecStartPre")]
    assert [line for line in service if line.startswith("User=")] == ["User=keel-agent-web"]


@pytest.mark.parametrize(
    ("seconds", "rendered"),
    [
        (2.5, "2.5s"),
        (10, "10s"),
        (0.001, "0.001s"),
        (1.0000004, "1s"),
        (86400, "86400s"),
        (0.1234567, "0.123457s"),
    ],
)
def test_watchdog_seconds_are_rendered_to_the_microsecond(seconds: float, rendered: str) -> None:
    assert format_seconds(seconds) == rendered


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("yes\rExecStartPre=+/bin/sh", 'contains "\\r"'),
        ("yes\x00", 'contains "\\u0000"'),
        ("a\u2028b", 'contains "\\u2028"'),
        ("yes \\", "ends with a backslash"),
    ],
)
def test_tiers_values_stay_on_their_line(value: str, message: str) -> None:
    assert message in bad_tiers(lambda d: d["tiers"]["1"]["serviceConfig"].update(X=value))
    assert message in bad_tiers(lambda d: d["tiers"]["1"]["serviceConfig"].update(X=["ok", value]))
    assert message in bad_tiers(lambda d: d["tiers"]["2"].update(description=value))


def test_a_duplicate_key_in_tiers_json_is_refused(tmp_path: Path) -> None:
    text = TIERS_JSON.read_text().replace('"version": 1,', '"version": 1, "version": 1,', 1)
    assert text != TIERS_JSON.read_text()
    path = tmp_path / "tiers.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r'tiers\.json: key "version" appears twice'):
        load_tiers(path)
