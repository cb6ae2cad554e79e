"""Runtimes behind one small protocol, so torch, onnxruntime(-genai) and
llama.cpp are interchangeable in tests, the CLI and reports.

A runtime is opened once on an artifact (a transformers dir, an ONNX export,
a GGUF export) and then serves requests; ``use_adapter`` switches the active
IA3 adapter between requests without reloading the base, ``load_adapter`` /
``unload_adapter`` change the set while it runs (where ``cannot_load`` says
nothing against it). The protocol is all its clients (run, report, the CLI, the
server) use; ``RuntimeBase`` (``base_runtime``) holds what runtimes share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from ..errors import EdgeIA3Error
from ..prompts import ChatTemplates, resolve_template
from ..tokens import TokenContract
from .base_runtime import NotLoadable, PreparedAdapter, RuntimeBase, adapter_format

__all__ = ["NotLoadable", "PreparedAdapter", "Runtime", "RuntimeBase", "adapter_format", "generate", "open_runtime",
           "prompt_ids_for", "refuse_options", "register_runtime"]


@runtime_checkable
class Runtime(Protocol):
    name: str  # e.g. "torch", "onnxruntime-genai", "llama.cpp"; for people (messages, metrics), never to branch on
    templates: ChatTemplates  # which chat template renders chat for which adapter (edgeia3.prompts)
    # Greedy decoding of up to N requests at once, each with its own KV cache (``batch_decoder(N)``:
    # ONNX exports, each row with its own adapter, see ``onnx_batch``; GGUF exports, rows with the
    # active adapter - the decoder's ``one_adapter`` -, see ``llama_batch``); None: one request at a time.
    batch_decoder: Callable[[int], Any] | None
    # The last finished ``generate_ids`` timed by the runtime's own clock ({"ttft_s", "decode_tok_s"}),
    # where the times tokens reach the caller are not when they were made (the web runtime polls the
    # page, so several tokens can arrive at once); None: the arrival times are the timing.
    last_timing: dict | None

    @property
    def adapters(self) -> list[str]:
        """The adapters ``use_adapter`` takes; the merged one (``merged``) is listed by the llama.cpp
        and T5 runtimes, not by onnxruntime-genai's."""

    @property
    def active(self) -> str | None:
        """The adapter the next request runs with (None: the base; a merged GGUF export: its merged adapter)."""

    @property
    def merged(self) -> str | None:
        """The adapter folded into this model's weights (None: none); it cannot be unloaded, and its
        name and None both run the weights as they are."""

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

    def cannot_load(self) -> str | None:
        """None if adapters can be loaded while this runtime runs, else why they cannot, as a
        sentence for the user (a merged export, an export without IA3 inputs, the torch runtime)."""

    def load_adapter(self, name: str, path: str | Path, workdir: str | Path) -> dict:
        """Validate the adapter at ``path`` - any form this runtime takes (canonical, PEFT dir,
        ``.ia3.gguf``; ONNX also ``.onnx_adapter``) - against this base exactly as the export steps do,
        and make it usable as ``name``. ``workdir``: where the runtime may keep its own copy (deleted
        on unload). Returns facts about it (sites, params, format[, note]). Raises ``NotLoadable``
        (``cannot_load``), or ``EdgeIA3Error`` for a bad name or adapter; a refused adapter leaves no trace."""

    def prepare_adapter(self, name: str, path: str | Path, workdir: str | Path) -> PreparedAdapter:
        """``load_adapter``'s reading and checking, callable from another thread while the runtime
        decodes; ``attach_prepared`` (on the decoding thread) then makes it usable."""

    def attach_prepared(self, prepared: PreparedAdapter) -> dict:
        """``load_adapter``'s quick second half: the prepared adapter becomes usable as its name."""

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (the base becomes active if it was) and any copy of it the runtime
        made. Raises ``NotLoadable`` for the merged adapter or a runtime that cannot unload."""

    def close(self) -> None:
        """Release the model (sessions, the llama.cpp context, its private working copy of the GGUF);
        idempotent; the runtime is unusable afterwards. Also on leaving a ``with`` block."""


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
    raise EdgeIA3Error(f"{path}: not a model edgeia3 can run (transformers dir, ONNX, GGUF or web export)")


def _import_optional_runtimes() -> None:
    import importlib

    for mod in ("onnx_runtime", "llama_runtime", "t5_llama", "t5_onnx", "web_runtime"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(__name__):
                continue  # that runtime is not part of this build yet
            raise
