"""NATS JetStream, the durable baseline: one publishing and one consuming process.

``run.py`` starts ``nats-server -js`` (file storage) on the receiving host,
then ``jetstream.py recv`` next to it and ``jetstream.py send`` on the
sending host, as ``peer.py`` does for the other baselines. What is measured
is what a user picking durable messaging would get from JetStream with the
Python client (``nats-py``): the publisher waits for every publish
acknowledgement (``publish_async``, up to 4000 outstanding, then
``publish_async_completed``: the message is stored in the stream's file),
the consumer is a durable pull consumer with explicit acknowledgements
(each message acked). Each message starts with the sender's
``CLOCK_MONOTONIC`` in nanoseconds, as in ``peer.py``.

Modes: ``flood`` only (the throughput row); the receiver reports the time of
its first and last message and the one-way latencies under load. Each side
prints one JSON line. Needs ``nats-py`` (``pip install nats-py``) and a
``nats-server`` binary (Debian: ``apt-get install nats-server``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import struct
import sys
import time
from typing import Any

STAMP = struct.Struct(">Q")
STREAM = "KEELBENCH"


def payload(size: int) -> bytes:
    return STAMP.pack(time.monotonic_ns()) + b"\x5a" * (size - STAMP.size)


async def receive(args: argparse.Namespace) -> dict[str, Any]:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

    nc = await nats.connect(f"nats://{args.address}")
    js = nc.jetstream()
    subject = f"bench.{args.topic}"
    from nats.js.errors import NotFoundError

    with contextlib.suppress(NotFoundError):  # left by the previous size's run
        await js.delete_stream(STREAM)
    await js.add_stream(StreamConfig(name=STREAM, subjects=["bench.>"], storage=StorageType.FILE))
    durable = f"c{args.topic}"
    sub = await js.pull_subscribe(
        subject,
        durable=durable,
        stream=STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20000),
    )
    print("ready", flush=True)
    latencies: list[int] = []
    first = last = 0
    cpu = time.process_time()
    while len(latencies) < args.count:
        try:
            batch = await sub.fetch(batch=min(512, args.count - len(latencies)), timeout=10)
        except TimeoutError:
            raise RuntimeError(f"no message for 10 s after {len(latencies)}") from None
        for message in batch:
            now = time.monotonic_ns()
            first = first or now
            last = now
            latencies.append(now - STAMP.unpack_from(message.data)[0])
            await message.ack()
    await nc.flush()
    cpu = time.process_time() - cpu
    await nc.close()
    return {"first_ns": first, "last_ns": last, "latencies_ns": latencies, "cpu_s": cpu}


async def send(args: argparse.Namespace) -> dict[str, Any]:
    import nats

    nc = await nats.connect(f"nats://{args.address}")
    js = nc.jetstream(publish_async_max_pending=4000)
    subject = f"bench.{args.topic}"
    cpu = time.process_time()
    start = time.monotonic_ns()
    futures = [await js.publish_async(subject, payload(args.size)) for _ in range(args.count)]
    await js.publish_async_completed()
    failed = sum(1 for f in futures if f.exception() is not None)
    if failed:
        raise RuntimeError(f"{failed} publishes were not acknowledged")
    result = {"start_ns": start, "cpu_s": time.process_time() - cpu}
    await nc.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["send", "recv"])
    parser.add_argument("--address", required=True, help="the nats-server, HOST:PORT")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    result = asyncio.run(receive(args) if args.role == "recv" else send(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
