from __future__ import annotations

import json
from pathlib import Path

import pytest
from keel.config import Section, describe, join_path, load_json_file, parse_json, shorten
from keel.errors import ConfigError


def section(data: object) -> Section:
    return Section(data, source="test.json")


def test_reads_typed_values_and_defaults() -> None:
    with section({"name": "web", "port": 8080, "ratio": 1, "on": True, "argv": ["a", "b"]}) as s:
        assert s.string("name") == "web"
        assert s.integer("port", minimum=1, maximum=65535) == 8080
        assert s.number("ratio", positive=True) == 1.0
        assert s.boolean("on") is True
        assert s.strings("argv") == ["a", "b"]
        assert s.string("missing", default="x") == "x"
        assert s.integer("absent", None) is None
        assert s.number("gone", 2.5) == 2.5


@pytest.mark.parametrize(
    ("data", "read", "message"),
    [
        ({}, lambda s: s.string("name"), "test.json: name: required key is missing"),
        (
            {"port": "80"},
            lambda s: s.integer("port"),
            'port: expected an integer, got a string "80"',
        ),
        (
            {"port": True},
            lambda s: s.integer("port"),
            "port: expected an integer, got true or false",
        ),
        ({"port": 0}, lambda s: s.integer("port", minimum=1), "port: must be at least 1, got 0"),
        ({"t": 0}, lambda s: s.number("t", positive=True), "t: expected a number > 0, got 0"),
        ({"n": ""}, lambda s: s.string("n"), "n: must not be empty"),
        ({"b": "x"}, lambda s: s.choice("b", ["systemd", "process"]), "b: expected one of"),
        ({"argv": ["a", 1]}, lambda s: s.strings("argv"), "argv[1]: expected a non-empty string"),
        ({"env": {"A": 1}}, lambda s: s.string_map("env"), "env.A: expected a string"),
    ],
)
def test_bad_values_name_the_key(data: object, read, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        read(section(data))
    assert message in str(info.value)


def test_unknown_keys_are_refused_with_their_path() -> None:
    cfg = section({"agents": {"web": {"unit": "web.service", "probs": []}}})
    agents = cfg.section("agents")
    with pytest.raises(
        ConfigError, match=r"agents\.web\.probs: unknown key \(known keys here: unit\)"
    ):
        for _name, agent in agents.sections():
            agent.string("unit")
            agent.done()


def test_nested_list_paths() -> None:
    cfg = section({"probes": [{"type": "tcp"}, {"interval": -1}]})
    probes = cfg.section_list("probes")
    assert probes[0].string("type") == "tcp"
    with pytest.raises(ConfigError, match=r"probes\[1\]\.interval: expected a number > 0"):
        probes[1].number("interval", positive=True)


def test_top_level_must_be_an_object() -> None:
    with pytest.raises(ConfigError, match="top level: expected an object, got a list"):
        section([])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_json_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 2 column 7"):
        load_json_file(bad)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_json_file(binary)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"x": 1}))
    assert Section.load(good).integer("x") == 1


def test_parse_json_refuses_a_key_given_twice() -> None:
    from keel.config import parse_json

    with pytest.raises(ConfigError, match=r'^spec.json: key "name" appears twice in one object$'):
        parse_json('{"a": {"name": 1, "name": 2}}', source="spec.json")
    assert parse_json('{"a": {"name": 1}, "name": 2}', source="x") == {"a": {"name": 1}, "name": 2}


@pytest.mark.parametrize("depth", [65, 1000, 200_000])
def test_parse_json_refuses_deep_nesting_in_one_line(depth: int) -> None:
    from keel.config import parse_json

    for opener, closer in (("[", "]"), ('{"k":', "}")):
        text = opener * depth + "1" + closer * depth
        with pytest.raises(ConfigError, match=r"^--data: nested more than 64 levels deep$"):
            parse_json(text, source="--data")


def test_parse_json_accepts_nesting_up_to_the_limit() -> None:
    from keel.config import parse_json

    assert parse_json("[" * 64 + "]" * 64, source="x") is not None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff{}", "not UTF-8 text"),
        ('{"a": 1}'.encode("utf-16"), "not UTF-8 text"),  # json.loads alone would guess UTF-16
        ("{", "invalid JSON at line 1 column 2"),
        ('{"a": 1', "invalid JSON"),
        ('{"a": NaN}', "NaN is not a JSON value"),
        ("[Infinity]", "Infinity is not a JSON value"),
    ],
)
def test_parse_json_errors_are_one_line(raw: str | bytes, message: str) -> None:
    from keel.config import parse_json

    with pytest.raises(ConfigError, match=message) as caught:
        parse_json(raw, source="f.json")
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("f.json: ")


# --- long and hostile values in messages (issue 8, item 11) ----------------------------------


def test_shorten_says_how_long_the_original_was() -> None:
    assert shorten("short") == "short"
    assert shorten("x" * 60) == "x" * 60
    assert shorten("x" * 100_000) == "x" * 57 + "... (100000 characters)"
    assert shorten("abcdef", limit=4) == "a... (6 characters)"


def test_describe_is_one_short_line_whatever_the_value() -> None:
    assert describe("web") == '"web"'
    assert describe(5) == "5"
    assert describe(None) == "null"
    assert describe("a\nb\rc\x00d") == '"a\\nb\\rc\\u0000d"'
    assert (
        describe("line\u2028sep\u0085next\u202eltr\x7f")
        == '"line\\u2028sep\\u0085next\\u202eltr\\u007f"'
    )
    assert describe("\ud800") == '"\\ud800"'
    assert describe("日本") == '"日本"'
    long = describe("y" * 100_000)
    assert long == '"' + "y" * 57 + '..." (100000 characters)'
    assert describe(["z" * 50] * 10).endswith("... (540 characters)")
    assert describe(object()).startswith("<object object")
    for value in ("a\nb" * 1000, {"k\n": ["\u2029" * 100]}, "\r" * 10):
        assert len(describe(value).splitlines()) == 1
        assert len(describe(value)) < 100


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("web", "agents.web"),
        ("web.service", "agents.web.service"),
        ("A=B", 'agents["A=B"]'),
        ("a b", 'agents["a b"]'),
        ("a\nb", 'agents["a\\nb"]'),
        ("", 'agents[""]'),
        ("k" * 61, 'agents["' + "k" * 57 + '..." (61 characters)]'),
        (3, "agents[3]"),
    ],
)
def test_key_paths_show_odd_keys_quoted(key: str | int, path: str) -> None:
    assert join_path("agents", key) == path
    assert section({}).key_path("x") == "x"


def test_a_missing_string_value_with_an_odd_key_is_named_on_one_line() -> None:
    with pytest.raises(ConfigError) as info, section({"env": {"A\nB": 1}}) as s:
        s.string_map("env")
    assert str(info.value) == 'test.json: env["A\\nB"]: expected a string, got an integer 1'


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("1" * 5000, "an integer of 5000 digits is too long (at most 4300)"),
        ("[-" + "9" * 4301 + "]", "an integer of 4301 digits is too long"),
        ("1e400", "the number 1e400 is too large"),
        ('{"a": -1e999}', "the number -1e999 is too large"),
        (
            '["\\ud800"]',
            'the string "\\ud800" holds an unpaired surrogate U+D800, which is not text',
        ),
        ('{"\\udfff": 1}', "holds an unpaired surrogate U+DFFF"),
    ],
)
def test_parse_json_refuses_what_python_would_choke_on_later(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_json(raw, source="x.json")
    assert str(info.value) == f"x.json: {message}" or message in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_parse_json_keeps_big_but_representable_numbers() -> None:
    assert parse_json("[1e308, " + "9" * 4300 + ', "\\ud83d\\ude00"]', source="x") == [
        1e308,
        int("9" * 4300),
        "\U0001f600",
    ]
