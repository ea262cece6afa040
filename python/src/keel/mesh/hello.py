"""What a node says about itself in its handshake's ``extra`` (protocol, section 15). Pure.

``{"addrs": [its addresses], "mesh": <its mesh id>, "admission": [<join
records>], "app": <application revision>, "agents": [<its agents' names>]}``. The session checked that
``extra`` is a JSON object and nothing more; here each field is taken if it
has the right shape and ignored otherwise (receivers ignore what they do not
know, and a malformed field must not cost more than itself): a peer can send
anything in it, and nothing in it is ever an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from keel.mesh.encoding import is_address
from keel.mesh.ids import is_agent_name, is_message_id
from keel.mesh.packets import APP_REVISION

MAX_ADDRESSES: Final = 16
MAX_ADMISSION_CHAIN: Final = 16
MAX_AGENTS: Final = 1024  # agents a node announces (more are not listed)


@dataclass(frozen=True)
class Hello:
    addresses: tuple[str, ...] = ()  # the well-formed ones, at most 16
    mesh: str | None = None
    admission: tuple[Mapping[str, Any], ...] = ()  # raw join records (checked when merged)
    app: int = 1  # the application-layer revision it accepts
    agents: tuple[str, ...] = ()  # its agents that may use the mesh (revision 3)


def parse_hello(extra: Mapping[str, Any]) -> Hello:
    addresses = extra.get("addrs")
    mesh = extra.get("mesh")
    admission = extra.get("admission")
    app = extra.get("app")
    agents = extra.get("agents")
    return Hello(
        addresses=tuple(a for a in addresses if is_address(a))[:MAX_ADDRESSES]
        if isinstance(addresses, list)
        else (),
        mesh=mesh if is_message_id(mesh) else None,
        admission=tuple(r for r in admission[:MAX_ADMISSION_CHAIN] if isinstance(r, dict))
        if isinstance(admission, list)
        else (),
        app=app if type(app) is int and app >= 1 else 1,
        agents=tuple(dict.fromkeys(a for a in agents[:MAX_AGENTS] if is_agent_name(a)))
        if isinstance(agents, list)
        else (),
    )


def make_hello(
    addresses: Sequence[str],
    mesh: str,
    admission: Sequence[Mapping[str, Any]],
    agents: Sequence[str] = (),
) -> dict[str, Any]:
    """This node's ``extra``."""
    return {
        "addrs": list(addresses),
        "mesh": mesh,
        "admission": list(admission)[:MAX_ADMISSION_CHAIN],
        "app": APP_REVISION,
        "agents": sorted(agents)[:MAX_AGENTS],
    }
