"""Agents and their trust tiers.

- :mod:`keel.agents.spec`: the JSON agent spec (``docs/agents.md``), validated.
- :mod:`keel.agents.units`: the systemd unit of an agent, rendered from its spec
  and ``tiers.json`` alone.
- :mod:`keel.agents.install`: users, units and specs written onto a plain
  systemd host, idempotently.
- :mod:`keel.agents.cli`: ``keel agents render-unit | install | list``.
"""
