"""ONNX runtime: an edgeia3 ONNX export served by onnxruntime-genai.

The model is opened once (``og.Model``) and every adapter file once
(``og.Adapters``); ``use_adapter`` only changes which name the next
generator activates, so switching costs microseconds and reloads nothing.

Two paths over the same export:
- generation (``generate_ids``): onnxruntime-genai, greedy, KV cache;
- full logits (``logits``), mixed-adapter batches (``forward_mixed``) and
  batched decoding with a KV cache (``batch_decoder``, see ``onnx_batch``): a
  plain ``onnxruntime.InferenceSession`` on model.onnx (created on first use),
  adapters activated with ``RunOptions.add_active_adapter`` - genai exposes
  only last-position logits, and mixed batches need per-row IA3 inputs
  ([batch, 1, N]), which the graph accepts but genai cannot feed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import EdgeIA3Error
from ..manifest import MANIFEST, export_kind, read_manifest
from ..prompts import ChatTemplates, read_template
from ..tokens import TokenContract, hf_encoder
from . import refuse_options, register_runtime
from .base_runtime import PreparedAdapter, RuntimeBase


class OnnxRuntime(RuntimeBase):
    name = "onnxruntime-genai"
    adapter_mechanism = "IA3 side-tensors fed as graph inputs by onnxruntime-genai Adapters (no reload)"

    def __init__(self, path: str | Path, provider: str | None = None, threads: int | None = None):
        import onnxruntime_genai as og

        self.path = Path(path)
        self.threads = threads  # intra-op threads of the plain session (batches, logits); None: genai's rule
        self.manifest = read_manifest(self.path)
        self.genai_config = _read_json(self.path / "genai_config.json", self.path)
        with _load_errors(self.path, "the export's genai_config.json"):
            config = og.Config(str(self.path))
            if provider is not None:  # e.g. run a CUDA-targeted export on CPU
                config.clear_providers()
                if provider != "cpu":
                    config.append_provider(provider)
        self._provider = provider or "cpu"
        t0 = time.perf_counter()
        with _load_errors(self.path, self.manifest.model_file or "model.onnx"):
            self.model = og.Model(config)
            self._og_adapters = og.Adapters(self.model)
        self._files: dict[str, Path] = {}
        for name, entry in self.manifest.side_adapters.items():
            self._files[name] = self.path / entry.file
            with _load_errors(self.path, f"adapter '{name}' ({entry.file})"):
                self._og_adapters.load(str(self._files[name]), name)
        self.open_seconds = time.perf_counter() - t0
        self._active: str | None = None
        self.templates = ChatTemplates(read_template(self.path))
        for name, entry in self.manifest.adapters.items():  # what each was trained with
            if entry.chat_template is not None:
                self.templates.record(name, template=entry.chat_template)
        merged = self.manifest.merged_name
        if merged in self.templates.recorded:  # the weights are that adapter's model
            self.templates.own = self.templates.recorded[merged]
        self._tokenizer: Any = None  # created on first use (see the tokenizer property)
        self._hf_tokenizer = False
        self._tokens: TokenContract | None = None
        self._session = None  # plain onnxruntime session for full logits / mixed batches
        self._ort_adapters: dict[str, Any] = {}
        self._vectors: dict[str, dict[str, np.ndarray]] = {}
        self._copies: set[str] = set()  # adapters loaded at run time: their files are this runtime's copies
        self._adapter_dtype: Any = None

    # -- protocol ------------------------------------------------------------------------------
    def describe(self) -> str:
        return self.adapter_mechanism

    def close(self) -> None:
        self._session = self._og_adapters = self.model = None

    @property
    def adapters(self) -> list[str]:
        return list(self._files)

    @property
    def merged(self) -> str | None:
        return self.manifest.merged_name

    def use_adapter(self, name: str | None) -> None:
        self._active = self.side_adapter(name)

    def side_adapter(self, name: str | None) -> str | None:
        """The adapter whose side tensors serve ``name`` (None: none to feed, e.g. the merged one)."""
        merged = self.merged
        if name is not None and name == merged:
            return None  # already in the weights: no side tensors to feed
        if name is not None and name not in self._files:
            hint = f" (this export has adapter '{merged}' merged into its weights)" if merged else ""
            raise EdgeIA3Error(f"unknown adapter '{name}' (in this export: {', '.join(self._files) or 'none'}){hint}")
        return name

    # -- adapters loaded while running (RuntimeBase.load_adapter / unload_adapter) ----------------------
    def cannot_load(self) -> str | None:
        if self.manifest.ia3_inputs:
            return None
        merged = self.merged
        why = f"adapter '{merged}' is merged into its weights" if merged else "it was exported without adapters"
        return (f"this ONNX export has no IA3 side inputs ({why}), so adapters cannot be loaded at run time; "
                "re-export it with --adapter NAME=PATH")

    @property
    def adapter_dtype(self) -> Any:
        """The dtype of this export's IA3 inputs in its adapter files (the graph's activations')."""
        if self._adapter_dtype is None:
            from edgeia3.converters.onnx.graph import activation_np_dtype

            self._adapter_dtype = activation_np_dtype(self.path / (self.manifest.model_file or "model.onnx"))
        return self._adapter_dtype

    def _prepare(self, name: str, path: Path, workdir: Path) -> PreparedAdapter:
        """Check the adapter against this export's IA3 inputs and write this runtime's own
        ``.onnx_adapter`` copy under ``workdir`` (see ``onnx_adapters``)."""
        from .onnx_adapters import prepare

        copy, info, adapter = prepare(self.manifest, self.adapter_dtype, name, path, workdir)
        return PreparedAdapter(name, path, (copy, info, adapter), files=(copy,))

    def _attach(self, prepared: PreparedAdapter) -> dict:
        """Load the prepared copy into onnxruntime-genai's adapter set."""
        copy, info, adapter = prepared.payload
        name = prepared.name
        try:
            self._og_adapters.load(str(copy), name)
        except Exception as e:  # onnxruntime-genai raises its own RuntimeError types
            raise EdgeIA3Error(f"onnxruntime-genai cannot load adapter {prepared.path}: "
                               f"{' '.join(str(e).split())}") from None
        self._files[name] = copy
        self._copies.add(name)
        self.templates.record(name, adapter)  # only once loaded; its prompts render as it was trained
        return info

    def _detach(self, name: str) -> None:
        if self._active == name:
            self.use_adapter(None)
        self._og_adapters.unload(name)
        self._ort_adapters.pop(name, None)  # the caches of the mixed-batch path
        self._vectors.pop(name, None)
        path = self._files.pop(name)
        if name in self._copies:
            self._copies.discard(name)
            path.unlink(missing_ok=True)

    def batch_decoder(self, max_rows: int = 16) -> Any:
        """Greedy decoding of up to ``max_rows`` requests at once, each with its own adapter
        (``onnx_batch.BatchDecoder``; for the server)."""
        from .onnx_batch import BatchDecoder

        return BatchDecoder(self, max_rows)

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        if not isinstance(prompt, str):
            prompt = self.templates.render(prompt, self._active)
        tok = self.tokenizer
        return self.tokens.ids(hf_encoder(tok) if self._hf_tokenizer else tok.encode, prompt)

    @property
    def context_length(self) -> int:
        return int(self.genai_config["model"]["context_length"])

    @property
    def vocab_size(self) -> int:
        return int(self.genai_config["model"]["vocab_size"])

    @property
    def tokens(self) -> TokenContract:
        """What this export's tokenizer adds by default: its post-processor, as transformers and
        llama.cpp apply it. (onnxruntime-genai 0.18's ``encode`` adds nothing unless told
        ``update_options(add_special_tokens="true")``; edgeia3 applies the contract itself.)"""
        if self._tokens is None:
            tok = self.tokenizer
            if self._hf_tokenizer:
                self._tokens = TokenContract.of_tokenizer(tok)
            else:  # what the tokenizer's post-processor adds shows on the empty text
                tok.update_options(add_special_tokens="true")
                full = tok.encode("")
                tok.update_options(add_special_tokens="false")  # encode adds nothing; the contract does
                eos = [int(e) for e in tok.eos_token_ids]
                self._tokens = TokenContract.observed([], full, int(tok.bos_token_id), eos[0] if eos else None)
        return self._tokens

    def detokenize(self, ids: list[int]) -> str:
        tok = self.tokenizer
        if self._hf_tokenizer:
            return tok.decode(ids, skip_special_tokens=True)
        return tok.decode(np.asarray(ids, dtype=np.int32))

    @property
    def tokenizer(self) -> Any:
        """onnxruntime-genai's tokenizer; transformers' (same files) for tokenizer types it cannot parse."""
        if self._tokenizer is None:
            import onnxruntime_genai as og

            try:
                if not self._genai_can_parse_tokenizer():
                    raise RuntimeError("tokenizer model type not supported by onnxruntime-genai")
                self._tokenizer = og.Tokenizer(self.model)
            except RuntimeError:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.path)
                self._hf_tokenizer = True
        return self._tokenizer

    def _genai_can_parse_tokenizer(self) -> bool:
        """Ask before trying: og.Tokenizer on an unsupported tokenizer.json (e.g. WordLevel)
        sometimes raises and sometimes crashes the process (seen in CI)."""
        try:
            model_type = json.loads((self.path / "tokenizer.json").read_text())["model"]["type"]
        except (OSError, KeyError, ValueError):
            return True  # no tokenizer.json to judge by: let genai decide
        return model_type in ("BPE", "Unigram", "WordPiece")

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64,
                     ignore_eos: bool = False) -> Iterator[int]:
        import onnxruntime_genai as og

        context = int(self.genai_config["model"]["context_length"])
        if len(prompt_ids) >= context:
            raise EdgeIA3Error(f"prompt has {len(prompt_ids)} tokens; the model's context is {context}")
        params = og.GeneratorParams(self.model)
        max_length = min(context, len(prompt_ids) + max_tokens)
        # min_length keeps genai from stopping at its own EOS when asked to ignore it
        params.set_search_options(do_sample=False, max_length=max_length,
                                  min_length=max_length if ignore_eos else 0)
        gen = og.Generator(self.model, params)
        if self._active is not None:
            gen.set_active_adapter(self._og_adapters, self._active)
        gen.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        eos = set() if ignore_eos else set(self.eos_ids())
        for _ in range(max_tokens):
            if gen.is_done():
                return
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            if tok in eos:
                return
            yield tok

    def genai_last_logits(self, prompt_ids: list[int]) -> np.ndarray:
        """Last-position logits [vocab] through onnxruntime-genai (what generation sees)."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + 1)
        gen = og.Generator(self.model, params)
        if self._active is not None:
            gen.set_active_adapter(self._og_adapters, self._active)
        gen.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        return np.array(gen.get_logits(), dtype=np.float32).reshape(-1)[-self.vocab_size:]

    def logits(self, token_ids: list[int]) -> np.ndarray:
        return self.forward_mixed([token_ids], [self._active])[0]

    # -- mixed-adapter batches --------------------------------------------------------------------
    def forward_mixed(self, token_ids_per_row: list[list[int]], adapter_per_row: list[str | None]) -> list[np.ndarray]:
        """Logits [len_i, vocab] per row, each row with its own adapter (None: base), in ONE run.

        Rows are right-padded to the longest; every IA3 input gets one vector
        per row ([batch, 1, N]). A single row with an adapter goes through
        ``RunOptions.add_active_adapter`` (the adapter file), like genai does.
        """
        import onnxruntime as ort

        if len(token_ids_per_row) != len(adapter_per_row) or not token_ids_per_row:
            raise EdgeIA3Error("forward_mixed needs one adapter name (or None) per row")
        for name in adapter_per_row:
            if name is not None and name not in self._files:
                raise EdgeIA3Error(f"unknown adapter '{name}' (in this export: {', '.join(self._files) or 'none'})")
        sess = self.ort_session()
        lengths = [len(r) for r in token_ids_per_row]
        batch, width = len(lengths), max(lengths)
        feeds = self._base_feeds(token_ids_per_row, width)
        opts = ort.RunOptions()
        if batch == 1 and adapter_per_row[0] is not None:
            opts.add_active_adapter(self._ort_adapter(adapter_per_row[0]))
        elif any(a is not None for a in adapter_per_row):
            for inp in self.manifest.ia3_inputs or []:
                rows = [self.side_vector(a, inp) for a in adapter_per_row]
                feeds[inp["name"]] = np.stack(rows).astype(self._ia3_dtype)
        logits = sess.run(["logits"], feeds, opts)[0]
        return [logits[b, :n].astype(np.float32) for b, n in enumerate(lengths)]

    # -- helpers -----------------------------------------------------------------------------------
    def eos_ids(self) -> list[int]:
        eos = self.genai_config["model"].get("eos_token_id")
        return eos if isinstance(eos, list) else [eos]

    def ort_session(self):
        """A plain onnxruntime session on model.onnx (full logits, mixed batches), made on first use."""
        import onnxruntime as ort

        if self._session is None:
            providers = ["CUDAExecutionProvider"] if self._provider == "cuda" else ["CPUExecutionProvider"]
            model_file = self.path / (self.manifest.model_file or "model.onnx")
            so = ort.SessionOptions()
            so.log_severity_level = 3  # IA3 inputs are overridable initializers by design; no warning per input
            _genai_threads(so, self.genai_config["model"]["decoder"].get("session_options", {}))
            if self.threads:
                so.intra_op_num_threads = int(self.threads)
            with _load_errors(self.path, model_file.name, "onnxruntime"):
                self._session = ort.InferenceSession(str(model_file), so, providers=providers)
            types = {i.name: i.type for i in (*self._session.get_inputs(),
                                              *self._session.get_overridable_initializers())}
            self.input_types = types
            names = [p["name"] for p in (self.manifest.ia3_inputs or [])]
            self._ia3_dtype = np.float16 if names and "float16" in types[names[0]] else np.float32
        return self._session

    def _ort_adapter(self, name: str):
        import onnxruntime as ort

        if name not in self._ort_adapters:
            a = ort.LoraAdapter()
            with _load_errors(self.path, f"adapter '{name}' ({self._files[name].name})", "onnxruntime"):
                a.Load(str(self._files[name]))
            self._ort_adapters[name] = a
        return self._ort_adapters[name]

    def side_vector(self, name: str | None, inp: dict) -> np.ndarray:
        """The [1, N] vector adapter ``name`` feeds IA3 input ``inp`` (ones for None)."""
        if name is None:
            return np.ones((1, inp["size"]), dtype=np.float32)
        if name not in self._vectors:
            from edgeia3.converters.onnx.adapter_file import read_onnx_adapter_tensors

            self._vectors[name] = read_onnx_adapter_tensors(self._files[name])
        return self._vectors[name][inp["name"]].reshape(1, -1)

    def _base_feeds(self, rows: list[list[int]], width: int) -> dict[str, np.ndarray]:
        dec = self.genai_config["model"]["decoder"]
        types = self.input_types
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
            mask[b, : len(r)] = 1
        feeds = {"input_ids": ids.astype(_np_type(types["input_ids"])),
                 "attention_mask": mask.astype(_np_type(types["attention_mask"]))}
        kv_shape = (len(rows), dec["num_key_value_heads"], 0, dec["head_size"])
        names = dec["inputs"]
        for i in range(dec["num_hidden_layers"]):
            for pattern in (names["past_key_names"], names["past_value_names"]):
                name = pattern % i
                feeds[name] = np.zeros(kv_shape, dtype=_np_type(types[name]))
        return feeds


@contextlib.contextmanager
def _load_errors(export: Path, what: str, runtime: str = "onnxruntime-genai") -> Iterator[None]:
    """A runtime's failure to load part of an export (a truncated model.onnx makes
    onnxruntime raise a protobuf parse error) becomes one EdgeIA3Error naming the export."""
    try:
        yield
    except EdgeIA3Error:
        raise
    except Exception as e:  # onnxruntime(-genai) raise RuntimeError and their own pybind11 types
        detail = " ".join(str(e).split()) or type(e).__name__
        raise EdgeIA3Error(f"{export}: {runtime} cannot load {what} (is the export complete? "
                           f"re-export it): {detail}") from None


def _read_json(path: Path, export: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EdgeIA3Error(f"{export}: cannot read {path.name}: {e}") from None


def _genai_threads(so: Any, config: dict) -> None:
    """The thread counts onnxruntime-genai gives its own session (half the logical cores, at most 16,
    unless genai_config.json says): ORT's default (every core, spinning) is ~2x slower on a busy
    machine, and the two paths over one export should be timed alike."""
    so.intra_op_num_threads = int(config.get("intra_op_num_threads") or min(16, max(1, (os.cpu_count() or 2) // 2)))
    if config.get("inter_op_num_threads"):
        so.inter_op_num_threads = int(config["inter_op_num_threads"])


def _np_type(ort_type: str):
    return {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
            "tensor(float16)": np.float16}[ort_type]


def _is_onnx_export(path: Path) -> bool:
    return path.is_dir() and export_kind(path) == "onnx"


def _open(path: Path, adapters: dict | None = None, provider: str | None = None, **options: Any) -> OnnxRuntime:
    threads = options.pop("threads", None)
    refuse_options(path, "onnxruntime-genai", options)
    if adapters:
        raise EdgeIA3Error(f"{path}: an ONNX export carries its own adapters ({MANIFEST}); attaching "
                           f"{', '.join(adapters)} at run time is not possible - re-export with --adapter NAME=PATH")
    return OnnxRuntime(path, provider=provider, threads=threads)


register_runtime(_is_onnx_export, _open)
