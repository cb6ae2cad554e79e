"""T5 / Flan-T5 (encoder-decoder), first part: the registry entry, merge equal to PEFT,
PEFT interop both ways, identity, and clear errors for what is not supported. Tiny random
models: the original ReLU MLP and Flan-T5's gated GELU."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import T5Config, T5EncoderModel

from edgeia3 import load_adapter_for, load_base, merge_loaded, to_peft_model, write_peft_dir
from edgeia3.errors import EdgeIA3Error
from edgeia3.formats.peft_dir import peft_target_modules, read_peft_dir
from edgeia3.registry import get_family
from tiny_models import make_tiny_t5, random_t5_peft_adapter

VARIANTS = {"relu": "relu", "gated": "gated-gelu"}


def _t5(out, ff, **kw):
    make_tiny_t5(out, ff, **kw)
    return out


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(input_ids=torch.randint(2, 128, (2, 9), generator=g),
                decoder_input_ids=torch.randint(2, 128, (2, 5), generator=g))


_peft_adapter = random_t5_peft_adapter


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_equals_peft_merge_and_unload(variant, tmp_path):
    d = _t5(tmp_path / "m", VARIANTS[variant])
    base = load_base(d)
    assert base.family.name == "t5"
    pm = _peft_adapter(copy.deepcopy(base.model), tmp_path / "peft")
    with torch.no_grad():
        want = pm.merge_and_unload()(**_inputs()).logits
    ad = load_adapter_for(tmp_path / "peft", base)
    # PEFT's defaults are edgeia3's: k, v in encoder, decoder and cross attention, and both wo
    assert sorted(ad.sites) == sorted(get_family("t5").default_targets)
    assert {v.scaling.value for v in ad.vectors if v.site.endswith("wo")} == {"input"}
    with torch.no_grad():
        plain = base.model(**_inputs()).logits
        got = merge_loaded(base, ad)(**_inputs()).logits  # folds into base.model
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the model
    assert (got - want).abs().max() < 1e-5


def test_edgeia3_written_adapter_loads_in_peft(tmp_path):
    d = _t5(tmp_path / "m", "gated-gelu")
    base = load_base(d)
    _peft_adapter(copy.deepcopy(base.model), tmp_path / "peft", seed=2)
    ad = load_adapter_for(tmp_path / "peft", base)
    # only some sites: the written PEFT config must target exactly those stacks
    part = type(ad)(ad.family, [v for v in ad.vectors if v.site in ("enc_k", "cross_v", "dec_wo")],
                    base=ad.base, quant=ad.quant)
    write_peft_dir(part, tmp_path / "out")
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base.model), tmp_path / "out")
    names = {n.split("base_model.model.")[1].rsplit(".ia3_l", 1)[0] for n, _ in pm.named_parameters() if "ia3_l" in n}
    assert names == {base.family.module_path(v.layer, base.family.site(v.site)) for v in part.vectors}
    with torch.no_grad():
        ours = to_peft_model(copy.deepcopy(base.model), part)(**_inputs()).logits
        theirs = pm(**_inputs()).logits
    assert (ours - theirs).abs().max() < 1e-6
    back = read_peft_dir(tmp_path / "out", family="t5")
    assert {(v.layer, v.site) for v in back.vectors} == {(v.layer, v.site) for v in part.vectors}


def test_peft_targets_are_per_stack():
    targets, ff = peft_target_modules(get_family("t5"), ["enc_k", "dec_wo"])
    import re

    assert re.fullmatch(targets, "encoder.block.1.layer.0.SelfAttention.k")
    assert not re.fullmatch(targets, "decoder.block.1.layer.0.SelfAttention.k")
    assert re.fullmatch(ff, "decoder.block.0.layer.2.DenseReluDense.wo")
    assert not re.fullmatch(ff, "encoder.block.0.layer.1.DenseReluDense.wo")


def test_identity_of_dir_and_model_agree(tmp_path):
    from edgeia3.fingerprint import identity_of_dir

    d = _t5(tmp_path / "m", "relu")
    assert load_base(d).identity.matches(identity_of_dir(d, get_family("t5")))


def test_bad_inputs_are_clear(tmp_path, tiny_dir):
    enc = tmp_path / "enc"
    T5EncoderModel(T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)).save_pretrained(enc)
    with pytest.raises(EdgeIA3Error, match="encoder-only"):
        load_base(enc)
    uneven = _t5(tmp_path / "uneven", "relu", num_decoder_layers=3)
    with pytest.raises(EdgeIA3Error, match="equal depths"):
        load_base(uneven)
    # a decoder-only adapter on a T5 base
    from tiny_models import random_peft_adapter

    llama = load_base(tiny_dir("llama"))
    random_peft_adapter(copy.deepcopy(llama.model), "llama", tmp_path / "llama_peft")
    with pytest.raises(EdgeIA3Error, match="llama|family"):
        load_adapter_for(tmp_path / "llama_peft", load_base(_t5(tmp_path / "t5", "relu")))
    # a T5 dir without tokenizer files: transformers would tokenize everything as unknown
    from edgeia3.train import train
    from tiny_models import write_label_task

    with pytest.raises(EdgeIA3Error, match="tokenizer files missing"):
        train(str(tmp_path / "t5"), write_label_task(tmp_path / "d.jsonl", 8), tmp_path / "ad", quant="none")
    assert not (tmp_path / "ad").exists()

