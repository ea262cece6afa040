"""keel's control sockets: present for each enabled daemon, closed to others.

keel's daemons serve /run/keel/<service>.sock; /run/keel belongs to root and
the keel group (2770 under the NixOS module) and nothing in it is open to
other users, agents included.
"""

from __future__ import annotations

import stat
from typing import Any

import keelhost
import pytest


@pytest.fixture(scope="module")
def runtime_dir(host: Any) -> Any:
    directory = host.file(keelhost.RUNTIME_DIR)
    if not directory.exists:
        daemons = keelhost.unit_files(host, "keel-*.service", state="enabled")
        daemons = [
            u
            for u in daemons
            if u.removeprefix("keel-").removesuffix(".service") in keelhost.DAEMONS
        ]
        assert not daemons, f"{keelhost.RUNTIME_DIR} is missing, yet {daemons} are enabled"
        pytest.skip(f"no keel daemon runs here (no {keelhost.RUNTIME_DIR})")
    return directory


def _expected_group(host: Any) -> str:
    return "keel" if host.group("keel").exists else "root"


def test_runtime_directory_is_closed(host: Any, runtime_dir: Any) -> None:
    assert runtime_dir.is_directory
    assert runtime_dir.user == "root"
    assert runtime_dir.group == _expected_group(host)
    assert runtime_dir.mode & 0o007 == 0, (
        f"{keelhost.RUNTIME_DIR} is open to others: {oct(runtime_dir.mode)}"
    )


def test_each_enabled_daemon_has_its_socket(host: Any, runtime_dir: Any) -> None:
    missing = []
    for daemon in keelhost.DAEMONS:
        if host.service(f"keel-{daemon}").is_enabled:
            socket = host.file(f"{keelhost.RUNTIME_DIR}/{daemon}.sock")
            if not socket.is_socket:
                missing.append(f"keel-{daemon}.service is enabled, {socket.path} is not a socket")
    assert not missing, "\n".join(missing)


def test_sockets_are_closed_to_others(host: Any, runtime_dir: Any) -> None:
    sockets = [
        name for name in runtime_dir.listdir() if host.file(f"{runtime_dir.path}/{name}").is_socket
    ]
    if not sockets:
        pytest.skip(f"no sockets in {keelhost.RUNTIME_DIR}")
    problems = []
    group = _expected_group(host)
    for name in sockets:
        socket = host.file(f"{runtime_dir.path}/{name}")
        mode = stat.S_IMODE(socket.mode)
        if (
            mode & 0o007
            or socket.group not in (group, "root")
            or socket.user not in ("root", "keel")
        ):
            problems.append(f"{socket.path}: {socket.user}:{socket.group} {oct(mode)}")
    assert not problems, "sockets open to others or wrongly owned:\n" + "\n".join(problems)
