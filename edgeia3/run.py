"""Run step: open a model artifact once, answer prompts, switch adapters."""

from __future__ import annotations

from pathlib import Path

from .runtimes import Runtime, generate, open_runtime


def run(model: str | Path, prompt: str, adapter: str | None = None, max_tokens: int = 64,
        chat: bool = True, adapters: dict[str, str] | None = None) -> str:
    """Answer one prompt on ``model`` with ``adapter`` active (None: the base).

    ``adapters`` maps names to adapter paths for runtimes that take them at
    open time (a transformers base); exports carry their adapters inside.
    """
    rt: Runtime = open_runtime(model, adapters=adapters)
    rt.use_adapter(adapter)
    message = [{"role": "user", "content": prompt}] if chat else prompt
    return generate(rt, message, max_tokens=max_tokens)
