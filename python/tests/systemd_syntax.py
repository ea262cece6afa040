"""How systemd reads a unit file back: the values it will use, for tests.

A model of systemd 252's reading of the two kinds of values that carry an
agent's data into its unit (``src/basic/extract-word.c``,
``src/basic/escape.c``, ``config_parse_exec`` and ``config_parse_environ`` in
``src/core/load-fragment.c``), so that the tests can compare what a unit says
with what its spec meant without a running systemd. The system tier
(``tests/system/test_nixos_unit_values.py``) holds the model to systemd itself: the
same units, loaded by systemd, read back through D-Bus. Anything the model
does not know (a specifier other than ``%%``, a ``$VAR``, an unknown escape)
raises :class:`Unreadable` rather than guess, since systemd would change or
refuse the value there.
"""

from __future__ import annotations

from dataclasses import dataclass

WHITESPACE = " \t\n\r"
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "s": " ",
}


class Unreadable(ValueError):
    """systemd would not read this value back as it is written."""


@dataclass(frozen=True)
class Directive:
    section: str
    key: str
    value: str


def directives(text: str) -> list[Directive]:
    """The ``Key=value`` lines of a unit file, in order, with their section.

    Comments (``#``, ``;``) and blank lines are skipped; key and value are
    stripped of surrounding whitespace as systemd strips them. A line ending
    in a backslash (continuation) is refused: no generated unit should need
    one, and a value that made one would be a value read as syntax.
    """
    found: list[Directive] = []
    section = ""
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(WHITESPACE)
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            raise Unreadable(f"line {number} continues on the next line: {raw!r}")
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise Unreadable(f"line {number} is not Key=value: {raw!r}")
        found.append(Directive(section, key.strip(WHITESPACE), value.strip(WHITESPACE)))
    return found


def _unescape(text: str, i: int) -> tuple[str, int]:
    """One C escape after a backslash at ``text[i - 1]``: (its characters, next index)."""
    if i >= len(text):
        raise Unreadable("a backslash ends the value")
    c = text[i]
    if c in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[c], i + 1
    if c in "xuU":
        width = {"x": 2, "u": 4, "U": 8}[c]
        digits = text[i + 1 : i + 1 + width]
        if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise Unreadable(f"\\{c} needs {width} hex digits")
        code = int(digits, 16)
        if code == 0:
            raise Unreadable("NUL cannot be unescaped")
        if c == "x" and code >= 0x80:
            # A raw byte: only meaningful as part of UTF-8, which the tests
            # never write through \\x.
            raise Unreadable("\\x above 0x7f is a raw byte")
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise Unreadable(f"\\{c}{digits} is not a Unicode scalar value")
        return chr(code), i + 1 + width
    if c in "01234567":
        digits = text[i : i + 3]
        if len(digits) != 3 or any(d not in "01234567" for d in digits):
            raise Unreadable("an octal escape needs 3 digits")
        code = int(digits, 8)
        if code == 0 or code >= 0x80:
            raise Unreadable("octal escapes of NUL or of raw bytes are not read as text")
        return chr(code), i + 3
    raise Unreadable(f"unknown escape \\{c}")


def words(value: str) -> list[str]:
    """``value`` split as ``extract_first_word(EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE)`` splits it."""
    return [word for word, _ in _split(value)]


def _split(value: str) -> list[tuple[str, bool]]:
    """The words of ``value``, each with whether it was written bare (no quote, no escape)."""
    out: list[tuple[str, bool]] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in WHITESPACE:
            i += 1
        if i >= n:
            return out
        word: list[str] = []
        quote = ""
        start = i
        while i < n:
            c = value[i]
            if quote:
                if c == quote:
                    quote = ""
                    i += 1
                elif c == "\\":
                    text, i = _unescape(value, i + 1)
                    word.append(text)
                else:
                    word.append(c)
                    i += 1
            elif c in "'\"":
                quote = c
                i += 1
            elif c == "\\":
                text, i = _unescape(value, i + 1)
                word.append(text)
            elif c in WHITESPACE:
                break
            else:
                word.append(c)
                i += 1
        if quote:
            raise Unreadable(f"unterminated {quote} quote")
        text = "".join(word)
        out.append((text, value[start:i] == text))


def _undouble(word: str, char: str, what: str) -> str:
    """``word`` with each doubled ``char`` read as one; a single one is refused."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if word[i] == char:
            if word[i + 1 : i + 2] != char:
                raise Unreadable(f"{what} {word[i : i + 2]!r} would be expanded")
            i += 2
        else:
            i += 1
        out.append(word[i - 1])
    return "".join(out)


def specifiers(word: str) -> str:
    """``%%`` read as ``%``; any other specifier would be expanded by systemd."""
    return _undouble(word, "%", "specifier")


def variables(word: str) -> str:
    """``$$`` read as ``$`` in a command line; ``$VAR`` would be expanded."""
    return _undouble(word, "$", "variable")


def exec_argv(value: str, keep: tuple[str, ...] = ()) -> list[str]:
    """The argv systemd runs for an ``ExecStart=`` value (no prefixes, no ``;``).

    ``keep``: whole words left as written (a template's ``%i``, expanded by systemd
    to the instance name, which the caller checks as written).
    """
    split = _split(value)
    if not split:
        raise Unreadable("an empty command line")
    if any(word == ";" and bare for word, bare in split):
        raise Unreadable("a lone ';' separates two commands")
    argv = [word for word, _ in split]
    if argv[0][:1] in ("-", "@", ":", "+", "!"):
        raise Unreadable(f"the command starts with the prefix {argv[0][0]!r}")
    if any(ord(c) < 0x20 or c in "\"'\\\x7f" for c in argv[0]):
        # string_is_safe(): systemd refuses such an executable name.
        raise Unreadable(f"systemd refuses the executable name {argv[0]!r}")
    return [word if word in keep else variables(specifiers(word)) for word in argv]


def environment(values: list[str]) -> dict[str, str]:
    """The variables a list of ``Environment=`` values sets (the later wins)."""
    env: dict[str, str] = {}
    for value in values:
        for word in words(value):
            name, sep, text = specifiers(word).partition("=")
            if not sep:
                raise Unreadable(f"{word!r} is not an assignment")
            env[name] = text
    return env


def service_values(text: str, keep: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """(argv of the one ``ExecStart=``, environment) of a unit's ``[Service]``."""
    service = [d for d in directives(text) if d.section == "Service"]
    starts = [d.value for d in service if d.key == "ExecStart"]
    if len(starts) != 1:
        raise Unreadable(f"expected one ExecStart=, found {len(starts)}")
    env = environment([d.value for d in service if d.key == "Environment"])
    return exec_argv(starts[0], keep), env
