"""The house rules that keep the code readable: every module sits in one layer and imports
only its own layer or the layers below it (lazy imports inside functions included), there
are no import cycles, no module uses another module's private (``_name``) names, and the
installed package list covers every folder.

The layers, lowest first (docs/ARCHITECTURE.md draws them):

- core: the canonical adapter, registry, base identity, token contract, errors, atomic
  writes, manifest, deployed weights, chat templates;
- formats: reading and writing adapters and bases in each format (PEFT dir, GGUF, ONNX,
  web) and validating an adapter against anything with a base's shape;
- steps: base loading, train, merge, export, run, report, inspect, serve and the runtimes;
- cli: the typer CLI and the package facade.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed module name -> folder (converters/ installs as edgeia3.converters).
FOLDERS = {"edgeia3": ROOT / "edgeia3", "edgeia3.converters": ROOT / "converters"}


def _names(prefix: str, *mods: str) -> set[str]:
    return {f"{prefix}.{m}" if m else prefix for m in mods}


# Every module, by layer (lowest first). A new module is assigned here or the test fails.
LAYERS: dict[str, set[str]] = {
    "core": _names("edgeia3", "errors", "atomic", "adapter", "fingerprint", "manifest", "tokens", "weights",
                   "prompts", "registry", "registry.base", "registry.builtin", "registry.gguf_hparams",
                   "registry.onnx_config"),
    "formats": _names("edgeia3", "formats", "formats.peft_dir", "validate", "converters")
    | _names("edgeia3.converters.gguf", "", "adapter_file", "base_gguf", "blocks", "decompose", "file_types",
             "ggml_index", "hf_writer", "llama_vocab", "merge", "plan", "quant_types", "quantize", "to_hf",
             "torch_weights", "unigram", "vocab")
    | _names("edgeia3.converters.onnx", "", "adapter_file", "builder", "graph", "mobile", "t5", "transcode",
             "web"),
    "steps": _names("edgeia3", "base", "embedded", "npm", "train", "tasks", "data", "evaluate", "progress",
                    "schedule", "seq2seq", "merge", "peft_model", "export", "run", "report", "report_render",
                    "inspect", "web")
    | _names("edgeia3.steps", "", "gguf_export", "gguf_merge", "onnx_export", "t5_export")
    | _names("edgeia3.runtimes", "", "base_runtime", "batch_rows", "llama_batch", "llama_runtime", "onnx_adapters",
             "onnx_batch", "onnx_runtime", "t5_llama", "t5_onnx", "torch_runtime", "web_runtime")
    | _names("edgeia3.serve", "", "api", "batching", "bodies", "engine", "hotload", "metrics", "requests",
             "security"),
    "cli": _names("edgeia3", "", "__main__", "cli"),
}
# (importer, imported) pairs allowed to point upward, each with the reason. Keep it empty.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
# (importer, "module._name") private names used from another module, each with the reason. Keep it empty.
KNOWN_PRIVATE: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for prefix, folder in FOLDERS.items():
        for p in folder.rglob("*.py"):
            parts = p.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join((prefix, *parts))] = p
    return mods


def _package(name: str, is_pkg: bool) -> str:
    return name if is_pkg else name.rpartition(".")[0]


def _owner(dotted: str, mods: set[str] | dict) -> str:
    """The longest prefix of ``dotted`` that is a project module ("" if none)."""
    while dotted and dotted not in mods:
        dotted = dotted.rpartition(".")[0]
    return dotted


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return base and f"{base}.{node.attr}"
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _scan(name: str, source: str, is_pkg: bool, mods: set[str] | dict) -> tuple[set[str], set[str]]:
    """(project modules ``name`` imports anywhere in its body, lazy imports included;
    "module._name" private names of other modules it imports or reads)."""
    imports, private = set(), set()
    bound: dict[str, str] = {}  # local name -> project module it names
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = _package(name, is_pkg).split(".")
                pkg = pkg[: len(pkg) - (node.level - 1)]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            imports.add(_owner(mod, mods))
            for a in node.names:
                full = f"{mod}.{a.name}"
                if full in mods:
                    imports.add(full)
                    bound[a.asname or a.name] = full
                elif _private(a.name) and _owner(mod, mods):
                    private.add(f"{_owner(mod, mods)}.{a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                imports.add(_owner(a.name, mods))
                if a.asname and a.name in mods:
                    bound[a.asname] = a.name
                elif not a.asname and a.name.split(".")[0] in mods:
                    bound[a.name.split(".")[0]] = a.name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            dotted = _dotted(node.value)
            if dotted and dotted.split(".")[0] in bound:
                full = ".".join([bound[dotted.split(".")[0]], *dotted.split(".")[1:]])
                if full in mods:
                    private.add(f"{full}.{node.attr}")
    # a package's own parents are not edges (importing a submodule runs them anyway)
    imports = {m for m in imports if m and m != name and not name.startswith(m + ".")}
    private = {p for p in private if p.rpartition(".")[0] != name}
    return imports, private


def _scan_all() -> dict[str, tuple[set[str], set[str]]]:
    mods = _modules()
    return {m: _scan(m, p.read_text(), p.name == "__init__.py", mods) for m, p in mods.items()}


def _graph() -> dict[str, set[str]]:
    return {m: imports for m, (imports, _) in _scan_all().items()}


def _layer_of() -> dict[str, int]:
    return {m: rank for rank, mods in enumerate(LAYERS.values()) for m in mods}


def _upward(graph: dict[str, set[str]], layer: dict[str, int]) -> list[str]:
    """Every import of a higher layer (a module with no layer fails its own test)."""
    names = list(LAYERS)
    return sorted(f"{m} ({names[layer[m]]}) imports {d} ({names[layer[d]]})"
                  for m, deps in graph.items() for d in deps
                  if m in layer and d in layer and layer[d] > layer[m] and (m, d) not in KNOWN_UPWARD)


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


def test_every_module_has_exactly_one_layer():
    mods = set(_modules())
    assert len(mods) > 50  # the scan found the library, not an empty folder
    assigned = [m for mods_ in LAYERS.values() for m in mods_]
    assert len(assigned) == len(set(assigned)), "a module is listed in two layers"
    unassigned = sorted(mods - set(assigned))
    assert not unassigned, f"modules with no layer (add each to LAYERS): {unassigned}"


def test_no_upward_imports():
    assert _upward(_graph(), _layer_of()) == []


def test_no_import_cycles():
    g = _graph()
    assert len(g) > 50
    assert _cycles(g) == []


def test_no_private_names_across_modules():
    found = sorted(f"{m} uses {p}" for m, (_, private) in _scan_all().items() for p in private
                   if (m, p) not in KNOWN_PRIVATE)
    assert found == []


def test_cycle_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


MODS = {"edgeia3": 0, "edgeia3.base": 0, "edgeia3.fingerprint": 0, "edgeia3.converters": 0,
        "edgeia3.converters.gguf": 0, "edgeia3.converters.gguf.plan": 0, "edgeia3.converters.gguf.blocks": 0}


@pytest.mark.parametrize("source, imports", [
    ("from edgeia3.base import load_base", {"edgeia3.base"}),
    ("def f():\n    from edgeia3.base import load_base", {"edgeia3.base"}),  # lazy
    ("from ... import base", {"edgeia3.base"}),
    ("import edgeia3.base as b", {"edgeia3.base"}),
    ("from .blocks import row_fields", {"edgeia3.converters.gguf.blocks"}),
])
def test_import_scan_finds_every_form(source, imports):
    assert _scan("edgeia3.converters.gguf.plan", source, False, MODS)[0] == imports


def test_layer_check_finds_an_upward_import():
    graph = {m: set() for m in _layer_of()}
    graph["edgeia3.converters.gguf.plan"] = {"edgeia3.base"}  # formats -> steps
    assert _upward(graph, _layer_of()) == ["edgeia3.converters.gguf.plan (formats) imports edgeia3.base (steps)"]


@pytest.mark.parametrize("source, private", [
    ("from edgeia3.fingerprint import _content", {"edgeia3.fingerprint._content"}),
    ("def f():\n    from edgeia3 import fingerprint\n    return fingerprint._content", {"edgeia3.fingerprint._content"}),
    ("import edgeia3.fingerprint as fp\nfp._content(1)", {"edgeia3.fingerprint._content"}),
    ("import edgeia3.fingerprint\nedgeia3.fingerprint._content(1)", {"edgeia3.fingerprint._content"}),
    ("from .blocks import _field", {"edgeia3.converters.gguf.blocks._field"}),  # the same package too
    ("from . import blocks\nblocks._field", {"edgeia3.converters.gguf.blocks._field"}),
    ("_local = 1\nclass A:\n    _x = 1\nA._x", set()),  # its own private names
    ("from edgeia3.fingerprint import __doc__, content_hash", set()),
])
def test_private_scan_finds_every_form(source, private):
    assert _scan("edgeia3.converters.gguf.plan", source, False, MODS)[1] == private


def test_installed_packages_cover_every_folder():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert listed == on_disk
    assert cfg["package-dir"]["edgeia3.converters"] == "converters"
    import edgeia3.converters.gguf.decompose as mod  # the mapping works in this environment

    assert Path(mod.__file__).resolve().parent == ROOT / "converters" / "gguf"
