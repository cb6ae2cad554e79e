"""Training on tiny random models: vectors move, loss drops, guards fire, bad data is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeia3 import EdgeIA3Error, load_base
from edgeia3.cli import app
from edgeia3.peft_model import wrap_with_ia3
from edgeia3.train import TrainConfig, _Guard, train
from tiny_models import input_ids, write_label_task
from edgeia3.formats import load_adapter

runner = CliRunner()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    return write_label_task(d / "train.jsonl", 48, seed=0), write_label_task(d / "eval.jsonl", 16, seed=1)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_training_moves_vectors_and_lowers_loss(quant, tiny_dir, task, tmp_path):
    base = tiny_dir("llama", tokenizer=True)
    cfg = TrainConfig(max_steps=12, batch_size=8, lr=3e-2, eval_accuracy=True)
    res = train(str(base), task[0], tmp_path / "ad", eval_data=task[1], quant=quant, config=cfg, quiet=True)
    assert res.steps == 12
    assert res.eval_after["loss"] < res.eval_before["loss"]
    assert np.mean(res.loss_curve[-3:]) < np.mean(res.loss_curve[:3])
    adapter = load_adapter(tmp_path / "ad")
    assert adapter.quant == quant and adapter.sites == ["k", "v", "down"]
    assert max(float(np.abs(v.values - 1).max()) for v in adapter.vectors) > 1e-3
    assert adapter.base is not None and adapter.base.matches(load_base(base).identity)
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "edgeia3_adapter.safetensors",
                     "training.json"]  # nothing pickled
    report = json.loads((tmp_path / "ad" / "training.json").read_text())
    assert report["quant"] == quant and len(report["loss_curve"]) == 12
    assert report["tokens_per_second"] > 0 and report["eval_after"] == res.eval_after
    # the reported answers and accuracy are the saved adapter's, recomputed apart from train()
    preds, targets = greedy_reference(base, quant, tmp_path / "ad", task[1])
    after = res.eval_after
    assert [s["prediction"] for s in after["samples"]] == preds[:3], (after["samples"], preds[:3])
    assert [s["target"] for s in after["samples"]] == targets[:3]
    exact = sum(p.strip() == t.strip() for p, t in zip(preds, targets)) / len(targets)
    assert after["rows"] == len(targets) and after["accuracy"] == round(exact, 4), (after, preds)


def greedy_reference(base_dir, quant: str, adapter_dir, eval_file) -> tuple[list[str], list[str]]:
    """The saved adapter's greedy answer to every eval row, computed apart from train()'s
    evaluation (batched, left-padded ``model.generate`` on the live PEFT model): one row at a
    time with a KV cache (TorchRuntime) on a fresh load of the weights the evaluation runs on
    (NF4: their dequantized fp32 twin). As in ``generate``, an answer ends at the model's
    generation-config EOS and is decoded without special tokens."""
    import dataclasses

    from edgeia3.data import load_examples
    from edgeia3.merge import dequantize_model
    from edgeia3.runtimes.torch_runtime import TorchRuntime

    lb = load_base(base_dir, quant=quant)
    if quant == "nf4":
        lb = dataclasses.replace(lb, model=dequantize_model(lb.model), quant="none")
    rt = TorchRuntime(lb, {"trained": load_adapter(adapter_dir)})
    rt.use_adapter("trained")
    tok = lb.tokenizer
    examples = load_examples(eval_file, tok, 256)
    budget = max(len(tok(e.target, add_special_tokens=False)["input_ids"]) for e in examples) + 4
    eos = lb.model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos])
    preds = []
    for e in examples:
        ids = []
        for t in rt.generate_ids(rt.prompt_ids(e.prompt), budget, ignore_eos=True):
            if t in stop:
                break
            ids.append(t)
        preds.append(tok.decode(ids, skip_special_tokens=True))
    return preds, [e.target for e in examples]


def test_nf4_eval_pass_does_not_freeze_training(tiny_dir):
    """An eval-mode, no-grad forward of the 4-bit model between training steps used to repack
    the bnb weights and kill every IA3 gradient; with load_base's protection it does not."""
    lb = load_base(tiny_dir("llama", intermediate_size=128), quant="nf4")
    model = wrap_with_ia3(lb, ["k", "v", "down"])
    params = {n: p for n, p in model.named_parameters() if "ia3_l" in n}
    guard = _Guard(params)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    for step in range(3):
        model.eval()
        with torch.no_grad():
            model(input_ids=input_ids())  # the evaluation pass
        model.train()
        model(input_ids=input_ids(), labels=input_ids()).loss.backward()
        guard.check_grads(step)  # raises if any IA3 gradient is missing
        opt.step()
        opt.zero_grad()
    guard.check_moved(3)


def test_nf4_training_with_eval_keeps_learning(tiny_dir, task, tmp_path):
    """train() evaluates before and after (on the dequantized-NF4 twin) and the vectors learn."""
    base = tiny_dir("llama", tokenizer=True)
    cfg = TrainConfig(max_steps=10, batch_size=8, lr=3e-2)
    res = train(str(base), task[0], tmp_path / "ad", eval_data=task[1], quant="nf4", config=cfg, quiet=True)
    assert res.eval_before is not None
    last = load_adapter(tmp_path / "ad")
    assert max(float(np.abs(v.values - 1).max()) for v in last.vectors) > 1e-3


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def _grads_after_an_eval_pass(tiny_dir, undo_fix: bool):
    """NF4 base + IA3, one no-grad eval-mode forward, then one training forward/backward:
    (the IA3 parameters, their guard). ``undo_fix``: re-enable bitsandbytes' AVX512-BF16 CPU
    path that load_base turns off (the path repacks the 4-bit weights in place on that
    first eval forward, after which the IA3 vectors get no gradient)."""
    # the repacked layout needs input widths that are multiples of 64
    lb = load_base(tiny_dir("llama", intermediate_size=128), quant="nf4")
    switches = [m for m in lb.model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert switches, "bitsandbytes no longer has support_avx512bf16_for_cpu: revisit load_base's fix"
    assert not any(m.support_avx512bf16_for_cpu for m in switches)  # load_base's fix is on
    if undo_fix:
        for m in switches:
            m.support_avx512bf16_for_cpu = True
    model = wrap_with_ia3(lb, ["k", "v", "down"])
    params = {n: p for n, p in model.named_parameters() if "ia3_l" in n}
    guard = _Guard(params)
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids())
    model.train()
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    return params, guard


def test_bnb_repack_bug_is_caught_by_the_guard(tiny_dir):
    """On a CPU with AVX512-BF16 the repack bug reproduces without load_base's fix (every IA3
    gradient vanishes and the guard raises) and is gone with it. Elsewhere bitsandbytes has no
    such path (enabling it would run instructions the CPU lacks): the fix must leave the
    gradients intact."""
    if "avx512_bf16" in _cpu_flags():
        branch = "this CPU has avx512_bf16: the bug must reproduce without the fix"
        params, guard = _grads_after_an_eval_pass(tiny_dir, undo_fix=True)
        missing = [n for n, p in params.items() if p.grad is None]
        assert missing, f"{branch}, but every IA3 vector still got a gradient"
        with pytest.raises(EdgeIA3Error, match="no gradient"):
            guard.check_grads(0)
    else:
        branch = "this CPU lacks avx512_bf16: no repack path, only the fix is checked"
    params, guard = _grads_after_an_eval_pass(tiny_dir, undo_fix=False)
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"{branch}; with load_base's fix {len(missing)} IA3 vectors got no gradient"
    assert all(float(p.grad.abs().sum()) > 0 for p in params.values()), branch
    guard.check_grads(0)


def test_guard_detects_frozen_vectors():
    p = torch.nn.Parameter(torch.ones(4))
    guard = _Guard({"x.ia3_l": p})
    with pytest.raises(EdgeIA3Error, match="no gradient"):
        guard.check_grads(3)
    with pytest.raises(EdgeIA3Error, match="frozen"):
        guard.check_moved(10)
    with torch.no_grad():
        p.mul_(1.01)
    guard.check_moved(20)


def test_non_finite_loss_stops_the_run(tiny_dir, task, tmp_path):
    cfg = TrainConfig(max_steps=5, lr=float("inf"))  # the vectors blow up after one step
    with pytest.raises(EdgeIA3Error, match="loss is (nan|inf)"):
        train(str(tiny_dir("llama", tokenizer=True)), task[0], tmp_path / "ad", quant="none", config=cfg,
              quiet=True)
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize("content, needle", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n',
     ":2: not valid JSON"),
    ('{"question": "x"}\n', ":1: expected a 'messages'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: the last message must be the assistant"),
    ('{"prompt": "a", "completion": 3}\n', ":1: 'prompt' and 'completion' must both be strings"),
    ('[1, 2]\n', ":1: each line must be a JSON object"),
    ("\n\n", "has no rows"),
])
def test_malformed_data(content, needle, tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "ad"
    res = runner.invoke(app, ["train", "--base", str(tiny_dir("llama", tokenizer=True)), "--data", str(bad),
                              "--out", str(out), "--quant", "none", "--quiet"])
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not out.exists()


def test_prompt_completion_and_text_rows(tiny_dir, tmp_path):
    rows = [{"prompt": "sea is ", "completion": "wet"}, {"text": "snow is cold"}] * 8
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = train(str(tiny_dir("llama", tokenizer=True)), data, tmp_path / "ad", quant="none",
                config=TrainConfig(max_steps=3, batch_size=4), quiet=True)
    assert res.steps == 3 and all(np.isfinite(res.loss_curve))


def test_two_process_accelerate_run(tiny_dir, task, tmp_path):
    out = tmp_path / "ad"
    # --multi_gpu selects accelerate's torch.distributed launcher; on a CPU-only
    # machine the processes join over gloo (--cpu alone would start one process).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--module", "edgeia3",
           "train", "--base", str(tiny_dir("llama", tokenizer=True)), "--data", str(task[0]),
           "--out", str(out), "--quant", "none", "--max-steps", "4", "--batch-size", "4", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "training.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 4 and report["backend"] == "gloo"
    adapter = load_adapter(out)
    assert max(float(np.abs(v.values - 1).max()) for v in adapter.vectors) > 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "phi3"])
def test_labelled_loss_equals_the_models_own_loss(family, tiny_dir):
    """The LM head applied only at labelled positions gives the model's own ``labels=`` loss
    (gemma2: with its final logit soft-capping), and the same IA3 gradients."""
    from edgeia3.tasks import labelled_loss
    from edgeia3.peft_model import wrap_with_ia3

    lb = load_base(tiny_dir(family))
    model = wrap_with_ia3(lb, list(lb.family.default_targets))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 5:8], labels[1, 3:7], labels[2, 9] = ids[0, 5:8], ids[1, 3:7], ids[2, 9]
    grads = []
    for fn in (lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss,
               lambda: labelled_loss(model, ids, mask, labels)):
        model.zero_grad()
        loss = fn()
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for n, p in model.named_parameters() if "ia3_l" in n]))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_gradient_norms_are_recorded_and_checked(tiny_dir, task, tmp_path):
    """Every step's IA3 gradient norm lands in training.json; leaving the healthy band warns."""
    from edgeia3.train import GRAD_NORM_BAND, TrainConfig, gradient_warning, train

    res = train(str(tiny_dir("llama", tokenizer=True)), task[0], tmp_path / "ad", quant="none", quiet=True,
                config=TrainConfig(max_steps=5, batch_size=4))
    report = json.loads((tmp_path / "ad" / "training.json").read_text())
    assert len(report["grad_norms"]) == 5 and report["grad_norms"] == [float(f"{x:.4g}") for x in res.grad_norms]
    low, high = GRAD_NORM_BAND
    assert all(low < g < high for g in res.grad_norms) and report["warnings"] == []
    assert gradient_warning(3, 1e-9).startswith("step 3: IA3 gradient norm 1.0e-09") and "vanishing" in gradient_warning(3, 1e-9)
    assert "exploding" in gradient_warning(4, 5e4) and "is nan" in gradient_warning(1, float("nan"))
    assert gradient_warning(2, 0.5) is None


def test_schedule_scales_epochs_with_the_row_count():
    """Without --epochs/--max-steps: a few dozen rows get many epochs (at least MIN_STEPS steps),
    thousands about one epoch; explicit options win (--max-steps over --epochs)."""
    from edgeia3.schedule import MIN_STEPS, plan

    few = plan(32, 8)
    assert few.steps == MIN_STEPS >= 50 and few.steps_per_epoch == 4 and few.epochs >= 10
    assert few.source.startswith("auto") and 1 <= few.warmup_steps < few.steps // 4
    assert plan(16, 8).epochs > plan(64, 8).epochs > plan(300, 8).epochs >= 1
    many = plan(5000, 8)
    assert many.steps == 625 and many.epochs == 1
    assert plan(32, 8, epochs=2).steps == 8 and plan(32, 8, epochs=2).source == "--epochs"
    assert plan(32, 8, epochs=2, max_steps=7).steps == 7 and plan(32, 8, max_steps=7).source == "--max-steps"
    assert plan(5000, 8, epochs=0.5).steps == 313 and plan(3, 8, epochs=1).steps == 1


def test_training_json_records_the_schedule(tiny_dir, task, tmp_path, monkeypatch):
    """The chosen schedule is run, printed with the progress bar and recorded in training.json;
    an explicit --epochs replaces it."""
    import edgeia3.schedule

    monkeypatch.setattr(edgeia3.schedule, "MIN_STEPS", 9)  # the automatic rule, at tiny-test size
    base = str(tiny_dir("llama", tokenizer=True))
    res = runner.invoke(app, ["train", "--base", base, "--data", str(task[0]), "--out", str(tmp_path / "auto"),
                              "--quant", "none"])
    assert res.exit_code == 0, res.output
    printed = " ".join(res.output.split())  # the console wraps long lines
    assert "schedule: 9 steps = 1.5 epochs of 6 steps, 1 warm-up, lr constant-decay (auto (48 rows))" in printed
    report = json.loads((tmp_path / "auto" / "training.json").read_text())
    assert report["steps"] == 9 and len(report["loss_curve"]) == 9 and report["config"]["epochs"] is None
    assert report["schedule"] == {"steps": 9, "steps_per_epoch": 6, "epochs": 1.5, "warmup_steps": 1,
                                  "source": "auto (48 rows)", "lr_schedule": "constant-decay"}
    res = runner.invoke(app, ["train", "--base", base, "--data", str(task[0]), "--out", str(tmp_path / "ep"),
                              "--quant", "none", "--epochs", "0.5", "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ep" / "training.json").read_text())
    assert report["steps"] == 3 and report["schedule"]["source"] == "--epochs"
