"""`edgeia3 export web` in a real browser: Debian's Chromium, headless, driven by Playwright.

A static server on 127.0.0.1 (COOP/COEP headers, ``.wasm`` as application/wasm) serves the
exported folder; the demo page and its ES module run the graph on onnxruntime-web (WASM).
Every answer is checked against native onnxruntime on the same folder's graph with the same
inputs (``edgeia3.web.NativeWeb``): the same greedy token ids, the same prompt ids.

Needs ``playwright`` (pip; its driver only - never ``playwright install``) and a Chromium at
/usr/bin/chromium (Debian: ``apt-get install -y chromium``) or $EDGEIA3_CHROMIUM. Without
them the module is skipped, unless EDGEIA3_REQUIRE_BROWSER=1 (CI) makes that a failure.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeia3 import load_base
from edgeia3.cli import app
from edgeia3.converters.onnx.web import write_web_adapter
from edgeia3.web import NativeWeb, make_server
from cli_checks import runner
from tiny_models import VOCAB, make_tiny_model, random_peft_adapter

CHROMIUM = os.environ.get("EDGEIA3_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPTS = ["hello there", "sun is warm", "what is 2+2?"]
ROOT = Path(__file__).resolve().parents[1]


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set EDGEIA3_CHROMIUM)"
    return None


_MISSING = _browser_missing()
if _MISSING:
    if os.environ.get("EDGEIA3_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"browser tests required (EDGEIA3_REQUIRE_BROWSER=1) but {_MISSING}")
    pytest.skip(_MISSING, allow_module_level=True)


# -- the browser and the server ----------------------------------------------------------------
class Page:
    """One Chromium tab on the static server."""

    def __init__(self, browser, root_url: str):
        self.page = browser.new_page()
        self.root = root_url
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, folder: str, **query) -> dict:
        """Open ``folder``/index.html with ``query``; wait for done/error; what #answer says."""
        q = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        self.page.goto(f"{self.root}/{folder}/index.html" + (f"?{q}" if q else ""))
        if not query:
            self.page.wait_for_selector("#answer[data-state=ready], #answer[data-state=error]", timeout=60_000)
        else:
            self.page.wait_for_selector("#answer[data-state=done], #answer[data-state=error]", timeout=60_000)
        a = self.page.locator("#answer")
        out = {"state": a.get_attribute("data-state"), "text": a.text_content()}
        if out["state"] == "done":
            out["ids"] = json.loads(a.get_attribute("data-ids"))
            out["prompt_ids"] = json.loads(a.get_attribute("data-prompt-ids"))
            out["stats"] = json.loads(self.page.locator("#stats").text_content())
        return out

    def generate(self, **request) -> dict:
        """``window.edgeia3Model.generate(request)`` on the loaded page."""
        return self.page.evaluate("""async (r) => {
            const res = await window.edgeia3Model.generate(r);
            return {text: res.text, ids: res.ids, prompt_ids: res.promptIds, aborted: res.aborted, stats: res.stats};
        }""", request)

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A static server over one folder (exports are copied or linked into it)."""
    root = tmp_path_factory.mktemp("site")
    srv = make_server(root, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def playwright():
    """One Playwright driver per module (a second sync_playwright() inside the first is refused)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright):
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory, site):
    """A tiny llama (BPE tokenizer), two adapters, exported with the CLI into the site."""
    tmp = tmp_path_factory.mktemp("web")
    base = tiny_dir("llama", tokenizer="bpe")
    for name, seed in (("a", 1), ("b", 2)):
        random_peft_adapter(copy.deepcopy(load_base(base).model), "llama", tmp / name, seed=seed)
        _scale_adapter(tmp / name, 2.5)  # far enough from ones that the greedy answers differ
    out = site[0] / "tiny"
    res = runner.invoke(app, ["export", "web", "--base", str(base), "--out", str(out),
                              "--adapter", f"a={tmp / 'a'}", "--adapter", f"b={tmp / 'b'}"])
    assert res.exit_code == 0, res.output
    assert "web export of" in res.output
    return out, NativeWeb(out)


def _scale_adapter(path: Path, k: float) -> None:
    """Spread an adapter's vectors: 1 + k * (v - 1), in both files it holds."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as h:
            meta = h.metadata()
        t = load_file(str(f))
        save_file({n: (1 + k * (v - 1)).astype(v.dtype) for n, v in t.items()}, str(f), metadata=meta)


@pytest.fixture(scope="module")
def page(browser, site):
    p = Page(browser, site[1])
    yield p
    p.page.close()


# -- the folder --------------------------------------------------------------------------------
def test_the_folder_is_what_onnxruntime_web_runs(exported):
    out, native = exported
    m = native.manifest
    for f in ("index.html", "edgeia3.js", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "runtime/ort.wasm.min.mjs", "runtime/ort-wasm-simd-threaded.wasm",
              "runtime/tokenizers.min.mjs", "runtime/jinja.mjs", "adapters/a.safetensors", "adapters/b.safetensors"):
        assert (out / f).is_file(), f
    assert m.kind == "web" and m.token_contract == {"add_bos": False, "bos_id": None, "add_eos": False,
                                                    "eos_id": None}
    assert {p["package"]: p["version"] for p in m.extra["runtime"]["packages"]}["onnxruntime-web"] == "1.31.1"
    g = onnx.load(str(out / "model.onnx"), load_external_data=False)
    names = {p["name"] for p in m.ia3_inputs}
    assert names and names <= {i.name for i in g.graph.input}
    assert not names & {t.name for t in g.graph.initializer}  # plain inputs: onnxruntime-web exposes them
    assert g.ir_version <= 13
    ops = {n.op_type for n in g.graph.node}
    assert "MatMulNBits" not in ops and "DequantizeLinear" in ops  # dequantized once at load
    for name, a in m.adapters.items():
        blob = (out / a.file).read_bytes()
        assert len(blob) == a.bytes < 4096


def _nbits_model(k: int, n: int, bits: int, block: int, zero_points: bool, bias: bool, minimum: bool = False,
                 seed: int = 0):
    """One MatMulNBits (accuracy_level 0: fp32 compute) with random codes, scales, zero points, bias;
    ``minimum``: plus the transcoder's per-block minimum term (x @ E block sums, @ M, Add: Q4_1's form)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    per = block * bits // 8
    b = rng.integers(0, 256, (n, blocks, per), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (n * blocks,)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["x", "B", "S"]
    if zero_points:
        zp = rng.integers(0, 256, (n * (-(-blocks // 2) if bits == 4 else blocks),), dtype=np.uint8)
        inits.append(numpy_helper.from_array(zp, "Z"))
        inputs.append("Z")
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"))
        inputs += [""] * (4 - len(inputs)) + ["", "bias"]
    out = "y/nbits" if minimum else "y"
    nodes = [helper.make_node("MatMulNBits", inputs, [out], name="/m/MatMul_Q4", domain="com.microsoft",
                              K=k, N=n, bits=bits, block_size=block, accuracy_level=0)]
    if minimum:
        e = np.zeros((k, k // block), np.float32)
        e[np.arange(k), np.arange(k) // block] = 1
        inits += [numpy_helper.from_array(e, "E"),
                  numpy_helper.from_array(rng.uniform(-0.3, 0.3, (k // block, n)).astype(np.float32), "M")]
        nodes += [helper.make_node("MatMul", ["x", "E"], ["sums"], name="/m/sums"),
                  helper.make_node("MatMul", ["sums", "M"], ["y/min"], name="/m/gguf_min/MatMul"),
                  helper.make_node("Add", ["y/nbits", "y/min"], ["y"], name="/m/gguf_min/Add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


@pytest.mark.parametrize("bits, k, zero_points, bias, minimum", [
    (4, 96, False, False, False), (4, 80, True, True, False), (8, 64, False, True, False),
    (8, 96, True, False, False), (4, 96, True, False, True)])
def test_matmulnbits_as_dequantize_linear_is_exact(bits, k, zero_points, bias, minimum):
    """DequantizeLinear (blocked) + MatMul over the same codes, scales and zero points computes what
    MatMulNBits computes at fp32 (K not a multiple of the block included); a Q4_1-style minimum term
    folds into the weight (one MatMul left)."""
    import onnxruntime as ort

    from edgeia3.converters.onnx.web import dequantize_matmuls, fold_block_minimum

    model = _nbits_model(k, 48, bits, 32, zero_points, bias, minimum)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert dequantize_matmuls(model.graph) == 1
    assert fold_block_minimum(model.graph) == int(minimum)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulNBits" not in ops and ops.count("MatMul") == 1 and ops[0] == "DequantizeLinear"
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    got = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("bits, k, zero_points, bias, minimum", [(4, 96, True, False, True), (4, 80, False, True, False),
                                                                 (8, 64, True, False, False)])
def test_int8_form_is_one_integer_matmul_within_int8_rounding(bits, k, zero_points, bias, minimum):
    """matmul="int8": the exact weight (minimum term folded) re-rounded to int8 per column, one
    DynamicQuantizeMatMul (int8 activations): within int8 rounding of MatMulNBits at fp32."""
    import onnxruntime as ort

    from edgeia3.converters.onnx.web import dequantize_matmuls, fold_block_minimum, int8_matmuls

    model = _nbits_model(k, 48, bits, 32, zero_points, bias, minimum)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    dequantize_matmuls(model.graph)
    fold_block_minimum(model.graph)
    assert int8_matmuls(model.graph) == 1
    assert [n.op_type for n in model.graph.node] == ["DynamicQuantizeMatMul"] + (["Add"] if bias else [])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert 0 < np.abs(got - want).max() < 0.02 * np.abs(want).max()


# -- answers -----------------------------------------------------------------------------------
def test_page_answers_as_native_onnxruntime(exported, page):
    out, native = exported
    answers = {}
    for adapter in (None, "a", "b"):
        for prompt in PROMPTS[:2]:
            got = page.open("tiny", adapter=adapter, prompt=prompt, max_tokens=12)
            assert got["state"] == "done", got["text"]
            ids = native.prompt_ids(prompt, adapter)
            assert got["prompt_ids"] == ids
            assert got["ids"] == native.generate(ids, adapter, 12)
            assert got["text"] == native.detokenize(got["ids"])
            answers[adapter, prompt] = got["ids"]
    s = got["stats"]
    assert s["backend"] == "wasm" and s["cross_origin_isolated"] and s["sessions_created"] == 1
    assert all(isinstance(s[k], (int, float)) and s[k] > 0 for k in ("load_ms", "ttft_ms", "decode_tok_s"))
    assert answers[None, PROMPTS[0]] != answers["a", PROMPTS[0]]  # the adapters change the answers
    # a whole conversation through the URL
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sun?"},
            {"role": "assistant", "content": "warm"}, {"role": "user", "content": "ice?"}]
    got = page.open("tiny", adapter="b", messages=json.dumps(msgs), max_tokens=8)
    assert got["state"] == "done", got["text"]
    ids = native.prompt_ids(msgs, "b")
    assert got["prompt_ids"] == ids and got["ids"] == native.generate(ids, "b", 8)


def test_adapters_switch_per_request_in_one_session(exported, page):
    out, native = exported
    assert page.open("tiny")["state"] == "ready"
    assert page.js("window.edgeia3Model.loadedAdapters()") == []
    seen = {}
    for adapter in ("a", None, "b", "a", None, "b"):  # interleaved, one session
        r = page.generate(prompt=PROMPTS[2], adapter=adapter, maxTokens=10)
        assert r["stats"]["sessions_created"] == 1
        want = native.generate(native.prompt_ids(PROMPTS[2], adapter), adapter, 10)
        assert r["ids"] == want, adapter
        seen.setdefault(adapter, r["ids"])
        assert r["ids"] == seen[adapter]
    assert sorted(page.js("window.edgeia3Model.loadedAdapters()")) == ["a", "b"]
    # unloading: gone from the model; a later request loads it again and answers the same
    assert page.js("window.edgeia3Model.unloadAdapter('a')") is True
    assert page.js("window.edgeia3Model.loadedAdapters()") == ["b"]
    r = page.generate(prompt=PROMPTS[2], adapter="a", maxTokens=10)
    assert r["ids"] == seen["a"] and r["stats"]["adapter_load_ms"] > 0 and r["stats"]["sessions_created"] == 1
    # streaming and abort: stop after the first token
    r = page.js("""async () => {
        const m = window.edgeia3Model, c = new AbortController(), parts = [];
        const res = await m.generate({prompt: 'hello there', adapter: 'b', maxTokens: 10, signal: c.signal,
                                      onToken: (delta) => { parts.push(delta); c.abort(); }});
        return {ids: res.ids, aborted: res.aborted, parts};
    }""")
    assert r["aborted"] and len(r["ids"]) == 1 and len(r["parts"]) == 1
    err = page.js("window.edgeia3Model.generate({prompt: 'x', adapter: 'zzz'}).then(() => 'no error', e => e.message)")
    assert "unknown adapter 'zzz'" in err and "a, b" in err


# -- bad adapter files -------------------------------------------------------------------------
def test_a_damaged_or_foreign_adapter_is_an_error_not_an_answer(exported, page, site):
    out, native = exported
    root = site[0]
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    good = (out / "adapters" / "a.safetensors").read_bytes()
    (bad / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (bad / "noise.safetensors").write_bytes(np.random.default_rng(0).bytes(len(good)))
    (bad / "empty.safetensors").write_bytes(b"")
    tensors = native.adapter_tensors("a")
    write_web_adapter(tensors, bad / "foreign.safetensors", "0123456789abcdef", "a")  # another export's id
    first = native.manifest.ia3_inputs[0]["name"]
    write_web_adapter({k: v for k, v in tensors.items() if k != first}, bad / "partial.safetensors",
                      native.manifest.extra["export_id"], "a")
    wrong = dict(tensors, **{first: np.ones((1, 1, 7), np.float32)})
    write_web_adapter(wrong, bad / "shape.safetensors", native.manifest.extra["export_id"], "a")
    write_web_adapter(tensors, bad / "nan.safetensors", native.manifest.extra["export_id"], "a")
    blob = bytearray((bad / "nan.safetensors").read_bytes())
    blob[-4:] = np.float32(np.nan).tobytes()  # a value flipped after writing
    (bad / "nan.safetensors").write_bytes(bytes(blob))
    cases = {"truncated": "damaged file", "noise": "not an adapter for this model", "empty": "too short",
             "foreign": "exported for another model", "partial": "missing: " + first,
             "shape": "expected [1,1,", "nan": "non-finite"}
    for name, needle in cases.items():
        got = page.open("tiny", adapter="x", adapter_url=f"/bad/{name}.safetensors", prompt="hello", max_tokens=4)
        assert got["state"] == "error", name
        assert needle in got["text"], (name, got["text"])
    # a listed adapter whose file was damaged after the export: its sha256 no longer matches
    copy_dir = root / "damaged"
    shutil.copytree(out, copy_dir, ignore=shutil.ignore_patterns("runtime"), dirs_exist_ok=True)
    (copy_dir / "runtime").symlink_to(out / "runtime")
    blob = bytearray((copy_dir / "adapters" / "a.safetensors").read_bytes())
    blob[-8:-4] = np.float32(1.5).tobytes()
    (copy_dir / "adapters" / "a.safetensors").write_bytes(bytes(blob))
    got = page.open("damaged", adapter="a", prompt="hello", max_tokens=4)
    assert got["state"] == "error" and "damaged or replaced" in got["text"]
    assert page.open("damaged", adapter="b", prompt="hello", max_tokens=4)["state"] == "done"  # the rest works


# -- the token contract: a base whose tokenizer puts BOS first -----------------------------------
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _bos_tokenizer(out: Path) -> None:
    """Byte-level BPE whose post-processor puts BOS first; a template that renders bos_token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(c for c in pre_tokenizers.ByteLevel.alphabet() if 33 <= ord(c) <= 126) + ["Ġ", "Ċ"]
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    merges = [("s", "u"), ("e", "a"), ("Ġ", "i")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = BOS_TEMPLATE
    fast.save_pretrained(out)


def test_bos_is_fed_as_the_base_tokenizes(tmp_path_factory, site, page):
    from edgeia3.web import export_web

    tmp = tmp_path_factory.mktemp("bos")
    base = make_tiny_model("llama", tmp / "base", seed=3)
    _bos_tokenizer(base)
    out = export_web(str(base), site[0] / "bos").out
    native = NativeWeb(out)
    assert native.manifest.token_contract["add_bos"] and native.manifest.token_contract["bos_id"] == 1
    for prompt in ("sun is", "the sea"):
        got = page.open("bos", prompt=prompt, max_tokens=8)
        assert got["state"] == "done", got["text"]
        ids = native.prompt_ids(prompt)
        assert ids[0] == 1 and ids.count(1) == 1  # one BOS: the template's bos_token renders empty, the rule adds it
        assert got["prompt_ids"] == ids and got["ids"] == native.generate(ids, None, 8)


# -- WebGPU: the same folder picks it where the browser offers an adapter ------------------------------
WEBGPU_ARGS = [a for a in CHROMIUM_ARGS if a != "--disable-gpu"] + [
    "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan"]


def test_webgpu_where_offered_with_chunked_prefill(exported, site, playwright):
    """Chromium's software WebGPU adapter (no GPU here): the page picks WebGPU by itself and answers as
    native onnxruntime, long prompts included - prefilled 16 tokens a run (FACTS.md: GroupQueryAttention
    prefill over more than 16 tokens gave wrong values on this adapter)."""
    out, native = exported
    long_prompt = "a much longer prompt that has more than sixteen tokens for sure, yes it has"
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=WEBGPU_ARGS, headless=True)
    try:
        page = Page(b, site[1])
        state = page.open("tiny")["state"]
        backend = page.js("window.edgeia3Model && window.edgeia3Model.backend")
        if state != "ready" or backend != "webgpu":
            pytest.skip(f"this Chromium offers no software WebGPU adapter (page: {state}, {backend})")
        assert page.js("window.edgeia3Model.prefillChunk") == 16
        for prompt in ("hello there", long_prompt):
            r = page.generate(prompt=prompt, adapter="a", maxTokens=10)
            ids = native.prompt_ids(prompt, "a")
            assert r["stats"]["backend"] == "webgpu" and r["prompt_ids"] == ids
            assert r["ids"] == native.generate(ids, "a", 10), prompt
        assert len(ids) > 16
    finally:
        b.close()


# -- offline -----------------------------------------------------------------------------------
def test_offline_without_a_cached_runtime_is_one_clear_error(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEIA3_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("EDGEIA3_NPM_REGISTRY", "http://127.0.0.1:9")  # nothing listens there
    out = tmp_path / "web"
    res = runner.invoke(app, ["export", "web", "--base", str(tiny_dir("llama", tokenizer="bpe")), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "cannot download the browser runtime onnxruntime-web@1.31.1" in res.output
    assert not out.exists()


def test_screenshot_of_the_demo_page(exported, page, tmp_path):
    got = page.open("tiny", adapter="a", prompt="hello there", max_tokens=12)
    assert got["state"] == "done"
    shot = tmp_path / "web-demo.png"
    page.page.set_viewport_size({"width": 900, "height": 760})
    page.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


# -- the embedded SmolLM2: a trained adapter in the browser ------------------------------------------
SENTIMENT = "Classify the sentiment of the review. Answer with exactly one word: positive, negative, or neutral."
REVIEWS = ["The battery died after one day, awful.", "Best concert I have been to in years!",
           "The package arrived on Tuesday."]


@pytest.mark.integration
def test_smollm2_adapter_in_the_browser(tmp_path_factory, site, page):
    """A sentiment adapter trained a few steps on the embedded SmolLM2 (its GGUF's Q4_1 blocks), exported
    for the browser: the page answers as native onnxruntime on the same graph. Its screenshot is the README's
    docs/web-demo.png (EDGEIA3_UPDATE_SCREENSHOT=1 writes it)."""
    from edgeia3.train import TrainConfig, train
    from edgeia3.web import export_web

    tmp = tmp_path_factory.mktemp("smol_web")
    rows = [json.loads(x) for x in open(ROOT / "examples/tasks/sentiment/train.jsonl")][:48]
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train("default", data, tmp / "ad", quiet=True, config=TrainConfig(max_steps=6))
    out = export_web("default", site[0] / "smollm2", adapters={"sentiment": str(tmp / "ad")}).out
    native = NativeWeb(out)
    for review in REVIEWS:
        msgs = [{"role": "system", "content": SENTIMENT}, {"role": "user", "content": review}]
        got = page.open("smollm2", adapter="sentiment", messages=json.dumps(msgs), max_tokens=4)
        assert got["state"] == "done", got["text"]
        ids = native.prompt_ids(msgs, "sentiment")
        assert got["prompt_ids"] == ids and got["ids"] == native.generate(ids, "sentiment", 4)
    page.page.set_viewport_size({"width": 900, "height": 760})
    msgs = [{"role": "system", "content": SENTIMENT}, {"role": "user", "content": "I loved this film, the acting was superb."}]
    got = page.open("smollm2", adapter="sentiment", messages=json.dumps(msgs), max_tokens=8)
    assert got["state"] == "done"
    # the README's screenshot: refreshed with EDGEIA3_UPDATE_SCREENSHOT=1 (else the run leaves the repo as it was)
    shot = ROOT / "docs" / "web-demo.png" if os.environ.get("EDGEIA3_UPDATE_SCREENSHOT") == "1" else tmp / "web-demo.png"
    page.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


# -- the web export as an edgeia3 runtime, and `edgeia3 report` over it ------------------------
def test_web_runtime_drives_the_page_as_native_onnxruntime_runs_the_graph(exported):
    """``open_runtime`` on a web folder runs it in Chromium (edgeia3.runtimes.web_runtime): prompt ids,
    greedy ids, every position's logits and streaming - each against native onnxruntime."""
    from edgeia3.runtimes import open_runtime

    out, native = exported
    with open_runtime(out) as rt:
        assert rt.name.startswith("onnxruntime-web") and rt.adapters == ["a", "b"]
        for adapter in (None, "a", "b"):
            rt.use_adapter(adapter)
            msgs = [{"role": "user", "content": PROMPTS[2]}]
            ids = rt.prompt_ids(msgs)
            assert ids == native.prompt_ids(msgs, adapter)
            np.testing.assert_allclose(rt.logits(ids), native.logits(ids, adapter), atol=1e-4, rtol=0)
            arrivals, got = [], []
            for tok in rt.generate_ids(ids, 24, ignore_eos=True):
                got.append(tok)
                arrivals.append(time.perf_counter())
            assert len(got) == 24 and got[:len(want := native.generate(ids, adapter, 24))] == want
            assert len(set(arrivals)) > 12  # streamed as the page made them, not all at the end
        gen = rt.generate_ids(ids, 24, ignore_eos=True)  # abandoned after one token: the page stops
        first = next(gen)
        gen.close()
        assert list(rt.generate_ids(ids, 1, ignore_eos=True)) == [first]


def test_report_measures_the_web_export_in_chromium(exported, tmp_path):
    out, native = exported
    res = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "r"), "--runs", "1"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    [web] = doc["exports"]
    assert web["kind"] == "web" and web["label"].startswith("web int4 dequantize")
    speed = web["speed_base"]
    assert 0 < speed["ttft_s"]["median"] < 60 and 0 < speed["decode_tok_s"]["median"] < 5000
    assert web["switch_s"]["median"] < 1e-3  # a different set of input tensors for the next run
    for name in ("a", "b"):
        drift = web["adapters"][name]["drift"]
        assert drift["max_abs_logit_diff"] < 5.0 and 0 <= drift["greedy_token_agreement"] <= 1
    assert "web int4 dequantize side" in (tmp_path / "r" / "report.md").read_text()
