"""safeswitch: switch the system configuration behind a health gate, roll back by itself.

Layers, from the bottom up:

- :mod:`~keel.safeswitch.machine`: the switch as a state machine (the
  transition table in one place) and the health gate; pure, clocked by its
  caller. :mod:`~keel.safeswitch.checks` judges what the checks answered, and
  :mod:`~keel.safeswitch.report` words what people read; both pure.
- :mod:`~keel.safeswitch.state` (the state file and the lock),
  :mod:`~keel.safeswitch.generations` (systems, the profile, GC roots),
  :mod:`~keel.safeswitch.runners` (the rollback timer and activations as
  transient systemd units or detached processes),
  :mod:`~keel.safeswitch.probing` (running the checks).
- :mod:`~keel.safeswitch.switcher` (the asyncio shell that obeys the machine),
  :mod:`~keel.safeswitch.rollback`, :mod:`~keel.safeswitch.views` (status and
  history), :mod:`~keel.safeswitch.rebuild` (``nix build`` first);
  :mod:`~keel.safeswitch.cli` is ``keel switch`` and ``keel rebuild``.

There is no safeswitch daemon: a switch is a command, and what must outlive
it (the timer, the activation) lives in systemd (docs/safeswitch.md says why).
"""
