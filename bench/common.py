"""Shared helpers for the bench scripts: machine description, tables, prompt/completion rows."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


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


def prompt_row(row: dict) -> dict:
    """A chat row as a prompt/completion row: the system and user messages one per line, then
    ``Answer:``; the assistant's answer after a space."""
    *msgs, answer = row["messages"]
    return {"prompt": "\n".join(m["content"] for m in msgs) + "\nAnswer:", "completion": " " + answer["content"]}


def prompt_rows(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        rows = [prompt_row(json.loads(x)) for x in (src / f"{split}.jsonl").read_text().splitlines() if x.strip()]
        (dst / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst
