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


def describe(value: object) -> str:
    """A short, readable rendering of a JSON value for error messages."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


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


def _depth_exceeds(value: object, limit: int) -> bool:
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(text: str | bytes, *, source: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON from outside (configs, specs, ``--data``, requests) strictly.

    A key given twice in one object is refused (the last would silently win),
    and so are ``NaN``/``Infinity`` (not JSON) and nesting deeper than
    ``max_depth``. Every failure is a
    :class:`ConfigError` that starts with ``source``, one line, no traceback.
    """
    try:
        value = json.loads(
            text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
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
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise ConfigError(f"{source}: a number has more digits than any value can need") from None
    if _depth_exceeds(value, max_depth):
        raise ConfigError(f"{source}: nested more than {max_depth} levels deep")
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
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

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
                    f"{self.source}: {self.key_path(key)}.{name}: expected a string, "
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
