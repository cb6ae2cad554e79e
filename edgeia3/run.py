"""Run step: open a model artifact once, answer prompts, switch adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .prompts import NoChatTemplate
from .runtimes import Runtime, open_runtime


@dataclass
class RunResult:
    text: str
    runtime: str  # torch | onnxruntime-genai | llama.cpp
    adapter: str | None
    how: str  # how the adapter is applied (side inputs, in-place swap, reload, ...)
    prompt_ids: list[int] = field(default_factory=list)  # the prompt as the model saw it


def describe_swap(rt: Runtime) -> str:
    """How this runtime applies adapters, in words."""
    return rt.describe()


def run(model: str | Path, prompt: str, adapter: str | None = None, max_tokens: int = 64,
        chat: bool = True, adapters: dict[str, str] | None = None,
        chat_template: str | Path | None = None) -> RunResult:
    """Answer one prompt on ``model`` with ``adapter`` active (None: the base).

    ``adapters`` maps names to adapter paths for runtimes that take them at
    open time (a transformers base); exports carry their adapters inside.
    ``chat_template``: "chatml" or a Jinja file (None: the template the adapter
    was trained with, else the model's own).
    """
    rt: Runtime = open_runtime(model, adapters=adapters, chat_template=chat_template)
    try:
        rt.use_adapter(adapter)
        message = [{"role": "user", "content": prompt}] if chat else prompt
        try:
            ids = rt.prompt_ids(message)
        except NoChatTemplate as e:  # run can also send plain text
            raise NoChatTemplate(f"{e}, or send the prompt as plain text with --raw") from None
        text = rt.detokenize(list(rt.generate_ids(ids, max_tokens)))
        return RunResult(text, rt.name, adapter, rt.describe(), ids)
    finally:
        rt.close()
