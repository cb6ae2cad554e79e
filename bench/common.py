"""Shared helpers for the bench scripts: machine description and tables."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable


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


def timed(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> dict:
    """Median / min / max seconds of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def table(rows: list[dict]) -> str:
    """A Markdown table from a list of same-keyed dicts."""
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(out)
