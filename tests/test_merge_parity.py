"""Merge parity with PEFT and PEFT round trips, on a tiny random model per family."""

from __future__ import annotations

import dataclasses

import copy

import pytest
from peft import PeftModel

from edgeia3 import IA3Adapter, load_adapter_for, load_base, merge_loaded, write_peft_dir
from edgeia3.merge import merge
from tiny_models import FAMILIES, logits, random_peft_adapter
from edgeia3.formats import load_adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_matches_peft_merge_and_unload(family, tiny_dir, tmp_path):
    base = load_base(tiny_dir(family))
    pm = random_peft_adapter(copy.deepcopy(base.model), base.family.name, tmp_path / "peft")
    unmerged = logits(pm)
    reference = logits(pm.merge_and_unload())
    assert (unmerged - reference).abs().max() < 1e-5  # PEFT agrees with itself
    assert (reference - logits(base.model)).abs().max() > 1e-3  # the adapter does something

    adapter = load_adapter_for(tmp_path / "peft", base)
    assert adapter.family == base.family.name
    merged = merge_loaded(base, adapter)
    assert (logits(merged) - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_edgeia3_written_adapter_loads_in_peft(family, tiny_dir, tmp_path):
    """PEFT -> edgeia3 -> PEFT: PeftModel.from_pretrained gives the same logits."""
    base = load_base(tiny_dir(family))
    pm = random_peft_adapter(copy.deepcopy(base.model), base.family.name, tmp_path / "peft")
    expected = logits(pm)

    adapter = load_adapter_for(tmp_path / "peft", base)
    write_peft_dir(adapter, tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(load_base(tiny_dir(family)).model, tmp_path / "ours")
    assert (logits(reloaded) - expected).abs().max() <= 1e-6

    # and the canonical file alone round-trips every vector bit for bit
    again = load_adapter(tmp_path / "ours")
    assert [v.key for v in again.vectors] == [v.key for v in adapter.vectors]
    for a, b in zip(again.vectors, adapter.vectors):
        assert a.scaling is b.scaling and (a.values == b.values).all()


def test_fused_sites_split_and_pad(tiny_dir, tmp_path):
    """phi3's qkv_proj vector is split into q, k, v; a k/v-only adapter pads q with ones."""
    base = load_base(tiny_dir("phi3"))
    random_peft_adapter(copy.deepcopy(base.model), "phi3", tmp_path / "peft")
    adapter = load_adapter_for(tmp_path / "peft", base)
    assert adapter.sites == ["q", "k", "v", "down"]
    hd = 64 // 4
    assert adapter.get(0, "k").values.size == 2 * hd and adapter.get(0, "q").values.size == 4 * hd

    kv_only = IA3Adapter(adapter.family, [v for v in adapter.vectors if v.site != "q"],
                         fused_layout=adapter.fused_layout)
    write_peft_dir(kv_only, tmp_path / "kv")
    back = load_adapter_for(tmp_path / "kv", base)
    assert back.sites == ["k", "v", "down"]  # the all-ones q slice is identity and dropped
    peft = PeftModel.from_pretrained(load_base(tiny_dir("phi3")).model, tmp_path / "kv")
    assert (logits(peft) - logits(merge_loaded(base, kv_only))).abs().max() <= 1e-5


def test_merge_command_writes_loadable_model(tiny_dir, tmp_path):
    base = load_base(tiny_dir("qwen2"))
    pm = random_peft_adapter(copy.deepcopy(base.model), "qwen2", tmp_path / "peft")
    res = merge(base=str(tiny_dir("qwen2")), adapter=tmp_path / "peft", out=tmp_path / "merged")
    assert res.into.startswith("full-precision")
    merged = load_base(tmp_path / "merged")
    assert (logits(merged.model) - logits(pm)).abs().max() <= 1e-5
    assert not list(tmp_path.glob(".merged*"))  # no temp leftovers


def test_nf4_merge_is_exact_against_the_4bit_model(tiny_dir, tmp_path):
    """An adapter used on an NF4 base merges into the dequantized NF4 weights exactly."""
    path = tiny_dir("llama")
    nf4 = load_base(path, quant="nf4")
    pm = random_peft_adapter(nf4.model, "llama", tmp_path / "peft")
    four_bit = logits(pm)

    adapter = load_adapter_for(tmp_path / "peft", load_base(path))
    adapter = dataclasses.replace(adapter, quant="nf4")
    adapter.save(tmp_path / "peft")  # canonical file now says: trained on NF4
    res = merge(base=str(path), adapter=tmp_path / "peft", out=tmp_path / "merged")
    assert "NF4" in res.into
    merged = logits(load_base(tmp_path / "merged").model)
    assert (merged - four_bit).abs().max() <= 1e-4
    # merging into the original fp32 weights instead carries the quantization error
    full = merge(base=str(path), adapter=tmp_path / "peft", out=tmp_path / "full", into="full")
    assert "full" in full.into
    assert (logits(load_base(tmp_path / "full").model) - four_bit).abs().max() > 1e-3
