"""modules/mcp.nix against the Python side: same specs, same units, same policy checks.

The module writes /etc/keel/mcp.json with every server's spec inline and the
host's agents; `keel mcp serve` reads it. Here keel's own config reader takes
the file the module wrote, and each server's unit is the one keel renders from
that spec (agents.nix's renderer in Nix, keel.agents.units in Python).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from keel.agents.units import load_tiers
from keel.config import Section
from keel.mcp import config as mcp_config
from keel.mcp.spec import parse_server_spec
from keel.mcp.units import launcher, render_units

from tests import systemd_syntax
from tests.conftest import REPO
from tests.nix.test_agents import NIXOS_ENVIRONMENT, sections
from tests.nix.test_modules import evaluate

TIERS_JSON = REPO / "modules" / "tiers.json"
NODE = "a" * 32
REMOTE = "b" * 32

HOST = rf"""
{{
  services.keel.egress = {{ enable = true; upstream = [ "192.0.2.53" ]; }};
  services.keel.agents = {{
    scout = {{ command = [ "/bin/scout" ]; tier = 2; }};
    notes = {{ command = [ "/bin/notes" ]; tier = 1; }};
    ops = {{ command = [ "/bin/ops" ]; tier = 0; user = "root"; }};
  }};
  services.keel.watch.enable = true;
  services.keel.mesh = {{ enable = true; listen = "0.0.0.0:7400"; }};
  services.keel.mcp = {{
    enable = true;
    remote.b = {{ node = "{REMOTE}"; servers = [ "notes" ]; }};
    remote.c = {{ node = "{NODE}"; }};
    mesh.deadline = 5;
    settings.http = "/run/keel-mcp/http.sock";
    servers = {{
      files = {{
        command = [ "/run/current-system/sw/bin/files-mcp" "--root" "/srv/files" ];
        tier = 2;
        readWritePaths = [ "/srv/files" ];
        environment = {{ MODE = "read only"; }};
        environmentFiles = [ "/run/secrets/files.env" ];
        resources = {{ memoryMax = "256M"; tasksMax = 32; }};
        share = [
          {{ agents = [ "scout" "notes" ]; tools = [ "read" ]; }}
          {{ agents = "*"; tools = [ "list" ]; }}
          {{ agents = "*"; tools = "*"; nodes = [ "{NODE}" ]; }}
        ];
      }};
      shell = {{
        command = [ "/run/current-system/sw/bin/shell-mcp" ];
        tier = 0;
        share = [ {{ agents = [ "ops" ]; tools = "*"; }} ];
      }};
      browser = {{
        command = [ "/run/current-system/sw/bin/browser-mcp" "--port" "8931" ];
        url = "http://127.0.0.1:8931/mcp";
        tier = 1;
        share = [ {{ agents = [ "notes" ]; tools = "*"; }} ];
      }};
      search = {{
        url = "https://search.example.com/mcp";
        share = [ ];
      }};
    }};
  }};
}}
"""


@pytest.fixture(scope="module")
def host(nix_instantiate: str, nixpkgs_tree: Path) -> dict[str, Any]:
    result = evaluate(nix_instantiate, nixpkgs_tree, HOST)
    assert result["failedAssertions"] == []
    return result


def test_the_gateway_reads_the_config_the_module_writes(host: dict[str, Any]) -> None:
    written = host["etc"]["keel/mcp.json"]["json"]
    assert sorted(written["servers"]) == ["browser", "files", "search", "shell"]
    # Root runs no agent the gateway can tell apart; the others by their users.
    assert written["agents"] == {
        "notes": {"user": "keel-agent-notes", "tier": 1},
        "scout": {"user": "keel-agent-scout", "tier": 2},
    }
    assert written["listen"] == "/run/keel-mcp/mcp.sock"
    assert written["http"] == "/run/keel-mcp/http.sock"
    # keel-mcp appends to the ledger; only root's daemons sign it (the key is root's).
    assert written["checkpoint_every"] is None
    for name, data in written["servers"].items():
        spec = parse_server_spec(data, source=f"servers.{name}")
        assert spec.to_json() == data
    # Other nodes' tools, and how the gateway reaches the mesh (it hosts for nodes too).
    assert written["remote"] == {
        "b": {"node": REMOTE, "servers": ["notes"]},
        "c": {"node": NODE, "servers": "*"},
    }
    assert written["mesh"] == {"socket": "/run/keel/mesh.sock", "deadline": 5, "list_ttl": 30}
    # keel's own reader takes those two sections as the module wrote them
    parsed = mcp_config.parse(
        Section({"remote": written["remote"], "mesh": written["mesh"], "servers": {}}, source="x")
    )
    assert {label: r.node for label, r in parsed.remote.items()} == {"b": REMOTE, "c": NODE}
    assert parsed.remote["b"].offers("notes")
    assert not parsed.remote["b"].offers("files")


def test_each_stdio_server_is_a_socket_and_the_unit_keel_renders(host: dict[str, Any]) -> None:
    written = host["etc"]["keel/mcp.json"]["json"]
    tiers = load_tiers(TIERS_JSON)
    assert set(host["sockets"]) == {"keel-mcp-files", "keel-mcp-shell"}
    socket = host["sockets"]["keel-mcp-files"]
    assert socket["listenStreams"] == ["/run/keel/mcp/files.sock"]
    assert socket["socketConfig"] == {
        "Accept": False,
        "SocketUser": "keel-mcp",
        "SocketMode": "0600",
        "DirectoryMode": "0750",
    }
    assert {"keel-mcp-files", "keel-mcp-shell", "keel-mcp-browser"} <= set(host["services"])
    assert "keel-mcp-search" not in host["services"]  # run elsewhere
    for name in ("files", "shell", "browser"):
        spec = parse_server_spec(written["servers"][name], source=name)
        unit = host["services"][f"keel-mcp-{name}"]
        nix_text = host["units"][spec.unit_name]
        program = systemd_syntax.service_values(nix_text)[0][0] if spec.url is None else None
        python_text = render_units(spec, tiers, program=program)[spec.unit_name]
        # The same directives, argv and environment, however each side quotes them.
        values = {"ExecStart", "Environment"}
        nix_service = {
            k: v for k, v in sections(nix_text, skip=values).items() if k[0] == "Service"
        }
        if spec.tier == 2 or spec.egress_allow:
            # modules/egress.nix governs it as an agent: it starts once its rules
            # are in the kernel (tests/nix/test_egress.py).
            [check] = nix_service.pop(("Service", "ExecStartPre"))
            assert check.endswith(f"nft list chain inet keel agent_mcp.{name}")
        python_service = {
            k: v for k, v in sections(python_text, skip=values).items() if k[0] == "Service"
        }
        assert nix_service == python_service, name
        nix_argv, nix_env = systemd_syntax.service_values(nix_text)
        python_argv, python_env = systemd_syntax.service_values(python_text)
        assert nix_argv == python_argv, name
        assert {k: v for k, v in nix_env.items() if k not in NIXOS_ENVIRONMENT} == python_env
        assert unit["description"] == f"keel MCP server {name} (tier {spec.tier})"
    files = host["services"]["keel-mcp-files"]
    assert files["requires"] == ["keel-mcp-files.socket"]
    assert sorted(files["after"]) == ["keel-egress.service", "keel-mcp-files.socket"]
    files_argv = systemd_syntax.service_values(host["units"]["keel-mcp-files.service"])[0]
    assert files_argv[0].endswith("/bin/keel")
    assert files_argv[1:] == [
        "mcp",
        "exec",
        "--",
        "/run/current-system/sw/bin/files-mcp",
        "--root",
        "/srv/files",
    ]
    assert launcher("/x")[1:] == ("mcp", "exec", "--")
    assert files["serviceConfig"]["InaccessiblePaths"] == [
        "-/run/keel",
        "-/var/lib/keel",
        "-/etc/keel",
        "-/run/nscd",
        "-/run/systemd/resolve",
    ]


def test_the_gateway_unit_is_hardened_and_watch_supervises_the_servers(
    host: dict[str, Any],
) -> None:
    gateway = host["services"]["keel-mcp"]["serviceConfig"]
    assert gateway["User"] == "keel-mcp"
    assert gateway["Type"] == "notify"
    assert gateway["NoNewPrivileges"] is True
    assert gateway["ProtectSystem"] == "strict"
    assert gateway["CapabilityBoundingSet"] == ""
    assert gateway["RuntimeDirectory"] == "keel-mcp"
    assert "mcp serve --config /nix/store/" in gateway["ExecStart"]
    watch = host["etc"]["keel/watch.json"]["json"]["agents"]
    assert watch["keel-mcp-files"]["unit"] == "keel-mcp-files.service"
    assert watch["keel-mcp-browser"]["unit"] == "keel-mcp-browser.service"
    assert "keel-mcp-search" not in watch
    assert "d /run/keel/mcp 0750 keel-mcp keel - -" in host["tmpfiles"]
    assert {"keel-mcp", "keel-mcp-files", "keel-mcp-shell"} <= set(host["users"])
    names = [check["name"] for check in host["checks"]]
    assert "keel-mcp-valid" in names


def test_the_gateway_waits_for_the_mesh_it_uses(host: dict[str, Any]) -> None:
    gateway = host["services"]["keel-mcp"]
    assert "keel-mesh.service" in gateway["after"]
    assert "keel-mesh.service" in gateway["wants"]


def test_a_gateway_without_remote_tools_or_node_grants_leaves_the_mesh_alone(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    config = """{
      services.keel.mcp = {
        enable = true;
        servers.time = { url = "http://127.0.0.1:9/mcp"; share = [ { agents = "*"; tools = "*"; } ]; };
      };
    }"""
    result = evaluate(nix_instantiate, nixpkgs_tree, config)
    assert result["failedAssertions"] == []
    written = result["etc"]["keel/mcp.json"]["json"]
    assert written["remote"] == {}
    assert "mesh" not in written
    assert "keel-mesh.service" not in result["services"]["keel-mcp"]["after"]


@pytest.mark.parametrize(
    ("remote", "message"),
    [
        (f'remote.files = {{ node = "{REMOTE}"; }};', "a local server is named 'files' too"),
        (f'remote."B.x" = {{ node = "{REMOTE}"; }};', "is not a valid label"),
        (f'remote.{"l" * 24} = {{ node = "{REMOTE}"; }};', "1 to 23 lowercase letters"),
        ('remote.b = { node = "node-b"; };', "'node-b' is not a mesh node id"),
        (f'remote.b = {{ node = "{REMOTE}"; servers = [ "No Such" ]; }};', 'expected "*" or MCP'),
    ],
)
def test_bad_remote_declarations_fail_naming_the_option(
    nix_instantiate: str, nixpkgs_tree: Path, remote: str, message: str
) -> None:
    config = f"""{{
      services.keel.mesh = {{ enable = true; listen = "0.0.0.0:7400"; }};
      services.keel.mcp = {{
        enable = true;
        servers.files = {{ url = "http://127.0.0.1:9/mcp"; }};
        {remote}
      }};
    }}"""
    failed = evaluate(nix_instantiate, nixpkgs_tree, config)["failedAssertions"]
    assert any("services.keel.mcp.remote." in f and message in f for f in failed), failed


def test_remote_tools_need_the_mesh(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    config = f'{{ services.keel.mcp = {{ enable = true; remote.b.node = "{REMOTE}"; }}; }}'
    failed = evaluate(nix_instantiate, nixpkgs_tree, config)["failedAssertions"]
    assert any("remote tools travel over the mesh: enable services.keel.mesh" in f for f in failed)


def test_the_gateway_may_not_be_told_to_sign(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    config = "{ services.keel.mcp = { enable = true; settings.checkpoint_every = 60; }; }"
    result = evaluate(nix_instantiate, nixpkgs_tree, config)
    assert any(
        "services.keel.mcp.settings.checkpoint_every: the gateway runs as keel-mcp" in failure
        for failure in result["failedAssertions"]
    ), result["failedAssertions"]


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ('{ command = [ "/bin/x" ]; share = [ ]; }', "servers.bad.tier: required"),
        ("{ share = [ ]; }", "give `command`"),
        ('{ command = [ "x" ]; tier = 1; }', "must be an absolute path"),
        ('{ url = "ftp://x"; }', "expected an http:// or https:// URL"),
        (
            '{ command = [ "/bin/x" ]; tier = 0; share = [ { agents = [ "scout" ]; tools = "*"; } ]; }',
            "would act outside their sandbox",
        ),
    ],
)
def test_bad_declarations_fail_an_assertion(
    nix_instantiate: str, nixpkgs_tree: Path, server: str, message: str
) -> None:
    config = (
        '{ services.keel.agents.scout = { command = [ "/bin/scout" ]; tier = 2; }; '
        'services.keel.egress = { enable = true; upstream = [ "192.0.2.53" ]; }; '
        f"services.keel.mcp = {{ enable = true; servers.bad = {server}; }}; }}"
    )
    result = evaluate(nix_instantiate, nixpkgs_tree, config)
    assert any(message in failure for failure in result["failedAssertions"]), result[
        "failedAssertions"
    ]


def test_the_vm_tests_host_id_is_that_of_its_fixed_key() -> None:
    import json
    import re

    from keel.mesh.identity import NodeIdentity

    from tests.conftest import REPO

    text = (REPO / "vm-tests" / "mcp.nix").read_text()
    declared = re.search(r'hostId = "([a-z2-7]{32})";', text)
    key = re.search(r"writeText \"mcp-test-b-identity.key\" ''\n(.*?)\n\s*'';", text, re.S)
    assert declared is not None
    assert key is not None
    data = json.loads(key.group(1))
    identity = NodeIdentity(
        static_private=bytes.fromhex(data["static_private"]),
        signing_private=bytes.fromhex(data["signing_private"]),
    )
    assert identity.node_id == data["node_id"] == declared.group(1)
