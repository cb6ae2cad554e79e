"""llama.cpp runtime (through llama-cpp-python) with IA3 adapter swap and no reload.

llama.cpp maps the model file shared and read-only, and with repacking off
(``use_extra_bufts=False``) CPU weights point straight into that mapping. The
runtime loads a private working copy of the GGUF and rewrites the block scale
fields of the live weights through a writable numpy memmap of the same file:
``use_adapter`` restores the pristine fields and applies the new adapter's
(the same computation as the exact file merge, so the weights are
bit-identical to a merged file), then clears the KV cache.

Where writes do not reach the live weights (weights offloaded to a GPU, no
mmap) the runtime patches the working copy and reloads it instead;
``swap_mode`` says which path is in use and ``swap_reason`` why.

``use_extra_bufts=False`` is also what keeps llama.cpp from crashing on CPUs
with AMX (the AMX extra buffer type segfaults in ggml_backend_amx_mul_mat).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import EdgeIA3Error
from ..manifest import export_kind, read_manifest
from ..prompts import ChatTemplates, read_template
from ..tokens import TokenContract
from . import refuse_options, register_runtime
from .base_runtime import PreparedAdapter, RuntimeBase, adapter_format
from .llama_batch import flash_attn_type

# Adapters whose scale fields stay computed (~4 MB each on SmolLM2): switching among these
# is only memory copies; any other adapter computes its fields once at switch time (~ms).
FIELD_CACHE = 8

IN_PLACE, RELOAD = "in-place", "reload"


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:  # optional dependency
        raise EdgeIA3Error("the llama.cpp runtime needs llama-cpp-python: pip install 'edgeia3[gguf]'") from e
    from edgeia3.converters.gguf.ggml_index import quiet_llama_logs

    quiet_llama_logs()  # keep load chatter and warnings off stderr
    return llama_cpp


class LlamaCppRuntime(RuntimeBase):
    name = "llama.cpp"

    def __init__(self, model: str | Path, adapters: dict[str, str | Path] | None = None, *,
                 merged: str | None = None, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int = 0, swap: str = "auto", workdir: str | Path | None = None):
        from edgeia3.converters.gguf.base_gguf import GGUFBase
        from edgeia3.converters.gguf.merge import adapter_plan

        if swap not in ("auto", IN_PLACE, RELOAD):
            raise EdgeIA3Error(f"swap must be auto, {IN_PLACE} or {RELOAD}")
        self.source = Path(model)
        self.base = GGUFBase(self.source)
        self._merged = merged  # adapter already folded into the file (a merged export)
        self.adapter_paths = {n: Path(p) for n, p in (adapters or {}).items()}
        loaded = {n: self.base.load_adapter(p) for n, p in self.adapter_paths.items()}
        plans = {n: adapter_plan(ad, self.base) for n, ad in loaded.items()}
        self.n_ctx = min(n_ctx, self.base.index.arch_int("context_length", n_ctx))
        self.n_gpu_layers = n_gpu_layers
        self.n_threads = n_threads or os.cpu_count() or 1
        self._active: str | None = merged
        self._ll = _llama_cpp()
        self._model = self._ctx = self._batch = None
        self._decoders: weakref.WeakSet = weakref.WeakSet()  # batch decoders over this model (llama_batch)
        self._tokens: TokenContract | None = None

        # A private working copy: the pristine file stays untouched whatever we patch.
        self._workdir = Path(tempfile.mkdtemp(prefix="edgeia3-llama-", dir=workdir))
        # Removed on close(), garbage collection or interpreter exit, whichever comes first.
        weakref.finalize(self, shutil.rmtree, str(self._workdir), True)
        self.work = self._workdir / "model.gguf"
        shutil.copyfile(self.source, self.work)
        self._mm = np.memmap(self.work, dtype=np.uint8, mode="r+")
        self._fields, self._pristine = {}, {}
        self._track(self.base.norm_tensor)
        # Per adapter only its row scalings (a few kB); the scale fields they give are computed
        # at switch time exactly as the file merge computes them (RowFields.scaled), so a switch
        # stays bit-identical to a merged file. The last few are kept (FIELD_CACHE).
        self._plans: dict[str, dict[str, np.ndarray]] = {}
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        for n, plan in plans.items():
            self._add_plan(n, plan)
        self._load()
        self.templates = ChatTemplates(self.base.index.kv.get("tokenizer.chat_template"))
        for n, ad in loaded.items():  # the template each adapter was trained with (its file's metadata)
            self.templates.record(n, ad)
        self.swap_mode, self.swap_reason = self._choose_swap_mode(swap)
        self.last_switch_seconds: float | None = None

    # -- loading ---------------------------------------------------------------
    def _load(self) -> None:
        from llama_cpp import _internals

        ll = self._ll
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = self.n_gpu_layers
        mp.load_mode = ll.LLAMA_LOAD_MODE_MMAP if ll.llama_supports_mmap() else ll.LLAMA_LOAD_MODE_NONE
        mp.use_extra_bufts = False  # no repacking: the AMX crash fix, and the block layout stays the file's
        cp = ll.llama_context_default_params()
        cp.n_ctx = cp.n_batch = self.n_ctx
        cp.n_ubatch = min(512, self.n_ctx)
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.flash_attn_type = flash_attn_type(ll)
        try:
            self._model = _internals.LlamaModel(path_model=str(self.work), params=mp, verbose=False)
            self._ctx = _internals.LlamaContext(model=self._model, params=cp, verbose=False)
        except ValueError as e:
            raise EdgeIA3Error(f"llama.cpp cannot load {self.source}: {e}") from e
        self._batch = _internals.LlamaBatch(n_tokens=self.n_ctx, embd=0, n_seq_max=1, verbose=False)
        self.n_vocab = self._model.n_vocab()

    def _unload(self) -> None:
        for dec in list(self._decoders):  # their contexts go before the model they run on
            dec._release()
        for obj in (self._batch, self._ctx, self._model):
            if obj is not None:
                obj.close()
        self._model = self._ctx = self._batch = None

    def _choose_swap_mode(self, swap: str) -> tuple[str, str]:
        if swap == RELOAD:
            return RELOAD, "requested"
        if self.n_gpu_layers:
            return RELOAD, "weights offloaded to a GPU are copies; patching the file cannot reach them"
        # Check that writes to the file reach the live weights: double the final norm, look.
        probe = [int(self.base.index.kv.get("tokenizer.ggml.bos_token_id", 0) or 0), 1]
        before = self.logits(probe)
        norm = self.base.index.tensor(self.base.norm_tensor)
        fields = self._fields[norm.name]
        fields.view[...] = fields.scaled(self._pristine[norm.name], np.full(norm.ne[0], 2.0, np.float32))
        after = self.logits(probe)
        fields.view[...] = self._pristine[norm.name]
        if np.array_equal(before, after):
            if swap == IN_PLACE:
                raise EdgeIA3Error("in-place adapter swap is not possible here: llama.cpp does not use the "
                                   "memory-mapped weights (no mmap support?)")
            return RELOAD, "llama.cpp does not run on the memory-mapped file (no mmap?)"
        return IN_PLACE, "live weights are the memory-mapped working copy"

    # -- adapters --------------------------------------------------------------
    def describe(self) -> str:
        return f"{self.swap_mode} swap ({self.swap_reason})"

    @property
    def adapters(self) -> list[str]:
        return ([self.merged] if self.merged else []) + list(self._plans)

    @property
    def merged(self) -> str | None:
        return self._merged

    def cannot_load(self) -> str | None:
        if self.merged:
            return (f"this GGUF export has adapter '{self.merged}' merged into its weights; it cannot load "
                    "adapters at run time (export without --merge to swap adapters)")
        return None

    def use_adapter(self, name: str | None) -> None:
        """Activate adapter ``name`` (None: the base) without reloading the model."""
        if self.merged is not None:  # no adapter or the merged one: both are the merged model
            if name not in (None, self.merged):
                raise EdgeIA3Error(f"this export has adapter '{self.merged}' merged into its weights; "
                                   "it cannot switch (export without --merge to swap adapters)")
            return
        if name is not None and name not in self._plans:
            raise EdgeIA3Error(f"unknown adapter '{name}' (loaded: {', '.join(self._plans) or 'none'})")
        t0 = time.perf_counter()
        old = self._plans.get(self._active, {}) if self._active else {}
        new = self._scaled_fields(name) if name else {}
        for t in set(old) - set(new):  # back to pristine where the new adapter does not write
            self._fields[t].view[...] = self._pristine[t]
        for t, fields in new.items():
            self._fields[t].view[...] = fields
        if self.swap_mode == RELOAD:
            self._mm.flush()
            self._unload()
            self._load()
        self._clear_kv()
        self._active = name
        self.last_switch_seconds = time.perf_counter() - t0

    # -- adapters --------------------------------------------------------------
    def _track(self, tensor: str) -> None:
        """Start tracking a tensor's scale fields (still pristine: no adapter wrote it yet)."""
        from edgeia3.converters.gguf.blocks import row_fields

        if tensor not in self._fields:
            self._fields[tensor] = row_fields(self._mm, self.base.index.tensor(tensor))
            self._pristine[tensor] = np.array(self._fields[tensor].view)

    def _add_plan(self, name: str, plan: dict[str, np.ndarray]) -> None:
        for t in plan:
            self._track(t)
        self._plans[name] = plan
        self._cache.pop(name, None)
        try:
            self._scaled_fields(name)  # refuses an overflowing scale now, not at switch time
        except Exception:
            self._plans.pop(name, None)  # a refused adapter leaves no trace
            self._cache.pop(name, None)
            raise

    def _scaled_fields(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._cache:
            self._cache[name] = {t: self._fields[t].scaled(self._pristine[t], lv)
                                 for t, lv in self._plans[name].items()}
            while len(self._cache) > FIELD_CACHE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        return self._cache[name]

    def _prepare(self, name: str, path: Path, workdir: Path) -> PreparedAdapter:
        """Validate the adapter (canonical, PEFT dir or ``.ia3.gguf``) against this GGUF and precompute
        its scale fields like the export's own adapters' (reads only the file's index and config)."""
        from edgeia3.converters.gguf.merge import adapter_plan

        adapter = self.base.load_adapter(path)  # family, identity, lengths, finite
        return PreparedAdapter(name, path, (adapter, adapter_plan(adapter, self.base)))

    def _attach(self, prepared: PreparedAdapter) -> dict:
        """Record the precomputed plan; the next ``use_adapter`` swaps it in."""
        adapter, plan = prepared.payload
        self._add_plan(prepared.name, plan)
        self.adapter_paths[prepared.name] = prepared.path
        self.templates.record(prepared.name, adapter)  # its prompts render as it was trained
        return {"sites": adapter.sites, "params": adapter.num_params, "format": adapter_format(prepared.path)}

    def _detach(self, name: str) -> None:
        if self._active == name:
            self.use_adapter(None)
        del self._plans[name]
        self._cache.pop(name, None)
        self.adapter_paths.pop(name, None)

    def _runs(self, name: str | None) -> bool:
        """Whether the weights hold adapter ``name`` now (None: the base; a merged export: both)."""
        if self.merged is not None:
            return name in (None, self.merged)
        return name == self._active

    # -- inference -------------------------------------------------------------
    def batch_decoder(self, max_rows: int = 16) -> Any:
        """Greedy decoding of up to ``max_rows`` requests at once over llama.cpp's parallel sequences,
        all with the active adapter (``llama_batch.LlamaBatchDecoder``; for the server)."""
        from .llama_batch import LlamaBatchDecoder

        return LlamaBatchDecoder(self, max_rows)

    def _model_ptr(self) -> Any:
        """The ``llama_model *`` of the loaded model, for contexts made through the low-level API."""
        return self._model.model

    def _is_eog(self, token: int) -> bool:
        return bool(self._ll.llama_vocab_is_eog(self._model.vocab, token))

    def _clear_kv(self) -> None:
        self._ctx.kv_cache_clear()

    def _decode(self, ids: list[int], n_past: int, all_logits: bool) -> None:
        if n_past + len(ids) > self.n_ctx:
            raise EdgeIA3Error(f"sequence of {n_past + len(ids)} tokens exceeds the context ({self.n_ctx})")
        self._batch.set_batch(ids, n_past=n_past, logits_all=all_logits)
        self._ctx.decode(self._batch)

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        if not isinstance(prompt, str):
            prompt = self.templates.render(prompt, self._active)
        return self.tokens.ids(self._plain_tokens, prompt)

    def _plain_tokens(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    @property
    def context_length(self) -> int:
        return int(self.n_ctx)

    @property
    def vocab_size(self) -> int:
        return int(self.n_vocab)

    @property
    def tokens(self) -> TokenContract:
        """What llama.cpp's own tokenization adds (its add_special: the vocabulary decides)."""
        if self._tokens is None:
            from edgeia3.converters.gguf.llama_vocab import vocab_tokens

            self._tokens = vocab_tokens(self._model.vocab)
        return self._tokens

    def detokenize(self, ids: list[int]) -> str:
        return self._model.detokenize(list(ids), special=False).decode("utf-8", errors="replace")

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Next-token logits at every position: [len, vocab] float32."""
        self._clear_kv()
        out = np.empty((len(token_ids), self.n_vocab), dtype=np.float32)
        for start in range(0, len(token_ids), self.n_ctx):
            chunk = list(token_ids[start:start + self.n_ctx])
            self._decode(chunk, start, all_logits=True)
            ptr = self._ctx.get_logits()
            out[start:start + len(chunk)] = np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab))
        self._clear_kv()
        return out

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64,
                     ignore_eos: bool = False) -> Iterator[int]:
        self._clear_kv()
        yield from self._greedy(list(prompt_ids), max_tokens, ignore_eos)

    def _greedy(self, ids: list[int], max_tokens: int, ignore_eos: bool) -> Iterator[int]:
        """Decode ``ids`` from an empty KV cache, then one argmax token at a time."""
        n_past, vocab = 0, self._model.vocab
        for _ in range(max_tokens):
            self._decode(ids, n_past, all_logits=False)
            n_past += len(ids)
            logits = np.ctypeslib.as_array(self._ctx.get_logits_ith(-1), shape=(self.n_vocab,))
            nxt = int(np.argmax(logits))
            if not ignore_eos and self._ll.llama_vocab_is_eog(vocab, nxt):
                return
            yield nxt
            ids = [nxt]

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_workdir", None) is None:
            return
        self._unload()
        self._mm = None
        shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: best effort
            pass


# -- opening -------------------------------------------------------------------
def _is_gguf_artifact(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".gguf"
    return export_kind(path) == "gguf"


def open_gguf(path: str | Path, adapters: dict[str, str | Path] | None = None, provider: str | None = None,
              **kwargs: Any) -> LlamaCppRuntime:
    """Open a GGUF export directory (its adapters come from the manifest) or a bare .gguf.
    ``kwargs`` go to LlamaCppRuntime (n_ctx, n_gpu_layers, swap, ...)."""
    path = Path(path)
    if provider:
        raise EdgeIA3Error(f"{path}: --provider applies to ONNX exports (llama.cpp: n_gpu_layers)")
    if "threads" in kwargs:  # the name every runtime takes (serve --threads)
        kwargs["n_threads"] = kwargs.pop("threads")
    known = {"n_ctx", "n_threads", "n_gpu_layers", "swap", "workdir"}
    refuse_options(path, "llama.cpp", {k: v for k, v in kwargs.items() if k not in known})
    if path.is_file():
        return _runtime_class(path)(path, adapters, **kwargs)
    manifest = read_manifest(path)
    found = {n: path / a.file for n, a in manifest.side_adapters.items()}
    merged = manifest.merged_name
    if merged:
        found = {}  # the weights already hold the merged adapter; others would stack on it
    found.update(adapters or {})
    model = path / (manifest.model_file or "model.gguf")
    rt = _runtime_class(model)(model, found, merged=merged, **kwargs)
    # A base without a template: the one its adapters were trained with, carried by the export.
    rt.templates.own = rt.templates.own or read_template(path)
    entry = manifest.adapters.get(merged) if merged else None
    if entry is not None and entry.chat_template is not None:  # the weights are that model
        rt.templates.own = entry.chat_template
        rt.templates.record(merged, template=entry.chat_template)
    return rt


# The runtime class for encoder-decoder GGUFs (T5): t5_llama.py subclasses this module's
# runtime and sets it when imported (open_runtime imports every runtime module first).
ENCODER_DECODER: type | None = None


def _runtime_class(model: Path) -> type:
    """The encoder API runtime for encoder-decoder families (T5), else this one."""
    from edgeia3.converters.gguf.ggml_index import GGUFIndex
    from edgeia3.registry import family_for_gguf_arch

    if family_for_gguf_arch(GGUFIndex(model).arch).encoder_decoder:
        if ENCODER_DECODER is None:
            raise EdgeIA3Error(f"{model}: an encoder-decoder GGUF; import edgeia3.runtimes.t5_llama to run it")
        return ENCODER_DECODER
    return LlamaCppRuntime


register_runtime(_is_gguf_artifact, open_gguf)
