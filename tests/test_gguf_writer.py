"""edgeia3's transformers -> GGUF writer: the files load in llama.cpp and agree
with transformers (logits, 20 greedy tokens); export from a transformers dir."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

from edgeia3.steps.gguf_export import export
from edgeia3.converters.gguf.hf_writer import write_hf_gguf
from edgeia3.base import load_base, resolve_base
from edgeia3.runtimes.llama_runtime import LlamaCppRuntime
from edgeia3.runtimes.torch_runtime import TorchRuntime
from tiny_models import random_peft_adapter

IDS = [5, 17, 99, 3, 42, 77, 8, 120, 64, 33, 11, 90]


def _greedy_torch(model, ids, n=20):
    """20 greedy tokens from full forwards (no EOS stop or suppression on either side)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def _greedy_llama(rt, ids, n=20):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(rt.logits(seq)[-1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("family,dtype,tol", [("llama", "f32", 2e-3), ("llama", "f16", 5e-2),
                                              ("qwen2", "f32", 2e-3)])
def test_tiny_model_matches_transformers(tiny_dir, tmp_path, family, dtype, tol):
    d = tiny_dir(family)
    path = write_hf_gguf(d, tmp_path / "m.gguf", dtype=dtype).path
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    with LlamaCppRuntime(path) as rt:
        got = rt.logits(IDS)
        assert got.shape == want.shape
        assert np.abs(got - want).max() < tol
        assert _greedy_llama(rt, IDS[:4]) == _greedy_torch(model, IDS[:4])


@pytest.mark.integration
def test_smollm2_f16_matches_transformers(smollm2, tmp_path):
    hf = resolve_base("default").hf_path
    written = write_hf_gguf(hf, tmp_path / "smol.f16.gguf", dtype="f16")
    assert written.pre_verified and "smollm" in written.tokenizer
    meta = GGUFReader(str(written.path)).fields
    assert meta["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(meta["tokenizer.ggml.merges"].data) == 48900
    assert "im_start" in meta["tokenizer.chat_template"].contents()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    torch_rt = TorchRuntime(smollm2)
    with LlamaCppRuntime(written.path) as rt:
        ids = rt.prompt_ids(msgs)
        assert ids == torch_rt.prompt_ids(msgs)  # same chat rendering and tokenizer
        gap = np.abs(rt.logits(ids) - torch_rt.logits(ids))
        assert gap.mean() < 0.05 and gap.max() < 0.5  # f16 weights vs fp32
        assert _greedy_llama(rt, ids) == _greedy_torch(smollm2.model, ids)
        assert "Paris" in rt.detokenize(list(rt.generate_ids(ids, 12)))


def test_export_from_transformers_quantized_with_merge(tiny_dir, tmp_path):
    d = tiny_dir("llama", hidden_size=256, intermediate_size=512)
    base = load_base(d)
    random_peft_adapter(copy.deepcopy(base.model), "llama", tmp_path / "peft", seed=4)
    res = export(str(d), tmp_path / "out", quant="q4_k_m", adapters={"x": str(tmp_path / "peft")}, merge="x")
    text = str(res)
    assert "q4_k_m" in text and "merged" in text and "x.ia3.gguf" in text
    # the adapter (made for the fp32 transformers base) is accepted through the recorded source identity
    reader = GGUFReader(str(tmp_path / "out" / "model.gguf"))
    assert reader.fields["edgeia3.source.fingerprint"].contents() == base.identity.fingerprint
    with LlamaCppRuntime(tmp_path / "out" / "model.gguf") as rt:
        assert np.isfinite(rt.logits(IDS)).all()
