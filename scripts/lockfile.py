"""Helpers for scripts/drift.sh: the lock (requirements/lock.txt) against a fresh install.

    python scripts/lockfile.py diff LOCK FREEZE     # which packages moved
    python scripts/lockfile.py broken JUNIT_XML     # which tests broke
    python scripts/lockfile.py write FREEZE LOCK    # FREEZE (+ this pip) as the new lock
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from datetime import date
from importlib.metadata import version
from pathlib import Path

HEADER = """\
# The versions the edgeia3 test suite last passed with (pip constraints).
# scripts/setup.sh installs with `-c requirements/lock.txt`, so the README's commands and CI
# get exactly these. Refresh: ./scripts/drift.sh --update-lock (installs the newest releases
# into a throwaway venv, runs the suite, rewrites this file only if it passed).
# torch is the CPU build where one is on the machine (a `+cpu` local version satisfies ==).
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str | Path) -> dict[str, str]:
    """name -> version of every `name==version` line (local labels such as +cpu dropped)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#+]+)", line.strip())
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def diff(lock: str, freeze: str) -> None:
    old, new = read_pins(lock), read_pins(freeze)
    moved = [(n, old[n], new[n]) for n in sorted(old.keys() & new.keys()) if old[n] != new[n]]
    added = sorted(new.keys() - old.keys())
    gone = sorted(old.keys() - new.keys() - {"pip"})
    print(f"packages moved since the lock: {len(moved)}")
    for name, a, b in moved:
        print(f"  {name}: {a} -> {b}")
    for name in added:
        print(f"  {name}: new ({new[name]})")
    for name in gone:
        print(f"  {name}: no longer installed (was {old[name]})")


def broken(junit: str) -> None:
    if not Path(junit).exists():
        print("no test report (the suite did not run)")
        return
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                msg = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
                failed.append(f"  {case.get('classname')}::{case.get('name')} ({kind}): {msg}")
    print(f"tests broken on the newest releases: {len(failed)}")
    print("\n".join(failed))


def write(freeze: str, lock: str) -> None:
    pins = {**read_pins(freeze), "pip": version("pip")}
    names = sorted(pins)
    body = "".join(f"{n}=={pins[n]}\n" for n in names)
    Path(lock).write_text(HEADER + f"# Locked on {date.today().isoformat()}.\n" + body)
    print(f"wrote {lock} ({len(names)} packages)")


if __name__ == "__main__":
    commands = {"diff": diff, "broken": broken, "write": write}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
