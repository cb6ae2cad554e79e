"""PyTorch runtime: a transformers model, with IA3 adapters through PEFT.

It is also the reference every other runtime is measured against: base +
adapter, unmerged, in fp32.

Encoder-decoder families (T5, ``Family.encoder_decoder``) follow the other T5 runtimes:
the prompt (plain text, or chat flattened by ``FLAT_CHAT`` unless the adapter recorded a
template) is the encoder's source with the tokenizer's EOS; ``logits`` gives the decoder's
rows after its start token (and after ``target_ids``); generation decodes from the start token.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..adapter import IA3Adapter
from ..base import LoadedBase, load_base
from ..errors import EdgeIA3Error
from ..formats.peft_dir import write_peft_dir
from ..manifest import MANIFEST
from ..prompts import FLAT_CHAT, ChatTemplates
from ..registry import decoder_start_token
from ..tokens import TokenContract, hf_encoder
from . import refuse_options, register_runtime
from .base_runtime import RuntimeBase


class TorchRuntime(RuntimeBase):
    """Adapters attach when the runtime opens; none load or unload while it runs (``cannot_load``)."""

    name = "torch"
    adapter_mechanism = "PEFT IA3 adapters on one loaded base (set_adapter, no reload)"

    def __init__(self, base: LoadedBase, adapters: dict[str, IA3Adapter] | None = None,
                 chat_template: str | None = None):
        """``chat_template``: template text for chat, for every adapter (None: each adapter's
        recorded one, else the tokenizer's own)."""
        import tempfile

        from peft import PeftModel

        self.base = base
        self.tokenizer = base.tokenizer
        self.seq2seq = base.family.encoder_decoder
        own = getattr(self.tokenizer, "chat_template", None) or (FLAT_CHAT if self.seq2seq else None)
        self.templates = ChatTemplates(own, chat_template)
        self._active: str | None = None
        self._names: list[str] = []
        self.model: Any = base.model
        for name, adapter in (adapters or {}).items():
            with tempfile.TemporaryDirectory() as tmp:
                write_peft_dir(adapter, tmp)
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(tmp, adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, tmp, adapter_name=name)
            self._names.append(name)
            self.templates.record(name, adapter)
        self.model.eval()

    def describe(self) -> str:
        return self.adapter_mechanism

    def close(self) -> None:
        self.model = None

    @property
    def adapters(self) -> list[str]:
        return list(self._names)

    @property
    def context_length(self) -> int:
        cfg = self.base.config  # T5 has none (relative positions): the 512 it was pre-trained with
        return int(getattr(cfg, "max_position_embeddings", None) or (512 if self.seq2seq else 2048))

    @property
    def vocab_size(self) -> int:
        return int(self.base.config.vocab_size)

    @property
    def tokens(self) -> TokenContract:
        return self.base.tokens

    def use_adapter(self, name: str | None) -> None:
        if name is not None and name not in self._names:
            raise EdgeIA3Error(f"unknown adapter '{name}' (loaded: {', '.join(self._names) or 'none'})")
        if name is not None:
            self.model.set_adapter(name)
        self._active = name

    def _context(self):
        if self._active is None and self._names:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise EdgeIA3Error("this model has no tokenizer; cannot encode text")
        if not isinstance(prompt, str):
            prompt = self.templates.render(prompt, self._active)
        return self.base.tokens.ids(hf_encoder(self.tokenizer), prompt)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def logits(self, token_ids: list[int], target_ids: list[int] | None = None) -> np.ndarray:
        """Next-token logits at every position; encoder-decoder: ``token_ids`` is the source and
        the rows are the decoder's, after its start token and each of ``target_ids``."""
        ids = torch.tensor([token_ids])
        kw = {"decoder_input_ids": torch.tensor([[self._start, *(target_ids or [])]])} if self.seq2seq else {}
        with torch.no_grad(), self._context():
            return self.model(input_ids=ids, **kw).logits[0].float().numpy()

    @property
    def _start(self) -> int:
        return decoder_start_token(self.base.model.config)

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64,
                     ignore_eos: bool = False) -> Iterator[int]:
        eos = set() if ignore_eos else set(_eos_ids(self.model.generation_config, self.tokenizer))
        ids = torch.tensor([prompt_ids])
        cache, kw = None, {}  # transformers >= 5.25 names the KV cache `cache` (in and out)
        if self.seq2seq:  # the source is encoded once (first step), then only the decoder runs
            kw, ids = {"input_ids": ids}, torch.tensor([[self._start]])
        with torch.no_grad(), self._context():
            for _ in range(max_tokens):
                if self.seq2seq:
                    out = self.model(decoder_input_ids=ids, cache=cache, use_cache=True, **kw)
                    kw = {"encoder_outputs": (out.encoder_last_hidden_state,)}
                else:
                    out = self.model(input_ids=ids, cache=cache, use_cache=True)
                cache = out.cache
                nxt = int(out.logits[0, -1].argmax())
                if nxt in eos:
                    return
                yield nxt
                ids = torch.tensor([[nxt]])


def _eos_ids(gen_config: Any, tokenizer: Any) -> list[int]:
    eos = getattr(gen_config, "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    return [e for e in eos if e is not None]


def _is_transformers_dir(path: Path) -> bool:
    # an export directory (its manifest names the runtime) may hold a config.json too (T5)
    return path.is_dir() and (path / "config.json").exists() and not (path / MANIFEST).exists()


def _open(path: Path, adapters: dict[str, Any] | None = None, provider: str | None = None,
          **options: Any) -> TorchRuntime:
    refuse_options(path, "torch", options)
    from ..validate import load_adapter_for

    if provider:
        raise EdgeIA3Error(f"{path}: --provider applies to ONNX exports; the torch runtime runs on the CPU/GPU torch sees")
    base = load_base(path)
    loaded = {name: load_adapter_for(p, base) for name, p in (adapters or {}).items()}
    return TorchRuntime(base, loaded)


register_runtime(_is_transformers_dir, _open)
