"""keel watch: per-agent supervision with health probes, back-off and alerts.

Layers, from the bottom up:

- ``policy``: the pure core. One :class:`~keel.watch.policy.AgentPolicy` per
  agent turns events (started, exited, probe results, the passing of time) into
  actions (start, stop, alert, record). No I/O; time is a parameter.
- ``alerting``: the pure core of alert delivery (rate limits, retry schedules,
  the Telegram and webhook request shapes); ``alerts`` drives it over HTTP.
- ``httpwire``: a small sans-I/O HTTP/1.1 reader and writer used by probes,
  alerts and the metrics endpoint.
- ``probes``: http, tcp and exec probe runners (asyncio, with timeouts).
- ``children`` and ``process_backend``: argv commands as process groups,
  death seen at once through pidfds. ``dbus`` and ``systemd_backend``: units
  started through systemd and followed through its D-Bus signals.
- ``daemon``: the asyncio shell that wires backends, probes, the policy,
  alerts, the ledger, metrics and the control socket together.
- ``cli``: ``keel watch serve|check-config|start|stop`` and ``keel status``.
"""
