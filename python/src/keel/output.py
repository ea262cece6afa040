"""How the CLI prints: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def print_json(value: Any, *, stream: TextIO | None = None) -> None:
    """Pretty JSON with sorted keys (stable for diffs and scripts)."""
    out = stream or sys.stdout
    out.write(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def print_json_line(value: Any, *, stream: TextIO | None = None) -> None:
    """One compact JSON object per line (for streams such as ``tail --follow``)."""
    out = stream or sys.stdout
    out.write(json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n")
    out.flush()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; ``None`` prints as ``-``."""
    cells = [[str(h).upper() for h in headers]]
    cells += [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, stream: TextIO | None = None
) -> None:
    (stream or sys.stdout).write(format_table(headers, rows) + "\n")


def human_duration(seconds: float | None) -> str:
    """``3d4h``, ``5m12s``, ``0.4s``: two units at most."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
