"""keel mesh: encrypted peer-to-peer messaging between keel hosts.

Three layers; each imports only from the ones below it
(``docs/architecture.md`` draws them, ``docs/mesh-protocol.md`` is the wire):

- **Pure cores** (no sockets, files or clocks of their own): names
  (``ids``, ``encoding``), the secure channel (``kem``, ``noise``,
  ``identity``, ``framing``, ``session``, ``invite``), the application layer
  (``packets``, ``membership``, ``rooms``, ``hello``), and the node's
  decisions: ``admission`` (whom to let in), ``inbound`` (a peer's batch),
  ``handoffs`` (who holds which received message), ``delivery`` (the
  outbox), ``dialing``, ``intake``, ``access``, ``arguments`` and ``verbs``
  (the control requests), ``local`` (the agents' binary stream), ``audit``
  (message metadata, batched into ledger entries).
- **The node** (asyncio, on ``keel.service``): ``node`` composes
  ``peer_link`` (a connection), ``links``, ``listener``, ``members``,
  ``outbound``, ``inbox``, ``audit_log``, ``agent_streams``, ``control``; ``store`` and
  ``directory`` are its disk; ``config`` reads ``mesh.json``; ``serve`` is
  ``keel mesh serve``.
- **Clients**: ``client`` (agents' Python API; no cryptography) and
  ``cli`` (``keel mesh ...``).
"""
