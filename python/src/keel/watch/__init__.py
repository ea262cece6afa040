"""keel watch: per-agent supervision with health probes, back-off and alerts.

Pure cores (no I/O; time is a parameter), each tested on its own:

- ``policy``: one :class:`~keel.watch.policy.AgentPolicy` per agent turns
  events (started, exited, probe results, the passing of time) into actions
  (start, stop, hold, alert, record); its phases move as one table.
- ``unit_state``: what a systemd unit's state changes mean for one agent
  (started, exited, stopped by someone else) and which job to ask of systemd.
- ``alert_routes``: the routes (Telegram, webhooks), their wire format, rate
  limits and retry schedules.
- ``httpwire``: an HTTP/1.1 request writer and response reader.

Shells around them:

- ``daemon``: wires backends, probes, the policy, alerts, the ledger, metrics
  and the control verbs together, on :mod:`keel.service`.
- ``systemd_backend`` (over ``dbus``): agents as units, followed through
  systemd's signals. ``process_backend`` (over ``children`` and ``scopes``):
  agents as commands, watched through pidfds, each in a cgroup of its own when
  watch can have one.
- ``probes`` and ``probe_engine``: http, tcp and exec probes; plain-HTTP and
  TCP ones on one thread with one epoll. ``http_client``: one HTTP exchange
  over asyncio (alerts, https probes). ``alert_router``: a queue and a worker
  per route. ``metrics``: the Prometheus endpoint.
- ``cli``: ``keel watch serve|check-config|start|stop|restart`` and ``keel status``.
"""
