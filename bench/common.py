"""Shared helpers for the bench scripts: machine description and tables."""

from __future__ import annotations

import os
import platform
import sys


def machine() -> str:
    """CPU model, cores, Python (the same facts edgeia3 reports record)."""
    from edgeia3.report import machine as facts

    m = facts()
    return f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, {platform.system()} {platform.release()}"


def header(title: str) -> None:
    print(f"# {title}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"machine: {machine()}")
    print()


def table(rows: list[dict]) -> str:
    """A Markdown table from a list of same-keyed dicts."""
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(out)
