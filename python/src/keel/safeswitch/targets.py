"""The systems an operator declared as targets others may switch this host to, by name.

``targets`` in ``safeswitch.json`` (``services.keel.safeswitch.targets``)
maps a name to what it is, one of:

- ``{"specialisation": "NAME"}``: that specialisation of the running system
  (``/run/current-system/specialisation/NAME``);
- ``{"system": "/path"}``: whatever the path points at when it is asked for
  (``/run/booted-system``: back to what the host booted;
  ``/nix/var/nix/profiles/system``: the boot default).

A target is resolved to a store path when a person is asked to confirm it and
again, as root, right before the switch: the two must agree (see
:mod:`keel.safeswitch.requests`). What a chat user may switch to is this list
and nothing else: never a path they type, never a flake to build.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from keel.errors import KeelError
from keel.safeswitch.generations import system_problem

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\Z")
SPECIALISATION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
KINDS = ("specialisation", "system")


class Unavailable(KeelError):
    """The target does not resolve to a system now (the message says why)."""


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "specialisation" | "system"
    value: str

    def describe(self) -> str:
        """``specialisation next``, ``system /run/booted-system``."""
        return f"{self.kind} {self.value}"

    def to_json(self) -> dict[str, str]:
        return {self.kind: self.value}


def resolve(target: Target, current: Path) -> str:
    """The store path ``target`` names now; :class:`Unavailable` when it names no system."""
    if target.kind == "specialisation":
        link = current / "specialisation" / target.value
        if not link.exists():
            raise Unavailable(f"the running system has no specialisation {target.value!r}")
    else:
        link = Path(target.value)
    path = os.path.realpath(link)
    if (problem := system_problem(Path(path))) is not None:
        raise Unavailable(problem)
    return path
