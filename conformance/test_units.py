"""keel's units: every one that is enabled runs, none has failed."""

from __future__ import annotations

import shlex
from typing import Any

import keelhost
import pytest


def test_no_keel_unit_has_failed(host: Any) -> None:
    argv = ["systemctl", "list-units", "--all", "--state=failed", "--no-legend", "--plain", "keel*"]
    failed = host.check_output(shlex.join(argv)).strip()
    assert not failed, f"failed keel units (see `journalctl -u UNIT`):\n{failed}"


def test_enabled_keel_services_are_active(host: Any) -> None:
    enabled = keelhost.unit_files(host, "keel*", state="enabled")
    if not enabled:
        pytest.skip("no keel services are enabled on this host")
    problems = []
    for unit in enabled:
        state = keelhost.show(host, unit, "ActiveState", "Type", "Result")
        finished_oneshot = state["Type"] == "oneshot" and state["Result"] == "success"
        if state["ActiveState"] != "active" and not finished_oneshot:
            problems.append(f"{unit}: {state['ActiveState']} (result {state['Result']})")
    assert not problems, "\n".join(problems)
