"""Integration on the embedded SmolLM2-135M-Instruct: merge via the CLI, inspect."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from edgeia3 import load_base
from edgeia3.base import default_gguf
from edgeia3.cli import app
from tiny_models import random_peft_adapter

pytestmark = pytest.mark.integration
runner = CliRunner()


def test_default_base_is_smollm2(smollm2):
    cfg = smollm2.config
    assert smollm2.family.name == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 3, 49152)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smollm2.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
    out = smollm2.model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0][ids["input_ids"].shape[1]:])


def test_merge_default_matches_peft_and_inspect(smollm2, tmp_path):
    pm = random_peft_adapter(copy.deepcopy(smollm2.model), "llama", tmp_path / "peft")
    n_params = sum(p.numel() for n, p in pm.named_parameters() if "ia3_l" in n)
    assert n_params == 57_600  # k (192) + v (192) + down (1536) per layer x 30
    ids = smollm2.tokenizer("IA3 rescales keys, values and feed-forward activations.", return_tensors="pt")
    with torch.no_grad():
        reference = pm.merge_and_unload()(**ids).logits

    res = runner.invoke(app, ["merge", "--base", "default", "--adapter", str(tmp_path / "peft"),
                              "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert "57,600" in res.output and "full-precision" in res.output
    merged = load_base(tmp_path / "merged")
    with torch.no_grad():
        ours = merged.model(**ids).logits
    assert (ours - reference).abs().max().item() <= 1e-5
    assert merged.tokenizer is not None  # tokenizer + chat template travel with the merge

    res = runner.invoke(app, ["inspect", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert "llama" in res.output and "merged adapter" in res.output
    assert smollm2.identity.fingerprint in res.output  # same structure as the base

    res = runner.invoke(app, ["inspect", str(tmp_path / "peft")])
    assert res.exit_code == 0 and "57,600" in res.output


def test_inspect_embedded_gguf(smollm2):
    res = runner.invoke(app, ["inspect", str(default_gguf())])
    assert res.exit_code == 0, res.output
    assert "llama" in res.output and "Q4_1" in res.output
    # the GGUF and the transformers model loaded from it have one identity
    assert f"{smollm2.identity.fingerprint}/{smollm2.identity.content}" in res.output
