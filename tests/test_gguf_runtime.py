"""llama.cpp runtime on the embedded SmolLM2 Q4_1: accuracy against PEFT, and
in-place adapter swap bit-identical to freshly loaded merged files."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeia3.steps.gguf_merge import merge_gguf
from edgeia3.base import default_gguf
from edgeia3.cli import app
from edgeia3.runtimes import generate, open_runtime
from edgeia3.runtimes.llama_runtime import IN_PLACE, RELOAD, LlamaCppRuntime
from tiny_models import random_peft_adapter

pytestmark = pytest.mark.integration
TEXT = "IA3 rescales keys, values and feed-forward activations of a frozen model."


@pytest.fixture(scope="module")
def peft_pair(smollm2, tmp_path_factory):
    """Two random PEFT IA3 adapters on SmolLM2 (the dequantized Q4_1 weights) and their PEFT models."""
    root = tmp_path_factory.mktemp("smol_adapters")
    models = {}
    for name, seed in (("A", 1), ("B", 2)):
        models[name] = random_peft_adapter(copy.deepcopy(smollm2.model), "llama", root / name, seed=seed).eval()
    return root, models


@pytest.fixture(scope="module")
def export_dir(peft_pair, tmp_path_factory):
    root, _ = peft_pair
    out = tmp_path_factory.mktemp("export") / "smol"
    res = CliRunner().invoke(app, ["export", "gguf", "--base", "default", "--out", str(out),
                                   "--adapter", f"A={root / 'A'}", "--adapter", f"B={root / 'B'}"])
    assert res.exit_code == 0, res.output
    assert "A.ia3.gguf" in res.output and "57,600" in res.output
    return out


@pytest.fixture(scope="module")
def rt(export_dir):
    runtime = open_runtime(export_dir)
    yield runtime
    runtime.close()


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def test_adapter_logits_match_peft(rt, smollm2, peft_pair):
    _, peft = peft_pair
    ids = smollm2.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert rt.prompt_ids(TEXT) == ids  # llama.cpp tokenizes like transformers
    rt.use_adapter(None)
    base_gap = np.abs(rt.logits(ids) - _torch_logits(smollm2.model, ids)).mean()  # llama.cpp's own error
    for name in ("A", "B"):
        rt.use_adapter(name)
        gap = np.abs(rt.logits(ids) - _torch_logits(peft[name], ids)).mean()
        assert gap <= base_gap + 0.05, (name, gap, base_gap)
        shift = np.abs(_torch_logits(peft[name], ids) - _torch_logits(smollm2.model, ids)).mean()
        assert shift > 5 * (gap - base_gap + 0.01)  # the adapter matters far more than the error


def test_swap_is_in_place_and_bit_identical_to_merged_files(rt, export_dir, peft_pair, tmp_path):
    root, _ = peft_pair
    assert rt.swap_mode == IN_PLACE and rt.adapters == ["A", "B"]
    ids = rt.prompt_ids([{"role": "user", "content": "Name three colours."}])
    seen = {}
    for name in ("A", "B", "A", None):
        rt.use_adapter(name)
        assert rt.last_switch_seconds < 1.0
        seen.setdefault(name, []).append(rt.logits(ids))
    assert np.array_equal(seen["A"][0], seen["A"][1])
    for name in ("A", "B"):
        merged = merge_gguf(default_gguf(), root / name, tmp_path / f"{name}.gguf").out
        with LlamaCppRuntime(merged) as fresh:
            assert np.array_equal(fresh.logits(ids), seen[name][0]), name
    with LlamaCppRuntime(default_gguf()) as plain:
        assert np.array_equal(plain.logits(ids), seen[None][0])  # None restores the pristine base
    assert not np.array_equal(seen["A"][0], seen["B"][0])


def test_reload_path_gives_the_same_logits(export_dir, rt):
    ids = rt.prompt_ids(TEXT)
    rt.use_adapter("B")
    want = rt.logits(ids)
    rel = open_runtime(export_dir, swap=RELOAD)
    try:
        assert rel.swap_mode == RELOAD
        rel.use_adapter("B")
        assert np.array_equal(rel.logits(ids), want)
        assert generate(rel, TEXT, 8) == generate(rt, TEXT, 8)
    finally:
        rel.close()


def test_merged_export_and_cli_run(peft_pair, tmp_path):
    root, _ = peft_pair
    out = tmp_path / "merged"
    runner = CliRunner()
    res = runner.invoke(app, ["export", "gguf", "--base", "default", "--out", str(out),
                              "--adapter", f"A={root / 'A'}", "--merge", "A"])
    assert res.exit_code == 0, res.output
    assert "merged exactly" in res.output
    direct = merge_gguf("default", root / "A", tmp_path / "A.gguf").out
    assert (out / "model.gguf").read_bytes() == direct.read_bytes()
    res = runner.invoke(app, ["run", "--model", str(out), "--adapter", "A", "--prompt", "Hi", "--max-tokens", "5"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["run", "--model", str(out), "--prompt", "Hi", "--max-tokens", "5"])
    assert res.exit_code == 0, res.output  # no adapter = the merged model, as for ONNX
    res = runner.invoke(app, ["run", "--model", str(out), "--adapter", "B", "--prompt", "Hi"])
    assert res.exit_code == 2 and "merged" in res.output
