"""keel mcp across the mesh, the pure parts: mcp.json's mesh and remote, the payloads, the names."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from keel import paths
from keel.config import Section
from keel.errors import ConfigError
from keel.mcp import config as mcp_config
from keel.mcp import remote
from keel.mcp.config import DEFAULT_DEADLINE, DEFAULT_LIST_TTL, McpConfig
from keel.mcp.gateway import McpGateway
from keel.mcp.remote import PART_BYTES, Answer, BadPayload, Part, Parts, Request
from keel.mcp.upstream import TIMEOUT
from keel.mesh.packets import MAX_PAYLOAD
from mcp import MCPError
from mcp_types import INTERNAL_ERROR

NODE_A = "a" * 32
NODE_B = "b" * 32
ID = "0123456789abcdef" * 2


def server(name: str = "files", share: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"name": name, "command": [sys.executable], "tier": 2, "share": share or []}


def parse(tmp_path: Path, **keys: Any) -> McpConfig:
    data = {
        "socket": str(tmp_path / "mcp.sock"),
        "ledger": None,
        "servers": {"files": server()},
        "agents": {"scout": {"uid": 4242, "tier": 2}},
        **keys,
    }
    with Section(json.loads(json.dumps(data)), source="mcp.json") as cfg:
        return mcp_config.parse(cfg)


def refused(tmp_path: Path, **keys: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(tmp_path, **keys)
    return str(caught.value)


# --- mcp.json ----------------------------------------------------------------------------


def test_without_remote_there_are_no_remote_tools_and_the_mesh_defaults(tmp_path: Path) -> None:
    config = parse(tmp_path)
    assert config.remote == {}
    assert config.mesh.socket == paths.socket_file("mesh")
    assert (config.mesh.deadline, config.mesh.list_ttl) == (DEFAULT_DEADLINE, DEFAULT_LIST_TTL)
    assert not config.hosts_for_mesh
    assert McpGateway(config).link is None  # no mesh use at all


def test_remote_and_mesh_are_read(tmp_path: Path) -> None:
    config = parse(
        tmp_path,
        mesh={"socket": "/run/x/mesh.sock", "deadline": 2.5, "list_ttl": 0},
        remote={
            "lab": {"node": NODE_B, "servers": ["db", "web"]},
            "all": {"node": NODE_A, "servers": "*"},
        },
    )
    assert config.mesh.socket == Path("/run/x/mesh.sock")
    assert (config.mesh.deadline, config.mesh.list_ttl) == (2.5, 0.0)
    lab = config.remote["lab"]
    assert (lab.label, lab.node, lab.servers) == ("lab", NODE_B, frozenset({"db", "web"}))
    assert lab.offers("db")
    assert not lab.offers("files")
    assert config.remote["all"].servers is None
    assert config.remote["all"].offers("anything")
    assert McpGateway(config).link is not None


def test_a_server_shared_with_nodes_makes_the_gateway_host(tmp_path: Path) -> None:
    shared = server(share=[{"nodes": [NODE_A], "agents": "*", "tools": ["read"]}])
    config = parse(tmp_path, servers={"files": shared})
    assert config.hosts_for_mesh
    assert config.remote == {}
    assert McpGateway(config).link is not None


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"remote": []}, "mcp.json: remote: expected an object of remote nodes by label"),
        ({"remote": {"files": {"node": NODE_B, "servers": "*"}}}, "mcp.json: remote.files: the label 'files' is also a local MCP server's name"),
        ({"remote": {"Lab": {"node": NODE_B, "servers": "*"}}}, 'mcp.json: remote.Lab: "Lab" is not a valid label: 1 to 23'),
        ({"remote": {"a.b": {"node": NODE_B, "servers": "*"}}}, "mcp.json: remote.a.b"),
        ({"remote": {"lab": {"servers": "*"}}}, "mcp.json: remote.lab.node: required key is missing"),
        ({"remote": {"lab": {"node": "bob", "servers": "*"}}}, "mcp.json: remote.lab.node: 'bob' is not a mesh node id"),
        ({"remote": {"lab": {"node": NODE_B}}}, "mcp.json: remote.lab.servers: required key is missing"),
        ({"remote": {"lab": {"node": NODE_B, "servers": "db"}}}, 'mcp.json: remote.lab.servers: expected "*" or a list of names'),
        ({"remote": {"lab": {"node": NODE_B, "servers": ["Db"]}}}, "mcp.json: remote.lab.servers[0]"),
        ({"remote": {"lab": {"node": NODE_B, "servers": "*", "tools": "*"}}}, "mcp.json: remote.lab.tools: unknown key"),
        ({"remote": {"lab": "node"}}, "mcp.json: remote.lab: expected an object"),
        ({"mesh": {"deadline": 0}}, "mcp.json: mesh.deadline: expected a number > 0"),
        ({"mesh": {"deadline": 7200}}, "mcp.json: mesh.deadline: must be at most 3600"),
        ({"mesh": {"list_ttl": -1}}, "mcp.json: mesh.list_ttl: must be at least 0"),
        ({"mesh": {"socket": ""}}, "mcp.json: mesh.socket: must not be empty"),
        ({"mesh": {"sockets": "/x"}}, "mcp.json: mesh.sockets: unknown key"),
        ({"mesh": 3}, "mcp.json: mesh: expected an object"),
    ],
)  # fmt: skip
def test_bad_mesh_and_remote_keys_are_refused_naming_the_key(
    tmp_path: Path, keys: dict[str, Any], message: str
) -> None:
    assert message in refused(tmp_path, **keys)


# --- the payloads ---------------------------------------------------------------------------


def test_known_answers() -> None:
    """The exact bytes of each payload kind (docs/mcp.md shows the same)."""
    assert remote.encode(Request(ID, "list", 1700000000.5)) == (
        b'{"deadline":1700000000.5,"id":"0123456789abcdef0123456789abcdef","kind":"list","v":1}'
    )
    call = Request(ID, "call", 1700000000, "files", "read", {"path": "/a", "n": 1})
    assert remote.encode(call) == (
        b'{"arguments":{"n":1,"path":"/a"},"deadline":1700000000,'
        b'"id":"0123456789abcdef0123456789abcdef","kind":"call","server":"files","tool":"read","v":1}'
    )
    assert remote.encode(Request(ID, "cancel", 1700000000.5)) == (
        b'{"deadline":1700000000.5,"id":"0123456789abcdef0123456789abcdef","kind":"cancel","v":1}'
    )
    assert remote.encode(Answer(ID, {"content": []})) == (
        b'{"id":"0123456789abcdef0123456789abcdef","result":{"content":[]},"v":1}'
    )
    assert remote.encode(Answer(ID, None, -32050, "no")) == (
        b'{"error":{"code":-32050,"message":"no"},"id":"0123456789abcdef0123456789abcdef","v":1}'
    )
    assert remote.encode(Answer(ID, None, -1, "é")).endswith(
        b'"message":"\\u00e9"},' + b'"id":"' + ID.encode() + b'","v":1}'
    )


# Text without lone surrogates: the reading side refuses those (keel.config.parse_json).
text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(text, children, max_size=5),
    max_leaves=20,
)


def json_objects() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(text, values, max_size=5)


names = st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True)
tools = st.from_regex(r"[A-Za-z0-9._-]{1,60}", fullmatch=True)
ids = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
deadlines = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(ids, names, tools, json_objects(), deadlines)
def test_requests_read_back_as_they_were_written(
    request_id: str, name: str, tool: str, arguments: dict[str, Any], deadline: float
) -> None:
    call = Request(request_id, "call", deadline, name, tool, arguments)
    try:
        data = remote.encode(call)
    except BadPayload:
        return  # larger than one mesh message: refused before sending
    assert remote.decode_request(data) == call
    assert (
        remote.decode_request(remote.encode(Request(request_id, "list", deadline))).kind == "list"
    )


@given(ids, json_objects(), st.integers(-(2**31), 2**31), text)
def test_answers_read_back_as_they_were_written(
    answer_id: str, result: dict[str, Any], code: int, message: str
) -> None:
    assert remote.decode_answer(remote.encode(Answer(answer_id, result))) == Answer(
        answer_id, result
    )
    assert remote.decode_answer(remote.encode(Answer(answer_id, None, code, message))) == Answer(
        answer_id, None, code, message
    )


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "request"),
        (b"[]", "request is not a JSON object"),
        (b'{"v":2,"id":"' + ID.encode() + b'","kind":"list","deadline":1}', "not version 1"),
        (b'{"v":1,"id":"XYZ","kind":"list","deadline":1}', "id must be 32 lowercase hex"),
        (b'{"v":1,"id":"' + ID.encode() + b'","kind":"list"}', "deadline must be a number"),
        (b'{"v":1,"id":"' + ID.encode() + b'","kind":"list","deadline":true}', "deadline must be a number"),
        (b'{"v":1,"id":"' + ID.encode() + b'","kind":"list","deadline":NaN}', "request"),
        (b'{"v":1,"id":"' + ID.encode() + b'","kind":"run","deadline":1}', 'kind must be "list", "call" or "cancel"'),
        (b'{"v":1,"id":"' + ID.encode() + b'","kind":"list","deadline":1,"agent":"ops"}', "unknown key 'agent'"),
        (b'{"v":1,"id":"' + ID.encode() + b'","kind":"cancel","deadline":1,"agent":"ops"}', "a cancel request has an unknown key 'agent'"),
        (b'{"v":1,"id":"' + ID.encode() + b'","kind":"cancel"}', "deadline must be a number"),
        (b'{"v":1,"id":"' + ID.encode() + b'","kind":"call","deadline":1,"server":"f","tool":"t","arguments":{},"node":"x"}', "unknown key 'node'"),
        (b'{"v":1,"id":"' + ID.encode() + b'","kind":"call","deadline":1,"server":"F","tool":"t","arguments":{}}', "server is not"),
        (b'{"v":1,"id":"' + ID.encode() + b'","kind":"call","deadline":1,"server":"f","tool":"a b","arguments":{}}', "tool is not"),
        (b'{"v":1,"id":"' + ID.encode() + b'","kind":"call","deadline":1,"server":"f","tool":"t","arguments":[]}', "arguments must be a JSON object"),
        (b'{"v":1,"v":1,"id":"' + ID.encode() + b'","kind":"list","deadline":1}', "request"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_with_the_reason(payload: bytes, message: str) -> None:
    with pytest.raises(BadPayload, match=message):
        remote.decode_request(payload)


def test_the_caller_is_never_read_from_the_payload() -> None:
    """A request naming an agent or a node is no request: the mesh message says who calls."""
    for key in ("agent", "node", "caller", "uid"):
        data = json.dumps({"v": 1, "id": ID, "kind": "list", "deadline": 1, key: "ops"}).encode()
        with pytest.raises(BadPayload):
            remote.decode_request(data)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"v":1,"id":"' + ID.encode() + b'"}', "exactly one of result and error"),
        (b'{"v":1,"id":"' + ID.encode() + b'","result":{},"error":{"code":1,"message":""}}', "exactly one"),
        (b'{"v":1,"id":"' + ID.encode() + b'","result":[]}', "result must be a JSON object"),
        (b'{"v":1,"id":"' + ID.encode() + b'","error":{"code":"1","message":"m"}}', "integer code"),
        (b'{"v":1,"id":"' + ID.encode() + b'","error":{"code":1,"message":"m","data":1}}', "unknown key 'data'"),
    ],
)  # fmt: skip
def test_bad_answers_are_refused_with_the_reason(payload: bytes, message: str) -> None:
    with pytest.raises(BadPayload, match=message):
        remote.decode_answer(payload)


def test_a_payload_over_one_mesh_message_is_refused_both_ways() -> None:
    big = Request(ID, "call", 1, "files", "write", {"text": "x" * MAX_PAYLOAD})
    with pytest.raises(BadPayload, match="more than one mesh message carries"):
        remote.encode(big)
    with pytest.raises(BadPayload, match="over the limit"):
        remote.decode_request(b" " * (MAX_PAYLOAD + 1))


def test_the_id_of_a_malformed_request_is_found_to_answer_it() -> None:
    assert remote.request_id_of(b'{"id":"' + ID.encode() + b'","kind":"?"}') == ID
    assert remote.request_id_of(b'{"id":"nope"}') is None
    assert remote.request_id_of(b"[") is None
    assert remote.request_id_of(b"[1]") is None


# --- names --------------------------------------------------------------------------------


def test_remote_names_are_label_server_tool() -> None:
    labels = {"lab": object()}
    assert remote.remote_name("lab", "files", "read") == "lab.files.read"
    assert remote.split_remote("lab.files.read", labels) == ("lab", "files", "read")
    assert remote.split_remote("lab.files.read.v2", labels) == ("lab", "files", "read.v2")
    assert remote.split_remote("files.read", labels) is None  # a local name
    assert remote.split_remote("lab.files", labels) is None
    assert remote.split_remote("lab", labels) is None
    assert remote.split_remote("other.files.read", labels) is None


# --- the calling side's bookkeeping (no I/O) ----------------------------------------------------


def test_an_answer_counts_only_from_the_node_that_was_asked(tmp_path: Path) -> None:
    config = parse(tmp_path, remote={"lab": {"node": NODE_B, "servers": "*"}})
    link = McpGateway(config).link
    assert link is not None

    async def scenario() -> None:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        link._pending[ID] = (NODE_B, future)
        data = remote.encode(Answer(ID, {"content": []}))
        message = {"from": NODE_A, "agent": None, "data": base64.b64encode(data).decode()}
        link.on_answer(message)  # another node answering b's request: dropped
        assert not future.done()
        link.on_answer({**message, "data": base64.b64encode(b"junk").decode(), "from": NODE_B})
        assert not future.done()
        link.on_answer({**message, "from": NODE_B})
        assert future.result() == Answer(ID, {"content": []})
        link.on_answer({**message, "from": NODE_B})  # a second copy: nothing waits, nothing breaks

    asyncio.run(scenario())


# --- the hosting side's bookkeeping: who may cancel what ------------------------------------


def message(node: str, agent: str | None, request: Request) -> dict[str, Any]:
    data = base64.b64encode(remote.encode(request)).decode()
    return {"from": node, "agent": agent, "data": data, "room": None}


def hosting(tmp_path: Path) -> tuple[McpGateway, Any]:
    shared = server(share=[{"nodes": [NODE_A, NODE_B], "agents": "*", "tools": ["read"]}])
    gateway = McpGateway(parse(tmp_path, servers={"files": shared}))
    link = gateway.link
    assert link is not None
    return gateway, link


def test_a_cancel_counts_only_from_the_node_and_agent_that_sent_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway, link = hosting(tmp_path)
    running: dict[str, asyncio.Event] = {}
    stopped: list[str] = []
    sent: list[tuple[str, bytes]] = []

    async def call_from_node(node: str, agent: str | None, *args: Any, **kw: Any) -> Any:
        running[node].set()
        try:
            await asyncio.Event().wait()  # a call that never ends by itself
        except asyncio.CancelledError:
            stopped.append(node)
            raise

    async def mesh_send(node: str, topic: str, payload: bytes, *args: Any) -> None:
        sent.append((node, payload))

    monkeypatch.setattr(gateway, "call_from_node", call_from_node)
    monkeypatch.setattr(link, "_mesh_send", mesh_send)

    async def scenario() -> None:
        deadline = 1e12
        call = Request(ID, "call", deadline, "files", "read", {})
        cancel = Request(ID, "cancel", deadline)
        running[NODE_A], running[NODE_B] = asyncio.Event(), asyncio.Event()
        link.on_request(message(NODE_A, "scout", call))
        link.on_request(message(NODE_B, "scout", call))  # the same id from another node: its own
        await running[NODE_A].wait()
        await running[NODE_B].wait()
        link.on_request(message(NODE_A, "ops", cancel))  # another agent of the same node
        link.on_request(message(NODE_A, None, cancel))  # a process of the node that is no agent
        link.on_request(message(NODE_A, "scout", Request("f" * 32, "cancel", deadline)))
        assert (link.cancels_ignored, link.cancelled, stopped) == (3, 0, [])
        assert link.status()["running"] == 2
        link.on_request(message(NODE_B, "scout", cancel))  # b's own cancel stops b's call only
        # The cancelled task ends within a few turns of the loop (no I/O here):
        # yielding to it until it has is waiting on that end.
        while link.status()["running"] != 1:
            await asyncio.sleep(0)
        assert (link.cancelled, stopped) == (1, [NODE_B])
        link.on_request(message(NODE_B, "scout", cancel))  # again: nothing runs, ignored
        assert link.cancels_ignored == 4
        link.on_request(message(NODE_A, "scout", cancel))
        while link.status()["running"] != 0:  # as above: the loop's turns, no I/O
            await asyncio.sleep(0)
        assert stopped == [NODE_B, NODE_A]
        assert sent == []  # a cancelled call is not answered
        await link.close()

    asyncio.run(scenario())


def test_a_call_cancelled_before_it_runs_is_recorded_as_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway, link = hosting(tmp_path)
    recorded: list[tuple[str, str | None, str, str]] = []

    def record_not_run(node: str, agent: str | None, request: Request, outcome: str) -> None:
        recorded.append((node, agent, request.id, outcome))

    async def call_from_node(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a cancelled call must not run")

    monkeypatch.setattr(gateway, "record_not_run", record_not_run)
    monkeypatch.setattr(gateway, "call_from_node", call_from_node)

    async def scenario() -> None:
        call = Request(ID, "call", 1e12, "files", "read", {})
        # request and cancel in the same batch from the mesh: the call never starts
        link.on_request(message(NODE_A, "scout", call))
        link.on_request(message(NODE_A, "scout", Request(ID, "cancel", 1e12)))
        while link.status()["running"] != 0:  # the task's end, a few turns of the loop away
            await asyncio.sleep(0)
        assert recorded == [(NODE_A, "scout", ID, "cancelled")]
        assert link.hosted == 0
        await link.close()

    asyncio.run(scenario())


# --- answers larger than one mesh message travel in parts ----------------------------------------

MIB = 1024 * 1024


BIG = 3 * PART_BYTES + 1000  # the text of an answer in 4 parts (its JSON is a little longer)


def big_answer(size: int = BIG, answer_id: str = ID) -> Answer:
    return Answer(answer_id, {"content": [{"type": "text", "text": "x" * size}]})


def in_parts(size: int = BIG, *, keep: Callable[[list[bytes]], list[bytes]] = list) -> Any:
    return lambda request_id: keep(
        remote.encode_answer(big_answer(size, request_id), limit=8 * MIB)
    )


def test_an_answer_over_one_message_is_cut_into_parts_that_join_back() -> None:
    answer = big_answer()
    payloads = remote.encode_answer(answer, limit=4 * MIB)
    assert len(payloads) == 4
    assert all(len(p) <= remote.MAX_BYTES for p in payloads)
    first = json.loads(payloads[0])
    assert sorted(first) == ["count", "data", "id", "part", "v"]
    assert (first["v"], first["id"], first["part"], first["count"]) == (1, ID, 0, 4)
    parts = Parts(ID, 4 * MIB)
    decoded = [remote.decode_answer_or_part(p) for p in payloads]
    assert all(isinstance(p, Part) for p in decoded)
    # in any order; a copy of a part already in changes nothing
    assert parts.add(decoded[3]) is None  # type: ignore[arg-type]
    assert parts.add(decoded[0]) is None  # type: ignore[arg-type]
    assert parts.add(decoded[0]) is None  # type: ignore[arg-type]
    assert parts.add(decoded[2]) is None  # type: ignore[arg-type]
    assert parts.add(decoded[1]) == answer  # type: ignore[arg-type]
    # one message's worth is one plain answer, as before
    small = Answer(ID, {"content": []})
    assert remote.encode_answer(small, limit=4 * MIB) == [remote.encode(small)]
    assert remote.decode_answer_or_part(remote.encode(small)) == small


def test_an_answer_over_the_gateways_limit_is_refused_before_sending() -> None:
    with pytest.raises(BadPayload, match="more than this gateway sends"):
        remote.encode_answer(big_answer(), limit=MIB)


def part(index: int, count: int, data: bytes = b"x", answer_id: str = ID) -> Part:
    return Part(answer_id, index, count, data)


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([part(0, 2), part(1, 3)], "disagree on their count \\(2 and 3\\)"),
        ([part(0, 2, b"a"), part(0, 2, b"b")], "part 0 came twice, with different bytes"),
        ([part(0, 7)], "7 parts are more than an answer of at most"),
        ([part(0, 2, b"x" * PART_BYTES), part(1, 2, b"x" * PART_BYTES)], "more than"),
        ([part(0, 2, b"not"), part(1, 2, b" json")], "answer"),
        ([part(0, 2, b'{"v":1,"id":"' + b"f" * 32), part(1, 2, b'","result":{}}')], "the answer to ffff"),
        ([part(0, 2, b'{"v":1,"id":"' + ID.encode()), part(1, 2, b'","part":0,"result":{}}')], "unknown key 'part'"),
        ([part(0, 2, answer_id="f" * 32)], "given to answer"),
    ],
)  # fmt: skip
def test_parts_that_make_no_answer_are_refused_with_the_reason(
    parts: list[Part], message: str
) -> None:
    joining = Parts(ID, 2 * PART_BYTES - 1)
    with pytest.raises(BadPayload, match=message):
        for each in parts:
            joining.add(each)


def test_a_missing_part_leaves_the_answer_incomplete() -> None:
    joining = Parts(ID, 4 * MIB)
    assert joining.add(part(0, 3)) is None
    assert joining.add(part(2, 3)) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"part": 0, "count": 1, "data": "eA=="}, "count must be an integer >= 2"),
        ({"part": 2, "count": 2, "data": "eA=="}, "index must be an integer from 0 to 1"),
        ({"part": -1, "count": 2, "data": "eA=="}, "index must be"),
        ({"part": True, "count": 2, "data": "eA=="}, "index must be"),
        ({"part": 0, "count": 2, "data": "!!"}, "not base64"),
        ({"part": 0, "count": 2, "data": ""}, "must be base64 text"),
        ({"part": 0, "count": 2, "data": "eA==", "result": {}}, "unknown key 'result'"),
    ],
)
def test_bad_parts_are_refused_with_the_reason(fields: dict[str, Any], message: str) -> None:
    data = json.dumps({"v": 1, "id": ID, **fields}).encode()
    with pytest.raises(BadPayload, match=message):
        remote.decode_answer_or_part(data)


def calling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: Callable[[str], list[bytes]]
) -> Any:
    """A calling link whose mesh answers each request with ``answer(its id)`` from node b."""
    config = parse(
        tmp_path, remote={"lab": {"node": NODE_B, "servers": "*"}}, mesh={"deadline": 0.5}
    )
    link = McpGateway(config).link
    assert link is not None

    async def mesh_send(node: str, topic: str, payload: bytes, *args: Any) -> None:
        for data in answer(remote.decode_request(payload).id):
            link.on_answer({"from": NODE_B, "data": base64.b64encode(data).decode()})

    monkeypatch.setattr(link, "_mesh_send", mesh_send)
    return link


def test_an_answer_in_parts_reaches_the_caller_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = big_answer()
    link = calling(tmp_path, monkeypatch, in_parts())

    async def scenario() -> None:
        got = await link.ask(link.remote["lab"], "scout", "call", server="s", tool="t")
        assert got.result == answer.result
        assert link.status()["assembling"] == 0

    asyncio.run(scenario())


def test_parts_that_never_complete_end_at_the_deadline_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = calling(tmp_path, monkeypatch, in_parts(keep=lambda p: [p[0], p[2]]))  # no part 1

    async def scenario() -> None:
        with pytest.raises(MCPError) as caught:
            await link.ask(link.remote["lab"], "scout", "call", server="s", tool="t")
        assert caught.value.code == TIMEOUT
        assert (link.status()["pending"], link.status()["assembling"]) == (0, 0)

    asyncio.run(scenario())


def test_parts_that_cannot_make_an_answer_are_an_error_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def miscounted(payloads: list[bytes]) -> list[bytes]:
        wrong = json.loads(payloads[1])
        wrong["count"] = 2  # disagrees with the first part's 4
        return [payloads[0], json.dumps(wrong).encode()]

    link = calling(tmp_path, monkeypatch, in_parts(keep=miscounted))

    async def scenario() -> None:
        got = await link.ask(link.remote["lab"], "scout", "call", server="s", tool="t")
        assert (got.result, got.code) == (None, INTERNAL_ERROR)
        assert f"node {NODE_B} sent an answer in parts keel cannot use" in got.message
        assert "disagree on their count (4 and 2)" in got.message
        assert (link.status()["pending"], link.status()["assembling"]) == (0, 0)

    asyncio.run(scenario())


def test_parts_over_the_callers_limit_are_an_error_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = calling(tmp_path, monkeypatch, in_parts(5 * PART_BYTES + 1000))  # 6 parts
    link.max_message = 2 * MIB  # this gateway takes at most 2 MiB

    async def scenario() -> None:
        got = await link.ask(link.remote["lab"], "scout", "call", server="s", tool="t")
        assert (got.result, got.code) == (None, INTERNAL_ERROR)
        assert "6 parts are more than an answer of at most 2,097,152 bytes has" in got.message
        assert link.status()["assembling"] == 0

    asyncio.run(scenario())


def test_the_largest_payload_fits_one_send_to_the_mesh_daemon() -> None:
    """A payload goes base64 in the JSON of the mesh's send verb: one control-socket line."""
    from keel.api import MAX_REQUEST

    assert remote.MAX_BYTES == MAX_PAYLOAD  # 960 KiB, the mesh's own bound
    send = {
        "verb": "send",
        "args": {
            "id": ID,
            "to": NODE_B,
            "topic": remote.ANSWER_TOPIC,
            "data": base64.b64encode(b"x" * remote.MAX_BYTES).decode(),
            "ttl": 3605.0,
            "as_agent": "a" * 64,
        },
    }
    assert len(json.dumps(send)) + 1 <= MAX_REQUEST
    with pytest.raises(BadPayload, match="more than one mesh message carries"):
        remote.encode(Answer(ID, {"text": "x" * remote.MAX_BYTES}))


def test_a_mesh_message_keel_cannot_read_is_dropped_without_stopping_the_reader(
    tmp_path: Path,
) -> None:
    _, link = hosting(tmp_path)

    async def scenario() -> None:
        link.on_request({"from": NODE_A, "agent": "scout", "data": "not base64!"})
        link.on_request({"agent": "scout", "data": ""})  # no sender
        assert link.status()["running"] == 0
        await link.close()

    asyncio.run(scenario())
