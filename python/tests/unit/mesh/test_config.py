"""mesh.json: what `keel mesh serve --config FILE` reads, and how it says what is wrong."""

from __future__ import annotations

import grp
import json
from pathlib import Path
from typing import Any

import pytest
from keel.errors import ConfigError, UsageError
from keel.mesh import config
from keel.mesh.config import parse_listen


def load(tmp_path: Path, **keys: Any) -> config.MeshConfig:
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps({"listen": "0.0.0.0:7400", **keys}))
    return config.load(path)


def test_defaults_are_the_installed_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_DEV", "0")
    loaded = load(tmp_path)
    assert loaded.directory == Path("/var/lib/keel/mesh")
    assert loaded.listen == ("0.0.0.0", 7400)
    assert loaded.common.socket == Path("/run/keel/mesh.sock")
    assert loaded.common.ledger == Path("/var/lib/keel/ledger.db")
    assert loaded.settings.session.handshake_timeout == 10.0
    assert loaded.settings.durability == "normal"
    assert loaded.settings.operator_group is None


def test_dev_mode_keeps_everything_under_dot_keel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_DEV", "1")
    loaded = load(tmp_path)
    assert loaded.directory == Path(".keel/mesh")
    assert loaded.common.socket == Path(".keel/run/mesh.sock")


def test_every_key_of_the_flags_and_settings_file_is_read(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        directory=str(tmp_path / "node"),
        socket=str(tmp_path / "m.sock"),
        ledger=None,
        checkpoint_every=None,
        handshake_timeout=2,
        keepalive_interval=5,
        idle_timeout=20,
        rekey_interval=60,
        default_ttl=600,
        ack_timeout=3,
        retry_base=0.5,
        retry_cap=5,
        dial_base=0.1,
        dial_cap=1,
        connect_timeout=2,
        max_handshakes=10,
        max_handshakes_per_address=2,
        lease=5,
        max_outbox_per_peer=10,
        max_outbox=100,
        max_outbox_bytes=1000,
        max_inbox=5,
        max_inbox_bytes=500,
        window_messages=64,
        window_bytes=4096,
        durability="full",
        keep_dead_letters=500,
        operator_group=grp.getgrgid(0).gr_name,
    )
    settings = loaded.settings
    assert loaded.directory == tmp_path / "node"
    assert (loaded.common.ledger, loaded.common.checkpoint_every) == (None, None)
    assert settings.session.keepalive_interval == 5
    assert settings.limits.window_messages == 64
    assert settings.inbox.max_messages == 5
    assert settings.lease == 5
    assert (settings.dial_base, settings.dial_cap) == (0.1, 1)
    assert settings.durability == "full"
    assert settings.keep_dead_letters == 500
    assert settings.operators().gid == 0


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"nope": 1}, "nope"),
        ({"idle_timeout": 1, "keepalive_interval": 2}, "idle_timeout: must exceed"),
        ({"durability": "maybe"}, "durability"),
        ({"keep_dead_letters": 0}, "keep_dead_letters"),
        ({"retry_base": 10, "retry_cap": 1}, "retry_base: must not exceed retry_cap"),
        ({"dial_base": 10, "dial_cap": 1}, "dial_base: must not exceed dial_cap"),
        ({"operator_group": "no-such-group-here"}, "operator_group: no group"),
        ({"operator_group": 5}, "operator_group: expected a string"),
        ({"listen": "mesh.example.org:7400"}, "listen: .* HOST must be an IP address"),
        ({"listen": "0.0.0.0:99999"}, "listen: .* expected HOST:PORT"),
        ({"socket": "/run/" + "s" * 200}, "socket: .* at most 107"),
        ({"directory": ""}, "directory"),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"mesh.json: {message}"):
        load(tmp_path, **keys)


def test_listen_is_required(tmp_path: Path) -> None:
    path = tmp_path / "mesh.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="listen"):
        config.load(path)


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:7400") == ("0.0.0.0", 7400)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("0.0.0.0:07400") == ("0.0.0.0", 7400)  # as the NixOS module reads it
    for bad in ("7400", "host:7400", "1.2.3.4:x", "1.2.3.4:70000", ":1", "1.2.3.4:\u00b2"):
        with pytest.raises(UsageError, match=r"expected HOST:PORT|IP address"):
            parse_listen(bad)
