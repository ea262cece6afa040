"""keel: a home for fleets of AI agents on a rented server.

Layers, from the bottom up:

- ``keel.<service>.core``: pure logic with no I/O (Merkle maths, the Noise
  handshake, the watch policy...). Bytes and events in, bytes and decisions out;
  clocks and randomness are parameters.
- ``keel.<service>.daemon``: the asyncio shell that feeds a core from sockets,
  timers, systemd and the kernel and carries out its decisions.
- ``keel.<service>.cli``: the ``keel <service> ...`` subcommands.

Shared by all of them: ``keel.config`` (validated JSON configs), ``keel.api``
(the local control socket), ``keel.sd`` (systemd notify and logging),
``keel.paths`` (default locations), ``keel.errors`` (what can go wrong).
"""

__version__ = "0.1.0"
