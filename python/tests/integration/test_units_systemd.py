"""Units rendered by keel, read back by systemd's own parser, compared with the spec.

``systemd --test`` (systemd 252 on Debian 12) loads unit files exactly as PID 1
does, prints the parsed state of every unit and exits, without booting or
starting anything. Each test renders units from specs holding hostile values
(:mod:`tests.unit_values`), lets systemd parse them and checks that it read
back exactly the spec: every environment variable, every argument (before the
``$$`` → ``$`` expansion done at exec time, which ``tests/system`` checks in a
running agent), the paths and the limits, with no warning about any line.
``systemd-analyze verify`` is run on the same units too.

``systemd --test`` refuses to run as root, so as root it runs as ``nobody``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keel.agents.spec import AgentSpec, parse_spec
from keel.agents.units import load_tiers, render_unit

from tests.fuzz import examples
from tests.unit_values import CARRIED, INJECTION, carried_text, env_names, program_paths

SYSTEMD = Path("/lib/systemd/systemd")


def _missing() -> str | None:
    if not sys.platform.startswith("linux"):
        return "systemd runs on Linux only"
    if not SYSTEMD.exists():
        return f"no {SYSTEMD} (Debian's systemd package, pulled in by systemd-container)"
    if shutil.which("systemd-analyze") is None:
        return "no systemd-analyze (Debian's systemd package)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def spec(name: str, **fields: Any) -> AgentSpec:
    data = {"name": name, "command": ["/bin/true"], "tier": 2, **fields}
    return parse_spec(data, source=f"{name}.json")


class Loaded:
    """What systemd made of a set of unit files: its dump and its warnings."""

    def __init__(self, dump: str, warnings: list[str]) -> None:
        self.dump = dump
        self.warnings = warnings

    def unit(self, name: str) -> str:
        """The dump from ``name``'s header on (the parts tests look at come first)."""
        header = f"\t-> Unit {name}:\n"
        assert header in self.dump, f"systemd did not load {name}"
        return self.dump[self.dump.index(header) + len(header) :]


@contextlib.contextmanager
def _unit_dir(units: dict[str, str]) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="keel-units-"))
    try:
        directory.chmod(0o755)  # readable by nobody
        for name, text in units.items():
            (directory / name).write_text(text, encoding="utf-8")
            (directory / name).chmod(0o644)
        yield directory
    finally:
        shutil.rmtree(directory)


def systemd_loads(units: dict[str, str]) -> Loaded:
    """Load ``units`` (file name → text) with ``systemd --test`` and return the result."""
    target = "keel-test-all.target"
    files = {**units, target: f"[Unit]\nWants={' '.join(units)}\n"}
    with _unit_dir(files) as directory:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/",
            # Our directory first, then the system's (for the default dependencies).
            "SYSTEMD_UNIT_PATH": f"{directory}:",
        }
        as_nobody: dict[str, Any] = (
            {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
        )
        proc = subprocess.run(
            [
                str(SYSTEMD),
                "--test",
                "--system",
                "--no-pager",
                "--log-level=warning",
                f"--unit={target}",
            ],
            capture_output=True,
            env=env,
            timeout=120,
            check=False,
            **as_nobody,
        )
        stderr = proc.stderr.decode("utf-8", "replace")
        assert proc.returncode == 0, stderr
        warnings = [line for line in stderr.splitlines() if str(directory) in line]
        return Loaded(proc.stdout.decode("utf-8", "surrogateescape"), warnings)


def split_command_line(line: str) -> list[str]:
    """Undo systemd's ``quote_command_line`` (how the dump prints an argv).

    Words are separated by one space; a word with special characters is in
    double quotes, with ``\\`` before ``"``, ``\\``, `````` and ``$``, and
    control characters as C escapes (``\\n``, ``\\r``, ``\\001``).
    """
    data, words, i = line.encode(), [], 0
    simple = {ord(k): v for k, v in zip("abfnrtv", b"\a\b\f\n\r\t\v", strict=True)}
    while i < len(data):
        if data[i] == ord('"'):
            word, i = bytearray(), i + 1
            while data[i] != ord('"'):
                if data[i] != ord("\\"):
                    word.append(data[i])
                    i += 1
                    continue
                escaped = data[i + 1]
                if escaped in simple:
                    word.append(simple[escaped])
                    i += 2
                elif ord("0") <= escaped <= ord("7"):
                    word.append(int(data[i + 1 : i + 4], 8))
                    i += 4
                elif escaped == ord("x"):
                    word.append(int(data[i + 2 : i + 4], 16))
                    i += 4
                else:
                    word.append(escaped)
                    i += 2
            i += 1
        else:
            end = data.find(b" ", i)
            end = len(data) if end < 0 else end
            word, i = bytearray(data[i:end]), end
        words.append(word.decode())
        assert i == len(data) or data[i] == ord(" "), line
        i += 1
    return words


def check_read_back(loaded: Loaded, web: AgentSpec) -> None:
    """systemd's parsed unit holds exactly ``web``'s values."""
    section = loaded.unit(web.unit_name)
    position = 0
    if web.environment:
        block = "".join(f"\t\tEnvironment: {k}={v}\n" for k, v in web.environment.items())
        position = section.find(block)
        assert position >= 0, f"environment not read back exactly: {web.environment!r}"
        assert "\t\tEnvironment: " not in section[:position]
        position += len(block)
        assert not section[position:].startswith("\t\tEnvironment: ")
    marker = "\t\t-> ExecStart:\n\t\t\tCommand Line: "
    start = section.index(marker, position) + len(marker)
    argv = split_command_line(section[start : section.index("\n", start)])
    # The dump shows argv before variables are expanded at exec time ($$ → $).
    assert argv == [web.command[0], *(arg.replace("$", "$$") for arg in web.command[1:])]
    assert f"\t\tUser: {web.user}\n" in section
    assert f"\t\tWorkingDirectory: {web.working_directory or web.state_directory}\n" in section
    for path in web.environment_files:
        assert f"\t\tEnvironmentFile: {path}\n" in section
    if web.read_write_paths:
        assert f"\t\tReadWritePaths: {' '.join(web.read_write_paths)}\n" in section


def test_the_issues_injection_is_one_environment_value() -> None:
    web = spec("inj", command=["/bin/sleep", "100"], environment={"A": INJECTION})
    loaded = systemd_loads({web.unit_name: render_unit(web, load_tiers())})
    assert loaded.warnings == []
    check_read_back(loaded, web)
    section = loaded.unit(web.unit_name)
    assert "-> ExecStartPre:" not in section.split("\t-> Unit ")[0]
    assert "\t\tUser: keel-agent-inj\n" in section


def test_every_hostile_value_is_read_back_exactly() -> None:
    """All of CARRIED at once, as arguments and as environment values, in each tier."""
    tiers = load_tiers()
    specs = [
        spec(
            f"all{tier}",
            tier=tier,
            user="root" if tier == 0 else f"keel-agent-all{tier}",
            command=["/opt/keel test/100%/agent", *CARRIED],
            environment={f"V{i}": value for i, value in enumerate(CARRIED)},
            workingDirectory="/srv/w%d",
            readWritePaths=["/srv//rw/./", "/srv/100%"],
            environmentFiles=["/etc/keel/a%i.env"],
        )
        for tier in (0, 1, 2)
    ]
    loaded = systemd_loads({web.unit_name: render_unit(web, tiers) for web in specs})
    assert loaded.warnings == []
    for web in specs:
        check_read_back(loaded, web)


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    program=program_paths(),
    args=st.lists(carried_text(60), max_size=40),
    env=st.dictionaries(env_names(), carried_text(60), max_size=40),
)
def test_generated_values_are_read_back_exactly(
    program: str, args: list[str], env: dict[str, str]
) -> None:
    web = spec("gen", command=[program, *args], environment=env)
    loaded = systemd_loads({web.unit_name: render_unit(web, load_tiers())})
    assert loaded.warnings == []
    check_read_back(loaded, web)


def test_resource_limits_at_their_bounds_are_applied() -> None:
    cases = {
        "big": {
            "memoryMax": "18446744073709551614",
            "cpuQuota": "21474836.47%",
            "tasksMax": 2**64 - 2,
        },
        "small": {"memoryMax": "1", "cpuQuota": "0.01%", "tasksMax": 1},
        "suffix": {"memoryMax": "17179869183G", "cpuQuota": "50.12%"},
        "percent": {"memoryMax": "12.55%"},
    }
    specs = {
        name: spec(
            name, resources=resources, health={"watchdogSec": 0.001 if name == "small" else 86400}
        )
        for name, resources in cases.items()
    }
    loaded = systemd_loads(
        {web.unit_name: render_unit(web, load_tiers()) for web in specs.values()}
    )
    assert loaded.warnings == []  # nothing dropped
    big = loaded.unit(specs["big"].unit_name)
    assert "\t\tMemoryMax: 18446744073709551614\n" in big
    assert f"\t\tTasksMax: {2**64 - 2}\n" in big
    assert "\t\tMemoryMax: 18446744072635809792\n" in loaded.unit(specs["suffix"].unit_name)
    assert "\t\tCPUQuotaPerSecSec: 501.200ms\n" in loaded.unit(specs["suffix"].unit_name)
    assert "\t\tMemoryMax: 1\n" in loaded.unit(specs["small"].unit_name)


def test_systemd_analyze_verify_accepts_the_hostile_units(tmp_path: Path) -> None:
    web = spec(
        "verify",
        command=["/bin/true", *CARRIED],
        environment={f"V{i}": v for i, v in enumerate(CARRIED)},
    )
    unit = tmp_path / web.unit_name
    unit.write_text(render_unit(web, load_tiers()), encoding="utf-8")
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")


def test_the_decoder_reads_what_systemd_prints() -> None:
    assert split_command_line('/bin/true "" "a\\001b" "c\\rd" 100% "x\\$\\$y" "q\\"q" "it\'s"') == [
        "/bin/true", "", "a\x01b", "c\rd", "100%", "x$$y", 'q"q', "it's",
    ]  # fmt: skip
    assert json.dumps(split_command_line("\u00e9 \U0001f600")) == json.dumps(
        ["\u00e9", "\U0001f600"]
    )
