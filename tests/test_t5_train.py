"""`edgeia3 train` on T5 / Flan-T5 (encoder-decoder): prompt -> encoder, completion -> decoder
target. On tiny random models (the original ReLU MLP and Flan-T5's gated GELU) with a
character tokenizer: the loss drops, the PEFT-loaded adapter answers a label task better
than the base, PEFT equals edgeia3's merge, and bad input is refused with exit code 2."""

from __future__ import annotations

import json
import random

import pytest
import torch

from cli_checks import assert_refused, invoke
from edgeia3 import load_adapter_for, load_base, merge_loaded
from edgeia3.formats import load_adapter
from edgeia3.registry import get_family
from edgeia3.seq2seq import FLAT_CHAT, encode
from edgeia3.train import TrainConfig, train
from tiny_models import make_tiny_t5, make_tiny_t5_tokenizer, write_label_task

VARIANTS = {"relu": "relu", "gated": "gated-gelu"}
LABELS = {"red": "W", "sun": "W", "fire": "W", "ice": "C", "snow": "C", "frost": "C", "sea": "R", "rain": "R",
          "lake": "R"}


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """Factory: a saved tiny T5 of a variant with its tokenizer (no dropout: a 64-wide model
    learns the task in a few dozen steps only without it)."""
    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            d = tmp_path_factory.mktemp(f"t5_{variant}")
            make_tiny_t5(d, VARIANTS[variant], dropout_rate=0.0)
            make_tiny_t5_tokenizer(d)
            cache[variant] = d
        return cache[variant]

    return get


def _label_rows(path, words):
    path.write_text("".join(json.dumps({"prompt": w, "completion": LABELS[w]}) + "\n" for w in words))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5_task")
    rng = random.Random(0)
    train_rows = [rng.choice(sorted(LABELS)) for _ in range(48)]
    return _label_rows(d / "train.jsonl", train_rows), _label_rows(d / "eval.jsonl", sorted(LABELS))


def _greedy(model, tok, words):
    """Greedy answers of ``model`` (encoder input: the word + EOS, as training encodes it)."""
    seqs = [tok(w, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for w in words]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=1)
    return tok.batch_decode(out, skip_special_tokens=True)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(input_ids=torch.randint(3, 128, (2, 9), generator=g),
                decoder_input_ids=torch.randint(3, 128, (2, 5), generator=g))


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_learns_labels_and_loads_in_peft(variant, t5_dir, task, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    d, out = t5_dir(variant), tmp_path / "ad"
    cfg = TrainConfig(max_steps=30, batch_size=8, lr=0.3, eval_accuracy=True, bf16=False)
    res = train(str(d), task[0], out, eval_data=task[1], config=cfg, quiet=True)  # quant auto: none for T5
    assert res.steps == 30 and res.warnings == []
    assert sum(res.loss_curve[-5:]) < sum(res.loss_curve[:5]) / 2
    assert res.eval_after["loss"] < res.eval_before["loss"] / 2
    report = json.loads((out / "training.json").read_text())
    assert report["quant"] == "none" and report["family"] == "t5" and report["chat_template"] is None
    assert sorted(report["sites"]) == sorted(get_family("t5").default_targets)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "edgeia3_adapter.safetensors", "training.json"]
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"

    # PEFT-loaded, greedy generate: the labels, far better than the base
    tok = load_base(d).tokenizer
    words = sorted(LABELS)
    base_model = AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    before = _greedy(base_model, tok, words)
    pm = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(d), out).eval()
    after = _greedy(pm, tok, words)
    hits_before = sum(a == LABELS[w] for a, w in zip(before, words))
    hits_after = sum(a == LABELS[w] for a, w in zip(after, words))
    assert hits_after >= 6 and hits_after > hits_before, (before, after)
    # train()'s own evaluation reports what the saved adapter does
    assert res.eval_after["accuracy"] == round(hits_after / len(words), 4), (res.eval_after, after)
    assert res.eval_before["accuracy"] == round(hits_before / len(words), 4), (res.eval_before, before)

    # the PEFT dir and edgeia3's merge of the canonical adapter compute the same model
    lb = load_base(d)
    ad = load_adapter(out)
    assert ad.quant == "none" and ad.base.matches(lb.identity)
    load_adapter_for(out, lb)  # validated against the base it was trained on
    with torch.no_grad():
        plain = lb.model(**_inputs()).logits
        want = pm(**_inputs()).logits
        got = merge_loaded(lb, ad)(**_inputs()).logits
    assert (want - plain).abs().max() > 1e-2
    assert (got - want).abs().max() < 1e-5


def test_encoding_rules(t5_dir):
    """prompt -> encoder (+ EOS), completion -> labels (+ EOS); a lone user message equals a
    prompt row; longer chats flatten to role-prefixed lines; cutting keeps the encoder EOS."""
    tok = load_base(t5_dir("relu")).tokenizer
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    plain = encode({"prompt": "sea", "completion": "wet"}, tok, 64, FLAT_CHAT, "x")
    assert plain.input_ids == ids("sea") + [1] and plain.labels == ids("wet") + [1]
    chat = encode({"messages": [{"role": "user", "content": "sea"}, {"role": "assistant", "content": "wet"}]},
                  tok, 64, FLAT_CHAT, "x")
    assert (chat.input_ids, chat.labels, chat.target) == (plain.input_ids, plain.labels, "wet")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sea"},
            {"role": "assistant", "content": "wet"}, {"role": "user", "content": "sun"},
            {"role": "assistant", "content": "warm"}]
    multi = encode({"messages": msgs}, tok, 64, FLAT_CHAT, "x")
    assert multi.input_ids == ids("system: be brief\nuser: sea\nassistant: wet\nuser: sun") + [1]
    assert multi.labels == ids("warm") + [1] and multi.prompt == msgs[:-1]
    cut = encode({"prompt": "a long prompt", "completion": "ok"}, tok, 8, FLAT_CHAT, "x")
    assert cut.input_ids == ids("a long ") + [1]


def test_cli_trains_chat_rows_and_records_the_flat_template(t5_dir, tmp_path):
    data = write_label_task(tmp_path / "chat.jsonl", 16)
    out = tmp_path / "ad"
    res = invoke("train", "--base", t5_dir("gated"), "--data", data, "--out", out, "--max-steps", "4",
                 "--batch-size", "4", "--quant", "none", "--no-bf16", "--quiet")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 4 and report["chat_template"] == "seq2seq-flat" and report["tokens_per_second"] > 0
    assert load_adapter(out).extra["chat_template"] == FLAT_CHAT  # run / serve render prompts the same way


@pytest.mark.parametrize("content, args, needle", [
    ('{"prompt": "sea"}\n', (), "'prompt' and 'completion' must both be strings"),
    ('{"text": "sea is wet"}\n', (), "no input / target split"),
    ('{"prompt": "sea", "completion": "R"}\n', ("--quant", "nf4"), "full precision only"),
    ('{"prompt": "sea", "completion": "R"}\n', ("--quant", "q4_0"), "--quant none"),
    ('{"prompt": "sea", "completion": "R"}\n', ("--quant", "int3"), "unknown quantization"),
])
def test_bad_input_is_refused(content, args, needle, t5_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    out = tmp_path / "ad"
    res = invoke("train", "--base", t5_dir("relu"), "--data", data, "--out", out, "--max-steps", "2", "--quiet", *args)
    assert_refused(res, out, needle)


def test_a_base_without_tokenizer_files_is_refused(tmp_path):
    """transformers builds an empty T5 tokenizer for a directory without tokenizer files;
    training on the unknown tokens it makes of every row would be silent garbage."""
    make_tiny_t5(tmp_path / "m", "relu")
    out = tmp_path / "ad"
    res = invoke("train", "--base", tmp_path / "m", "--data", write_label_task(tmp_path / "d.jsonl", 8), "--out", out,
                 "--quant", "none", "--max-steps", "2", "--quiet")
    assert_refused(res, out, "tokenizer files missing")
