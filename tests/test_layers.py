"""The house rules that keep the code readable: layers import in one direction,
there are no import cycles, and the installed package list covers every folder."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Installed module name -> folder (converters/ installs as edgeia3.converters).
FOLDERS = {"edgeia3": ROOT / "edgeia3", "edgeia3.converters": ROOT / "converters"}
CORE = {"edgeia3.errors", "edgeia3.atomic", "edgeia3.registry", "edgeia3.registry.base",
        "edgeia3.registry.builtin", "edgeia3.registry.gguf_hparams", "edgeia3.registry.onnx_config",
        "edgeia3.adapter", "edgeia3.fingerprint", "edgeia3.manifest"}


def _modules() -> dict[str, Path]:
    mods = {}
    for prefix, folder in FOLDERS.items():
        for p in folder.rglob("*.py"):
            parts = p.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join((prefix, *parts))] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports anywhere in its body (lazy imports included)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            cands = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        for c in cands:
            while c and c not in mods:
                c = c.rpartition(".")[0]
            # a package's own parents are not edges (importing a submodule runs them anyway)
            if c and c != name and not name.startswith(c + "."):
                out.add(c)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    g = _graph()
    assert len(g) > 50  # the scan found the library, not an empty folder
    assert _cycles(g) == []


def test_cycle_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_imports_nothing_above_it():
    g = _graph()
    for mod in CORE:
        above = {d for d in g[mod] if d not in CORE}
        assert not above, f"{mod} (core) imports {above}"


def test_converters_never_import_steps_or_cli():
    steps = {"edgeia3.train", "edgeia3.export", "edgeia3.report", "edgeia3.cli", "edgeia3.inspect",
             "edgeia3.serve", "edgeia3.run"}
    for mod, deps in _graph().items():
        if mod.startswith("edgeia3.converters"):
            bad = {d for d in deps if d in steps or any(d.startswith(s + ".") for s in steps)}
            assert not bad, f"{mod} imports steps {bad}"


def test_installed_packages_cover_every_folder():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert listed == on_disk
    assert cfg["package-dir"]["edgeia3.converters"] == "converters"
    import edgeia3.converters.gguf.decompose as mod  # the mapping works in this environment

    assert Path(mod.__file__).resolve().parent == ROOT / "converters" / "gguf"
