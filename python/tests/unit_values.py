"""Hostile values for everything that reaches a systemd unit or a program's argv/environment.

Shared by the tests of keel's unit renderer (``tests/unit``, the
``systemd --test`` round trip in ``tests/integration/test_units_systemd.py``,
the nspawn round trip in ``tests/system/test_unit_values.py``), of watch's
process backend, and of the NixOS module (``modules/agents.nix``), so that every
path that writes these values is held to the same cases:

- :data:`CARRIED`: strings keel must deliver to a program exactly (as an
  argument or an environment value): every control character, ``%``
  specifiers, ``$`` variables, quotes, backslashes, line continuations,
  comment and section syntax, Unicode line separators, bidi overrides, long
  strings;
- :data:`REFUSED`: strings no program can be given (NUL, unpaired surrogates,
  noncharacters), which must be refused with a message naming the key;
- :data:`BAD_ENV_NAMES`: environment names that must be refused;
- :func:`carried_text`, :func:`env_names`, :func:`program_paths`: Hypothesis
  strategies of the same kinds, for property tests.

Outside pytest: ``python -c 'import json, tests.unit_values as v;
print(json.dumps(v.CARRIED))'`` from ``python/`` prints the cases as JSON.
"""

from __future__ import annotations

from hypothesis import strategies as st
from keel.launch import ENV_NAME, text_problem

# The injection: \r ends a line in a unit file whatever the quoting.
INJECTION = "x\rExecStartPre=+/nonexistent/evil-as-root\rUser=root\r#"

CARRIED: list[str] = [
    "",
    " ",
    "  leading and trailing  ",
    INJECTION,
    "x\nExecStartPre=+/bin/sh -c 'id > /tmp/pwned'",
    "\n[Service]\nUser=root",
    "".join(chr(c) for c in range(1, 32)) + "\x7f",
    *[f"<{chr(c)}>" for c in [*range(1, 32), 0x7F]],
    "%",
    "%%",
    "%n %N %p %i %u %h %t %%n",
    "100%",
    "trailing %",
    "$",
    "$$",
    "$HOME",
    "${HOME}",
    "$$HOME",
    "a$HOME",
    "${",
    "$}",
    "\\",
    "\\\\",
    "end with a backslash \\",
    "\\n is not a newline",
    "\\x41\\u0042\\101",
    ";",
    "\\;",
    "a ; b",
    '"',
    "'",
    '"\'"',
    "say \"hi\" and 'bye'",
    "#not a comment",
    ";not a comment",
    "=",
    "A=B",
    "[Unit]",
    "é",
    "日本語",
    "😀 emoji",
    "\u0085 next line",
    "\u2028 line separator",
    "\u2029 paragraph separator",
    "\u202e right-to-left override",
    "\ufeff byte order mark",
    "\u200b zero width space",
    "\ue000 private use",
    "\U000e0001 language tag",
    "\U0010fffd last private use",
    "\u00a0 no-break space",
    "x" * 10_000,
    ("%$\\\"'\r\n\t " * 500),
]

REFUSED: list[str] = [
    "a\x00b",
    "\x00",
    "\ud800",
    "x\udfff",
    "\ufdd0",
    "\ufffe",
    "\uffff",
    "\U0001fffe",
    "\U0010ffff",
]

BAD_ENV_NAMES: list[str] = [
    "",
    "A=B",
    "1X",
    "A B",
    "A-B",
    "A.B",
    "A\nB",
    "A\x00B",
    "É",
    "$A",
    "A%",
]


def carried_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Strings a program can be given, biased to what unit files and shells treat specially."""
    special = st.sampled_from(
        ["%", "$", "\\", '"', "'", "\r", "\n", "\t", ";", "#", "=", "{", "}", " ", "\x7f"]
    )
    any_char = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
    char = st.one_of(special, any_char, st.characters(max_codepoint=0x1F, min_codepoint=1))
    return st.one_of(
        st.lists(char, max_size=max_size).map("".join),
        st.sampled_from(CARRIED),
    ).filter(lambda text: text_problem(text) is None)


def env_names() -> st.SearchStrategy[str]:
    return st.from_regex(ENV_NAME, fullmatch=True).filter(lambda name: len(name) <= 40)


def program_paths() -> st.SearchStrategy[str]:
    """Absolute paths systemd accepts as a program (no control characters, quotes,
    backslashes or '$'; see keel.agents.spec.check_program)."""
    part_char = st.characters(
        exclude_categories=["Cs"],
        exclude_characters="\x00/\"'\\$",
        min_codepoint=0x20,
    ).filter(lambda c: c != "\x7f")
    part = st.lists(part_char, min_size=1, max_size=12).map("".join)
    return (
        st.lists(part, min_size=1, max_size=4)
        .map(lambda parts: "/" + "/".join(parts))
        .filter(lambda path: text_problem(path) is None)
    )
