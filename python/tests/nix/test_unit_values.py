"""An agent's values reach its NixOS unit so that systemd reads back each exactly.

The unit text is the one the real NixOS generates (nixos/lib/systemd-lib.nix,
from the real declarations); ``tests/systemd_syntax.py`` reads it as systemd
252 does, and ``tests/system/test_nixos_unit_values.py`` checks the same units with
systemd itself. What cannot be carried fails an assertion naming the agent
and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import systemd_syntax, unit_values
from tests.nix import hostile
from tests.nix.nixeval import NixEvalError, nix_eval_expr, nix_text
from tests.nix.test_agents import agent
from tests.nix.test_modules import evaluate

UNIT = "keel-agent-hostile.service"


@pytest.fixture(scope="module")
def hostile_unit(
    nix_instantiate: str, nixpkgs_tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[str], dict[str, Any]]:
    strings = hostile.values()
    host = hostile.agent_host(tmp_path_factory.mktemp("values"), strings)
    result = evaluate(nix_instantiate, nixpkgs_tree, host)
    assert result["failedAssertions"] == []
    return strings, result


def test_every_argument_reaches_systemd_unchanged(
    hostile_unit: tuple[list[str], dict[str, Any]],
) -> None:
    strings, result = hostile_unit
    argv, _ = systemd_syntax.service_values(result["units"][UNIT])
    assert argv[0] == "/usr/local/bin/agent"
    for i, (got, given) in enumerate(zip(argv[1:], hostile.arguments_of(strings), strict=True)):
        assert got == given, (i, given)


def test_every_environment_value_reaches_systemd_unchanged(
    hostile_unit: tuple[list[str], dict[str, Any]],
) -> None:
    strings, result = hostile_unit
    _, env = systemd_syntax.service_values(result["units"][UNIT])
    for key, given in hostile.environment_of(strings).items():
        assert env[key] == given, (key, given)


def test_no_value_becomes_a_directive(hostile_unit: tuple[list[str], dict[str, Any]]) -> None:
    # The injections of the corpus would add ExecStartPre= or User= lines.
    # The one ExecStartPre= is keel egress's check that the agent's rules
    # are in the kernel (modules/egress.nix: the agent is tier 2).
    found = systemd_syntax.directives(hostile_unit[1]["units"][UNIT])
    keys = [(d.section, d.key) for d in found]
    [pre] = [d.value for d in found if (d.section, d.key) == ("Service", "ExecStartPre")]
    assert pre.startswith("+/nix/store/")
    assert pre.endswith("-nftables/bin/nft list chain inet keel agent_hostile")
    assert keys.count(("Service", "User")) == 1
    assert keys.count(("Service", "ExecStart")) == 1
    assert {section for section, _ in keys} == {"Unit", "Service", "Install"}


def test_the_spec_keeps_every_value(hostile_unit: tuple[list[str], dict[str, Any]]) -> None:
    strings, result = hostile_unit
    spec = result["etc"]["keel/agents/hostile.json"]["json"]
    assert spec["command"][1:] == hostile.arguments_of(strings)
    assert spec["environment"] == hostile.environment_of(strings)


def test_an_agent_path_replaces_the_nixos_path(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    result = evaluate(
        nix_instantiate,
        nixpkgs_tree,
        """{ services.keel.agents.p = {
             command = [ "/bin/agent" ]; tier = 1;
             environment = { PATH = "/opt/agent/bin:%h"; TZDIR = "/usr/share/zoneinfo"; };
           }; }""",
    )
    _, env = systemd_syntax.service_values(result["units"]["keel-agent-p.service"])
    assert env["PATH"] == "/opt/agent/bin:%h"
    assert env["TZDIR"] == "/usr/share/zoneinfo"


def xs(count: int) -> str:
    """A Nix expression for ``count`` times "x", made by Nix: an argument of
    128 KiB or more cannot be passed to nix-instantiate either."""
    return f'(builtins.concatStringsSep "" (builtins.genList (_: "x") {count}))'


MEBIBYTE = xs(1_048_576)


REFUSED = [
    pytest.param(
        agent(environment='{ "A-B" = "x"; "ok" = "y"; "1X" = "z"; }'),
        "services.keel.agents.probe.environment: '1X', 'A-B': variable names are letters",
        id="variable-names",
    ),
    pytest.param(
        agent(environment='{ "A B" = "x"; }'),
        "services.keel.agents.probe.environment: 'A B': variable names",
        id="space-in-name",
    ),
    pytest.param(
        agent(environment='{ "A=B" = "x"; }'),
        "services.keel.agents.probe.environment: 'A=B': variable names",
        id="equals-in-name",
    ),
    pytest.param(
        agent(environment=f'{{ BIG = {MEBIBYTE}; SMALL = "y"; }}'),
        "services.keel.agents.probe: the command and environment take 1048600 bytes; "
        "keel passes at most 131072 to a program",
        id="a-mebibyte-value",
    ),
    pytest.param(
        agent(command=f'[ "/bin/agent" {MEBIBYTE} ]'),
        "services.keel.agents.probe: the command and environment take 1048588 bytes",
        id="a-mebibyte-argument",
    ),
    pytest.param(
        # "/bin/agent" and NUL (11), "AB=" + value + NUL: one byte over.
        agent(command='[ "/bin/agent" ]', environment=f"{{ AB = {xs(131072 - 11 - 4 + 1)}; }}"),
        "services.keel.agents.probe: the command and environment take 131073 bytes",
        id="one-byte-over",
    ),
    *[
        pytest.param(
            agent(command=f"[ {nix_text(program)} ]"),
            "services.keel.agents.probe.command: the program path",
            id=f"program-{label}",
        )
        for label, program in [
            ("quote", '/bin/a"b'),
            ("apostrophe", "/bin/a'b"),
            ("backslash", "/bin/a\\b"),
            ("newline", "/bin/a\nb"),
            ("control", "/bin/a\x01b"),
            ("delete", "/bin/a\x7fb"),
            ("dollar", "/bin/a$b"),
        ]
    ],
    *[
        pytest.param(
            agent(readWritePaths=f"[ {nix_text(path)} ]"),
            "paths must be absolute, shorter than 4096 bytes, without '..', whitespace, control",
            id=f"path-{label}",
        )
        for label, path in [
            ("newline", "/srv/a\nb"),
            ("carriage-return", "/srv/a\rb"),
            ("control", "/srv/a\x01b"),
            ("delete", "/srv/a\x7fb"),
            ("quote", '/srv/"a"'),
            ("backslash", "/srv/a\\b"),
            ("long", "/srv/" + "a" * 5000),
        ]
    ],
]


@pytest.mark.parametrize(("config", "message"), REFUSED)
def test_what_cannot_be_carried_is_refused_by_name(
    nix_instantiate: str, nixpkgs_tree: Path, config: str, message: str
) -> None:
    failed = evaluate(nix_instantiate, nixpkgs_tree, config)["failedAssertions"]
    assert any(message in text for text in failed), failed


# unit_values.REFUSED that a Nix string can hold: the noncharacters.
NONCHARACTERS = [
    text
    for text in unit_values.REFUSED
    if "\x00" not in text and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
]


@pytest.mark.parametrize(
    "raw",
    [b"caf\xe9", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe4\xb8", b"\xff"]
    + [text.encode() for text in NONCHARACTERS],
)
def test_bytes_that_are_not_utf8_are_refused_by_name(
    nix_instantiate: str, nixpkgs_tree: Path, tmp_path: Path, raw: bytes
) -> None:
    # A value read from a file may hold any bytes; systemd drops a variable
    # that is not UTF-8, and the JSON spec cannot carry it.
    (tmp_path / "raw").write_bytes(raw)
    read = f"(builtins.readFile {tmp_path / 'raw'})"
    config = agent(
        environment=f'{{ GREETING = {read}; OK = "é"; }}', command=f'[ "/bin/a" "x" {read} ]'
    )
    failed = evaluate(nix_instantiate, nixpkgs_tree, config)["failedAssertions"]
    assert "services.keel.agents.probe.environment: GREETING: not UTF-8 text" in "\n".join(failed)
    assert "services.keel.agents.probe.command: word 2: not UTF-8 text" in "\n".join(failed)


def test_nul_and_lone_surrogates_cannot_reach_the_module(nix_instantiate: str) -> None:
    # The rest of unit_values.REFUSED: Nix cannot hold them. A lone
    # surrogate fails JSON parsing; Nix 2.8 cuts a string at NUL (newer Nix
    # refuses it), so the value the module would see is not the one given,
    # and the spec keel reads refuses NUL anyway.
    with pytest.raises(NixEvalError, match=r"surrogate|invalid string|parse error"):
        nix_eval_expr(nix_instantiate, 'builtins.fromJSON "\\"\\\\ud800\\""')
    cut = nix_eval_expr(nix_instantiate, 'builtins.fromJSON "\\"a\\\\u0000b\\""')
    assert cut != "a\x00b"


def test_exactly_the_limit_is_accepted(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    # As keel.launch.exec_bytes counts: each argument and NUL, each KEY=value and NUL.
    config = agent(
        command='[ "/bin/agent" "a b" ]', environment=f"{{ AB = {xs(131072 - 11 - 4 - 4)}; }}"
    )
    assert evaluate(nix_instantiate, nixpkgs_tree, config)["failedAssertions"] == []


def test_utf8_of_every_width_is_accepted(nix_instantiate: str, nixpkgs_tree: Path) -> None:
    text = nix_text("aé中😀\U0010fffd\u0800\ud7ff\ue000\ufdcf\ufdf0")
    failed = evaluate(nix_instantiate, nixpkgs_tree, agent(environment=f"{{ T = {text}; }}"))
    assert failed["failedAssertions"] == []
