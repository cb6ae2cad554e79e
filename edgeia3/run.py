"""Run step: open a model artifact once, answer prompts, switch adapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .runtimes import Runtime, generate, open_runtime


@dataclass
class RunResult:
    text: str
    runtime: str  # torch | onnxruntime-genai | llama.cpp
    adapter: str | None
    how: str  # how the adapter is applied (side inputs, in-place swap, reload, ...)


def describe_swap(rt: Runtime) -> str:
    """How this runtime applies adapters, in words."""
    return rt.describe()


def run(model: str | Path, prompt: str, adapter: str | None = None, max_tokens: int = 64,
        chat: bool = True, adapters: dict[str, str] | None = None) -> RunResult:
    """Answer one prompt on ``model`` with ``adapter`` active (None: the base).

    ``adapters`` maps names to adapter paths for runtimes that take them at
    open time (a transformers base); exports carry their adapters inside.
    """
    rt: Runtime = open_runtime(model, adapters=adapters)
    try:
        rt.use_adapter(adapter)
        message = [{"role": "user", "content": prompt}] if chat else prompt
        text = generate(rt, message, max_tokens=max_tokens)
        return RunResult(text, rt.name, adapter, rt.describe())
    finally:
        rt.close()
