from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from keel.agents.units import load_tiers, render_unit, service_directives
from keel.errors import ConfigError
from keel.mcp.spec import Grant, ServerSpec, load_server_specs, parse_server_spec
from keel.mcp.units import launcher, render_units, socket_unit, watch_entries

TIERS = Path(__file__).resolve().parents[3] / "modules" / "tiers.json"
NODE = "a" * 32


def stdio(**extra: Any) -> dict[str, Any]:
    return {
        "name": "files",
        "command": ["/usr/bin/files-mcp", "--root", "/srv"],
        "tier": 2,
        **extra,
    }


def parse(data: object) -> ServerSpec:
    return parse_server_spec(data, source="files.json")


def test_a_stdio_server_gets_defaults_and_shares_nothing() -> None:
    spec = parse(stdio())
    assert spec.user == "keel-mcp-files"
    assert spec.unit_name == "keel-mcp-files.service"
    assert spec.socket_unit_name == "keel-mcp-files.socket"
    assert spec.transport == "stdio"
    assert spec.runs_here
    assert spec.share == ()
    assert spec.to_json() == {
        "name": "files",
        "command": ["/usr/bin/files-mcp", "--root", "/srv"],
        "tier": 2,
        "user": "keel-mcp-files",
        "environment": {},
        "environmentFiles": [],
        "readWritePaths": [],
        "egress": {"allow": []},
        "resources": {},
        "share": [],
        "callTimeout": 60.0,
    }


def test_a_full_spec_round_trips() -> None:
    data = stdio(
        environment={"API_BASE": "https://api.example.com"},
        environmentFiles=["/run/secrets/files.env"],
        readWritePaths=["/srv/files"],
        egress={"allow": ["api.example.com"]},
        resources={"memoryMax": "256M", "tasksMax": 32},
        workingDirectory="/srv",
        share=[
            {"agents": ["scout", "notes"], "tools": ["read", "list"]},
            {"agents": "*", "tools": ["list"]},
            {"nodes": [NODE], "agents": "*", "tools": "*"},
        ],
        callTimeout=5,
    )
    spec = parse(data)
    assert spec.share[0] == Grant(frozenset({"scout", "notes"}), frozenset({"read", "list"}))
    assert spec.share[1].agents is None
    assert spec.share[2] == Grant(None, None, frozenset({NODE}), remote=True)
    again = parse(spec.to_json())
    assert again == spec
    assert again.to_json() == spec.to_json()


def test_a_url_server_runs_elsewhere() -> None:
    spec = parse({"name": "search", "url": "https://mcp.example.com/mcp", "share": []})
    assert spec.transport == "http"
    assert not spec.runs_here
    assert spec.to_json() == {
        "name": "search",
        "url": "https://mcp.example.com/mcp",
        "share": [],
        "callTimeout": 60.0,
    }
    with pytest.raises(ConfigError, match=r"files.json: tier: only for a server keel runs"):
        parse({"name": "search", "url": "https://mcp.example.com/mcp", "tier": 1})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "files", "tier": 1}, r"command: required key is missing: give `command`"),
        (
            stdio(command=["files-mcp"]),
            r'command\[0\]: "files-mcp": the program must be an absolute path',
        ),
        (stdio(tier=3), r"tier: expected 0, 1 or 2, got 3"),
        (stdio(user="root"), r"user: tier 2 servers run as their own user, not root"),
        (stdio(name="Files"), r"name: \"Files\" is not a valid MCP server name"),
        (stdio(name="a" * 23), r"is too long: at most 22 characters"),
        (stdio(url="ftp://x"), r"url: 'ftp://x': expected an http:// or https:// URL"),
        (stdio(share={"agents": "*"}), r"share: expected a list of objects"),
        (stdio(share=[{"agents": "*"}]), r"share\[0\].tools: required key is missing"),
        (stdio(share=[{"tools": "*"}]), r"share\[0\].agents: required key is missing"),
        (
            stdio(share=[{"agents": "all", "tools": "*"}]),
            r'share\[0\].agents: expected "\*" or a list',
        ),
        (
            stdio(share=[{"agents": ["*"], "tools": "*"}]),
            r'share\[0\].agents\[0\]: write "\*" instead',
        ),
        (stdio(share=[{"agents": ["Bad"], "tools": "*"}]), r'share\[0\].agents\[0\]: "Bad" is not'),
        (stdio(share=[{"agents": "*", "tools": ["a b"]}]), r"tools\[0\]: 'a b' is not a tool name"),
        (
            stdio(share=[{"agents": "*", "tools": "*", "nodes": ["x"]}]),
            r"nodes\[0\]: 'x' is not a mesh node id",
        ),
        (
            stdio(share=[{"agents": "*", "tools": "*", "nodes": "*", "allowLowerTier": True}]),
            r"allowLowerTier: applies to this node's agents",
        ),
        (
            stdio(share=[{"agents": "*", "tools": "*", "everyone": True}]),
            r"share\[0\].everyone: unknown key",
        ),
        (stdio(egress={"allow": ["*"]}), r"egress.allow\[0\]"),
        (stdio(tier=0, egress={"allow": ["example.com"]}), r"tier 0 servers have an open network"),
        (stdio(resources={"memoryMax": "lots"}), r'resources.memoryMax: "lots"'),
        (stdio(environment={"1X": "y"}), r'environment.1X: "1X" is not a valid variable name'),
        (stdio(callTimeout=0), r"callTimeout: expected a number > 0"),
        (stdio(sharing=[]), r"sharing: unknown key"),
    ],
)
def test_bad_specs_are_refused_naming_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(data)


def test_an_empty_grant_list_is_nobody_not_everyone() -> None:
    spec = parse(stdio(share=[{"agents": [], "tools": "*"}, {"agents": "*", "tools": []}]))
    assert spec.share[0].agents == frozenset()
    assert spec.share[1].tools == frozenset()


def test_two_specs_with_one_name_are_refused(tmp_path: Path) -> None:
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text('{"name": "files", "url": "http://127.0.0.1:1/mcp"}')
    with pytest.raises(ConfigError, match=r"b.json: name: MCP server 'files' is already defined"):
        load_server_specs([tmp_path / "a.json", tmp_path / "b.json"])


def test_the_server_unit_is_the_agent_renderer_s_with_the_launcher() -> None:
    tiers = load_tiers(TIERS)
    spec = parse(stdio(resources={"memoryMax": "128M", "tasksMax": 16}, environment={"K": "v w"}))
    units = render_units(spec, tiers, program="/usr/bin/keel")
    assert list(units) == ["keel-mcp-files.socket", "keel-mcp-files.service"]
    service = units["keel-mcp-files.service"]
    argv = "ExecStart=/usr/bin/keel mcp exec -- /usr/bin/files-mcp --root /srv"
    assert argv in service.splitlines()
    # Exactly what the agents' renderer makes of the same spec: same tier sandbox.
    unit_spec = spec.unit_spec(launcher("/usr/bin/keel"))
    assert unit_spec.unit_name == "keel-mcp-files.service"
    for key, value in service_directives(unit_spec, tiers).items():
        if isinstance(value, list):
            for item in value:
                assert f"{key}={item}" in service
        elif not isinstance(value, bool):
            assert f"{key}={value}" in service
    assert "StateDirectory=keel-mcp/files" in service
    assert "MemoryMax=128M" in service
    assert "TasksMax=16" in service
    assert "Description=keel MCP server files (tier 2)" in service
    assert "Requires=keel-mcp-files.socket" in service
    assert "After=network.target" in service
    assert "After=keel-mcp-files.socket" in service
    assert "InaccessiblePaths=-/run/keel" in service  # tier 2's sandbox
    assert service == render_unit(
        unit_spec,
        tiers,
        unit_extra={
            "Requires": "keel-mcp-files.socket",
            "After": ["network.target", "keel-mcp-files.socket"],
        },
    )


def test_the_socket_unit_belongs_to_the_gateway_s_user() -> None:
    text = socket_unit(parse(stdio()), run_dir=Path("/run/keel/mcp"), owner="keel-mcp")
    lines = text.splitlines()
    assert "ListenStream=/run/keel/mcp/files.sock" in lines
    assert "SocketUser=keel-mcp" in lines
    assert "SocketMode=0600" in lines
    assert "Accept=no" in lines
    assert "PartOf=keel-mcp-files.service" in lines


def test_an_http_server_keel_runs_has_no_launcher_and_no_socket() -> None:
    spec = parse(stdio(url="http://127.0.0.1:8931/mcp"))
    units = render_units(spec, load_tiers(TIERS), program="/usr/bin/keel")
    assert list(units) == ["keel-mcp-files.service"]
    assert "ExecStart=/usr/bin/files-mcp --root /srv" in units["keel-mcp-files.service"]
    assert render_units(parse({"name": "x", "url": "http://h/mcp"}), load_tiers(TIERS)) == {}


def test_watch_supervises_servers_by_unit_or_by_command() -> None:
    spec = parse(stdio(environment={"A": "b"}))
    remote = parse({"name": "x", "url": "http://h/mcp"})
    systemd = watch_entries([spec, remote], backend="systemd", sockets=Path("/run/keel/mcp"))
    assert systemd == {"keel-mcp-files": {"unit": "keel-mcp-files.service"}}
    process = watch_entries([spec], backend="process", sockets=Path("/s"), program="/k")
    assert process == {
        "keel-mcp-files": {
            "command": [
                "/k",
                "mcp",
                "exec",
                "--listen",
                "/s/files.sock",
                "--",
                "/usr/bin/files-mcp",
                "--root",
                "/srv",
            ],
            "environment": {"A": "b"},
        }
    }
