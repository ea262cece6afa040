"""keel fleet: every keel host of the mesh in one view, commands across hosts, one audit record.

Layers (docs/fleet.md tells the operator's side):

- pure cores: :mod:`~keel.fleet.cosign` (C2SP tlog-cosignature v1),
  :mod:`~keel.fleet.witness` (cosign or raise an alarm),
  :mod:`~keel.fleet.audit` (every node against what the others hold),
  :mod:`~keel.fleet.status` (a node's report, the fleet view),
  :mod:`~keel.fleet.control` (who may command what),
  :mod:`~keel.fleet.rollout` (the rolling switch's plan),
  :mod:`~keel.fleet.protocol` (the messages between nodes);
- the shell: :mod:`~keel.fleet.daemon` on :mod:`keel.service`, reaching other
  nodes only through the mesh's public client (:mod:`~keel.fleet.link`),
  speaking for its own node (:mod:`~keel.fleet.local`), witnessing and
  auditing (:mod:`~keel.fleet.witnessing`), running rollouts
  (:mod:`~keel.fleet.rollouts`) and this node's switches
  (:mod:`~keel.fleet.switching`), keeping its state in :mod:`~keel.fleet.store`;
- :mod:`~keel.fleet.cli`: ``keel fleet ...``.
"""
