"""The control socket's administrative verbs are the operators' (issue 8, item 3),
and what an unprivileged user meets when it may not write a node's directory.

The daemon runs as root; the CLI runs as the unprivileged ``nobody`` (setpriv)
with and without the operator group (``users``, gid 100, as a supplementary
or as its primary group). The socket is opened up for the test so that
``nobody`` may connect at all: what is checked is the daemon's own decision.
"""

from __future__ import annotations

import grp
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from .nodes import FAST, Node

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other uids")


def operator_group() -> tuple[str, int]:
    try:
        return "users", grp.getgrnam("users").gr_gid
    except KeyError:
        pytest.skip("no group 'users' on this host")


def open_up(node: Node) -> None:
    """Let any uid reach the socket (the directories, then the socket itself)."""
    for path in (node.directory.parent, node.directory):
        path.chmod(0o755)
    node.socket.chmod(0o666)


def as_user(
    node: Node, *args: str, groups: Sequence[int] = (), gid: int = NOBODY
) -> subprocess.CompletedProcess[str]:
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={gid}"]
    setpriv += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    argv = [*setpriv, sys.executable, "-m", "keel", "mesh", *args, "--socket", str(node.socket)]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )


ADMIN = [
    ("invite",),
    ("revoke-invite", "0123456789abcdef0123456789abcdef"),
    ("remove", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    ("operator", "grant", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    ("room", "create", "ops"),
    ("room", "add", "ops", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    ("room", "remove", "ops", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
]


@pytest.fixture
def guarded(mesh_nodes: Callable[..., Node]) -> Node:
    name, _ = operator_group()
    a = mesh_nodes("a", config={**FAST, "operator_group": name}).start()
    open_up(a)
    return a


def test_administrative_verbs_are_refused_to_others(guarded: Node) -> None:
    for args in ADMIN:
        done = as_user(guarded, *args)
        assert done.returncode != 0, (args, done.stdout)
        verb = args[0].replace("-", "_") if args[0] != "room" else f"room_{args[1]}"
        assert done.stderr.strip() == (
            f"keel: error: `{verb}` needs root or membership of group users (you are uid {NOBODY})"
        )
    # join too: it would make the node leave its mesh for another
    token = guarded.invite()
    done = as_user(guarded, "join", token)
    assert "`join` needs root or membership of group users" in done.stderr
    # nothing changed
    assert guarded.client.rooms() == []
    assert "Traceback" not in guarded.log()


def test_other_verbs_stay_open_to_whoever_may_open_the_socket(
    guarded: Node, mesh_nodes: Callable[..., Node]
) -> None:
    b = mesh_nodes("b").start()
    b.join(guarded)
    guarded.wait_connected(b)
    assert as_user(guarded, "peers", "--json").returncode == 0
    sent = as_user(guarded, "send", b.node_id, "--topic", "t", "from nobody")
    assert sent.returncode == 0, sent.stderr
    got = b.client.recv("t", wait=20)
    assert [m.data for m in got] == [b"from nobody"]
    b.client.ack()


@pytest.mark.parametrize("how", ["supplementary", "primary"])
def test_the_operator_group_may_administer(guarded: Node, how: str) -> None:
    _, gid = operator_group()
    if how == "supplementary":
        done = as_user(guarded, "invite", groups=[gid])
    else:
        done = as_user(guarded, "invite", gid=gid)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("keelinv1.")
    created = as_user(guarded, "room", "create", "ops", groups=[gid])
    assert created.returncode == 0, created.stderr


def test_without_an_operator_group_only_root_and_the_daemons_user(
    mesh_nodes: Callable[..., Node],
) -> None:
    a = mesh_nodes("a").start()
    open_up(a)
    _, gid = operator_group()
    done = as_user(a, "invite", groups=[gid])
    assert done.returncode != 0
    assert done.stderr.strip() == (
        f"keel: error: `invite` needs root (you are uid {NOBODY}); an operator group may be "
        'named with "operator_group" in the node\'s config file'
    )
    assert a.invite().startswith("keelinv1.")  # root may


def test_an_unknown_operator_group_stops_the_start(mesh_nodes: Callable[..., Node]) -> None:
    a = mesh_nodes("a", config={**FAST, "operator_group": "no-such-group-here"})
    with pytest.raises(AssertionError, match="exited at start"):
        a.start()
    assert 'operator_group: no group "no-such-group-here" on this host' in a.log()
    assert "Traceback" not in a.log()


def run_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    argv += [sys.executable, "-m", "keel", "mesh", *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_a_directory_this_user_cannot_write_is_one_clear_line(short_tmp: Path) -> None:
    short_tmp.chmod(0o755)
    locked = short_tmp / "locked"
    locked.mkdir(mode=0o555)
    theirs = short_tmp / "theirs"
    theirs.mkdir(mode=0o755)
    key = theirs / "identity.key"
    key.write_text("{}")
    key.chmod(0o600)  # root's, unreadable to nobody
    cases = [
        (("id", "--dir", str(locked / "node")), f"--dir {locked / 'node'}: cannot create"),
        (("id", "--dir", str(locked)), f"--dir {locked}: not writable by this user (uid {NOBODY})"),
        (("id", "--dir", str(theirs)), f"{key}: cannot open the identity key file"),
    ]
    for args, text in cases:
        done = run_as_nobody(*args)
        assert done.returncode == 1, (args, done)
        assert done.stderr.startswith("keel: error: "), done.stderr
        assert text in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
    daemons = [
        (
            locked / "node",
            f"directory {locked / 'node'}: cannot create the node's directory: Permission denied",
        ),
        (locked, f"directory {locked}: not writable by this user"),
    ]
    for directory, text in daemons:
        config = short_tmp / "nobody.json"
        config.write_text(
            json.dumps(
                {"directory": str(directory), "listen": "127.0.0.1:0", "ledger": None,
                 "socket": str(short_tmp / "nobody.sock")}
            )
        )  # fmt: skip
        done = run_as_nobody("serve", "--config", str(config))
        assert done.returncode == 1, (directory, done)
        assert f"cannot start: {text}" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
