"""Allowlist entries and matching: exact, wildcards, case, trailing dots, IDNA; Hypothesis."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keel.egress.allowlist import Allowlist, EntryError, parse_entry, text_labels, wire_labels


def allows(entries: list[str], name: str) -> bool:
    return Allowlist.parse(entries).allows_text(name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("example.com", True),
        ("EXAMPLE.com", True),
        ("example.com.", True),
        ("a.example.com", True),  # the wildcard: one label
        ("a.b.example.com", True),  # ... or more
        ("A.B.Example.COM.", True),
        ("badexample.com", False),
        ("example.com.evil.test", False),
        ("com", False),
        ("other.test", False),
    ],
)
def test_exact_and_wildcard(name: str, expected: bool) -> None:
    assert allows(["example.com", "*.example.com"], name) is expected


def test_a_wildcard_never_matches_its_own_apex() -> None:
    assert not allows(["*.example.com"], "example.com")
    assert allows(["*.example.com"], "x.example.com")


def test_an_empty_allowlist_allows_nothing() -> None:
    empty = Allowlist.parse([])
    assert not empty
    assert not empty.allows(())
    assert not empty.allows_text("example.com")


def test_idna_names_are_one_name_in_both_forms() -> None:
    assert allows(["bücher.example"], "xn--bcher-kva.example")
    assert allows(["xn--bcher-kva.example"], "Bücher.example")
    assert allows(["*.bücher.example"], "shop.xn--bcher-kva.example")
    assert str(parse_entry("*.Bücher.Example.")) == "*.xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("", "must be a domain name"),
        (" example.com", "whitespace"),
        ("*.com", "registered name"),
        ("*", "whole first label"),
        ("a.*.example.com", "whole first label"),
        ("*example.com", "whole first label"),
        ("192.0.2.1", "not addresses"),
        ("2001:db8::1", "not addresses"),
        ("[2001:db8::1]", "not addresses"),
        ("exa_mple.com", "not a valid host name label"),
        ("-example.com", "not a valid host name label"),
        ("a..b", "not a valid host name label"),
        ("example.123", "all digits"),
        ("a" * 64 + ".com", "not a valid host name label"),
        (".".join(["a" * 60] * 5), "longer than 253"),
    ],
)
def test_invalid_entries_say_why(entry: str, reason: str) -> None:
    with pytest.raises(EntryError, match=re.escape(reason)):
        parse_entry(entry)


def test_wire_labels_compare_case_insensitively_and_keep_dots_inside_labels() -> None:
    allowlist = Allowlist.parse(["a.b.example.com"])
    assert allowlist.allows(wire_labels((b"A", b"B", b"example", b"COM", b"")))
    # One wire label "a.b" is not the two labels "a" and "b".
    assert not allowlist.allows(wire_labels((b"a.b", b"example", b"com", b"")))


def test_check_names_refuse_wildcards() -> None:
    with pytest.raises(EntryError, match="not a wildcard"):
        text_labels("*.example.com")


label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True).filter(
    lambda s: not s.isdigit()
)
names = st.lists(label, min_size=1, max_size=5).map(".".join)


def reference(entries: list[str], name: str) -> bool:
    """The rule as the issue states it, on strings."""
    name = name.lower().removesuffix(".")
    for entry in entries:
        if entry.startswith("*."):
            if name.endswith("." + entry[2:]):
                return True
        elif name == entry:
            return True
    return False


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.one_of(names, names.filter(lambda n: "." in n).map(lambda n: "*." + n)), max_size=6
    ),
    names,
)
def test_the_matcher_agrees_with_the_rule(entries: list[str], name: str) -> None:
    assert Allowlist.parse(entries).allows_text(name) is reference(entries, name)


@settings(max_examples=200, deadline=None)
@given(names.filter(lambda n: "." in n), label, st.booleans(), st.booleans())
def test_case_and_trailing_dots_do_not_matter(base: str, sub: str, upper: bool, dot: bool) -> None:
    allowlist = Allowlist.parse([base, "*." + base])
    name = f"{sub}.{base}"
    variant = (name.upper() if upper else name) + ("." if dot else "")
    assert allowlist.allows_text(variant)
    assert allowlist.allows_text(f"{sub}.{variant}")  # deeper still matches the wildcard


@settings(max_examples=200, deadline=None)
@given(names.filter(lambda n: "." in n), label)
def test_a_prefix_glued_to_the_apex_never_matches(base: str, glue: str) -> None:
    allowlist = Allowlist.parse(["*." + base])
    assert not allowlist.allows_text(glue + base)
    assert not allowlist.allows_text(base)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.from_regex(r"[A-Za-z0-9-]{1,12}", fullmatch=True), min_size=1, max_size=5))
def test_the_one_pass_check_and_the_label_check_agree(labels: list[str]) -> None:
    from keel.egress.allowlist import _ascii_label

    text = ".".join(labels)
    try:
        slow: tuple[bytes, ...] | None = tuple(_ascii_label(label, text) for label in labels)
    except EntryError:
        slow = None
    try:
        fast: tuple[bytes, ...] | None = parse_entry(text).labels
    except EntryError:
        fast = None
    if slow is not None and (slow[-1].isdigit() or len(b".".join(slow)) > 253):
        slow = None  # refused by the checks after the labels, on both paths
    assert fast == slow
