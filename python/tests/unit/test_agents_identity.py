from __future__ import annotations

import pwd

import pytest
from keel.agents.identity import AgentDirectory, Caller, default_user
from keel.api import Peer
from keel.errors import ConfigError


def test_uids_map_to_agents_and_nothing_else() -> None:
    directory = AgentDirectory({"scout": 1001, "writer": 1002})
    assert directory.caller(Peer(10, 1001, 1001)) == Caller(10, 1001, 1001, "scout")
    assert directory.caller(Peer(11, 1002, 5)).agent == "writer"
    assert directory.caller(Peer(12, 0, 0)).agent is None
    assert directory.caller(Peer(12, 0, 0)).describe() == "root (pid 12)"
    assert directory.caller(Peer(13, 1003, 1003)).describe() == "uid 1003 (not an agent)"
    assert directory.caller(Peer(13, 1001, 1)).describe() == "agent scout (uid 1001)"
    assert "scout" in directory
    assert directory.agents() == ["scout", "writer"]
    assert directory.uid_of("writer") == 1002


def test_agents_that_cannot_be_told_apart_are_refused() -> None:
    with pytest.raises(ConfigError, match="'a' and 'b' run as the same uid 7"):
        AgentDirectory({"a": 7, "b": 7})
    with pytest.raises(ConfigError, match="runs as root"):
        AgentDirectory({"ops": 0})


def test_users_are_looked_up_in_the_system_database() -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    assert AgentDirectory.from_users({"guest": "nobody"}).agent_of(nobody) == "guest"
    with pytest.raises(
        ConfigError, match=r"no such user for agent\(s\) ghost \(keel-agent-ghost\)"
    ):
        AgentDirectory.from_users({"ghost": default_user("ghost")})
