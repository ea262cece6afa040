"""The suite's check that no traceback reaches a user (tests/tracebacks.py) catches them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.tracebacks import tracebacks_in

pytest_plugins = ["pytester"]

PYTHON_DIR = Path(__file__).resolve().parents[2]

TRACEBACK = """\
Traceback (most recent call last):
  File "x.py", line 1, in <module>
    boom()
ValueError: bad
"""


def test_tracebacks_in_cuts_each_traceback_at_its_exception_line() -> None:
    text = f"before\n{TRACEBACK}after\n{TRACEBACK.replace('ValueError', 'KeyError')}"
    found = tracebacks_in(text)
    assert found == [TRACEBACK.rstrip("\n"), TRACEBACK.replace("ValueError", "KeyError").rstrip()]
    assert tracebacks_in("keel: error: one clear line\n") == []


@pytest.mark.allow_traceback(
    "the inner session's report quotes the tracebacks it provokes",
    match=r"ValueError: bad input|KeyError: 'x'|OSError: y",
)
def test_a_traceback_anywhere_a_user_sees_it_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["tests.tracebacks"]')
    pytester.makepyfile(
        test_inner=r"""
        import asyncio, logging, subprocess, sys
        import pytest
        from tests.harness.common import report_output

        CRASH = [sys.executable, "-c", "raise ValueError('bad input')"]

        def test_cli_stderr_read_by_run():
            subprocess.run(CRASH, capture_output=True)

        def test_cli_output_read_by_asyncio():
            async def go():
                proc = await asyncio.create_subprocess_exec(*CRASH, stderr=subprocess.PIPE)
                await proc.communicate()
            asyncio.run(go())

        def test_inherited_stderr():
            subprocess.run(CRASH)

        def test_a_daemon_log_record():
            try:
                raise KeyError("x")
            except KeyError:
                logging.getLogger("keel.x").exception("a bug")

        def test_a_log_handed_over_at_teardown(request):
            request.addfinalizer(lambda: report_output("node a's log", "Traceback (most recent call last):\n  x\nOSError: y\n"))

        def test_one_line_errors_pass():
            result = subprocess.run([sys.executable, "-c", "import sys; sys.exit('keel: bad input')"], capture_output=True)
            assert result.returncode == 1

        @pytest.mark.allow_traceback("provoked on purpose", match=r"ValueError: bad input")
        def test_allowed_when_it_matches():
            subprocess.run(CRASH, capture_output=True)

        @pytest.mark.allow_traceback("provoked on purpose", match=r"KeyError")
        def test_not_allowed_when_it_does_not_match():
            subprocess.run(CRASH, capture_output=True)
        """
    )
    result = pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider")
    outcomes = {
        line.split("::", 1)[1].split()[0]: line.split()[0]
        for line in result.outlines
        if line.startswith(("PASSED ", "FAILED ", "ERROR ")) and "::" in line
    }
    assert outcomes == {
        "test_cli_stderr_read_by_run": "FAILED",
        "test_cli_output_read_by_asyncio": "FAILED",
        "test_inherited_stderr": "FAILED",
        "test_a_daemon_log_record": "FAILED",
        "test_a_log_handed_over_at_teardown": "ERROR",  # its test passed, its teardown did not
        "test_one_line_errors_pass": "PASSED",
        "test_allowed_when_it_matches": "PASSED",
        "test_not_allowed_when_it_does_not_match": "FAILED",
    }, result.stdout.str()
    out = result.stdout.str()
    assert f"a traceback reached the user, in `{sys.executable} -c" in out
    assert "a traceback reached the user, in node a's log" in out
    assert "this test's log call" in out


@pytest.fixture(autouse=True)
def _importable_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(PYTHON_DIR))
