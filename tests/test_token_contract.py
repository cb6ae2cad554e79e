"""The token contract: the ids edgeia3 trains on, evaluates with and feeds at run time are the
ids the stock runtimes feed the exported model the ordinary way - transformers'
``tokenizer(text)`` / ``apply_chat_template(tokenize=True)``, onnxruntime-genai's
``Tokenizer.encode``, llama-cpp-python's ``Llama.tokenize`` defaults and
``create_chat_completion`` - for a tokenizer that adds BOS (as Gemma, Llama, Mistral and
Phi-3 do) and for one that adds none (SmolLM2). Expected ids come from those libraries,
never from edgeia3's own tokenization."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from edgeia3.adapter import IA3Adapter
from edgeia3.data import IGNORE, encode
from edgeia3.export import export_gguf, export_onnx
from edgeia3.runtimes import open_runtime
from edgeia3.tokens import RECORD_KEY, TokenContract
from edgeia3.train import TrainConfig, train
from tiny_models import VOCAB, make_tiny_model, make_tiny_tokenizer

PROMPTS = ["sun is", "the sea"]
MSGS = [{"role": "user", "content": "sun"}]
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bos_tokenizer(out, template_renders_bos: bool = True) -> None:
    """Byte-level BPE whose post-processor puts BOS first (as Llama 3's and Gemma's do), padded
    to the model's vocabulary so edgeia3's GGUF writer takes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(c for c in pre_tokenizers.ByteLevel.alphabet() if 33 <= ord(c) <= 126) + ["Ġ", "Ċ"]
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    merges = [("s", "u"), ("e", "a"), ("Ġ", "i")]  # llama.cpp wants merges in a BPE vocabulary
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
    fast.chat_template = BOS_TEMPLATE if template_renders_bos else BOS_TEMPLATE.replace("{{ bos_token }}", "")
    fast.save_pretrained(out)


def prompt_rows(path, n: int = 16) -> str:
    words = {"sun": "warm", "ice": "cold", "sea": "wet", "fire": "warm"}
    with open(path, "w") as f:
        for i in range(n):
            w = list(words)[i % len(words)]
            f.write(json.dumps({"prompt": f"{w} is", "completion": f" {words[w]}"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def bos_case(tmp_path_factory):
    """A tiny llama with a BOS-adding tokenizer, an adapter trained on it, and its exports."""
    tmp = tmp_path_factory.mktemp("bos")
    base = make_tiny_model("llama", tmp / "base")
    bos_tokenizer(base)
    data = prompt_rows(tmp / "train.jsonl")
    adapter = tmp / "adapter"
    train(str(base), data, adapter, quant="none", quiet=True,
          config=TrainConfig(max_steps=3, batch_size=4, lr=3e-2, seed=0))
    onnx = export_onnx(str(base), tmp / "onnx", "fp32", adapters={"a": str(adapter)}).out
    gguf = export_gguf(str(base), tmp / "gguf", quant="f32", adapters={"a": str(adapter)}).out
    merged = export_gguf(str(base), tmp / "merged", quant="f32", adapters={"a": str(adapter)}, merge="a").out
    return {"base": base, "adapter": adapter, "onnx": onnx, "gguf": gguf, "merged": merged,
            "hf": AutoTokenizer.from_pretrained(base), "data": data}


def _stock_llama(path, **kw):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), verbose=False, seed=0, **kw)


def test_training_rows_start_with_the_bos_the_tokenizer_adds(bos_case):
    hf = bos_case["hf"]
    ex = encode({"prompt": "sun is", "completion": " warm"}, hf, 64)
    assert ex.input_ids[0] == hf.bos_token_id and ex.labels[0] == IGNORE
    assert ex.input_ids[1:] == hf("sun is warm<|im_end|>", add_special_tokens=False)["input_ids"]
    chat = encode({"messages": [*MSGS, {"role": "assistant", "content": "warm"}]}, hf, 64)
    assert chat.input_ids.count(hf.bos_token_id) == 1 and chat.input_ids[0] == hf.bos_token_id  # template's own
    recorded = IA3Adapter.load(bos_case["adapter"]).extra[RECORD_KEY]
    assert recorded["add_bos"] is True and recorded["bos_id"] == hf.bos_token_id


def test_every_runtime_feeds_what_the_stock_runtimes_feed(bos_case):
    import onnxruntime_genai as og

    hf = bos_case["hf"]
    want_text = {p: hf(p)["input_ids"] for p in PROMPTS}
    want_chat = hf.apply_chat_template(MSGS, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert all(ids[0] == hf.bos_token_id for ids in want_text.values()) and want_chat.count(hf.bos_token_id) == 1

    og_tok = og.Tokenizer(og.Model(str(bos_case["onnx"])))
    # genai 0.18's encode adds no special tokens by default (measured); this is its switch for
    # the tokenizer's own post-processor, which the README tells genai users to set
    og_tok.update_options(add_special_tokens="true")
    vocab = _stock_llama(bos_case["gguf"] / "model.gguf", vocab_only=True)
    for p, want in want_text.items():
        assert [int(t) for t in og_tok.encode(p)] == want
        assert vocab.tokenize(p.encode()) == want  # llama-cpp-python's defaults
    vocab.close()

    for where in (bos_case["base"], bos_case["onnx"], bos_case["gguf"]):
        rt = open_runtime(where, adapters={"a": str(bos_case["adapter"])}) if where == bos_case["base"] \
            else open_runtime(where)
        rt.use_adapter("a")
        for p, want in want_text.items():
            assert rt.prompt_ids(p) == want, (rt.name, p)
        assert rt.prompt_ids(MSGS) == want_chat, rt.name
        rt.close()

    # llama-cpp-python's chat completion renders the GGUF's template: the same prompt length
    llm = _stock_llama(bos_case["gguf"] / "model.gguf", n_ctx=128)
    out = llm.create_chat_completion(messages=MSGS, max_tokens=1, temperature=0.0)
    assert out["usage"]["prompt_tokens"] == len(want_chat)
    llm.close()


def test_stock_llama_cpp_answers_as_the_trained_model(bos_case):
    """The merged GGUF, fed by llama-cpp-python's default tokenization, continues each prompt with
    the tokens the trained adapter gives in PyTorch (fp32 on both sides: the same greedy tokens)."""
    import itertools

    rt = open_runtime(bos_case["base"], adapters={"a": str(bos_case["adapter"])})
    rt.use_adapter("a")
    trained = {p: list(rt.generate_ids(rt.prompt_ids(p), 6, ignore_eos=True)) for p in PROMPTS}
    rt.close()
    llm = _stock_llama(bos_case["merged"] / "model.gguf", n_ctx=128)
    for p in PROMPTS:
        stream = llm.generate(llm.tokenize(p.encode()), top_k=1, temp=0.0)
        assert list(itertools.islice(stream, 6)) == trained[p], p
    llm.close()


def test_a_tokenizer_that_adds_nothing_gets_nothing(tmp_path):
    base = make_tiny_model("llama", tmp_path / "base")
    make_tiny_tokenizer(base, bpe=True)
    hf = AutoTokenizer.from_pretrained(base)
    contract = TokenContract.of_tokenizer(hf)
    assert not contract.add_bos and not contract.add_eos
    ex = encode({"prompt": "sun is", "completion": " warm"}, hf, 64)
    assert ex.input_ids == hf("sun is warm<|im_end|>")["input_ids"]


def test_the_rule_never_doubles_bos():
    c = TokenContract(add_bos=True, bos_id=1)
    assert c.wrap([5, 6]) == [1, 5, 6] and c.wrap([1, 5]) == [1, 5]
    t5 = TokenContract(add_eos=True, eos_id=2)
    assert t5.wrap([5]) == [5, 2] and t5.wrap([5, 2]) == [5, 2]
    assert TokenContract.recorded(None) == TokenContract()  # older adapters: nothing was added


def test_an_adapter_trained_without_bos_is_flagged_where_bos_is_fed(bos_case, tmp_path):
    """An adapter from before the contract (no record: trained with nothing added) on a base whose
    runtimes feed BOS: the exports say so, --strict refuses, and the manifests record both sides."""
    import dataclasses

    from edgeia3.errors import EdgeIA3Error

    ad = IA3Adapter.load(bos_case["adapter"])
    legacy = dataclasses.replace(ad, extra={k: v for k, v in ad.extra.items() if k != RECORD_KEY})
    path = legacy.save(tmp_path / "legacy.safetensors")
    for export, kw in ((export_onnx, {"precision": "fp32"}), (export_gguf, {"quant": "f32"})):
        res = export(str(bos_case["base"]), tmp_path / export.__name__, adapters={"old": str(path)}, **kw)
        assert any("trained with no special tokens" in n and "BOS (id 1) first" in n for n in res.notes), res.notes
        with pytest.raises(EdgeIA3Error, match="--strict"):
            export(str(bos_case["base"]), tmp_path / f"{export.__name__}-strict", adapters={"old": str(path)},
                   strict=True, **kw)
        assert not (tmp_path / f"{export.__name__}-strict").exists()
    m = json.loads((bos_case["gguf"] / "edgeia3.json").read_text())
    assert m[RECORD_KEY]["add_bos"] and m["adapters"]["a"][RECORD_KEY]["add_bos"]


def test_a_vocabulary_llama_cpp_refuses_is_said_not_guessed(tiny_dir, tmp_path):
    """A BPE vocabulary without merges (llama.cpp will not load it): the GGUF export still completes,
    says so, and records the rule as unknown instead of guessing llama.cpp's defaults."""
    from edgeia3.converters.gguf.llama_vocab import llama_cpp_tokens

    base = tiny_dir("llama", tokenizer="bpe")
    res = export_gguf(str(base), tmp_path / "g", quant="f32")
    assert llama_cpp_tokens(res.out / "model.gguf") is None
    assert any("cannot load this GGUF's vocabulary" in n for n in res.notes)
    assert json.loads((res.out / "edgeia3.json").read_text())[RECORD_KEY] is None
