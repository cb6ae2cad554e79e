"""T5 / Flan-T5 through edgeia3's GGUF writer and llama.cpp's T5 architecture, run with
llama.cpp's encoder API (edgeia3/runtimes/t5_llama.py). Tiny random ReLU and gated-GELU
models with a SentencePiece Unigram vocabulary trained here; the oracles are
transformers (the same weights), PEFT (the adapted model) and transformers' tokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from edgeia3 import EdgeIA3Error
from edgeia3.converters.gguf.base_gguf import GGUFBase
from edgeia3.steps.gguf_export import export
from edgeia3.converters.gguf.hf_writer import write_hf_gguf
from edgeia3.fingerprint import identity_of_dir
from edgeia3.registry import get_family
from edgeia3.runtimes import generate, open_runtime
from edgeia3.runtimes.t5_llama import T5LlamaRuntime
from cli_checks import assert_refused, invoke
from tiny_models import VOCAB, make_tiny_model, make_tiny_t5, random_peft_adapter, random_t5_peft_adapter

VARIANTS = {"relu": "relu", "gated": "gated-gelu"}
SRC = [5, 17, 99, 3, 42, 64, 8, 120, 33, 1]
TGT = [11, 77, 2, 90]
TEXTS = ["hello red fox", "the lazy dog\nsees the sea", "fine day, cold snow!"]
TOL = 5e-3  # llama.cpp vs transformers on the same f32 weights (measured ~1e-3 here) ...
REL = 1e-3  # ... plus this share of the largest logit (an unscaled Flan-style head: ~12)


def _close(got, want) -> bool:
    return float(np.abs(got - want).max()) < TOL + REL * float(np.abs(want).max())


@pytest.fixture(scope="module")
def unigram_tokenizer(tmp_path_factory):
    """A T5-style tokenizer dir: a SentencePiece Unigram model trained here (spiece.model) with
    as many pieces as the tiny model's vocabulary, so every generated id is real text."""
    import random

    import sentencepiece as spm

    d = tmp_path_factory.mktemp("unigram")
    rng = random.Random(0)
    syllables = [a + b for a in "bdfgklmnprstvz" for b in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(300)]
    lines = ["the quick brown fox jumps over the lazy dog", "hello world, it is a fine day",
             "red warm sun fire ice cold snow sea wet rain lake frost"] * 50
    lines += [" ".join(rng.choices(words, k=8)) for _ in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(d / "sp"), vocab_size=VOCAB,
                                   model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, minloglevel=3)
    tok = d / "tok"
    tok.mkdir()
    shutil.copy(d / "sp.model", tok / "spiece.model")
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
         "extra_ids": 0}))
    return tok


def _t5_dir(tmp_path, ff, tokenizer=None, **overrides):
    d = tmp_path / f"t5-{ff}"
    model = make_tiny_t5(d, ff, **overrides)
    for f in (tokenizer.iterdir() if tokenizer else []):
        shutil.copy(f, d / f.name)
    return d, model


def _flan_head(d):
    """Make the checkpoint at ``d`` Flan-T5-like: its own lm_head, no d_model**-0.5 scaling
    (transformers keeps a head that differs from the embedding); returns it reloaded."""
    from safetensors.torch import load_file, save_file
    from transformers import T5ForConditionalGeneration

    sd = load_file(str(d / "model.safetensors"))
    sd["lm_head.weight"] = torch.randn(sd["shared.weight"].shape, generator=torch.Generator().manual_seed(5))
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": False, "scale_decoder_outputs": False}))
    model = T5ForConditionalGeneration.from_pretrained(d).eval()
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"]) and not model.config.scale_decoder_outputs
    return model


def _logits(model, src=SRC, tgt=TGT):
    with torch.no_grad():
        dec = torch.tensor([[model.config.decoder_start_token_id, *tgt]])
        return model(input_ids=torch.tensor([src]), decoder_input_ids=dec).logits[0].numpy()


# T5 v1.0's head: the shared embedding, decoder output scaled by d_model**-0.5; Flan-T5's: its own
@pytest.mark.parametrize("variant,head", [("relu", "t5"), ("gated", "t5"), ("gated", "flan"), ("relu", "flan")])
def test_llama_cpp_runs_the_written_t5_like_transformers(variant, head, unigram_tokenizer, tmp_path):
    d, model = _t5_dir(tmp_path, VARIANTS[variant], unigram_tokenizer)
    if head == "flan":
        model = _flan_head(d)
    written = write_hf_gguf(d, tmp_path / "t5.gguf")
    assert written.tokenizer.startswith("SentencePiece Unigram") and written.pre_verified
    with T5LlamaRuntime(written.path) as rt:
        got = rt.logits(SRC, TGT)
        assert got.shape == (len(TGT) + 1, model.config.vocab_size)
        want = _logits(model)
        assert _close(got, want)  # the head is written pre-scaled where transformers scales
        assert np.abs(want).max() > 50 * TOL
        hf_tok = AutoTokenizer.from_pretrained(d)
        for text in TEXTS:  # llama.cpp's Unigram tokenizer, EOS included, as transformers
            assert rt.prompt_ids(text) == hf_tok(text)["input_ids"]
    assert GGUFBase(written.path).identity.matches(identity_of_dir(d, get_family("t5")))


def test_the_gguf_tensors_are_the_checkpoints(tmp_path):
    """gguf-py reads back every weight as written (names from gguf-py's own T5 map); one shared
    embedding, relative attention biases in block 0 only, a gate only in the gated MLP."""
    from gguf import GGUFReader

    d, _ = _t5_dir(tmp_path, "gated-gelu")
    model = _flan_head(d)
    names = {t.name: np.array(t.data) for t in GGUFReader(write_hf_gguf(d, tmp_path / "t.gguf").path).tensors}
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    assert np.array_equal(names["token_embd.weight"], sd["shared.weight"])
    assert np.array_equal(names["output.weight"], sd["lm_head.weight"])
    assert np.array_equal(names["dec.blk.1.cross_attn_k.weight"], sd["decoder.block.1.layer.1.EncDecAttention.k.weight"])
    assert np.array_equal(names["enc.blk.0.ffn_gate.weight"], sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"])
    assert np.array_equal(names["enc.blk.0.attn_rel_b.weight"],
                          sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
    assert "enc.blk.1.attn_rel_b.weight" not in names and "dec.blk.0.attn_rel_b.weight" in names


@pytest.mark.parametrize("variant", VARIANTS)
def test_side_adapters_swap_in_place_and_equal_peft(variant, unigram_tokenizer, tmp_path):
    """`export gguf` with two PEFT adapters on every T5 site: llama.cpp swaps them in place
    (a -> b -> base -> a) and each gives PEFT's logits and greedy tokens; --merge equals side."""
    import copy

    d, model = _t5_dir(tmp_path, VARIANTS[variant], unigram_tokenizer)
    peft = {n: random_t5_peft_adapter(copy.deepcopy(model), tmp_path / n, seed=s, every_site=True)
            for n, s in (("a", 1), ("b", 2))}
    want = {n: _logits(pm) for n, pm in peft.items()} | {None: _logits(model)}
    assert np.abs(want["a"] - want["b"]).max() > 0.1
    adapters = {n: str(tmp_path / n) for n in peft}
    side = export(str(d), tmp_path / "side", quant="f32", adapters=adapters)
    merged = export(str(d), tmp_path / "merged", quant="f32", adapters=adapters, merge="a")
    hf_tok = AutoTokenizer.from_pretrained(d)
    src = hf_tok("the lazy dog")["input_ids"]
    with open_runtime(side.out) as rt:
        assert isinstance(rt, T5LlamaRuntime) and rt.swap_mode == "in-place"
        for name in ("a", "b", None, "a"):
            rt.use_adapter(name)
            assert _close(rt.logits(SRC, TGT), want[name]), name
        with torch.no_grad():
            ref = peft["a"].generate(input_ids=torch.tensor([src]), max_new_tokens=6, do_sample=False)[0, 1:]
        ref = [int(t) for t in ref if int(t) != model.config.eos_token_id]
        assert len(ref) >= 3
        assert list(rt.generate_ids(src, max_tokens=6))[:len(ref)] == ref[:6]
        assert generate(rt, "the lazy dog", max_tokens=6) == rt.detokenize(ref[:6])
    with open_runtime(merged.out) as rt:
        assert _close(rt.logits(SRC, TGT), want["a"])


def test_quantized_export_runs_the_adapter_on_its_blocks(tmp_path):
    """q8_0 through llama.cpp's quantizer: the adapter rescales the blocks' scales; the result is
    the quantized base's own logits moved the way PEFT's adapter moves the f32 model's."""
    import copy

    d, model = _t5_dir(tmp_path, "gated-gelu")
    pm = random_t5_peft_adapter(copy.deepcopy(model), tmp_path / "a", every_site=True)
    e = export(str(d), tmp_path / "q8", quant="q8_0", adapters={"a": str(tmp_path / "a")})
    with open_runtime(e.out) as rt:
        base = rt.logits(SRC, TGT)
        rt.use_adapter("a")
        got = rt.logits(SRC, TGT)
    assert np.abs(base - _logits(model)).max() < 0.2  # q8_0's own rounding
    assert np.abs(got - _logits(pm)).max() < 0.2
    assert np.abs(got - base).max() > 0.5  # and the adapter does act


def test_relu_mlp_refuses_a_non_positive_feed_forward_scale(tmp_path):
    """A ReLU MLP folds wo's input scale into wi's rows only where it is positive: a negative
    one is refused with the reason (no file); the gated MLP takes it (its fold is exact)."""
    import copy

    for ff, ok in (("relu", False), ("gated-gelu", True)):
        d, model = _t5_dir(tmp_path / ff, ff)
        pm = random_t5_peft_adapter(copy.deepcopy(model), tmp_path / ff / "neg")
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "ia3_l" in name and ".wo." in name:
                    p[..., 0] = -0.5
        pm.save_pretrained(tmp_path / ff / "neg")
        out = tmp_path / ff / "out"
        if ok:
            export(str(d), out, quant="f32", adapters={"neg": str(tmp_path / ff / "neg")})
            continue
        res = invoke("export", "gguf", "--base", d, "--adapter", f"neg={tmp_path / ff / 'neg'}", "--quant", "f32",
                     "--out", out)
        assert_refused(res, out, "relu", "l > 0")


def test_bad_inputs_get_clear_errors(tmp_path):
    """A decoder-only adapter on a T5 GGUF, a T5 llama.cpp would compute differently, and a
    decoder-only GGUF opened as T5: each refused, naming the cause."""
    d, model = _t5_dir(tmp_path, "relu")
    llama = make_tiny_model("llama", tmp_path / "llama")
    from transformers import AutoModelForCausalLM

    random_peft_adapter(AutoModelForCausalLM.from_pretrained(llama), "llama", tmp_path / "llama-a")
    out = tmp_path / "e"
    res = invoke("export", "gguf", "--base", d, "--adapter", f"x={tmp_path / 'llama-a'}", "--quant", "f32",
                 "--out", out)
    assert_refused(res, out, "llama")
    far, _ = _t5_dir(tmp_path / "far", "relu", relative_attention_max_distance=64)
    with pytest.raises(EdgeIA3Error, match="relative_attention_max_distance=64"):
        write_hf_gguf(far, tmp_path / "far.gguf")
    assert not (tmp_path / "far.gguf").exists()
    written = write_hf_gguf(llama, tmp_path / "llama.gguf")
    with pytest.raises(EdgeIA3Error, match="no encoder"):
        T5LlamaRuntime(written.path)


def test_served_by_edgeia3_serve_with_per_request_adapters(unigram_tokenizer, tmp_path):
    """`edgeia3 serve` on a T5 GGUF export (127.0.0.1, the official openai client): the model list
    names the base and both adapters, and each request's answer is the runtime's own for that
    adapter, streamed or not (a lone user message is sent as its text, as training reads it).
    The runtime loads and unloads adapters while it runs like the decoder-only llama.cpp runtime."""
    import copy

    from serving import Server, chat

    d, model = _t5_dir(tmp_path, "gated-gelu", unigram_tokenizer)
    for n, s in (("a", 1), ("b", 2)):
        random_t5_peft_adapter(copy.deepcopy(model), tmp_path / n, seed=s, every_site=True)
    e = export(str(d), tmp_path / "e", quant="f32", adapters={n: str(tmp_path / n) for n in "ab"})
    prompt = "the lazy dog"
    with open_runtime(e.out) as rt:
        want = {}
        for name in (None, "a", "b"):
            rt.use_adapter(name)
            want[name or "base"] = generate(rt, prompt, max_tokens=8)
        assert rt.cannot_load() is None
        facts = rt.load_adapter("b2", tmp_path / "b", tmp_path / "work")  # b's PEFT dir, under another name
        assert facts["format"] == "peft" and rt.adapters == ["a", "b", "b2"]
        rt.use_adapter("b2")
        assert generate(rt, prompt, max_tokens=8) == want["b"]
        rt.unload_adapter("b2")
        assert rt.adapters == ["a", "b"] and rt.active is None
    assert want["a"] and want["a"] != want["b"]
    srv = Server(e.out, tmp_path / "serve.log")
    try:
        client = srv.client()
        assert [m.id for m in client.models.list()] == ["base", "a", "b"]
        for name in ("a", "base", "b", "a"):
            assert chat(client, name, prompt, max_tokens=8)[0] == want[name], name
        stream = client.chat.completions.create(model="b", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want["b"]
        # token ids out of the vocabulary and sources past the context are 400s, as for other models
        import openai

        with pytest.raises(openai.BadRequestError, match="token ids must lie in"):
            client.completions.create(model="a", prompt=[VOCAB + 5], max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="context"):
            client.completions.create(model="a", prompt=[5] * 5000, max_tokens=2)
    finally:
        srv.close()


def test_t5_onnx_server_checks_ids_and_context(unigram_tokenizer, tmp_path):
    """A T5 ONNX export served: the runtime protocol gives the server its vocabulary and context
    (before, the server knew neither for onnxruntime-t5 and let any id through)."""
    import copy

    import openai

    from edgeia3.steps.t5_export import export_t5
    from serving import Server, chat

    d, model = _t5_dir(tmp_path, "gated-gelu", unigram_tokenizer)
    random_t5_peft_adapter(copy.deepcopy(model), tmp_path / "a", every_site=True)
    export_t5(d, tmp_path / "onnx", {"a": tmp_path / "a"})
    with open_runtime(tmp_path / "onnx") as rt:
        assert rt.vocab_size == VOCAB and rt.context_length == 512  # what the GGUF writer records for T5
        rt.use_adapter("a")
        want = generate(rt, "the lazy dog", max_tokens=6)
    srv = Server(tmp_path / "onnx", tmp_path / "serve.log")
    try:
        client = srv.client()
        assert chat(client, "a", "the lazy dog", max_tokens=6)[0] == want
        with pytest.raises(openai.BadRequestError, match="token ids must lie in"):
            client.completions.create(model="a", prompt=[VOCAB + 5], max_tokens=2)
    finally:
        srv.close()


def test_report_and_torch_reference_cover_t5_exports(unigram_tokenizer, tmp_path):
    """`report` on a T5 ONNX (side and merged) and GGUF export: drift against the PyTorch
    reference, whose T5 path generates PEFT's greedy tokens; the ONNX-T5 manifest reads back
    its adapters exactly (read_export)."""
    import copy

    from edgeia3.export import read_export
    from edgeia3.steps.t5_export import export_t5
    from edgeia3.validate import load_adapter_for
    from edgeia3.report import ReportOptions, report
    from edgeia3.runtimes.torch_runtime import TorchRuntime
    from edgeia3 import load_base

    d, model = _t5_dir(tmp_path, "gated-gelu", unigram_tokenizer)
    pm = random_t5_peft_adapter(copy.deepcopy(model), tmp_path / "a", every_site=True)
    lb = load_base(d)
    ref = TorchRuntime(lb, {"a": load_adapter_for(tmp_path / "a", lb)})
    ref.use_adapter("a")
    src = ref.prompt_ids("the lazy dog")
    assert src[-1] == model.config.eos_token_id  # the source ends with EOS, as T5 trains on it
    with torch.no_grad():
        want = [int(t) for t in pm.generate(input_ids=torch.tensor([src]), max_new_tokens=6, do_sample=False)[0, 1:]]
    assert len(want) >= 3 and list(ref.generate_ids(src, 6)) == [t for t in want if t != model.config.eos_token_id]
    assert _close(ref.logits(SRC, TGT), _logits(pm))

    side, merged = tmp_path / "onnx", tmp_path / "onnx-merged"
    export_t5(d, side, {"a": tmp_path / "a"})
    export_t5(d, merged, {"a": tmp_path / "a"}, merge="a")
    gg = export(str(d), tmp_path / "gguf", quant="f32", adapters={"a": str(tmp_path / "a")}).out
    back = read_export(side).adapters()["a"]
    canonical = load_adapter_for(tmp_path / "a", lb)
    assert sorted(back.sites) == sorted(canonical.sites)
    assert all(np.array_equal(v.values, canonical.get(v.layer, v.site).values) for v in back.vectors)
    doc = report([side, merged, gg], tmp_path / "report", options=ReportOptions(runs=1, decode_tokens=4,
                                                                                  greedy_tokens=6))
    drift = {e["label"]: e["adapters"]["a"]["drift"] for e in doc["exports"]}
    assert set(drift) == {"onnx-t5 fp32 side", "onnx-t5 fp32 merged 'a'", "gguf f32 side"}
    for label, dr in drift.items():
        assert dr["max_abs_logit_diff"] < (1e-4 if "onnx" in label else TOL), (label, dr)
        assert dr["greedy_token_agreement"] == 1.0, label
    assert (tmp_path / "report" / "report.md").exists()


def test_an_adapter_trained_by_edgeia3_answers_the_same_on_every_runtime(unigram_tokenizer, tmp_path):
    """The whole T5 chain through the CLI: `edgeia3 train` on a label task, `export gguf` and
    `export onnx` (fp32, side); llama.cpp and onnxruntime answer every eval prompt as the trained
    model does in PyTorch, and that model learned the task."""
    import random

    from edgeia3 import load_base
    from edgeia3.runtimes.torch_runtime import TorchRuntime
    from edgeia3.validate import load_adapter_for

    d, _ = _t5_dir(tmp_path, "gated-gelu", unigram_tokenizer, dropout_rate=0.0)
    labels = {w: "warm" for w in ("red", "sun", "fire")} | {w: "cold" for w in ("ice", "snow", "frost")} \
        | {w: "wet" for w in ("sea", "rain", "lake")}  # words the Unigram vocabulary knows
    rng = random.Random(0)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": w, "completion": labels[w]}) + "\n"
                            for w in rng.choices(sorted(labels), k=48)))
    res = invoke("train", "--base", d, "--data", data, "--out", tmp_path / "ad", "--max-steps", "60", "--lr", "0.3",
                 "--batch-size", "8", "--quiet")
    assert res.exit_code == 0, res.output
    for fmt, extra in (("gguf", ["--quant", "f32"]), ("onnx", ["--precision", "fp32"])):
        res = invoke("export", fmt, "--base", d, "--adapter", f"t={tmp_path / 'ad'}", "--out", tmp_path / fmt, *extra)
        assert res.exit_code == 0, res.output
    lb = load_base(d)
    ref = TorchRuntime(lb, {"t": load_adapter_for(tmp_path / "ad", lb)})
    ref.use_adapter("t")
    words = sorted(labels)
    want = [generate(ref, w, max_tokens=4).strip() for w in words]
    assert sum(a == labels[w] for a, w in zip(want, words)) >= 6, want  # it learned the task
    for fmt in ("gguf", "onnx"):
        with open_runtime(tmp_path / fmt) as rt:
            rt.use_adapter("t")
            assert [generate(rt, w, max_tokens=4).strip() for w in words] == want, fmt
