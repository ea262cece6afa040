"""Reading ``fleet.json`` (documented in ``docs/fleet.md``) into checked values."""

from __future__ import annotations

import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from keel import paths
from keel.config import Section, describe
from keel.ledger import core
from keel.ledger.errors import LedgerError
from keel.service import Common, read_common

NODE_ID = re.compile(r"[a-z2-7]{32}")
SERVICE_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
# keel's services that answer `status` on /run/keel/<name>.sock (the mesh is asked through its client).
DEFAULT_SERVICES = ("watch", "mesh")


@dataclass(frozen=True)
class FleetConfig:
    source: str
    common: Common
    host: str
    mesh: Path  # the mesh daemon's control socket
    state: Path  # the fleet's own state: fleet.db and the witness key
    witness_name: str
    witness_every: float  # seconds between two witnessing rounds
    request_timeout: float  # seconds a node has to answer a witnessing or audit request
    status_timeout: float  # seconds `keel fleet status` waits for the nodes' answers
    control_timeout: float  # seconds an operator's command may take on the node
    watch: Path | None  # watch's control socket; None: this host runs no watch
    services: dict[str, Path | None]  # name -> control socket (None: through the mesh client)
    operators: frozenset[str]  # node ids whose commands this node carries out
    mesh_operators: bool  # also from the mesh's operator nodes (its signed membership records)
    pinned: dict[str, str]  # node id -> ledger verifier key, instead of trust on first use
    current_system: Path
    profile: Path
    keep: int  # cosigned checkpoints kept per node (the newest; the largest is always kept)
    safeswitch: Path | None  # the safeswitch.json switches run with (None: safeswitch's default)
    switch_runner: str  # "systemd" (a transient unit) or "process" (a detached process)
    keel: tuple[str, ...]  # how to run keel for a switch (the module gives its store path)
    switch_timeout: float  # seconds a node's switch (build, activation, gate) may take
    switch_poll: float  # seconds between two questions about a switch in progress


TOP_LEVEL_KEYS = (
    "checkpoint_every",
    "control_timeout",
    "current_system",
    "host",
    "keel",
    "keep",
    "ledger",
    "mesh",
    "operators",
    "mesh_operators",
    "pinned",
    "profile",
    "request_timeout",
    "safeswitch",
    "services",
    "socket",
    "state",
    "status_timeout",
    "switch_poll",
    "switch_runner",
    "switch_timeout",
    "watch",
    "witness_every",
    "witness_name",
)


def load(path: Path) -> FleetConfig:
    """Read and check ``path``; :class:`~keel.errors.ConfigError` names the key on any problem."""
    with Section.load(path) as cfg:
        return parse(cfg)


def default_witness_name() -> str:
    """``<hostname>/keel/witness``, beside the ledger key's ``<hostname>/keel/ledger``."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "localhost"
    return f"{host}/keel/witness"


def parse(cfg: Section) -> FleetConfig:
    unknown = sorted(set(cfg.keys()) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise cfg.error(unknown[0], f"unknown key (known keys here: {', '.join(TOP_LEVEL_KEYS)})")
    common = read_common(cfg, "fleet")
    watch: Path | None = None
    if "watch" not in cfg or cfg.raw("watch") is not None:
        watch = cfg.filepath("watch", default=str(paths.socket_file("watch")))
    services: dict[str, Path | None] = {}
    names = cfg.strings("services", default=list(DEFAULT_SERVICES))
    for i, name in enumerate(names):
        if not SERVICE_NAME.fullmatch(name) or name == "fleet":
            raise cfg.error(
                "services",
                f"[{i}]: {describe(name)} is not a keel service name (lower-case letters, digits "
                "and '-'; fleet itself is not asked)",
            )
        services[name] = None if name == "mesh" else paths.socket_file(name)
    if "watch" in services and watch is not None:
        services["watch"] = watch
    operators = cfg.strings("operators", default=[])
    for i, node in enumerate(operators):
        if not NODE_ID.fullmatch(node):
            raise cfg.error(
                "operators",
                f"[{i}]: {describe(node)} is not a mesh node id (32 characters a-z and 2-7; "
                "`keel mesh id` prints a node's)",
            )
    pinned = cfg.string_map("pinned", default={})
    for node, key in pinned.items():
        if not NODE_ID.fullmatch(node):
            raise cfg.error("pinned", f"{describe(node)} is not a mesh node id")
        try:
            pinned[node] = str(core.Verifier.parse(key))
        except LedgerError as exc:
            raise cfg.error("pinned", f"{node}: not a ledger verifier key: {exc}") from None
    safeswitch: Path | None = None
    if cfg.raw("safeswitch", None) is not None:
        safeswitch = cfg.filepath("safeswitch")
    witness_name = cfg.string("witness_name", default=default_witness_name(), check=_key_name)
    witness_every = cfg.number("witness_every", 60.0, positive=True)
    request_timeout = cfg.number("request_timeout", 10.0, positive=True)
    return FleetConfig(
        source=cfg.source,
        common=common,
        host=cfg.string("host", default=socket.gethostname() or "localhost"),
        mesh=cfg.filepath("mesh", default=str(paths.socket_file("mesh"))),
        state=cfg.filepath("state", default=str(paths.state_dir() / "fleet")),
        witness_name=witness_name,
        witness_every=witness_every,
        request_timeout=request_timeout,
        status_timeout=cfg.number("status_timeout", 1.0, positive=True, maximum=60),
        control_timeout=cfg.number("control_timeout", 60.0, positive=True),
        watch=watch,
        services=services,
        operators=frozenset(operators),
        mesh_operators=cfg.boolean("mesh_operators", default=True),
        pinned=pinned,
        current_system=cfg.filepath("current_system", default="/run/current-system"),
        profile=cfg.filepath("profile", default="/nix/var/nix/profiles/system"),
        keep=cfg.integer("keep", 1000, minimum=1),
        safeswitch=safeswitch,
        switch_runner=cfg.choice("switch_runner", ["systemd", "process"], default="systemd"),
        keel=tuple(cfg.strings("keel", default=[sys.executable, "-m", "keel"], nonempty=True)),
        switch_timeout=cfg.number("switch_timeout", 3600.0, positive=True),
        switch_poll=cfg.number("switch_poll", 2.0, positive=True, maximum=60),
    )


def _key_name(value: str) -> str | None:
    if "+" in value or any(c.isspace() for c in value) or not value.isprintable():
        return f"{describe(value)} must have no spaces, '+' or control characters (a note key name)"
    return None


def empty(path: Path | None = None) -> FleetConfig:
    """The defaults, as a host without ``fleet.json`` runs them."""
    return parse(Section({}, source=str(path or paths.config_file("fleet"))))
