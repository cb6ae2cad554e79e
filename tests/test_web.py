"""`edgeia3 export web` in a real browser: Debian's Chromium, headless, driven by Playwright.

A static server on 127.0.0.1 (COOP/COEP headers, ``.wasm`` as application/wasm) serves the
exported folder; the demo page and its ES module run the graph on onnxruntime-web (WASM).
Every answer is checked against native onnxruntime on the same folder's graph with the same
inputs (``edgeia3.web.NativeWeb``): the same greedy token ids, the same prompt ids.

What it needs (Playwright and Debian's Chromium) and the fixtures: tests/web_browser.py. The graph's
matmul forms are checked without a browser in tests/test_web_graph.py, the web runtime and
``edgeia3 report`` over a web folder in tests/test_web_runtime.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeia3.cli import app
from edgeia3.converters.onnx.web import write_web_adapter
from edgeia3.web import NativeWeb
from cli_checks import runner
from tiny_models import VOCAB, make_tiny_model
from web_browser import CHROMIUM, CHROMIUM_ARGS, PROMPTS, ROOT, Page, require_browser

require_browser()  # fixtures (site, browser, page, exported): tests/web_browser.py


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
    assert m.extra["graph"]["session_options"] == {"session.disable_quant_qdq": "1", "session.disable_prepacking": "1"}
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
