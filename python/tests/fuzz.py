"""How many examples the property and fuzz tests run: bounded in ``make test``, deeper on demand.

``make test`` runs each fuzz test with the count its author chose (enough to
catch a regression in a few seconds). ``KEEL_FUZZ_EXAMPLES=N`` raises every
count that goes through :func:`examples` to at least N, for a long fuzzing
session (``KEEL_FUZZ_EXAMPLES=20000 make pytest PYTEST_ARGS=-k fuzz``); it
never lowers one.
"""

from __future__ import annotations

import os


def examples(default: int) -> int:
    """``default``, or ``KEEL_FUZZ_EXAMPLES`` when that asks for more."""
    raw = os.environ.get("KEEL_FUZZ_EXAMPLES", "").strip()
    if not raw:
        return default
    try:
        asked = int(raw)
    except ValueError:
        raise SystemExit(f"KEEL_FUZZ_EXAMPLES={raw!r}: expected a whole number") from None
    return max(default, asked)
