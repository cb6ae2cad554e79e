"""llama.cpp runtime for T5 / Flan-T5 GGUFs: llama.cpp's encoder API, adapters swapped in place.

llama-cpp-python's high-level ``Llama`` drives decoder-only models; an encoder-decoder
model needs ``llama_encode`` (the source, once) before ``llama_decode`` (the target,
from the model's decoder start token, with the encoder output as cross-attention
input). Everything else is the decoder-only runtime's: the private working copy, the
block-scale swap, the probe that picks in-place or reload, the adapter set (loaded and
unloaded while it runs too).

Prompts are plain text; a conversation is rendered by the template the adapter was
trained with, else T5's plain flattening (``edgeia3.prompts.FLAT_CHAT``). The source gets the tokenizer's EOS like
transformers' T5 tokenizer adds it.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..errors import EdgeIA3Error
from ..prompts import FLAT_CHAT
from . import llama_runtime
from .llama_runtime import LlamaCppRuntime


class T5LlamaRuntime(LlamaCppRuntime):
    name = "llama.cpp-t5"
    batch_decoder = None  # the encoder API decodes one request at a time

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.templates.own = self.templates.own or FLAT_CHAT  # T5 ships no chat template

    def _load(self) -> None:
        super()._load()
        ll = self._ll
        if not ll.llama_model_has_encoder(self._model.model):
            raise EdgeIA3Error(f"{self.source} has no encoder: not an encoder-decoder GGUF")
        start = ll.llama_model_decoder_start_token(self._model.model)
        self.decoder_start = int(start if start >= 0 else ll.llama_vocab_bos(self._model.vocab))

    # -- inference -------------------------------------------------------------
    def _encode(self, src_ids: list[int]) -> None:
        if not src_ids:
            raise EdgeIA3Error("an encoder-decoder model needs a non-empty source")
        if len(src_ids) > self.n_ctx:
            raise EdgeIA3Error(f"source of {len(src_ids)} tokens exceeds the context ({self.n_ctx})")
        self._clear_kv()
        self._batch.set_batch(list(src_ids), n_past=0, logits_all=False)
        rc = self._ll.llama_encode(self._ctx.ctx, self._batch.batch)
        if rc != 0:
            raise EdgeIA3Error(f"llama_encode returned {rc}")

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        text = prompt if isinstance(prompt, str) else self.templates.render(prompt, self._active)
        return self.tokens.ids(self._plain_tokens, text)  # T5's vocabulary adds the trailing EOS

    def logits(self, token_ids: list[int], target_ids: list[int] | None = None) -> np.ndarray:
        """Decoder logits [len(target)+1, vocab] for source ``token_ids``: the first row is the
        prediction after the decoder start token, then one row per target token."""
        self._encode(token_ids)
        dec = [self.decoder_start, *(target_ids or [])]
        self._decode(dec, 0, all_logits=True)
        out = np.array(np.ctypeslib.as_array(self._ctx.get_logits(), shape=(len(dec), self.n_vocab)))
        self._clear_kv()
        return out

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64,
                     ignore_eos: bool = False) -> Iterator[int]:
        self._encode(prompt_ids)
        yield from self._greedy([self.decoder_start], max_tokens, ignore_eos)


llama_runtime.ENCODER_DECODER = T5LlamaRuntime  # open_gguf runs T5 GGUFs with it
