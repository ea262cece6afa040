"""Every agent is installed as specified and sandboxed as its tier says."""

from __future__ import annotations

from typing import Any

import keelhost
from keel.agents.spec import AgentSpec
from keel.agents.units import Tiers


def test_agent_units_are_enabled_and_active(host: Any, agents: list[AgentSpec]) -> None:
    problems = []
    for spec in agents:
        state = keelhost.show(host, spec.unit_name, "UnitFileState", "ActiveState", "SubState")
        if state["UnitFileState"] != "enabled" or state["ActiveState"] != "active":
            problems.append(f"{spec.unit_name}: {state}")
    assert not problems, "\n".join(problems)


def test_agent_users_exist_without_login(host: Any, agents: list[AgentSpec]) -> None:
    problems = []
    for spec in agents:
        user = host.user(spec.user)
        if not user.exists:
            problems.append(f"{spec.name}: user {spec.user} does not exist")
        elif spec.user != "root" and not user.shell.endswith(("nologin", "false")):
            problems.append(f"{spec.name}: user {spec.user} has a login shell ({user.shell})")
    assert not problems, "\n".join(problems)


def test_sandbox_directives_are_in_effect(host: Any, agents: list[AgentSpec], tiers: Tiers) -> None:
    problems = [p for spec in agents for p in keelhost.sandbox_problems(host, spec, tiers)]
    assert not problems, "\n".join(problems)


def test_running_agents_show_their_sandbox(host: Any, agents: list[AgentSpec]) -> None:
    problems = [p for spec in agents for p in keelhost.runtime_problems(host, spec)]
    assert not problems, "\n".join(problems)


def test_agent_state_directories_are_private(host: Any, agents: list[AgentSpec]) -> None:
    problems = []
    for spec in agents:
        directory = host.file(spec.state_directory)
        if not directory.is_directory:
            problems.append(f"{spec.name}: {spec.state_directory} is missing")
        elif directory.user != spec.user or directory.mode & 0o077:
            problems.append(
                f"{spec.name}: {spec.state_directory} is {directory.user} {oct(directory.mode)}, "
                f"expected {spec.user} 0o700"
            )
    assert not problems, "\n".join(problems)
