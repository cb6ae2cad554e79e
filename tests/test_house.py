"""House rule: no function in the library (edgeia3/ and converters/) is longer than MAX_LINES.

A long function is split by concern (setup / loop / report; match / rewrite), and a mode switch
repeated through one (decoder-only vs encoder-decoder) becomes a strategy chosen once
(``edgeia3.tasks``). Length: from the ``def`` line to the function's last line, docstring
included, decorators not; nested functions count inside their parent and on their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("edgeia3", "converters")
MAX_LINES = 80


def _functions(source: str, where: str = "") -> dict[str, int]:
    """``where::qualified name`` -> length in lines, for every function and method in ``source``."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out[f"{where}::{name}"] = child.end_lineno - child.lineno + 1
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def _library() -> dict[str, int]:
    out: dict[str, int] = {}
    for folder in FOLDERS:
        for p in sorted((ROOT / folder).rglob("*.py")):
            out.update(_functions(p.read_text(encoding="utf-8"), p.relative_to(ROOT).as_posix()))
    return out


def test_no_library_function_is_over_the_limit():
    funcs = _library()
    assert len(funcs) > 500  # the scan found the library, not an empty folder
    long = {name: n for name, n in funcs.items() if n > MAX_LINES}
    assert not long, (f"functions over {MAX_LINES} lines (split them by concern): "
                      + ", ".join(f"{name} ({n})" for name, n in sorted(long.items(), key=lambda x: -x[1])))


def test_lengths_are_measured_per_function_and_method():
    body = "\n".join(f"    x = {i}" for i in range(MAX_LINES))
    source = f"@decorator\ndef long():\n{body}\n\nclass C:\n    def short(self):\n        def inner():\n" \
             "            pass\n        return inner\n"
    assert _functions(source, "m.py") == {"m.py::long": MAX_LINES + 1, "m.py::C.short": 4,
                                          "m.py::C.short.inner": 2}
