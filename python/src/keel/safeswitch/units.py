"""safeswitch's units and polkit rule for a plain systemd host (``keel switch install-units``).

modules/safeswitch.nix declares the same on NixOS (tests/nix/test_safeswitch.py
holds the two to the same directives):

- ``keel-switch@.service``: a switch to a declared target asked for by someone
  who is not root (:mod:`keel.safeswitch.requests`); never restarted or
  stopped by the switch of the configuration it carries out;
- ``keel-safeswitch-reconcile.service``: at boot, records the switches a
  reboot interrupted (:mod:`keel.safeswitch.evidence`);
- ``60-keel-switch.rules``: lets the users named (keel chat's) *start*
  instances of ``keel-switch@.service``, and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from keel.safeswitch.requests import PREFIX, SUFFIX

TEMPLATE_UNIT = "keel-switch@.service"
RECONCILE_UNIT = "keel-safeswitch-reconcile.service"
POLKIT_RULE = "/etc/polkit-1/rules.d/60-keel-switch.rules"
# The unit names polkit lets through: the template's instances as systemd-escape writes them.
UNIT_PATTERN = (
    "^" + PREFIX.replace(".", "\\.") + "[A-Za-z0-9_.:\\\\]+" + SUFFIX.replace(".", "\\.") + "$"
)


def template_unit(keel: str, config: str | None = None) -> str:
    argv = [keel, "switch", "request", *(["--config", config] if config else []), "%i"]
    return "\n".join(
        [
            "# keel: a switch to a declared target, asked for by someone who is not root",
            "# (docs/safeswitch.md, 'Switching from elsewhere'). Rendered by",
            "# `keel switch install-units`.",
            "[Unit]",
            "Description=keel safeswitch: a switch to a declared target (request %i)",
            "After=keel-ledger-key.service",
            # The switch of the configuration it carries out must not stop or restart it
            # (as nixos-upgrade.service); it ends when safeswitch decides. Where NixOS
            # writes these two (systemd ignores X- keys; switch-to-configuration reads them).
            "X-StopOnRemoval=false",
            "",
            "[Service]",
            "X-RestartIfChanged=false",
            "Type=oneshot",
            # Unconfined root, as `keel switch` by hand: it runs switch-to-configuration.
            # safeswitch's deadline and its rollback timer bound it, not a start timeout.
            f"ExecStart={' '.join(argv)}",
            "TimeoutStartSec=infinity",
            "",
        ]
    )


def reconcile_unit(keel: str, config: str | None = None) -> str:
    argv = [keel, "switch", "reconcile", *(["--config", config] if config else [])]
    return "\n".join(
        [
            "# keel: record the switches a reboot interrupted. Rendered by",
            "# `keel switch install-units`.",
            "[Unit]",
            "Description=keel safeswitch: record the switches a reboot interrupted",
            "After=local-fs.target keel-ledger-key.service",
            "",
            "[Service]",
            "Type=oneshot",
            "RemainAfterExit=yes",
            f"ExecStart={' '.join(argv)}",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def polkit_rule(users: Sequence[str]) -> str:
    """The polkit rule: these users may start instances of keel-switch@.service, nothing more."""
    return "\n".join(
        [
            "// keel: the users below may *start* keel-switch@INSTANCE.service (a switch to a",
            "// target declared in safeswitch.json, checked again by root) and nothing else.",
            "// docs/safeswitch.md, 'Switching from elsewhere'.",
            "polkit.addRule(function (action, subject) {",
            '  if (action.id === "org.freedesktop.systemd1.manage-units" &&',
            f"      {json.dumps(sorted(set(users)), separators=(',', ':'))}"
            ".indexOf(subject.user) >= 0 &&",
            '      action.lookup("verb") === "start" &&',
            f'      /{UNIT_PATTERN}/.test(action.lookup("unit"))) {{',
            "    return polkit.Result.YES;",
            "  }",
            "});",
            "",
        ]
    )
