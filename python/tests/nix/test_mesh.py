"""modules/mesh.nix: /etc/keel/mesh.json and keel-mesh.service from the options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from keel.agents.meshgrant import MeshGrant
from keel.config import Section
from keel.mesh.config import parse, parse_listen

from tests import systemd_syntax
from tests.nix.nixeval import nix_text
from tests.nix.test_modules import evaluate

FIREWALL = '[ [ "networking" "firewall" "allowedTCPPorts" ] ]'


def mesh(nix_instantiate: str, nixpkgs_tree: Path, body: str) -> dict[str, Any]:
    return evaluate(
        nix_instantiate,
        nixpkgs_tree,
        "{ services.keel.mesh.enable = true; " + body + " }",
        paths=FIREWALL,
    )


def node_config(result: dict[str, Any]) -> dict[str, Any]:
    """/etc/keel/mesh.json, the file the unit runs the daemon on (no link, no preStart)."""
    assert result["services"]["keel-mesh"]["preStart"] == ""
    config: dict[str, Any] = result["etc"]["keel/mesh.json"]["json"]
    return config


@pytest.fixture
def default_node(nix_instantiate: str, nixpkgs_tree: Path) -> dict[str, Any]:
    return mesh(nix_instantiate, nixpkgs_tree, 'services.keel.mesh.listen = "0.0.0.0:7400";')


def test_the_node_is_a_hardened_notify_service(default_node: dict[str, Any]) -> None:
    assert default_node["failedAssertions"] == []
    unit = default_node["services"]["keel-mesh"]
    service = unit["serviceConfig"]
    argv, _ = systemd_syntax.service_values(default_node["units"]["keel-mesh.service"])
    assert argv[0].endswith("-keel-0.1.0/bin/keel")
    assert argv[1:4] == ["mesh", "serve", "--config"]
    assert argv[4].endswith("-mesh.json")
    assert len(argv) == 5
    assert service["Type"] == "notify"
    assert service["Restart"] == "always"
    assert service["User"] == "keel-mesh"
    assert service["Group"] == "keel"
    assert service["StateDirectory"] == "keel/mesh"
    assert service["ReadWritePaths"] == ["/var/lib/keel", "/run/keel"]
    assert (service["RuntimeDirectory"], service["RuntimeDirectoryMode"]) == ("keel-mesh", "0755")
    # The link the module made before keel mesh read --config goes away.
    assert "r /var/lib/keel/mesh/config.json - - - - -" in default_node["tmpfiles"]
    assert service["CapabilityBoundingSet"] == ""
    assert service["ProtectSystem"] == "strict"
    assert unit["after"] == ["network-online.target"]
    assert default_node["users"]["keel-mesh"]["isSystemUser"] is True
    assert default_node["values"] == [[]]


def test_a_switch_restarts_the_node_without_stopping_it_first(
    default_node: dict[str, Any],
) -> None:
    # As tailscale.nix: an activation driven over the mesh keeps its link.
    assert default_node["services"]["keel-mesh"]["stopIfChanged"] is False


def test_settings_become_config_json(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = mesh(
        nix_instantiate,
        nixpkgs_tree,
        """
          services.keel.mesh.listen = "[::]:7400";
          services.keel.mesh.settings = { keepalive_interval = 5; idle_timeout = 20; window_messages = 64; };
        """,
    )
    assert node_config(result) == {
        "directory": "/var/lib/keel/mesh",
        "listen": "[::]:7400",
        "socket": "/run/keel/mesh.sock",
        "agent_socket": "/run/keel-mesh/agents.sock",
        "ledger": "/var/lib/keel/ledger.db",
        "handshake_timeout": 10,
        "keepalive_interval": 5,
        "idle_timeout": 20,
        "rekey_interval": 120,
        "default_ttl": 86400,
        "durability": "normal",
        "window_messages": 64,
        "agents": {},
    }


def test_the_node_tells_the_hosts_agents_apart(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = mesh(
        nix_instantiate,
        nixpkgs_tree,
        """
          services.keel.mesh.listen = "0.0.0.0:7400";
          services.keel.egress = { enable = true; upstream = [ "192.0.2.53" ]; };
          services.keel.agents = {
            scout = { command = [ "/bin/scout" ]; tier = 2; mesh.topics = [ "jobs" ]; };
            idle = { command = [ "/bin/idle" ]; tier = 2; };
            notes = { command = [ "/bin/notes" ]; tier = 1; mesh.sendTo = [ ]; };
            picky = { command = [ "/bin/picky" ]; tier = 1; mesh.receiveFrom = [ "ops@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb" ]; };
            ops = { command = [ "/bin/ops" ]; tier = 0; user = "root"; };
          };
        """,
    )
    assert result["failedAssertions"] == []
    agents = node_config(result)["agents"]
    # root cannot be told apart from root: ops is no agent to the node
    assert agents == {
        "scout": {"user": "keel-agent-scout", "tier": 2, "mesh": {"topics": ["jobs"]}},
        "idle": {"user": "keel-agent-idle", "tier": 2},
        "notes": {"user": "keel-agent-notes", "tier": 1, "mesh": {"sendTo": []}},
        "picky": {
            "user": "keel-agent-picky",
            "tier": 1,
            "mesh": {"receiveFrom": ["ops@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"]},
        },
    }
    # the node reads them as its Python config reader does (uids stand in for the users)
    with Section(
        {"listen": "0.0.0.0:7400", "agents": {
            name: {"uid": 1000 + i, **{k: v for k, v in entry.items() if k != "user"}}
            for i, (name, entry) in enumerate(sorted(agents.items()))
        }},
        source="mesh.json",
    ) as cfg:  # fmt: skip
        grants = {name: e.mesh for name, e in parse(cfg).settings.agents.entries.items()}
    assert grants["scout"] == MeshGrant((), ("jobs",))
    assert grants["idle"].empty
    assert grants["notes"] == MeshGrant((), ("*",), ("*",))
    assert grants["picky"] == MeshGrant(("*",), ("*",), (f"ops@{'b' * 32}",))


def test_low_port_firewall_and_no_ledger(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = mesh(
        nix_instantiate,
        nixpkgs_tree,
        """
          services.keel.mesh = { listen = "[::]:443"; openFirewall = true; ledger = null; };
        """,
    )
    service = result["services"]["keel-mesh"]["serviceConfig"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert service["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    config = node_config(result)
    assert config["ledger"] is None
    assert config["listen"] == "[::]:443"
    assert result["values"] == [[443]]


def test_values_reach_the_daemon_as_given(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    # `%` and `$` mean nothing to a shell but are specifiers and variables to
    # systemd: values travel in the config file, and the command line (the
    # file's path) is quoted as NixOS quotes Exec lines.
    ledger = "/srv/keel %h $HOME ${USER} \"x\" 'y' \\.db"
    result = mesh(
        nix_instantiate,
        nixpkgs_tree,
        f'services.keel.mesh = {{ listen = "0.0.0.0:7400"; ledger = {nix_text(ledger)}; }};',
    )
    assert result["failedAssertions"] == []
    assert node_config(result)["ledger"] == ledger
    argv, _ = systemd_syntax.service_values(result["units"]["keel-mesh.service"])
    assert argv[1:4] == ["mesh", "serve", "--config"]


def test_a_zero_padded_port_is_the_port_keel_mesh_reads(
    nix_instantiate: str, nixpkgs_tree: Path
) -> None:
    # lib.toInt throws on "07400" (octal or padded?); keel mesh reads 7400.
    result = mesh(
        nix_instantiate,
        nixpkgs_tree,
        'services.keel.mesh = { listen = "0.0.0.0:07400"; openFirewall = true; };',
    )
    assert result["failedAssertions"] == []
    assert result["values"] == [[7400]]
    assert parse_listen(node_config(result)["listen"]) == ("0.0.0.0", 7400)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            'services.keel.mesh.listen = "mesh.example.org:7400";',
            "services.keel.mesh.listen: expected IP:PORT",
            id="host-name",
        ),
        pytest.param(
            'services.keel.mesh.listen = "0.0.0.0:0";',
            "services.keel.mesh.listen: the port must be 1 to 65535",
            id="port-0",
        ),
        pytest.param(
            'services.keel.mesh.listen = "0.0.0.0:00000";',
            "services.keel.mesh.listen: the port must be 1 to 65535",
            id="port-0-padded",
        ),
        pytest.param(
            'services.keel.mesh = { listen = "0.0.0.0:99999"; openFirewall = true; };',
            "services.keel.mesh.listen: the port must be 1 to 65535",
            id="port-over-65535",
        ),
        pytest.param(
            'services.keel.mesh = { listen = "0.0.0.0:99999999999999999999"; openFirewall = true; };',
            "services.keel.mesh.listen: expected IP:PORT",
            id="port-of-20-digits",
        ),
        pytest.param(
            'services.keel.mesh.listen = "0.0.0.0:";',
            "services.keel.mesh.listen: expected IP:PORT",
            id="no-port",
        ),
        pytest.param(
            'services.keel.mesh.listen = "0.0.0.0:7400"; '
            "services.keel.mesh.settings.idle_timeout = 10;",
            "services.keel.mesh.settings.idle_timeout (10) must exceed keepalive_interval (15)",
            id="idle-below-keepalive",
        ),
    ],
)
def test_bad_settings_fail_with_a_message(
    nix_instantiate: str, nixpkgs_tree: Path, body: str, message: str
) -> None:
    failed = mesh(nix_instantiate, nixpkgs_tree, body)["failedAssertions"]
    assert any(message in text for text in failed), failed


def test_keel_mesh_accepts_the_config_the_module_writes(
    nix_instantiate: str, nixpkgs_tree: Path, tmp_path: Path
) -> None:
    import json

    from keel.mesh import config

    result = mesh(
        nix_instantiate,
        nixpkgs_tree,
        """
          services.keel.mesh.listen = "0.0.0.0:7400";
          services.keel.mesh.settings = {
            keepalive_interval = 5; idle_timeout = 20; rekey_interval = 60;
            window_messages = 64; max_inbox = 1000; durability = "full";
          };
        """,
    )
    (tmp_path / "mesh.json").write_text(json.dumps(node_config(result)))
    loaded = config.load(tmp_path / "mesh.json")
    assert loaded.directory == Path("/var/lib/keel/mesh")
    assert loaded.listen == ("0.0.0.0", 7400)
    assert loaded.common.socket == Path("/run/keel/mesh.sock")
    assert loaded.common.ledger == Path("/var/lib/keel/ledger.db")
    settings = loaded.settings
    assert settings.session.keepalive_interval == 5
    assert settings.session.idle_timeout == 20
    assert settings.session.rekey_interval == 60
    assert settings.limits.window_messages == 64
    assert settings.inbox.max_messages == 1000
    assert settings.durability == "full"
