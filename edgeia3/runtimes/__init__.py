"""Runtimes behind one small protocol, so torch, onnxruntime(-genai) and
llama.cpp are interchangeable in tests, the CLI and reports.

A runtime is opened once on an artifact (a transformers dir, an ONNX export,
a GGUF export) and then serves requests; ``use_adapter`` switches the active
IA3 adapter between requests without reloading the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

from ..errors import EdgeIA3Error
from ..prompts import ChatTemplates, resolve_template
from ..tokens import TokenContract


@runtime_checkable
class Runtime(Protocol):
    name: str  # e.g. "torch", "onnxruntime-genai", "llama.cpp"
    templates: ChatTemplates  # which chat template renders chat for which adapter (edgeia3.prompts)

    @property
    def adapters(self) -> list[str]: ...

    @property
    def context_length(self) -> int:
        """The most tokens (prompt + answer; a T5 source) one sequence may hold here."""

    @property
    def vocab_size(self) -> int:
        """Token ids valid here lie in [0, vocab_size)."""

    @property
    def tokens(self) -> TokenContract:
        """The special tokens this runtime's tokenization puts around a text (edgeia3.tokens)."""

    def use_adapter(self, name: str | None) -> None:
        """Activate adapter ``name`` for the next requests (None: the base model)."""

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        """Token ids of a plain-text prompt, or of chat messages rendered with the
        active adapter's chat template (``templates``: given > recorded > the artifact's)."""

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64,
                     ignore_eos: bool = False) -> Iterator[int]:
        """Greedy decoding, yielding each new token id as soon as it exists; stops
        at end-of-sequence unless ``ignore_eos`` (used to time a fixed number of
        tokens). Streaming makes TTFT and tok/s measurable."""

    def detokenize(self, ids: list[int]) -> str: ...

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Next-token logits at every position of ``token_ids``: [len, vocab] float32.
        Encoder-decoder runtimes (T5) take ``token_ids`` as the source and an optional
        ``target_ids``, and give the decoder's rows: after its start token, then each target token."""

    def describe(self) -> str:
        """How this runtime applies adapters, in words (e.g. in-place swap, side inputs)."""

    def close(self) -> None:
        """Release the model (files, sessions); the runtime is unusable afterwards."""


def generate(rt: Runtime, prompt: str | list[dict], max_tokens: int = 64) -> str:
    """Greedy completion of ``prompt`` as text, on any runtime."""
    return rt.detokenize(list(rt.generate_ids(rt.prompt_ids(prompt), max_tokens)))


def prompt_ids_for(rt: Runtime, prompt: str | list[dict], adapter: str | None) -> list[int]:
    """``rt.prompt_ids`` as it will be once ``adapter`` is active (the server tokenizes
    a request before swapping to its adapter)."""
    if not isinstance(prompt, str):
        prompt = rt.templates.render(prompt, adapter)
    return rt.prompt_ids(prompt)


# Openers tried in order: (can_open(path) -> bool, open(path, adapters, provider) -> Runtime).
# Each opener refuses options its runtime cannot honour instead of ignoring them.


def refuse_options(path: Path, runtime: str, options: dict) -> None:
    if options:
        raise EdgeIA3Error(f"{path}: the {runtime} runtime takes no option(s) {', '.join(sorted(options))}")
_OPENERS: list[tuple] = []


def register_runtime(can_open, opener) -> None:
    _OPENERS.append((can_open, opener))


def open_runtime(path: str | Path, adapters: dict[str, str | Path] | None = None,
                 provider: str | None = None, chat_template: str | Path | None = None, **options) -> Runtime:
    """Open the runtime that fits the artifact at ``path`` (an export: by its manifest's kind).

    ``adapters``: NAME -> adapter path to attach at open time (transformers dirs and
    GGUF; an ONNX export carries its own). ``provider``: onnxruntime execution provider.
    ``chat_template``: "chatml" or a Jinja file rendering chat for every adapter (None: each
    adapter's recorded template, else the artifact's own).
    ``options``: runtime-specific (llama.cpp: n_ctx, n_threads, n_gpu_layers, swap);
    a runtime refuses options it does not know.
    """
    from . import torch_runtime  # noqa: F401  (registers itself; others register on import)

    given = resolve_template(chat_template)  # a bad name/file fails before any loading
    _import_optional_runtimes()
    path = Path(path)
    if not path.exists():
        raise EdgeIA3Error(f"model not found: {path}")
    for can_open, opener in _OPENERS:
        if can_open(path):
            rt = opener(path, adapters=adapters, provider=provider, **options)
            rt.templates.given = given
            return rt
    raise EdgeIA3Error(f"{path}: not a model edgeia3 can run (transformers dir, ONNX or GGUF export)")


def _import_optional_runtimes() -> None:
    import importlib

    for mod in ("onnx_runtime", "llama_runtime", "t5_llama", "t5_onnx"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(__name__):
                continue  # that runtime is not part of this build yet
            raise
