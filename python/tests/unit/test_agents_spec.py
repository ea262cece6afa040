from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from keel.agents.spec import (
    MAX_TASKS,
    AgentSpec,
    check_absolute_path,
    check_domain,
    check_program,
    load_spec,
    load_specs,
    parse_spec,
)
from keel.egress.allowlist import Allowlist, EntryError, parse_entry
from keel.errors import ConfigError
from keel.launch import MAX_EXEC_BYTES

from tests.unit_values import BAD_ENV_NAMES, CARRIED, REFUSED

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
        (minimal(name="Web"), 'name: "Web" is not a valid agent name'),
        (minimal(name="web.1"), 'name: "web.1" is not a valid agent name'),
        (minimal(name="a" * 21), "is too long: at most 20 characters"),
        (minimal(command=[]), "command: must not be an empty list"),
        (
            minimal(command=["python3", "x.py"]),
            'command[0]: "python3": the program must be an absolute path',
        ),
        (minimal(tier=3), "tier: expected 0, 1 or 2, got 3"),
        (minimal(tier="2"), 'tier: expected an integer, got a string "2"'),
        (minimal(user="root"), "user: tier 1 agents run as their own user, not root"),
        (minimal(user="Bad User"), 'user: "Bad User" is not a valid user name'),
        (minimal(workingDirectory="srv"), 'workingDirectory: "srv" is not an absolute path'),
        (
            minimal(readWritePaths=["/srv/a", "/srv/../etc"]),
            "readWritePaths[1]: \"/srv/../etc\" contains '..'",
        ),
        (minimal(readWritePaths=["/"]), "readWritePaths[0]: '/' is the whole file system"),
        (
            minimal(readWritePaths=["/srv/my dir"]),
            'readWritePaths[0]: "/srv/my dir" contains " ": paths in a unit cannot hold whitespace',
        ),
        (minimal(environmentFiles=["env"]), 'environmentFiles[0]: "env" is not an absolute path'),
        (minimal(environment={"1X": "a"}), 'environment.1X: "1X" is not a valid variable name'),
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
            'health.probes[0].url: expected an http:// or https:// URL, got "ftp://x"',
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
        (minimal(health={"watchdogSec": -1}), "health.watchdogSec: must be at least 0.001, got -1"),
        (
            minimal(health={"probes": [{"type": "http", "url": "http://x", "expect_status": []}]}),
            "health.probes[0].expect_status: expected an HTTP status (100-599) or a non-empty list",
        ),
        (
            minimal(health={"probes": [{"type": "http", "url": "http://x", "expect_status": 600}]}),
            "health.probes[0].expect_status: expected an HTTP status",
        ),
        (minimal(resources={"memoryMax": "lots"}), 'resources.memoryMax: "lots": expected bytes'),
        (minimal(resources={"cpuQuota": "50"}), 'resources.cpuQuota: "50": expected a percentage'),
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
        # As the egress config reads them: case-insensitive, IDNA in either form.
        "Example.com",
        "API.Example.COM.",
        "bücher.example",
        "*.Bücher.example",
    ],
)
def test_good_domains(domain: str) -> None:
    assert check_domain(domain) is None


@pytest.mark.parametrize(
    ("domain", "message"),
    [
        ("bü cher.example", "not a valid IDNA label"),
        ("a\u200d.example", "not a valid IDNA label"),
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
        ConfigError, match=r'b\.json: name: agent "web" is already defined in .*a\.json'
    ):
        load_specs([tmp_path / "a.json", tmp_path / "b.json"])


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_example_specs_are_valid(path: Path) -> None:
    spec = load_spec(path)
    assert path.stem == spec.name


# --- hostile values (issue 8) ---------------------------------------------------------------


def error_of(data: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data)
    message = str(info.value)
    assert message.startswith("web.json: ")
    assert len(message.splitlines()) == 1, message
    return message


def test_every_carried_value_is_accepted_as_it_is() -> None:
    env = {f"V{i}": value for i, value in enumerate(CARRIED)}
    spec = parse(minimal(command=["/bin/echo", *CARRIED], environment=env))
    assert spec.command == ("/bin/echo", *CARRIED)
    assert spec.environment == env
    assert parse(json.loads(json.dumps(spec.to_json()))) == spec


@pytest.mark.parametrize("value", REFUSED, ids=ascii)
def test_values_no_program_can_be_given_are_refused_naming_the_key(value: str) -> None:
    assert error_of(minimal(command=["/bin/echo", "ok", value])).startswith(
        "web.json: command[2]: "
    )
    assert error_of(minimal(environment={"GOOD": "", "BAD": value})).startswith(
        "web.json: environment.BAD: "
    )
    exec_probe = {"probes": [{"type": "exec", "command": ["/bin/x", value]}]}
    assert error_of(minimal(health=exec_probe)).startswith(
        "web.json: health.probes[0].command[1]: "
    )


def test_a_nul_is_refused_with_the_reason() -> None:
    assert error_of(minimal(environment={"A": "x\x00y"})) == (
        'web.json: environment.A: "x\\u0000y" contains a NUL character (at 1), '
        "which no program can be given"
    )


@pytest.mark.parametrize("name", BAD_ENV_NAMES, ids=ascii)
def test_bad_environment_names_are_refused_naming_the_key(name: str) -> None:
    message = error_of(minimal(environment={"OK": "1", name: "1"}))
    assert message.startswith("web.json: environment")
    assert "is not a valid variable name" in message


def test_the_environment_name_is_shown_quoted_in_the_key_path() -> None:
    assert error_of(minimal(environment={"A=B": "1"})).startswith(
        'web.json: environment["A=B"]: "A=B" is not a valid variable name'
    )


def test_empty_arguments_are_kept_but_not_an_empty_program() -> None:
    assert parse(minimal(command=["/bin/echo", "", "x"])).command == ("/bin/echo", "", "x")
    assert "command[0]: the program must not be empty" in error_of(minimal(command=["", "x"]))


@pytest.mark.parametrize(
    ("program", "message"),
    [
        ("/opt/a b/run", None),
        ("/opt/100%/run", None),
        ("/opt/日本/run", None),
        ("/opt/../bin/run", None),
        ("run", "must be an absolute path"),
        ('/opt/"q"/run', 'contains "\\"": systemd runs no program'),
        ("/opt/it's/run", 'contains "\'"'),
        ("/opt/back\\slash", 'contains "\\\\"'),
        ("/opt/$HOME/run", 'contains "$"'),
        ("/opt/a\rb", 'contains "\\r"'),
        ("/opt/a\x7fb", 'contains "\\u007f"'),
        ("/opt/dir/", "names a directory"),
        ("/" + "x" * 256, "longer than 255 bytes"),
        ("/x" * 2048, "longer than 4095 bytes"),
    ],
)
def test_the_program_path_is_what_systemd_runs(program: str, message: str | None) -> None:
    problem = check_program(program)
    if message is None:
        assert problem is None
    else:
        assert problem is not None
        assert message in problem


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/srv/a\rb", 'contains "\\r"'),
        ("/srv/a\x01b", 'contains "\\u0001"'),
        ("/srv/a\u2028b", 'contains "\\u2028"'),
        ("/srv/a\u00a0b", 'contains "\\u00a0"'),
        ('/srv/"x"', "quotes, backslashes"),
        ("/srv/it's", "quotes, backslashes"),
        ("/srv/a\\b", "quotes, backslashes"),
        ("/srv/x/..", "contains '..'"),
        ("//", "whole file system"),
        ("/./", "whole file system"),
        ("/srv/" + "x" * 256, "longer than 255 bytes"),
    ],
)
def test_unit_paths_refuse_what_systemd_would_read_differently(path: str, message: str) -> None:
    problem = check_absolute_path(path)
    assert problem is not None
    assert message in problem
    assert len(problem.splitlines()) == 1


def test_paths_are_normalised_as_systemd_reads_them() -> None:
    spec = parse(
        minimal(
            workingDirectory="/srv//web/./",
            readWritePaths=["/srv/data/", "/srv//data", "/srv/100%"],
            environmentFiles=["/etc/keel/./web.env"],
        )
    )
    assert spec.working_directory == "/srv/web"
    assert spec.read_write_paths == ("/srv/data", "/srv/100%")
    assert spec.environment_files == ("/etc/keel/web.env",)
    assert parse(spec.to_json()) == spec


def test_the_command_and_environment_have_a_size_limit() -> None:
    # Exactly at the limit: the program, one argument, one variable, each with its NUL.
    program, name = "/bin/echo", "BIG"
    room = MAX_EXEC_BYTES - (len(program) + 1) - (len("x") + 1) - (len(name) + 2)
    at_limit = minimal(command=[program, "x"], environment={name: "v" * room})
    assert parse(at_limit).environment[name] == "v" * room
    over = minimal(command=[program, "x"], environment={name: "v" * (room + 1)})
    assert error_of(over) == (
        f"web.json: environment: the command and environment take {MAX_EXEC_BYTES + 1} bytes; "
        f"keel passes at most {MAX_EXEC_BYTES} to a program (put large data in a file)"
    )


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"memoryMax": "0"}, "out of range"),
        ({"memoryMax": "18446744073709551615"}, "out of range"),
        ({"memoryMax": "17179869184G"}, "out of range"),
        ({"memoryMax": "9" * 21}, "expected bytes"),
        ({"memoryMax": "0%"}, "above 0% and at most 100%"),
        ({"memoryMax": "150%"}, "above 0% and at most 100%"),
        ({"memoryMax": "12.555%"}, "at most two decimals"),
        ({"cpuQuota": "0%"}, "above 0%"),
        ({"cpuQuota": "50.123%"}, "at most two decimals"),
        ({"cpuQuota": "21474836.48%"}, "at most 21474836.47%"),
        ({"tasksMax": MAX_TASKS + 1}, "must be at most"),
    ],
)
def test_resource_limits_systemd_would_drop_are_refused(
    resources: dict[str, Any], message: str
) -> None:
    assert message in error_of(minimal(resources=resources))


def test_resource_limits_at_systemds_bounds_are_accepted() -> None:
    for resources in (
        {"memoryMax": "18446744073709551614", "cpuQuota": "21474836.47%", "tasksMax": MAX_TASKS},
        {"memoryMax": "17179869183G", "cpuQuota": "0.01%", "tasksMax": 1},
        {"memoryMax": "12.55%"},
        {"memoryMax": "100%"},
        {"memoryMax": "infinity"},
    ):
        assert parse(minimal(resources=resources)).resources.to_json() == resources


@pytest.mark.parametrize(
    ("seconds", "ok"), [(0.0009, False), (0.001, True), (86400, True), (86401, False)]
)
def test_watchdog_bounds(seconds: float, ok: bool) -> None:
    data = minimal(health={"watchdogSec": seconds})
    if ok:
        assert parse(data).watchdog_sec == seconds
    else:
        assert "health.watchdogSec: must be at" in error_of(data)


def test_long_values_are_shortened_in_messages() -> None:
    message = error_of(minimal(user="U" * 100_000))
    assert message.startswith('web.json: user: "UUUU')
    assert '..." (100000 characters) is not a valid user name' in message
    assert len(message) < 300


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        ({"type": "tcp", "host": "a\x00b", "port": 1}, "health.probes[0].host: "),
        ({"type": "tcp", "host": "a b", "port": 1}, "expected a host name"),
        ({"type": "http", "url": "http://127.0.0.1/\u20ac"}, "printable ASCII"),
        ({"type": "http", "url": "http://a\x00b/"}, "printable ASCII"),
        ({"type": "http", "url": "http://x/", "expect_body": "\ud800"}, "unpaired surrogate"),
    ],
)
def test_probe_values_watch_could_not_use_are_refused(probe: dict[str, Any], message: str) -> None:
    assert message in error_of(minimal(health={"probes": [probe]}))


def test_a_duplicate_key_in_a_spec_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    path.write_text('{"name": "web", "command": ["/bin/true"], "tier": 1, "tier": 0}')
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert str(info.value) == f'{path}: key "tier" appears twice in one object'
    path.write_text(
        '{"name": "web", "command": ["/bin/true"], "tier": 1, "environment": {"A": "1", "A": "2"}}'
    )
    with pytest.raises(ConfigError, match='key "A" appears twice'):
        load_spec(path)


def test_an_allowlist_a_spec_accepts_is_the_one_egress_enforces() -> None:
    """One rule (keel.egress.allowlist): what a spec takes, egress reads the same way."""
    allow = ["Bücher.Example", "*.API.example.com", "xn--caf-dma.example."]
    spec = parse_spec(minimal(tier=2, egress={"allow": allow}), source="x.json")
    assert spec.egress_allow == ("Bücher.Example", "*.API.example.com", "xn--caf-dma.example")
    allowlist = Allowlist.parse(spec.egress_allow)
    assert allowlist.allows_text("xn--bcher-kva.example")
    assert allowlist.allows_text("v1.api.EXAMPLE.com")
    assert allowlist.allows_text("café.example")
    assert not allowlist.allows_text("api.example.com")
    for bad in ("*.com", "a_b.example", "bü cher.example"):
        with pytest.raises(ConfigError) as refused:
            parse_spec(minimal(tier=2, egress={"allow": [bad]}), source="x.json")
        with pytest.raises(EntryError) as by_egress:
            parse_entry(bad)
        assert str(by_egress.value) in str(refused.value)
