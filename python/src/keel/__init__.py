"""keel: a home for fleets of AI agents on a rented server.

Layers, from the bottom up (docs/architecture.md draws the house):

- pure cores, with no I/O: Merkle maths and checkpoints (``keel.ledger.core``),
  the Noise handshake and mesh packets (``keel.mesh.noise``, ``packets``...),
  the watch policy (``keel.watch.policy``). Bytes and events in, bytes and
  decisions out; clocks and randomness are parameters (``keel.testing`` has a
  fake clock).
- daemon shells: each service's asyncio code that feeds its core from
  sockets, timers, systemd and the kernel, started and stopped by the one
  service shell, ``keel.service``, and recording through
  ``keel.ledger.recorder``.
- ``keel.<service>.cli``: the ``keel <service> ...`` subcommands.

Shared by all of them: ``keel.config`` (validated JSON), ``keel.api`` (the
local control socket and its client), ``keel.sd`` (systemd notify and
logging), ``keel.paths`` (default locations), ``keel.errors`` (what can go
wrong), ``keel.agents.identity`` (which agent is calling).
"""

__version__ = "0.1.0"
