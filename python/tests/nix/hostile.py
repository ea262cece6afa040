"""Hostile values for an agent's unit: what modules/agents.nix must carry intact.

Every value here is one an agent spec may hold (an argv word, an environment
value) and that systemd must read back exactly (issue 8: a value never
becomes unit syntax): this module's own cases, the shared corpus of
``tests/unit_values.py`` (``CARRIED``, which keel's Python renderer is held
to as well), and generated strings from a fixed seed, so a failure names the
same value every run.
:func:`agent_host` makes the NixOS host configuration that gives them to one
agent, through a JSON file as a host would read them from outside Nix.

Nix strings cannot hold NUL (Nix 2.8 cuts a string at a ``\\u0000`` it reads
from JSON, newer Nix refuses it), so NUL is not among them: it cannot reach
the module.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.unit_values import CARRIED

CONTROLS = [chr(c) for c in range(1, 0x20)] + ["\x7f"]

CORPUS: list[str] = [
    "",
    " ",
    "  leading and trailing  ",
    "plain",
    "two words",
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "crlf\r\n",
    # issue 8's injection, through \r and through \n
    "x\rExecStartPre=+/nonexistent/evil-as-root\rUser=root\r#",
    "x\nExecStartPre=+/nonexistent/evil-as-root\nUser=root\n#",
    "x\n[Service]\nUser=root",
    # specifiers and variables
    "%",
    "%%",
    "%n %u %h %%",
    "100%",
    "%{HOME}",
    "$",
    "$$",
    "$HOME",
    "${HOME}",
    "$$HOME",
    "a$b$",
    # quotes and escapes
    '"',
    "'",
    "\"'\"'",
    '"quoted"',
    "'single'",
    "\\",
    "\\\\",
    "a\\b",
    "\\n",
    "\\x41",
    "\\u0041",
    "\\",
    "ends with backslash\\",
    ";",
    " ; ",
    "\\;",
    "#not a comment",
    ";not a comment",
    "=",
    "A=B",
    "[Unit]",
    # characters that are not ASCII
    "é",
    "naïve café",
    "中文",
    "😀",
    "\u0085",
    "\u00a0",
    "\u2028\u2029",
    "\u202e",
    "\ufeff",
    "\U0010fffd",
    "".join(CONTROLS),
    *CONTROLS,
    # long
    "x" * 4096,
    "%$\\\"'\n" * 2000,
]

# Characters the generated values are drawn from: the specials many times
# over, so that they meet each other.
ALPHABET = (
    CONTROLS
    + list("%$\\\"' ;#=[]{}") * 4
    + list("abcXYZ019_-./")
    + ["é", "中", "😀", "\u2028", "\u0085"]
)


def generated(count: int, seed: int = 8) -> list[str]:
    """``count`` random strings over :data:`ALPHABET` (fixed seed)."""
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(1, 40))) for _ in range(count)]


def values(count: int = 300) -> list[str]:
    return CORPUS + [value for value in CARRIED if value not in CORPUS] + generated(count)


def arguments_of(strings: list[str]) -> list[str]:
    """The argv words (every one: an empty argument is an argument)."""
    return list(strings)


def environment_of(strings: list[str]) -> dict[str, str]:
    return {f"V{i}": value for i, value in enumerate(strings)}


def agent_host(tmp_path: Path, strings: list[str], *, name: str = "hostile") -> str:
    """A host whose agent ``name`` has every value as a variable and an argument."""
    data = tmp_path / f"{name}-values.json"
    data.write_text(
        json.dumps({"args": arguments_of(strings), "environment": environment_of(strings)}),
        encoding="utf-8",
    )
    return f"""
    let
      values = builtins.fromJSON (builtins.readFile {data});
    in
    {{
      services.keel.agents.{name} = {{
        command = [ "/usr/local/bin/agent" ] ++ values.args;
        environment = values.environment;
        tier = 2;
      }};
      services.keel.egress = {{ enable = true; upstream = [ "192.0.2.53" ]; }};
    }}
    """
