from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from keel.agents.spec import (
    AgentSpec,
    check_domain,
    load_spec,
    load_specs,
    parse_spec,
)
from keel.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "agents"


def minimal(**extra: Any) -> dict[str, Any]:
    return {"name": "web", "command": ["/usr/bin/python3", "-m", "http.server"], "tier": 1, **extra}


def parse(data: object) -> AgentSpec:
    return parse_spec(data, source="web.json")


def test_minimal_spec_gets_defaults() -> None:
    spec = parse(minimal())
    assert spec.user == "keel-agent-web"
    assert spec.unit_name == "keel-agent-web.service"
    assert spec.state_directory == "/var/lib/keel-agents/web"
    assert spec.working_directory is None
    assert spec.probes == ()
    assert spec.to_json() == {
        "name": "web",
        "command": ["/usr/bin/python3", "-m", "http.server"],
        "tier": 1,
        "user": "keel-agent-web",
        "environment": {},
        "environmentFiles": [],
        "readWritePaths": [],
        "capabilities": [],
        "egress": {"allow": []},
        "health": {"probes": []},
        "resources": {},
    }


def test_full_spec_round_trips() -> None:
    data = minimal(
        tier=2,
        user="scout",
        workingDirectory="/srv/scout",
        environment={"MODEL": "small", "EMPTY": ""},
        environmentFiles=["/etc/keel/agents/web.env"],
        readWritePaths=["/srv/scout", "/srv/scout"],
        egress={"allow": ["example.org", "*.Wikipedia.org".lower(), "api.example.com."]},
        health={
            "probes": [
                {"type": "http", "url": "http://127.0.0.1:8080/health", "expect_status": 204},
                {"type": "tcp", "host": "127.0.0.1", "port": 8080, "interval": 1, "timeout": 0.5},
                {"type": "exec", "command": ["/bin/true"], "failures": 1, "grace": 0},
                {"type": "tcp", "name": "port", "port": 9, "interval": 1},
            ],
            "watchdogSec": 5,
        },
        resources={"memoryMax": "512M", "cpuQuota": "150%", "tasksMax": 32},
    )
    spec = parse(data)
    assert spec.read_write_paths == ("/srv/scout",)
    assert spec.egress_allow == ("example.org", "*.wikipedia.org", "api.example.com")
    out = spec.to_json()
    assert out["health"]["probes"][0] == {
        "type": "http",
        "url": "http://127.0.0.1:8080/health",
        "expect_status": [204],
        "interval": 5.0,
        "timeout": 2.0,
        "failures": 3,
        "grace": 0.0,
    }
    assert out["health"]["probes"][1]["timeout"] == 0.5
    assert out["health"]["probes"][3] == {
        "type": "tcp",
        "name": "port",
        "host": "127.0.0.1",
        "port": 9,
        "interval": 1.0,
        "timeout": 1.0,
        "failures": 3,
        "grace": 0.0,
    }
    assert out["health"]["probes"][2]["command"] == ["/bin/true"]
    assert out["health"]["watchdogSec"] == 5.0
    assert out["resources"] == {"memoryMax": "512M", "cpuQuota": "150%", "tasksMax": 32}
    # The normalised form parses to the same spec: Nix may hand either to keel.
    assert parse(json.loads(json.dumps(out))) == spec


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"command": ["/bin/true"], "tier": 0}, "web.json: name: required key is missing"),
        (minimal(name="Web"), "name: 'Web' is not a valid agent name"),
        (minimal(name="web.1"), "name: 'web.1' is not a valid agent name"),
        (minimal(name="a" * 22), "is too long: at most 21 characters"),
        (minimal(command=[]), "command: must not be an empty list"),
        (
            minimal(command=["python3", "x.py"]),
            "command[0]: 'python3': the program must be an absolute path",
        ),
        (minimal(tier=3), "tier: expected 0, 1 or 2, got 3"),
        (minimal(tier="2"), 'tier: expected an integer, got a string "2"'),
        (minimal(user="root"), "user: tier 1 agents run as their own user, not root"),
        (minimal(user="Bad User"), "user: 'Bad User' is not a valid user name"),
        (minimal(workingDirectory="srv"), "workingDirectory: 'srv' is not an absolute path"),
        (
            minimal(readWritePaths=["/srv/a", "/srv/../etc"]),
            "readWritePaths[1]: '/srv/../etc' contains '..'",
        ),
        (minimal(readWritePaths=["/"]), "readWritePaths[0]: '/' is the whole file system"),
        (
            minimal(readWritePaths=["/srv/my dir"]),
            "readWritePaths[0]: '/srv/my dir' contains whitespace",
        ),
        (minimal(environmentFiles=["env"]), "environmentFiles[0]: 'env' is not an absolute path"),
        (minimal(environment={"1X": "a"}), "environment: '1X' is not a valid variable name"),
        (minimal(environment={"X": 1}), "environment.X: expected a string"),
        (minimal(egress={"allow": ["exa mple.com"]}), "egress.allow[0]: 'exa mple.com': label"),
        (minimal(egress={"allow": "example.com"}), "egress.allow: expected a list of strings"),
        (minimal(egress={"deny": []}), "egress.deny: unknown key"),
        (
            minimal(tier=0, egress={"allow": ["example.com"]}),
            "egress.allow: tier 0 agents have an open network",
        ),
        (
            minimal(health={"probes": [{"type": "ping"}]}),
            "health.probes[0].type: expected one of 'http', 'tcp', 'exec'",
        ),
        (
            minimal(health={"probes": [{"type": "http", "url": "ftp://x"}]}),
            "health.probes[0].url: 'ftp://x': expected an http:// or https:// URL",
        ),
        (
            minimal(health={"probes": [{"type": "tcp", "host": "h", "port": 0}]}),
            "health.probes[0].port: must be at least 1",
        ),
        (
            minimal(health={"probes": [{"type": "tcp", "host": "h", "port": 1, "interval": 0}]}),
            "health.probes[0].interval: expected a number > 0",
        ),
        (
            minimal(health={"probes": [{"type": "exec", "command": ["/bin/true"], "timeout": 9}]}),
            "health.probes[0].timeout: must not exceed interval (5 s)",
        ),
        (
            minimal(health={"probes": [{"type": "exec", "command": ["/bin/true"], "port": 1}]}),
            "health.probes[0].port: unknown key",
        ),
        (
            minimal(health={"probes": [{"type": "exec", "command": ["/bin/true"], "failures": 0}]}),
            "health.probes[0].failures: must be at least 1",
        ),
        (minimal(health={"watchdogSec": -1}), "health.watchdogSec: expected a number > 0"),
        (
            minimal(health={"probes": [{"type": "http", "url": "http://x", "expect_status": []}]}),
            "health.probes[0].expect_status: expected an HTTP status (100-599) or a non-empty list",
        ),
        (
            minimal(health={"probes": [{"type": "http", "url": "http://x", "expect_status": 600}]}),
            "health.probes[0].expect_status: expected an HTTP status",
        ),
        (minimal(resources={"memoryMax": "lots"}), "resources.memoryMax: 'lots': expected bytes"),
        (minimal(resources={"cpuQuota": "50"}), "resources.cpuQuota: '50': expected a percentage"),
        (minimal(resources={"tasksMax": 0}), "resources.tasksMax: must be at least 1"),
        (minimal(resources={"swap": "1G"}), "resources.swap: unknown key"),
        (minimal(comand=["/bin/true"]), "comand: unknown key"),
        (["not", "an", "object"], "web.json: top level: expected an object, got a list"),
    ],
)
def test_bad_specs_name_the_key(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert message in str(info.value)
    assert str(info.value).startswith("web.json: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "domain",
    [
        "example.com",
        "api.example.com",
        "*.example.com",
        "xn--bcher-kva.example",
        "a-b.c0.io",
        "localhost",
    ],
)
def test_good_domains(domain: str) -> None:
    assert check_domain(domain) is None


@pytest.mark.parametrize(
    ("domain", "message"),
    [
        ("Example.com", "lowercase"),
        ("bücher.example", "ASCII form"),
        ("*", "'*' is only allowed as the whole first label"),
        ("*.com", "a wildcard must sit under a registered name"),
        ("a.*.example.com", "'*' is only allowed as the whole first label"),
        ("*example.com", "'*' is only allowed"),
        ("-a.example.com", "label '-a'"),
        ("a..example.com", "label ''"),
        ("a_b.example.com", "label 'a_b'"),
        ("10.0.0.1", "not addresses"),
        ("::1", "not addresses"),
        ("example.123", "the last label cannot be all digits"),
        ("a" * 64 + ".com", "1 to 63 characters"),
        (".".join(["a" * 60] * 5), "longer than 253 characters"),
    ],
)
def test_bad_domains(domain: str, message: str) -> None:
    problem = check_domain(domain)
    assert problem is not None
    assert message in problem


def test_load_spec_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"name": "x",')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 1"):
        load_spec(path)
    with pytest.raises(ConfigError, match=r"missing\.json: agent spec file not found"):
        load_spec(tmp_path / "missing.json")


def test_two_specs_with_one_name_are_refused(tmp_path: Path) -> None:
    for file in ("a.json", "b.json"):
        (tmp_path / file).write_text(json.dumps(minimal()))
    with pytest.raises(
        ConfigError, match=r"b\.json: name: agent 'web' is already defined in .*a\.json"
    ):
        load_specs([tmp_path / "a.json", tmp_path / "b.json"])


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_example_specs_are_valid(path: Path) -> None:
    spec = load_spec(path)
    assert path.stem == spec.name
