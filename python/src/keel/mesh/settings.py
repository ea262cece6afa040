"""The mesh daemon's settings: ``--listen`` parsing, the optional ``DIR/config.json``.

Everything has a default; ``config.json`` (optional, in the node's
directory) overrides timeouts and limits, e.g. for tests or slow links::

    {"handshake_timeout": 10, "keepalive_interval": 15, "idle_timeout": 60,
     "rekey_interval": 120, "default_ttl": 86400, "ack_timeout": 10,
     "retry_base": 1, "retry_cap": 60, "dial_base": 0.5, "dial_cap": 30,
     "connect_timeout": 5, "max_handshakes": 64, "max_handshakes_per_address": 8,
     "lease": 30,
     "max_outbox_per_peer": 10000, "max_outbox": 100000, "max_outbox_bytes": 268435456,
     "max_inbox": 100000, "max_inbox_bytes": 268435456,
     "window_messages": 4096, "window_bytes": 16777216, "durability": "normal",
     "operator_group": "keel-operators"}

``operator_group`` (no default) names the group whose members may use the
control socket's administrative verbs besides root and the daemon's user
(:mod:`keel.mesh.access`). These settings move to the daemon's ``--config``
file with the shared service shell.
"""

from __future__ import annotations

import fcntl
import grp
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from keel.config import Section
from keel.errors import UsageError
from keel.mesh.access import Operators
from keel.mesh.delivery import DEFAULT_TTL, InboxLimits, Limits
from keel.mesh.session import SessionConfig

CONFIG_FILE = "config.json"
CONTROL_SOCKET = "control.sock"
SIOCGIFADDR = 0x8915


@dataclass(frozen=True)
class Settings:
    session: SessionConfig
    limits: Limits
    inbox: InboxLimits
    default_ttl: float = DEFAULT_TTL
    lease: float = 30.0
    dial_base: float = 0.5
    dial_cap: float = 30.0
    connect_timeout: float = 5.0
    max_handshakes: int = 64
    max_handshakes_per_address: int = 8
    durability: str = "normal"
    operator_group: str | None = None
    operator_gid: int | None = None

    def operators(self) -> Operators:
        """Who may administer the mesh through the control socket."""
        return Operators(os.getuid(), self.operator_group, self.operator_gid)


def load_settings(directory: Path) -> Settings:
    path = directory / CONFIG_FILE
    if not path.exists():
        return Settings(SessionConfig(), Limits(), InboxLimits())
    with Section.load(path) as cfg:
        keepalive = cfg.number("keepalive_interval", 15.0, positive=True)
        idle = cfg.number("idle_timeout", 60.0, positive=True)
        if idle <= keepalive:
            raise cfg.error("idle_timeout", "must exceed keepalive_interval")
        session = SessionConfig(
            handshake_timeout=cfg.number("handshake_timeout", 10.0, positive=True),
            keepalive_interval=keepalive,
            idle_timeout=idle,
            rekey_interval=cfg.number("rekey_interval", 120.0, positive=True),
        )
        limits = Limits(
            max_per_peer=cfg.integer("max_outbox_per_peer", 10_000, minimum=1),
            max_total=cfg.integer("max_outbox", 100_000, minimum=1),
            max_bytes=cfg.integer("max_outbox_bytes", 256 << 20, minimum=1),
            window_messages=cfg.integer("window_messages", 4096, minimum=1),
            window_bytes=cfg.integer("window_bytes", 16 << 20, minimum=1),
            ack_timeout=cfg.number("ack_timeout", 10.0, positive=True),
            retry_base=cfg.number("retry_base", 1.0, positive=True),
            retry_cap=cfg.number("retry_cap", 60.0, positive=True),
        )
        if limits.retry_base > limits.retry_cap:
            raise cfg.error("retry_base", "must not exceed retry_cap")
        inbox = InboxLimits(
            max_messages=cfg.integer("max_inbox", 100_000, minimum=1),
            max_bytes=cfg.integer("max_inbox_bytes", 256 << 20, minimum=1),
        )
        settings = Settings(
            session,
            limits,
            inbox,
            default_ttl=cfg.number("default_ttl", DEFAULT_TTL, positive=True),
            lease=cfg.number("lease", 30.0, positive=True),
            dial_base=cfg.number("dial_base", 0.5, positive=True),
            dial_cap=cfg.number("dial_cap", 30.0, positive=True),
            connect_timeout=cfg.number("connect_timeout", 5.0, positive=True),
            max_handshakes=cfg.integer("max_handshakes", 64, minimum=1),
            max_handshakes_per_address=cfg.integer("max_handshakes_per_address", 8, minimum=1),
            durability=cfg.choice("durability", ["full", "normal"], "normal"),
            operator_group=cfg.string("operator_group", None),
        )
        if settings.operator_group is not None:
            try:
                gid = grp.getgrnam(settings.operator_group).gr_gid
            except KeyError:
                raise cfg.error(
                    "operator_group", f"no group {settings.operator_group!r} on this host"
                ) from None
            settings = replace(settings, operator_gid=gid)
        if settings.dial_base > settings.dial_cap:
            raise cfg.error("dial_base", "must not exceed dial_cap")
    return settings


def control_path(directory: Path) -> Path:
    """Where a node's daemon serves its control API."""
    return directory / CONTROL_SOCKET


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); ``UsageError`` naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 0.0.0.0:7400 or [::]:7400")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--listen {text!r}: HOST must be an IP address") from None
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def advertised_addresses(host: str, port: int) -> list[str]:
    """The ``host:port`` strings peers should dial: the listen host, or every interface's."""
    address = ipaddress.ip_address(host)
    if not address.is_unspecified:
        return [format_address(host, port)]
    hosts = interface_addresses(ipv6=address.version == 6)
    public = [h for h in hosts if not ipaddress.ip_address(h).is_loopback]
    return [format_address(h, port) for h in (public or hosts)][:16]


def interface_addresses(*, ipv6: bool) -> list[str]:
    """IPv4 addresses of every interface (and global IPv6 ones for a ``[::]`` listener)."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
            except OSError:
                continue
            found.append(socket.inet_ntoa(answer[20:24]))
    if ipv6:
        try:
            lines = Path("/proc/net/if_inet6").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            raw = line.split()[0]
            v6 = ipaddress.IPv6Address(bytes.fromhex(raw))
            if not v6.is_link_local:
                found.append(str(v6))
    return found
