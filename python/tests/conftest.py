"""Test tiers and the end-of-run summary.

Tests live in one folder per tier (``unit/``, ``integration/``, ``system/``,
``nix/``) and get that tier's marker from their folder. At the end of a run a
summary names every tier, how long it took, and why anything in it skipped, so
that a skipped tier can never pass unnoticed.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# `make test` must pass on a loaded two-core machine: Hypothesis judges
# properties, never how long one example took (no timing asserts anywhere).
settings.register_profile(
    "keel", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("keel")

# The network-namespace and container fixtures (tests/harness/README.md), and the
# check that no traceback reaches a user (tests/tracebacks.py).
pytest_plugins = ["tests.harness.plugin", "tests.tracebacks"]

TIERS = {
    "unit": "tier 1 unit",
    "integration": "tier 2 integration",
    "system": "tier 3 system (nspawn)",
    "nix": "tier 4 nix",
}
TESTS = Path(__file__).parent
REPO = TESTS.parent.parent


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The published test vectors in ``../shared/vectors`` (``KEEL_VECTORS`` overrides)."""
    import os

    path = Path(os.environ.get("KEEL_VECTORS") or REPO.parent / "shared" / "vectors")
    if not path.is_dir():
        pytest.skip(f"no test vectors at {path} (set KEEL_VECTORS to their folder)")
    return path


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ktmp-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tier_of(path: Path) -> str | None:
    if not path.is_absolute():
        path = TESTS.parent / path
    try:
        relative = path.relative_to(TESTS)
    except ValueError:
        return None
    return relative.parts[0] if relative.parts and relative.parts[0] in TIERS else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(Path(str(item.path)))
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


class TierSummary:
    def __init__(self) -> None:
        self.outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.skips: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.started = time.monotonic()

    def record(self, report: pytest.TestReport) -> None:
        tier = tier_of(Path(report.fspath)) or "other"
        self.seconds[tier] += report.duration
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else "skipped"
                self.skips[tier][reason.removeprefix("Skipped: ")] += 1
                self.outcomes[tier]["skipped"] += 1
            elif report.failed:
                self.outcomes[tier]["failed"] += 1
            elif report.when == "call":
                self.outcomes[tier]["passed"] += 1

    def lines(self) -> list[str]:
        out = []
        for tier, label in TIERS.items():
            counts = self.outcomes.get(tier)
            if not counts:
                out.append(f"{label:<24} no tests collected")
                continue
            parts = ", ".join(
                f"{counts[k]} {k}" for k in ("passed", "failed", "skipped") if counts[k]
            )
            out.append(f"{label:<24} {parts:<40} {self.seconds[tier]:7.1f} s")
            for reason, n in sorted(self.skips[tier].items()):
                out.append(f"{'':<26}skipped ({n}): {reason}")
        out.append(f"{'total':<24} {'':<40} {time.monotonic() - self.started:7.1f} s")
        return out


_summary = TierSummary()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _summary.record(report)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.section("keel test tiers")
    for line in _summary.lines():
        terminalreporter.write_line(line)
