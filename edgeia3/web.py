"""Export step for the browser: ``edgeia3 export web``.

A static folder a web developer serves as is (offline, no CDN):

- ``model.onnx`` + ``model.onnx.data``: today's ONNX int4 side export (``export_onnx``: the
  exact weights the adapters were trained on), made browser-ready by
  ``converters/onnx/web.py`` (IA3 inputs without initializers, IR <= 13, int4 matmuls as
  DequantizeLinear + MatMul folded once at load, or kept as MatMulNBits);
- ``adapters/NAME.safetensors``: each adapter's input tensors, fetched on demand;
- ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``;
- ``runtime/``: the pinned onnxruntime-web, ``@huggingface/tokenizers`` and
  ``@huggingface/jinja`` files (``edgeia3.npm``, fetched from the npm registry without Node);
- ``edgeia3.js`` (the ES module API), ``index.html`` (the demo page) and ``edgeia3.json``
  (the manifest the page reads; ``kind: "web"``, with ``token_contract``).

``NativeWeb`` runs the same folder's graph with native onnxruntime: the reference the
browser's answers are checked against (tests, bench).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EdgeIA3Error
from .manifest import WEB_FORMAT_VERSION, WEB_KIND, AdapterEntry, ExportManifest

ASSETS = Path(__file__).with_name("web_assets")
ASSET_FILES = ("edgeia3.js", "index.html")
MANIFEST = "edgeia3.json"
KIND = WEB_KIND
FORMAT_VERSION = WEB_FORMAT_VERSION
MODEL_FILE = "model.onnx"
PRECISIONS = ("int4", "int8", "fp32")
# onnxruntime session config per matmul form (the page and NativeWeb use the same). The dequantized
# forms keep their fp32 weights as they are: prepacking them for the GEMM kernel held a second copy
# (Chromium, SmolLM2: peak 1,508 -> 1,144 MB without it, decode 15.2 -> 16.3 tok/s, same tokens).
_DEQUANTIZED = {"session.disable_quant_qdq": "1", "session.disable_prepacking": "1"}
SESSION_OPTIONS = {"dequantize": _DEQUANTIZED, "dequantize-fold": _DEQUANTIZED, "int8": {}, "nbits": {}}
WEBGPU_PREFILL_CHUNK = 16  # GQA prefill over > 16 tokens was wrong on Chromium's software WebGPU (FACTS.md)


@dataclass
class WebExport:
    """What ``export_web`` produced (``str()`` is the CLI's summary)."""

    out: Path
    manifest: ExportManifest
    seconds: float
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        m, graph = self.manifest, self.manifest.extra["graph"]
        sizes = ", ".join(f"{n} {(a.bytes or 0) / 1e3:.1f} kB" for n, a in m.adapters.items()) or "no adapters"
        rt = sum(p["bytes"] for p in m.extra["runtime"]["packages"]) / 1e6
        lines = [f"web export of {m.base.get('name')} ({m.family}, {m.precision}, matmuls: {graph['matmul']}): "
                 f"{sizes}",
                 f"  -> {self.out}  model {graph['bytes'] / 1e6:.1f} MB, runtime {rt:.1f} MB, {self.seconds:.1f} s",
                 f"  serve it with COOP/COEP headers for threads, e.g. `python -m edgeia3.web {self.out}`, "
                 "then open index.html"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def export_web(base: str = "default", out: str | Path = "", adapters: dict[str, str] | None = None,
               precision: str = "int4", matmul: str = "dequantize", weights: str = "auto",
               accuracy_level: int | None = None, strict: bool = False, force: bool = False) -> WebExport:
    """Export ``base`` with IA3 ``adapters`` (name -> path) as a static folder for the browser."""
    from edgeia3.converters.onnx.adapter_file import read_onnx_adapter_tensors
    from edgeia3.converters.onnx.web import MATMUL_MODES, browser_graph, export_id, write_web_adapter

    from .atomic import atomic_dir, check_out
    from .export import is_encoder_decoder, export_onnx
    from .manifest import read_manifest, write_manifest
    from .npm import install_runtime

    t0 = time.perf_counter()
    adapters = dict(adapters or {})
    if precision not in PRECISIONS:
        raise EdgeIA3Error(f"export web: precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if matmul not in MATMUL_MODES:
        raise EdgeIA3Error(f"export web: --matmul must be one of {', '.join(MATMUL_MODES)}, got '{matmul}'")
    check_out(Path(out), force)
    if is_encoder_decoder(base):
        raise EdgeIA3Error("export web supports decoder-only models (onnxruntime-genai builder families); "
                           "encoder-decoder (T5) exports are not available for the browser yet")
    with atomic_dir(out, force=force) as tmp, tempfile.TemporaryDirectory(prefix="edgeia3-web-") as work:
        packages = install_runtime(tmp / "runtime")  # first: offline without a cache fails before any work
        for p in packages:
            p["bytes"] = sum((tmp / "runtime" / f).stat().st_size for f in p["files"])
        onnx_dir = Path(work) / "onnx"
        res = export_onnx(base, onnx_dir, precision=precision, adapters=adapters, accuracy_level=accuracy_level,
                          weights=weights, strict=strict)
        m = read_manifest(onnx_dir)
        if m.mode == "merged":  # export_onnx never merges here; guard the assumption
            raise EdgeIA3Error("export web needs a side-tensor ONNX export")
        names = [p["name"] for p in m.ia3_inputs or []]
        graph = browser_graph(onnx_dir, tmp, names, matmul, m.model_file or MODEL_FILE)
        ident = export_id(m)
        entries = {}
        for name, a in m.adapters.items():
            rel = f"adapters/{name}.safetensors"
            info = write_web_adapter(read_onnx_adapter_tensors(onnx_dir / str(a.file)), tmp / rel, ident, name)
            entries[name] = AdapterEntry(a.sites, a.params, rel, info.pop("bytes"), trained_quant=a.trained_quant,
                                         same_weights=a.same_weights, token_contract=a.token_contract,
                                         chat_template=a.chat_template, extra=info)  # info: sha256
        tok = _copy_tokenizer(onnx_dir, tmp)
        for f in ASSET_FILES:
            shutil.copyfile(ASSETS / f, tmp / f)
        genai = json.loads((onnx_dir / "genai_config.json").read_text())
        weights, notes = m.weights, list(res.notes)
        if matmul == "int8" and graph["int8_matmuls"]:
            weights = {"kind": "requantized", "how": f"int8 per output column, re-rounded from the exact values of "
                       f"{(m.weights or {}).get('name') or 'the ONNX export'}; int8 activations",
                       "from": m.weights}
            notes.append("--matmul int8 re-rounds the weights to int8 per column, not the grid the adapters were "
                         "trained on (measured on SmolLM2: a sentiment adapter at 94% answered 46% this way); "
                         "--matmul dequantize runs the exact weights")
        manifest = ExportManifest(
            KIND, m.family, m.base, entries, weights=weights, token_contract=m.token_contract, notes=notes,
            precision=precision, fingerprint=m.fingerprint, format_version=FORMAT_VERSION,
            ia3_inputs=[{"name": p["name"], "size": p["size"], "layer": p["layer"], "parts": p["parts"]}
                        for p in m.ia3_inputs or []],
            extra={"export_id": ident, "transcoded": bool(m.extra.get("transcoded")),
                   "builder_options": m.extra.get("builder_options"),
                   "graph": {"file": MODEL_FILE, "external_data": [f for f in graph["files"] if f != MODEL_FILE],
                             "session_options": SESSION_OPTIONS[matmul], **graph},
                   "decoder": _decoder(genai), "tokenizer": tok,
                   "chat_template": "chat_template.jinja" if (tmp / "chat_template.jinja").exists() else None,
                   "runtime": {"wasm": "runtime/ort.wasm.min.mjs", "webgpu": "runtime/ort.webgpu.min.mjs",
                               "packages": packages},
                   "export_seconds": round(time.perf_counter() - t0, 2)})
        write_manifest(tmp, manifest)
    return WebExport(Path(out), manifest, time.perf_counter() - t0, notes)


def _copy_tokenizer(src: Path, dst: Path) -> dict:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if not (src / f).is_file():
            raise EdgeIA3Error(f"export web needs a fast tokenizer ({f}); this base's ONNX export has none")
        shutil.copyfile(src / f, dst / f)
    if (src / "chat_template.jinja").is_file():
        shutil.copyfile(src / "chat_template.jinja", dst / "chat_template.jinja")
    return {"json": "tokenizer.json", "config": "tokenizer_config.json"}


def _decoder(genai: dict) -> dict:
    """What the page's decoding loop needs from onnxruntime-genai's config."""
    mdl = genai["model"]
    dec = mdl["decoder"]
    eos = mdl.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    ins, outs = dec["inputs"], dec.get("outputs", {})
    return {"num_layers": int(dec["num_hidden_layers"]), "kv_heads": int(dec["num_key_value_heads"]),
            "head_size": int(dec["head_size"]), "vocab_size": int(mdl["vocab_size"]),
            "context_length": int(mdl["context_length"]), "eos_token_ids": [int(e) for e in eos if e is not None],
            "past_names": {"key": ins["past_key_names"], "value": ins["past_value_names"]},
            "present_names": {"key": outs.get("present_key_names", "present.%d.key"),
                              "value": outs.get("present_value_names", "present.%d.value")},
            "webgpu_prefill_chunk": WEBGPU_PREFILL_CHUNK}


def read_web_manifest(directory: str | Path) -> ExportManifest:
    from .manifest import parse_manifest

    path = Path(directory) / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EdgeIA3Error(f"{directory} is not an edgeia3 web export ({e})") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise EdgeIA3Error(f"{path}: not a web export manifest")
    return parse_manifest(doc, path, (KIND,))


# -- the native reference: the same folder's graph on onnxruntime ------------------------------------
class NativeWeb:
    """The web folder's graph on native onnxruntime (CPU), fed as the page feeds it."""

    def __init__(self, directory: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.dir = Path(directory)
        self.manifest = read_web_manifest(self.dir)
        so = ort.SessionOptions()
        for k, v in self.manifest.extra["graph"]["session_options"].items():
            so.add_session_config_entry(k, v)
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.dir / self.manifest.extra["graph"]["file"]), so,
                                            providers=["CPUExecutionProvider"])
        self._tokenizer = None

    # -- tokens, as edgeia3's own runtimes make them ----------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.dir))
        return self._tokenizer

    def prompt_ids(self, messages: list[dict] | str, adapter: str | None = None) -> list[int]:
        """A chat (or one user message) through the chat template and the token contract."""
        from .prompts import render_chat
        from .tokens import TokenContract, hf_encoder

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        m = self.manifest
        entry = m.adapters.get(adapter) if adapter else None
        template = entry.chat_template if entry else None
        if not template and m.extra.get("chat_template"):
            template = (self.dir / m.extra["chat_template"]).read_text()
        text = render_chat(template, messages)
        return TokenContract.from_json(m.token_contract).ids(hf_encoder(self.tokenizer), text)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- the graph ---------------------------------------------------------------------------
    def adapter_tensors(self, adapter: str | Path | None) -> dict:
        """Graph feeds for an adapter (a listed name or a file path; None: ones)."""
        import numpy as np

        from edgeia3.converters.onnx.web import read_web_adapter

        inputs = self.manifest.ia3_inputs or []
        if adapter is None:
            return {p["name"]: np.ones((1, 1, p["size"]), np.float32) for p in inputs}
        path = Path(adapter) if Path(str(adapter)).suffix == ".safetensors" else \
            self.dir / str(self.manifest.adapters[adapter].file)
        tensors, _ = read_web_adapter(path)
        return {p["name"]: tensors[p["name"]].astype(np.float32).reshape(1, 1, -1) for p in inputs}

    def logits(self, ids: list[int], adapter: str | Path | None = None) -> Any:
        """Next-token logits at every position of ``ids`` ([len, vocab]), the prompt in one run."""
        return self._steps(ids, adapter)[0][0]

    def generate(self, ids: list[int], adapter: str | Path | None = None, max_tokens: int = 32) -> list[int]:
        """Greedy token ids after ``ids``, stopping at EOS (not included) or ``max_tokens``."""
        return self._steps(ids, adapter, max_tokens)[1]

    def _steps(self, ids: list[int], adapter: str | Path | None, max_tokens: int = 0) -> tuple[Any, list[int]]:
        """The prompt's logits, then up to ``max_tokens`` greedy ids (EOS ends them, not included)."""
        import numpy as np

        d = self.manifest.extra["decoder"]
        feeds = self.adapter_tensors(adapter)
        past = {}
        for i in range(d["num_layers"]):
            for kind in ("key", "value"):
                past[d["past_names"][kind] % i] = np.zeros((1, d["kv_heads"], 0, d["head_size"]), np.float32)
        eos, out, total, tokens, first = set(d["eos_token_ids"]), [], 0, list(ids), None
        while True:
            total += len(tokens)
            res = self.session.run(None, {**feeds, **past, "input_ids": np.array([tokens], np.int64),
                                          "attention_mask": np.ones((1, total), np.int64)})
            named = dict(zip([o.name for o in self.session.get_outputs()], res))
            first = named["logits"] if first is None else first
            for i in range(d["num_layers"]):
                for kind in ("key", "value"):
                    past[d["past_names"][kind] % i] = named[d["present_names"][kind] % i]
            best = int(np.argmax(named["logits"][0, -1]))
            if best in eos or len(out) >= max_tokens:
                return first, out
            out.append(best)
            if len(out) >= max_tokens:
                return first, out
            tokens = [best]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- a static server with the headers threads need --------------------------------------------------
def make_server(directory: str | Path, host: str = "127.0.0.1", port: int = 8000):
    """An http.server serving ``directory`` with COOP/COEP (cross-origin isolation: WASM threads)
    and ``.wasm`` / ``.mjs`` content types. ``port`` 0 picks a free one."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                          ".mjs": "text/javascript", ".js": "text/javascript", ".json": "application/json",
                          ".onnx": "application/octet-stream", ".data": "application/octet-stream",
                          ".safetensors": "application/octet-stream", ".jinja": "text/plain; charset=utf-8"}

        def end_headers(self):
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.send_header("Cache-Control", "no-store")
            super().end_headers()

        def log_message(self, *args):  # quiet
            pass

    return ThreadingHTTPServer((host, port), functools.partial(Handler, directory=str(directory)))


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - `python -m edgeia3.web DIR [PORT]`
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m edgeia3.web EXPORT_DIR [PORT]")
        raise SystemExit(2)
    if not (Path(args[0]) / MANIFEST).is_file():
        print(f"error: {args[0]} is not an `edgeia3 export web` folder (no {MANIFEST})", file=sys.stderr)
        raise SystemExit(2)
    srv = make_server(args[0], port=int(args[1]) if len(args) > 1 else 8000)
    print(f"serving {args[0]} at http://127.0.0.1:{srv.server_address[1]}/ (Ctrl-C stops)")
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":  # pragma: no cover
    main()
