"""The sending daemon's path per 64 KiB message, in-process: SEND frame to sealed MSGS and ACK.

No sockets and no second daemon: an agent's SEND frames (16 messages each,
as ``MeshClient.sender`` makes them) are fed to a ``FrameReader`` in
256 KiB reads, decoded, checked (``Control._submit``), queued durably
(SQLite and the blob files, in a temporary directory under /dev/shm) and
sealed into ``MSGS`` packets on a session opened in-process, which a
transport that counts bytes takes; each frame's messages are then
acknowledged in two ACKs. Prints the CPU per message of each round. What
it leaves out (the kernel's socket copies, the event loop's waits) the
flood of ``run.py --bulk`` has.

Run: ``.venv/bin/python bench/mesh/sendpath.py [--count 4000] [--rounds 5] [--profile]``
(``KEEL_ROOT=<tree>``: that tree's keel).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

ROOT = os.environ.get("KEEL_ROOT", str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, ROOT + "/python/src")
sys.path.insert(0, ROOT + "/python")

from keel.agents.identity import Caller  # noqa: E402
from keel.mesh import local, packets  # noqa: E402
from keel.mesh.control import Control  # noqa: E402
from keel.mesh.delivery import Limits, Outbox  # noqa: E402
from keel.mesh.ids import new_message_id  # noqa: E402
from keel.mesh.outbound import Outbound  # noqa: E402
from keel.mesh.peer_link import PeerLink  # noqa: E402
from keel.mesh.store import Store  # noqa: E402
from tests.unit.mesh.conftest import open_pair, production_kem  # noqa: E402


class Transport:
    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.bytes += len(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class Events:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


class View:
    mesh_id = "m"

    def is_member(self, node: str) -> bool:
        return True


class Agents:
    def refuse_nodes(self, *a: object, **k: object) -> str | None:
        return None

    def refuse_topic(self, *a: object, **k: object) -> str | None:
        return None


PEER = "b" * 32
ME = "a" * 32


def frames(count: int, size: int, per: int) -> list[bytes]:
    out = []
    payload = os.urandom(size)
    for request, start in enumerate(range(0, count, per), 1):
        entries: list[bytes | memoryview] = []
        for _ in range(min(per, count - start)):
            entry = local.SendEntry(new_message_id(), PEER, "bulk", payload)
            entries += (local.send_entry_head(entry), payload)
        out.append(b"".join(local.encode_send_parts(request, entries)))
    return out


async def run(
    count: int, size: int, per: int, tmp: Path, prof: cProfile.Profile | None = None
) -> tuple[float, float]:
    clock = time.monotonic
    store = Store(tmp / "state.db", synchronous="NORMAL")
    outbox = Outbox(Limits(), clock=clock, wall=time.time)
    pair = open_pair(production_kem())
    link = PeerLink(Events(), pair.initiator, local_id=ME, clock=clock)
    link.transport = Transport()  # type: ignore[assignment]
    link.batching = link.agents = link.room_agents = True
    link.peer = PEER
    outbound = Outbound(
        store=store,
        outbox=outbox,
        links={PEER: link},
        me=ME,
        audit=None,
        clock=clock,
        wall=time.time,
    )
    outbox.connected(PEER)
    node = SimpleNamespace(
        settings=SimpleNamespace(agents=Agents(), default_ttl=86400.0),
        members=SimpleNamespace(view=View()),
        me=ME,
        wall=time.time,
        outbound=outbound,
    )
    control = Control(node)
    caller = Caller(1, 0, 0, None)
    data = frames(count, size, per)
    reader = local.FrameReader()
    step = 256 << 10
    loop = asyncio.get_running_loop()
    if prof is not None:
        prof.enable()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for raw in data:
        view = memoryview(raw)
        at = 0
        while at < len(raw):
            into = reader.buffer()
            n = min(len(into), len(raw) - at, step)
            into[:n] = view[at : at + n]
            reader.filled(n)
            at += n
        while (frame := reader.pop()) is not None:
            _kind, body = frame
            request, entries = local.decode_send(body)
            status, error = await control._submit(caller, entries)
            assert status == local.Status.QUEUED, error
            local.encode_sent(request, status, error)
            ids = tuple(e.id for e in entries)
            await asyncio.sleep(0)  # the link's flush
            half = len(ids) // 2
            outbound.answered(PEER, packets.Ack(ids[:half]))
            outbound.answered(PEER, packets.Ack(ids[half:]))
            loop.call_soon(lambda: None)
            await asyncio.sleep(0)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    if prof is not None:
        prof.disable()
    outbound.close()
    store.close()
    assert len(outbox) == 0
    return cpu / count * 1e6, wall / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--per", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    results = []
    for _ in range(args.rounds):
        tmp = Path(tempfile.mkdtemp(prefix="micro-", dir="/dev/shm"))
        try:
            if args.profile:
                prof = cProfile.Profile()
                results.append(asyncio.run(run(args.count, args.size, args.per, tmp, prof)))
                pstats.Stats(prof).sort_stats("tottime").print_stats(35)
            else:
                results.append(asyncio.run(run(args.count, args.size, args.per, tmp)))
        finally:
            shutil.rmtree(tmp)
    cpus = sorted(r[0] for r in results)
    print(
        f"{ROOT}: cpu us/msg min {cpus[0]:.1f} median {cpus[len(cpus) // 2]:.1f} all",
        " ".join(f"{c:.1f}" for c in cpus),
    )


if __name__ == "__main__":
    main()
