"""T5 / Flan-T5 ONNX exports (manifest kind "onnx-t5", converters/onnx/t5.py) run by
onnxruntime with edgeia3's own greedy loop: the encoder once (it also gives the
cross-attention K/V), then the decoder one token at a time with its self-attention past.

IA3 adapters are side inputs: ``use_adapter`` swaps the [1, 1, N] tensors fed to the
IA3 graph inputs (ones for the base); a merged export has none.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import EdgeIA3Error
from ..manifest import export_kind, read_manifest
from ..prompts import FLAT_CHAT, ChatTemplates
from ..tokens import TokenContract, hf_encoder
from .base_runtime import RuntimeBase

SOURCE_LIMIT = 512  # tokens of a T5 source (see context_length)

KIND = "onnx-t5"


class T5OnnxRuntime(RuntimeBase):
    """Adapters come with the export; none load or unload while it runs (``cannot_load``)."""

    name = "onnxruntime-t5"

    def __init__(self, path: str | Path, provider: str | None = None):
        import onnxruntime as ort
        from safetensors.numpy import load_file

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest.kind != KIND:
            raise EdgeIA3Error(f"{self.path}: not a T5 ONNX export (kind {self.manifest.kind!r})")
        m, x = self.manifest, self.manifest.extra  # x: the T5 graphs' own fields
        opts = ort.SessionOptions()
        providers = [provider or "CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(self.path / x["encoder"]), opts, providers=providers)
        self.decoder = ort.InferenceSession(str(self.path / x["decoder"]), opts, providers=providers)
        self.n, self.heads, self.d_kv = x["num_layers"], x["num_heads"], x["d_kv"]
        self.start = x["decoder_start_token_id"]
        if self.start is None:
            raise EdgeIA3Error(f"{self.path}: the model config names no decoder_start_token_id")
        eos = x.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._ones = {i["name"]: np.ones((1, 1, i["size"]), np.float32) for i in m.ia3_inputs or []}
        # a merged adapter keeps only its canonical vectors
        self._tensors = {name: load_file(str(self.path / a.file)) for name, a in m.side_adapters.items()}
        self._enc_inputs = {i.name for i in self.encoder.get_inputs()}
        self._dec_inputs = {i.name for i in self.decoder.get_inputs()}
        self._active: str | None = None
        self._feeds = self._ones
        self.templates = ChatTemplates(FLAT_CHAT)  # T5 ships no chat template
        for name, a in m.adapters.items():  # the template each adapter was trained with
            self.templates.record(name, template=a.chat_template)
        self._tok = None

    # -- adapters --------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return ([self.merged] if self.merged else []) + list(self._tensors)

    @property
    def merged(self) -> str | None:
        return self.manifest.merged_name

    def use_adapter(self, name: str | None) -> None:
        """Feed adapter ``name``'s side inputs (None: ones). A merged export is its adapter: the
        merged name and None both run the weights as they are; no other adapter applies."""
        if self.merged is not None and name in (None, self.merged):
            self._active = name
            return
        if name is not None and name not in self._tensors:
            hint = f" (this export has '{self.merged}' merged into its weights)" if self.merged else ""
            raise EdgeIA3Error(f"no adapter '{name}' in {self.path}; it has: {', '.join(self.adapters) or 'none'}{hint}")
        self._active = name
        self._feeds = self._ones if name is None else self._tensors[name]

    # -- model -----------------------------------------------------------------
    def _ia3(self, names: set[str]) -> dict[str, np.ndarray]:
        return {k: v for k, v in self._feeds.items() if k in names}

    def encode(self, input_ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Encoder hidden states [1, s, d] and the cross-attention K/V of every decoder layer."""
        ids = np.asarray([input_ids], dtype=np.int64)
        outs = self.encoder.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                       **self._ia3(self._enc_inputs)})
        return outs[0], outs[1:]

    def _decode(self, dec_ids: list[int], past: list[np.ndarray], cross: list[np.ndarray], src_len: int):
        feeds = {"decoder_input_ids": np.asarray([dec_ids], dtype=np.int64),
                 "encoder_attention_mask": np.ones((1, src_len), dtype=np.int64), **self._ia3(self._dec_inputs)}
        for i in range(self.n):
            feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = past[2 * i], past[2 * i + 1]
            feeds[f"cross_key.{i}"], feeds[f"cross_value.{i}"] = cross[2 * i], cross[2 * i + 1]
        outs = self.decoder.run(None, feeds)
        return outs[0][0], outs[1:]

    def _empty_past(self) -> list[np.ndarray]:
        return [np.zeros((1, self.heads, 0, self.d_kv), np.float32) for _ in range(2 * self.n)]

    def logits(self, input_ids: list[int], target_ids: list[int] | None = None) -> np.ndarray:
        """Decoder logits [len(target)+1, vocab] for source ``input_ids`` (one pass, no past): after
        the decoder start token, then after each target token (as every T5 runtime)."""
        _, cross = self.encode(input_ids)
        logits, _ = self._decode([self.start, *(target_ids or [])], self._empty_past(), cross, len(input_ids))
        return logits

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64, ignore_eos: bool = False) -> Iterator[int]:
        """Greedy decoding from ``decoder_start_token_id``, yielding each new token; stops
        at (and does not yield) end-of-sequence unless ``ignore_eos``."""
        _, cross = self.encode(list(prompt_ids))
        past, tok = self._empty_past(), self.start
        for _ in range(max_tokens):
            logits, past = self._decode([tok], past, cross, len(prompt_ids))
            tok = int(np.argmax(logits[-1]))
            if tok in self.eos and not ignore_eos:
                return
            yield tok

    # -- text ------------------------------------------------------------------
    def _tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(str(self.path))
            except Exception as e:  # noqa: BLE001  (no tokenizer files in the export)
                raise EdgeIA3Error(f"{self.path}: no tokenizer in this export ({e})") from None
        return self._tok

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        if not isinstance(prompt, str):
            prompt = self.templates.render(prompt, self._active)
        return self.tokens.ids(hf_encoder(self._tokenizer()), prompt)

    @property
    def tokens(self) -> TokenContract:
        return TokenContract.of_tokenizer(self._tokenizer(), encoder_source=True)

    @property
    def context_length(self) -> int:
        """T5's positions are relative: no hard limit; 512, the length T5 was pre-trained with
        (and the context the GGUF writer records for it), bounds a source here."""
        return SOURCE_LIMIT

    @property
    def vocab_size(self) -> int:
        width = self.decoder.get_outputs()[0].shape[-1]  # the logits' last axis (static in the graph)
        return int(width) if isinstance(width, int) else len(self._tokenizer())

    def detokenize(self, ids: list[int]) -> str:
        return self._tokenizer().decode(ids, skip_special_tokens=True)

    def describe(self) -> str:
        if self.merged:
            return f"onnxruntime T5 (encoder + decoder with past), adapter '{self.merged}' merged"
        return f"onnxruntime T5 (encoder + decoder with past), IA3 as {len(self._ones)} side inputs"

    def close(self) -> None:
        self.encoder = self.decoder = None


def _can_open(path: Path) -> bool:
    return path.is_dir() and export_kind(path) == KIND


def _open(path: Path, adapters=None, provider=None, **options) -> T5OnnxRuntime:
    from . import refuse_options

    if adapters:
        raise EdgeIA3Error(f"{path}: a T5 ONNX export carries its own adapters; attach them at export time")
    refuse_options(path, "onnxruntime T5", options)
    return T5OnnxRuntime(path, provider)


def _register() -> None:
    from . import register_runtime

    register_runtime(_can_open, _open)


_register()
