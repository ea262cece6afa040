from __future__ import annotations

from pathlib import Path

from keel.agents.units import load_tiers
from keel.mcp import install
from keel.mcp.spec import parse_server_spec

TIERS = Path(__file__).resolve().parents[3] / "modules" / "tiers.json"


def test_add_plans_users_units_and_the_gateway_and_is_idempotent(tmp_path: Path) -> None:
    spec = parse_server_spec(
        {"name": "files", "command": ["/usr/bin/files-mcp"], "tier": 2, "share": []}, source="x"
    )
    units, specs, config = tmp_path / "units", tmp_path / "specs", tmp_path / "mcp.json"
    plan = install.plan_add(
        [spec], load_tiers(TIERS), unit_dir=units, spec_dir=specs, config=config,
        user_exists=lambda user: False, program="/usr/bin/keel",
    )  # fmt: skip
    assert plan.users == [("keel-mcp-files", "/var/lib/keel-mcp/files")]
    written = {path.name for path, _ in plan.files}
    assert written == {
        "mcp.json",
        "keel-mcp.service",
        "files.json",
        "keel-mcp-files.socket",
        "keel-mcp-files.service",
    }
    assert plan.units == ["keel-mcp-files.socket", "keel-mcp-files.service", "keel-mcp.service"]
    lines = plan.describe()
    assert (
        "systemctl enable keel-mcp-files.socket; systemctl restart keel-mcp-files.socket" in lines
    )
    assert not plan.restart_gateway  # its unit is new: it is started, not restarted twice
    for path, text in plan.files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    again = install.plan_add(
        [spec], load_tiers(TIERS), unit_dir=units, spec_dir=specs, config=config,
        user_exists=lambda user: True, program="/usr/bin/keel",
    )  # fmt: skip
    assert again.files == []
    assert again.users == []
    assert not again.restart_gateway
    assert "ExecStart=/usr/bin/keel mcp serve --config /etc/keel/mcp.json" in install.gateway_unit(
        "/usr/bin/keel"
    )

    removal = install.plan_remove(["files"], unit_dir=units, spec_dir=specs)
    assert removal.units == ["keel-mcp-files.service", "keel-mcp-files.socket"]
    assert specs / "files.json" in removal.files
