"""Every family edgeia3's GGUF writer covers, on tiny random models: llama.cpp loads
the written file and computes what transformers computes on the same weights; the
GGUF read back as a base has the transformers dir's identity; an adapter made for
one deploys on the other (side and merged, against PEFT)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeia3 import load_adapter_for, load_base, to_peft_model
from edgeia3.converters.gguf.base_gguf import GGUFBase
from edgeia3.steps.gguf_export import export
from edgeia3.converters.gguf.hf_writer import write_hf_gguf
from edgeia3.errors import EdgeIA3Error
from edgeia3.fingerprint import identity_of_dir
from edgeia3.registry import families, family_for_config
from edgeia3.runtimes import open_runtime
from edgeia3.runtimes.llama_runtime import LlamaCppRuntime
from tiny_models import make_tiny_model, random_peft_adapter

IDS = [5, 17, 99, 3, 42, 77, 8, 120, 64, 33, 11, 90]
# llama.cpp scales Gemma's attention by head_dim (16 in the tiny configs), not by the
# config's query_pre_attn_scalar (256 by default): the tiny Gemmas use head_dim.
OVERRIDES = {"gemma2": {"query_pre_attn_scalar": 16}, "gemma3_text": {"query_pre_attn_scalar": 16}}
WRITABLE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2"]
# llama.cpp vs transformers on the same f32 weights: its own compute floor on these
# tiny models (Gemma 2's tanh soft-capping and GELU approximations cost a little more).
TOL = 5e-3


def get_family(model_type):
    return family_for_config({"model_type": model_type})


def _written(tiny_dir, tmp_path, family):
    d = tiny_dir(family, **OVERRIDES.get(family, {}))
    return d, write_hf_gguf(d, tmp_path / f"{family}.gguf", dtype="f32").path


def test_every_writable_family_is_listed():
    """The lists are the registry's: a new family with a GGUF writer gets these tests
    (phi3 in test_gguf_spm.py: llama.cpp's phi3 loader needs a real vocabulary; t5, an
    encoder-decoder, in test_t5_gguf.py; falcon's layouts in test_falcon.py)."""
    assert sorted(f for f, fam in families().items() if fam.gguf_writer) == sorted(
        {get_family(f).name for f in WRITABLE + ["phi3", "t5", "falcon"]})


@pytest.mark.parametrize("family", WRITABLE)
def test_llama_cpp_matches_transformers_and_identity_round_trips(tiny_dir, tmp_path, family):
    d, path = _written(tiny_dir, tmp_path, family)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    with LlamaCppRuntime(path) as rt:
        got = rt.logits(IDS)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()
    fam = get_family(family)
    ident = identity_of_dir(d, fam)
    assert GGUFBase(path).identity.matches(ident)
    # transformers' own GGUF loader (the way edgeia3 loads a GGUF base) agrees too
    assert load_base(str(path), quant="none").identity.matches(ident)


@pytest.mark.parametrize("family", WRITABLE)
def test_adapter_for_the_dir_deploys_on_its_gguf(tiny_dir, tmp_path, family):
    d, path = _written(tiny_dir, tmp_path, family)
    assert_deploys(d, path, family, tmp_path)


def assert_deploys(d, path, family, tmp_path, ids=IDS):
    """A PEFT adapter made on the transformers dir, exported against the GGUF written
    from it (side and merged), gives PEFT's logits in llama.cpp. llama.cpp swaps and
    merges by rescaling block-scale rows; GPT-2's MLP is not gated, so its feed-forward
    (input-column) vector has no exact row form: refused, and attention-only adapters deploy."""
    base = load_base(d)
    fam = get_family(family)
    if not fam.gated_mlp:
        random_peft_adapter(copy.deepcopy(base.model), fam.name, tmp_path / "with_down", seed=3)
        with pytest.raises(EdgeIA3Error, match="no exact row-scale fold"):
            export(str(path), tmp_path / "refused", adapters={"t": str(tmp_path / "with_down")})
        assert not (tmp_path / "refused").exists()
    sites = None if fam.gated_mlp else ("q", "k", "v")
    random_peft_adapter(copy.deepcopy(base.model), fam.name, tmp_path / "peft", seed=3, sites=sites)
    ad = load_adapter_for(tmp_path / "peft", base)
    with torch.no_grad():
        plain = base.model(input_ids=torch.tensor([ids])).logits[0].numpy()
        want = to_peft_model(copy.deepcopy(base.model), ad)(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(want - plain).max() > 1e-2  # the adapter changes the model
    adapters = {"t": str(tmp_path / "peft")}
    side = export(str(path), tmp_path / "side", adapters=adapters)
    merged = export(str(path), tmp_path / "merged", adapters=adapters, merge="t")
    with open_runtime(side.out) as rt:
        rt.use_adapter("t")
        assert np.abs(rt.logits(ids) - want).max() < TOL
        rt.use_adapter(None)  # swapped back in place: the base again
        assert np.abs(rt.logits(ids) - plain).max() < TOL
    with open_runtime(merged.out) as rt:
        assert np.abs(rt.logits(ids) - want).max() < TOL


def test_gguf_trained_adapter_is_accepted_by_the_dir(tiny_dir, tmp_path):
    """The reverse direction: an adapter made for the GGUF base validates on the dir."""
    from edgeia3.adapter import identity_adapter

    d, path = _written(tiny_dir, tmp_path, "gemma3_text")
    gguf_base = load_base(str(path), quant="none")
    ad = identity_adapter(gguf_base.family, gguf_base.model, base=gguf_base.identity)
    ad.save(tmp_path / "ad")
    assert load_adapter_for(tmp_path / "ad", load_base(d)).family == "gemma3_text"


@pytest.mark.parametrize("family,override,words", [
    ("gemma3_text", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar"),
    ("gemma2", {"layer_types": ["full_attention", "full_attention"]}, "layer_types"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE"),
])
def test_configs_llama_cpp_would_compute_differently_are_refused(tmp_path, family, override, words):
    d = make_tiny_model(family, tmp_path / "m", **{**OVERRIDES.get(family, {}), **override})
    with pytest.raises(EdgeIA3Error, match=words):
        write_hf_gguf(d, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
