"""`edgeia3 train` on every registered family (tiny random models, full precision):
the loss goes down, the vectors move, and the saved adapter validates against its base
and round-trips through PEFT (the support matrix's "train" column)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeia3 import load_adapter_for, load_base
from edgeia3.registry import families, family_for_config
from edgeia3.train import TrainConfig, train
from tiny_models import FAMILIES, write_label_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    return write_label_task(d / "train.jsonl", 32, seed=0), write_label_task(d / "eval.jsonl", 8, seed=1)


def test_every_family_is_trained_here():
    """Every decoder-only family is trained here (T5, encoder-decoder: test_t5_train.py)."""
    decoders = {n for n, f in families().items() if f.auto_model == "AutoModelForCausalLM"}
    assert {family_for_config({"model_type": t}).name for t in FAMILIES} == decoders


@pytest.mark.parametrize("model_type", FAMILIES)
def test_training_lowers_loss(model_type, tiny_dir, task, tmp_path):
    base = tiny_dir(model_type, tokenizer=True)
    cfg = TrainConfig(max_steps=8, batch_size=8, lr=3e-2, eval_accuracy=False, bf16=False)
    res = train(str(base), task[0], tmp_path / "ad", eval_data=task[1], quant="none", config=cfg, quiet=True)
    assert res.eval_after["loss"] < res.eval_before["loss"]
    lb = load_base(base)
    ad = load_adapter_for(tmp_path / "ad", lb)  # validated against the base it was trained on
    assert ad.family == lb.family.name and sorted(ad.sites) == sorted(lb.family.default_targets)
    assert max(float(np.abs(v.values - 1).max()) for v in ad.vectors) > 1e-3
