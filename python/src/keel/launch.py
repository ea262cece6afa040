"""What keel hands to a program it starts: its argv and its environment.

An agent's command and environment reach it through ``execve(2)``, by way of
keel watch's process backend or of a systemd unit (:mod:`keel.agents.units`
renders them so that systemd reads back exactly these strings). Both paths
read them with the functions here, so that what a config or a spec accepts is
what the program really gets, and nothing that would make a daemon fail later
gets past ``check-config``:

- every string is text a program can be given: no NUL (``execve`` ends a
  string there), no unpaired surrogate (not text: it has no UTF-8 form), no
  Unicode noncharacter (U+FDD0 to U+FDEF, U+xFFFE, U+xFFFF: systemd and D-Bus
  refuse them as invalid UTF-8);
- an environment name is a portable shell name, ``[A-Za-z_][A-Za-z0-9_]*``
  (an ``=`` in a name would be read differently by every program);
- the program (``command[0]``) is not empty; arguments may be;
- the command and the environment together take at most
  :data:`MAX_EXEC_BYTES`, counted as the kernel counts them (UTF-8 bytes and
  a terminating NUL per string; ``NAME=value`` per variable).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

from keel.config import Section, describe, join_path, type_name
from keel.errors import ConfigError

# 128 KiB: far below the kernel's limit for all of argv and envp (a quarter of
# the stack limit, 2 MiB by default) and its 128 KiB per string, and small
# enough that the escaped ExecStart= line (at most 4 bytes per byte) stays
# under systemd's 1 MiB line limit.
MAX_EXEC_BYTES: Final = 128 * 1024

ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

_NONCHARACTERS = "\ufdd0-\ufdef" + "".join(
    f"{chr(plane * 0x10000 + 0xFFFE)}{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(17)
)
_NOT_TEXT = re.compile(f"[\x00\ud800-\udfff{_NONCHARACTERS}]")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be given to a program, or None."""
    found = _NOT_TEXT.search(text)
    if found is None:
        return None
    char, at = found.group(), found.start()
    if char == "\x00":
        return f"contains a NUL character (at {at}), which no program can be given"
    if "\ud800" <= char <= "\udfff":
        return f"contains an unpaired surrogate U+{ord(char):04X} (at {at}), which is not text"
    return (
        f"contains the Unicode noncharacter U+{ord(char):04X} (at {at}), "
        "which systemd refuses as invalid UTF-8"
    )


def env_name_problem(name: str) -> str | None:
    if ENV_NAME.match(name):
        return None
    return (
        f"{describe(name)} is not a valid variable name: use letters, digits and '_', "
        "not starting with a digit"
    )


def read_command(section: Section, key: str) -> tuple[str, ...]:
    """An argv: a non-empty list of strings whose first (the program) is not empty."""
    value = section.raw(key)
    if not isinstance(value, list):
        raise section.error(
            key,
            f"expected a list of strings (the program and its arguments), got {type_name(value)}",
        )
    if not value:
        raise section.error(key, "must not be an empty list: name the program to run")
    for index, item in enumerate(value):
        where = join_path(section.key_path(key), index)
        if not isinstance(item, str):
            raise ConfigError(
                f"{section.source}: {where}: expected a string, got {type_name(item)} "
                f"{describe(item)}"
            )
        if index == 0 and not item:
            raise ConfigError(f"{section.source}: {where}: the program must not be empty")
        if (problem := text_problem(item)) is not None:
            raise ConfigError(f"{section.source}: {where}: {describe(item)} {problem}")
    return tuple(value)


def read_environment(section: Section, key: str) -> dict[str, str]:
    """Environment variables: an object of names to strings (``{}`` when absent)."""
    value = section.raw(key, {})
    if not isinstance(value, dict):
        raise section.error(
            key, f"expected an object of variable names to strings, got {type_name(value)}"
        )
    for name, item in value.items():
        where = join_path(section.key_path(key), name)
        if (problem := env_name_problem(name)) is not None:
            raise ConfigError(f"{section.source}: {where}: {problem}")
        if not isinstance(item, str):
            raise ConfigError(
                f"{section.source}: {where}: expected a string, got {type_name(item)} "
                f"{describe(item)}"
            )
        if (problem := text_problem(item)) is not None:
            raise ConfigError(f"{section.source}: {where}: {describe(item)} {problem}")
    return dict(value)


def exec_bytes(command: Sequence[str], environment: Mapping[str, str]) -> int:
    """What ``command`` and ``environment`` take in ``execve``, as the kernel counts."""
    arguments = sum(len(arg.encode()) + 1 for arg in command)
    variables = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in environment.items())
    return arguments + variables


def check_exec_size(
    section: Section, key: str, command: Sequence[str], environment: Mapping[str, str]
) -> None:
    """Refuse a command and environment over :data:`MAX_EXEC_BYTES`, naming ``key``."""
    size = exec_bytes(command, environment)
    if size > MAX_EXEC_BYTES:
        raise section.error(
            key,
            f"the command and environment take {size} bytes; keel passes at most "
            f"{MAX_EXEC_BYTES} to a program (put large data in a file)",
        )
