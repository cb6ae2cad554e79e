"""The runtime protocol is the only way the server, run, report and the CLI reach a runtime:
they touch no private attribute of another module's objects, import no private name, and never
branch on a runtime's name; and every runtime class implements every protocol member.
Checked on the source (``ast``), nothing heavy is opened."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER = sorted((ROOT / "edgeia3" / "serve").glob("*.py"))
CLIENTS = SERVER + [ROOT / "edgeia3" / f for f in ("run.py", "report.py", "report_render.py", "inspect.py", "cli.py")]
RUNTIME_MODULES = ("torch_runtime", "onnx_runtime", "llama_runtime", "t5_llama", "t5_onnx", "web_runtime")
OWN = {"self", "cls"}  # a class's own private attributes are its business
RUNTIME_REFS = {"rt", "runtime"}  # how the server names its runtime (also as ``engine.rt``)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_runtime(node: ast.AST) -> bool:
    """``rt``, ``runtime``, ``x.rt``, ``x.runtime``."""
    return (isinstance(node, ast.Name) and node.id in RUNTIME_REFS) or (
        isinstance(node, ast.Attribute) and node.attr in RUNTIME_REFS)


def _runtime_name(node: ast.AST) -> bool:
    """``rt.name`` and the like, or ``getattr(rt, "name")``."""
    if isinstance(node, ast.Attribute):
        return node.attr == "name" and _is_runtime(node.value)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
            and len(node.args) >= 2 and _is_runtime(node.args[0])
            and isinstance(node.args[1], ast.Constant) and node.args[1].value == "name")


def violations(source: str, module: str = "edgeia3.serve.x") -> list[str]:
    """What in ``source`` reaches past the protocol (an empty list: nothing)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in OWN):
                out.append(f"{where}: private attribute .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            out.append(f"{where}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, ast.ImportFrom):
            out += [f"{where}: imports private {a.name}" for a in node.names if _private(a.name)]
            target = "." * node.level + (node.module or "")
            if "runtimes." in target and module.startswith("edgeia3.serve"):
                out.append(f"{where}: imports a runtime module ({target}); the server uses the protocol")
        elif isinstance(node, ast.Compare) and any(_runtime_name(n) for n in (node.left, *node.comparators)):
            out.append(f"{where}: branches on a runtime's name")
        elif isinstance(node, ast.Match) and _runtime_name(node.subject):
            out.append(f"{where}: branches on a runtime's name")
    return out


def test_the_checker_finds_each_kind_of_reach():
    bad = """
from edgeia3.converters.onnx.export import _np_activation_dtype
from ..runtimes.llama_runtime import LlamaCppRuntime
active = getattr(rt, "_active", None)
rt._serve_ia3_dtype = 1
engine._merged_name()
if engine.rt.name == "llama.cpp": pass
if runtime.name in ("onnxruntime-genai", "torch"): pass
match rt.name:
    case "torch": pass
"""
    found = violations(bad)
    assert len(found) == 8, found
    fine = """
from .requests import BASE
class E:
    def f(self, rt):
        self._tmp = rt.active
        print(f"the {rt.name} runtime")
        return path.name == "x.gguf"
"""
    assert violations(fine) == []


@pytest.mark.parametrize("path", CLIENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_clients_use_only_the_protocol(path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    assert violations(path.read_text(), module) == []


def _protocol_members() -> dict[str, bool]:
    """Protocol member -> whether it is a method or property (False: a plain annotated attribute)."""
    from edgeia3.runtimes import Runtime

    members = {n: False for n in Runtime.__annotations__}
    members.update({n: True for n, v in vars(Runtime).items()
                    if not n.startswith("_") and (callable(v) or isinstance(v, property))})
    return members


def _runtime_classes() -> list[type]:
    """Every class a runtime module defines that generates (a runtime), imported, not instantiated."""
    out = []
    for mod in RUNTIME_MODULES:
        m = importlib.import_module(f"edgeia3.runtimes.{mod}")
        out += [c for _, c in inspect.getmembers(m, inspect.isclass)
                if c.__module__ == m.__name__ and hasattr(c, "generate_ids")]
    return out


def test_every_runtime_class_implements_the_protocol():
    from edgeia3.runtimes import RuntimeBase

    members = _protocol_members()
    assert {"active", "merged", "load_adapter", "unload_adapter", "cannot_load", "close",
            "context_length", "vocab_size", "batch_decoder"} <= set(members)
    classes = _runtime_classes()
    assert {c.__name__ for c in classes} == {"TorchRuntime", "OnnxRuntime", "LlamaCppRuntime", "T5LlamaRuntime",
                                             "T5OnnxRuntime", "WebRuntime"}
    for cls in classes:
        assert issubclass(cls, RuntimeBase), cls
        annotated = set().union(*(getattr(k, "__annotations__", {}) for k in cls.__mro__))
        for member, behaviour in members.items():
            assert hasattr(cls, member) or member in annotated, f"{cls.__name__} lacks {member}"
            if behaviour:
                assert hasattr(cls, member), f"{cls.__name__} lacks {member}"
        for member in ("adapters", "close", "logits", "generate_ids", "prompt_ids", "detokenize", "describe"):
            assert getattr(cls, member) is not getattr(RuntimeBase, member, None), f"{cls.__name__}.{member}"


def test_runtimes_that_cannot_hot_load_say_why():
    """Without a model: the base class's answers, as the torch and T5 ONNX runtimes give them."""
    from edgeia3.prompts import ChatTemplates
    from edgeia3.runtimes import NotLoadable, RuntimeBase

    class Fixed(RuntimeBase):
        name = "fixed"
        adapters = ["a"]
        templates = ChatTemplates(None)

    rt = Fixed()
    assert rt.active is None and rt.merged is None and rt.batch_decoder is None
    assert "the fixed runtime cannot load adapters at run time" in rt.cannot_load()
    with pytest.raises(NotLoadable, match="cannot load adapters"):
        rt.load_adapter("b", ROOT, ROOT)
    with pytest.raises(NotLoadable, match="cannot unload adapters"):
        rt.unload_adapter("a")
    with pytest.raises(Exception, match="unknown adapter"):
        rt.unload_adapter("zz")


def test_one_adapter_name_rule():
    """Exports (ONNX, GGUF) and the server take the same names: 1-64 letters, digits, '.', '_', '-'
    starting with a letter or digit, and never the base model's name."""
    from edgeia3.adapter import check_adapter_name
    from edgeia3.errors import EdgeIA3Error

    for good in ("a", "A1", "my-adapter_v2.1", "x" * 64):
        check_adapter_name(good)
    for bad in ("", "-a", ".a", "a b", "a/b", "a\n", "x" * 65, "base", "BASE", 3):
        with pytest.raises(EdgeIA3Error):
            check_adapter_name(bad)
    for path in ("edgeia3/steps/onnx_export.py", "edgeia3/steps/gguf_export.py", "edgeia3/serve/hotload.py"):
        text = (ROOT / path).read_text()
        assert "adapter_name" in text and "[A-Za-z0-9][A-Za-z0-9" not in text, path
