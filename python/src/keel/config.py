"""Loading and validating keel's JSON configs.

Every daemon reads one JSON file. A :class:`Section` wraps one JSON object and
hands out its keys with their types checked; :meth:`Section.done` then refuses
any key nobody asked for. Every error names the file and the full key path
(``watch.json: agents.web.probes[0].interval: expected a number > 0, got "1s"``),
so a daemon with a bad config never half-starts.

Typical use::

    with Section.load(path) as cfg:
        socket = cfg.string("socket", default="/run/keel/watch.sock")
        for name, agent in cfg.section("agents").sections():
            ...
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar, overload

from keel.errors import ConfigError

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Final = _Missing()

_TYPE_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


MAX_SHOWN: Final = 60  # characters of a value an error message shows


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to about ``limit`` characters, saying how long it was.

    ``shorten("x" * 100_000)`` is ``"xxx...xxx... (100000 characters)"``: a
    message that echoes what a user gave stays readable however much they gave.
    """
    if len(text) <= limit:
        return text
    return f"{text[: max(limit - 3, 1)]}... ({len(text)} characters)"


def _visible(text: str) -> str:
    """JSON-style ``\\uXXXX`` escapes for what would not print as itself on one line."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else json.dumps(ch, ensure_ascii=True)[1:-1] for ch in text
    )


def describe(value: object, limit: int = MAX_SHOWN) -> str:
    """A value for an error message: JSON-quoted, on one line, long values shortened.

    Control and other invisible characters (line breaks, U+2028, bidi
    overrides) are escaped, so a message is always one line that shows what
    the value really holds; a string longer than ``limit`` is cut with
    :func:`shorten`, which says how long it was.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return _visible(json.dumps(value, ensure_ascii=False))
        cut = _visible(json.dumps(value[: max(limit - 3, 1)], ensure_ascii=False))
        return f'{cut[:-1]}..." ({len(value)} characters)'
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return shorten(_visible(text), limit)


_PLAIN_KEY = re.compile(rf"[A-Za-z0-9_@.:+/-]{{1,{MAX_SHOWN}}}\Z")


def join_path(path: str, key: str | int) -> str:
    """``path`` extended by an object key or a list index, as :meth:`Section.key_path` shows it."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not _PLAIN_KEY.match(key):
        return f"{path}[{describe(key)}]"
    return f"{path}.{key}" if path else key


def type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


MAX_DEPTH: Final = 64  # nesting of objects and lists: far more than any keel file needs


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _NotJson(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value (use a number or null)")


MAX_DIGITS: Final = 4300  # of an integer: Python's own limit for converting one


def _parse_int(text: str) -> int:
    if len(text) > MAX_DIGITS:
        raise _NotJson(
            f"an integer of {len(text.lstrip('-'))} digits is too long (at most {MAX_DIGITS})"
        )
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotJson(f"the number {shorten(text)} is too large")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


# A lone surrogate reaches a parsed value only as itself in the text, or as an
# escape of one (\ud800 to \udfff); without either, strings need no look.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _may_hold_surrogates(text: str) -> bool:
    if not text.isascii() and _SURROGATE.search(text) is not None:
        return True
    return "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None


def _tree_problem(value: object, limit: int, *, strings: bool = True) -> str | None:
    """Nesting deeper than ``limit``, or a string that is not text (a lone surrogate).

    ``strings=False``: the text held no surrogate in any form; only nesting is checked.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if (found := _SURROGATE.search(item)) is not None:
                return (
                    f"the string {describe(item)} holds an unpaired surrogate "
                    f"U+{ord(found.group()):04X}, which is not text"
                )
        elif isinstance(item, dict | list):
            if depth > limit:
                return f"nested more than {limit} levels deep"
            children = item.values() if isinstance(item, dict) else item
            if strings:
                if isinstance(item, dict):
                    stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in children)
            else:
                for child in children:
                    if type(child) is dict or type(child) is list:
                        stack.append((child, depth + 1))
    return None


def parse_json(text: str | bytes, *, source: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON from outside (configs, specs, ``--data``, requests) strictly.

    A key given twice in one object is refused (the last would silently win),
    and so are ``NaN``/``Infinity`` (not JSON), numbers too large for a float
    (``1e400``) or with more than 4300 digits, strings holding an unpaired
    surrogate (``"\\ud800"``: not text, nothing can encode it) and nesting
    deeper than ``max_depth``. Every failure is a :class:`ConfigError` that
    starts with ``source``, one line, no traceback.
    """
    try:
        if isinstance(text, bytes):  # UTF-8 only: json.loads would also guess UTF-16 and -32
            text = text.decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_refuse_duplicates,
            parse_constant=_refuse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except _NotJson as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{source}: key {describe(exc.key)} appears twice in one object"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested more than {max_depth} levels deep") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    strings = _may_hold_surrogates(text)
    if (problem := _tree_problem(value, max_depth, strings=strings)) is not None:
        raise ConfigError(f"{source}: {problem}")
    return value


def load_json_file(path: Path, *, what: str = "config") -> Any:
    """Parse a JSON file; any failure is a :class:`ConfigError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: {what} file is not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a JSON {what} file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} file: {exc.strerror}") from None
    return parse_json(text, source=str(path))


def path_problem(value: str) -> str | None:
    """Why ``value`` cannot name a file, or None."""
    if "\x00" in value:
        return f"{describe(value)} contains a NUL character, which no path can hold"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{describe(value)} is not valid text"
    return None


class Section:
    """One JSON object of a config, read key by key with checked types."""

    def __init__(self, data: object, *, source: str, path: str = "") -> None:
        self.source = source
        self.path = path
        if not isinstance(data, dict):
            where = path or "top level"
            raise ConfigError(f"{source}: {where}: expected an object, got {type_name(data)}")
        self._data: dict[str, Any] = data
        self._seen: set[str] = set()

    # --- construction -----------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> Section:
        return cls(load_json_file(path), source=str(path))

    def __enter__(self) -> Section:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.done()

    # --- errors -----------------------------------------------------------

    def key_path(self, key: str | int) -> str:
        """Where ``key`` is, for messages: ``agents.web.probes[0]``.

        A key that is not a plain name (a line break, ``=``, a 100 KB string)
        is shown quoted and shortened, ``environment["A=B"]``, so that the
        message stays one readable line.
        """
        return join_path(self.path, key)

    def error(self, key: str | int, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key_path(key)}: {message}")

    def done(self) -> None:
        """Refuse every key that was not read: a typo must not pass silently."""
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            known = sorted(self._seen)
            hint = f" (known keys here: {', '.join(known)})" if known else ""
            raise self.error(unknown[0], f"unknown key{hint}")

    # --- access -----------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def keys(self) -> list[str]:
        return list(self._data)

    def _get(self, key: str, default: object) -> tuple[bool, Any]:
        self._seen.add(key)
        if key in self._data:
            return True, self._data[key]
        if default is REQUIRED:
            raise self.error(key, "required key is missing")
        return False, default

    def raw(self, key: str, default: object = REQUIRED) -> Any:
        """The value as parsed, unchecked (for free-form data)."""
        return self._get(key, default)[1]

    @overload
    def string(
        self,
        key: str,
        default: str | _Missing = ...,
        *,
        nonempty: bool = ...,
        check: Callable[[str], str | None] | None = ...,
    ) -> str: ...

    @overload
    def string(
        self,
        key: str,
        default: None,
        *,
        nonempty: bool = ...,
        check: Callable[[str], str | None] | None = ...,
    ) -> str | None: ...

    def string(
        self,
        key: str,
        default: str | _Missing | None = REQUIRED,
        *,
        nonempty: bool = True,
        check: Callable[[str], str | None] | None = None,
    ) -> str | None:
        """A string; ``check`` returns an error message or None."""
        present, value = self._get(key, default)
        if not present or (value is None and default is None):
            return None if value is None else str(value)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {type_name(value)} {describe(value)}")
        if nonempty and not value:
            raise self.error(key, "must not be empty")
        if check is not None and (problem := check(value)) is not None:
            raise self.error(key, problem)
        return value

    def boolean(self, key: str, default: bool | _Missing = REQUIRED) -> bool:
        present, value = self._get(key, default)
        if present and not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {describe(value)}")
        return bool(value)

    @overload
    def integer(
        self,
        key: str,
        default: int | _Missing = ...,
        *,
        minimum: int | None = ...,
        maximum: int | None = ...,
    ) -> int: ...

    @overload
    def integer(
        self,
        key: str,
        default: None,
        *,
        minimum: int | None = ...,
        maximum: int | None = ...,
    ) -> int | None: ...

    def integer(
        self,
        key: str,
        default: int | _Missing | None = REQUIRED,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        """An integer (``null`` allowed only when the default is None)."""
        present, value = self._get(key, default)
        if not present or (value is None and default is None):
            return None if value is None else int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {type_name(value)} {describe(value)}")
        self._check_range(key, value, minimum, maximum)
        return value

    @overload
    def number(
        self,
        key: str,
        default: float | _Missing = ...,
        *,
        minimum: float | None = ...,
        maximum: float | None = ...,
        positive: bool = ...,
    ) -> float: ...

    @overload
    def number(
        self,
        key: str,
        default: None,
        *,
        minimum: float | None = ...,
        maximum: float | None = ...,
        positive: bool = ...,
    ) -> float | None: ...

    def number(
        self,
        key: str,
        default: float | _Missing | None = REQUIRED,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        positive: bool = False,
    ) -> float | None:
        """An int or float (seconds, ratios); ``positive`` means strictly > 0.

        ``null`` is allowed only when the default is None.
        """
        present, value = self._get(key, default)
        if not present or (value is None and default is None):
            return None if value is None else float(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self.error(key, f"expected a number, got {type_name(value)} {describe(value)}")
        if positive and value <= 0:
            raise self.error(key, f"expected a number > 0, got {describe(value)}")
        self._check_range(key, value, minimum, maximum)
        return float(value)

    def _check_range(
        self, key: str, value: float, minimum: float | None, maximum: float | None
    ) -> None:
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {describe(value)}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, got {describe(value)}")

    def filepath(self, key: str, default: str | _Missing = REQUIRED) -> Path:
        """A file system path: a non-empty string the kernel can take (no NUL, valid text)."""
        return Path(self.string(key, default, check=path_problem))

    def choice(self, key: str, choices: Sequence[str], default: str | _Missing = REQUIRED) -> str:
        value = self.string(key, default)
        if value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise self.error(key, f"expected one of {options}, got {describe(value)}")
        return str(value)

    def strings(
        self, key: str, default: list[str] | _Missing = REQUIRED, *, nonempty: bool = False
    ) -> list[str]:
        """A list of non-empty strings (argv, paths, domain names)."""
        present, value = self._get(key, default)
        if not present:
            return list(value)
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings, got {type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise ConfigError(
                    f"{self.source}: {self.key_path(key)}[{i}]: expected a non-empty string, "
                    f"got {describe(item)}"
                )
        if nonempty and not value:
            raise self.error(key, "must not be an empty list")
        return list(value)

    def string_map(self, key: str, default: dict[str, str] | _Missing = REQUIRED) -> dict[str, str]:
        """An object whose values are all strings (environment variables)."""
        present, value = self._get(key, default)
        if not present:
            return dict(value)
        if not isinstance(value, dict):
            raise self.error(key, f"expected an object of strings, got {type_name(value)}")
        for name, item in value.items():
            if not isinstance(item, str):
                raise ConfigError(
                    f"{self.source}: {join_path(self.key_path(key), name)}: expected a string, "
                    f"got {type_name(item)} {describe(item)}"
                )
        return dict(value)

    def section(self, key: str, *, optional: bool = False) -> Section:
        """A nested object; ``optional`` gives an empty section when absent or null."""
        present, value = self._get(key, {} if optional else REQUIRED)
        if optional and (not present or value is None):
            value = {}
        return Section(value, source=self.source, path=self.key_path(key))

    def sections(self) -> Iterator[tuple[str, Section]]:
        """Every key of this object as a nested section (``agents.<name>``)."""
        for name in list(self._data):
            self._seen.add(name)
            yield name, Section(self._data[name], source=self.source, path=self.key_path(name))

    def section_list(self, key: str, *, default: list[Any] | _Missing = REQUIRED) -> list[Section]:
        present, value = self._get(key, default)
        if not present:
            value = list(value)
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of objects, got {type_name(value)}")
        return [
            Section(item, source=self.source, path=f"{self.key_path(key)}[{i}]")
            for i, item in enumerate(value)
        ]

    def parse(self, key: str, parser: Callable[[Section], T]) -> T:
        """Read a nested object with ``parser`` and check that it used every key."""
        with self.section(key) as nested:
            return parser(nested)
