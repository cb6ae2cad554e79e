"""The learning-rate schedule: its shape step by step, the option, and the run that follows it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from edgeia3 import EdgeIA3Error
from edgeia3.cli import app
from edgeia3.schedule import SCHEDULES, lr_factor, plan
from edgeia3.train import TrainConfig, train
from tiny_models import write_label_task

runner = CliRunner()


def curve(schedule: str, total: int = 100, warmup: int = 5) -> list[float]:
    return [lr_factor(schedule, s, total, warmup) for s in range(total)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warm_up_rises_linearly_to_the_peak(schedule):
    c = curve(schedule)
    assert c[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert c[5] == pytest.approx(1.0)  # the first step after warm-up runs at the peak
    assert all(0 < f <= 1 for f in c)


def test_linear_decays_to_ten_percent():
    c = curve("linear")
    assert c[5] == 1.0 and c[52] == pytest.approx(1 - 47 / 95)
    assert all(a >= b for a, b in zip(c[5:], c[6:]))
    assert c[-1] == pytest.approx(0.1) and c[94] == pytest.approx(0.1)  # the floor


def test_constant_stays_at_the_peak():
    assert curve("constant")[5:] == [1.0] * 95


def test_constant_decay_holds_then_decays_over_the_last_fifth():
    c = curve("constant-decay")
    assert c[5:81] == [1.0] * 76  # steps 5..80 at the peak (step 80: 20 steps left of a 20-step decay)
    assert c[90] == pytest.approx(0.5) and c[99] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(c[80:], c[81:]))
    # 30 steps: 6 decay steps
    short = curve("constant-decay", total=30, warmup=1)
    assert short[:24] == [1.0] * 24 and short[24:] == pytest.approx([1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_cosine_halves_at_the_midpoint():
    c = curve("cosine", total=105, warmup=5)
    assert c[5] == 1.0 and c[55] == pytest.approx(0.5)
    assert c[30] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert all(a > b for a, b in zip(c[5:], c[6:])) and 0 < c[-1] < 0.01


def test_plan_carries_the_schedule():
    s = plan(48, 8, max_steps=20, warmup_ratio=0.1, lr_schedule="cosine")
    assert s.warmup_steps == 2 and s.lr_schedule == "cosine" and s.to_dict()["lr_schedule"] == "cosine"
    assert [s.lr_factor(i) for i in range(20)] == curve("cosine", 20, 2)
    assert "lr cosine" in s.describe()
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor("step", 0, 10, 1)


@pytest.mark.parametrize("kwargs, needle", [
    ({"schedule": "cosin"}, "--schedule must be one of constant, constant-decay, cosine, linear (got cosin)"),
    ({"warmup_ratio": 1.5}, "--warmup must be between 0 and 1 (got 1.5)"),
])
def test_bad_schedule_values_are_one_clear_error(kwargs, needle):
    with pytest.raises(EdgeIA3Error) as e:
        TrainConfig(**kwargs)
    assert str(e.value) == needle


def test_cli_refuses_a_bad_schedule(tmp_path):
    """Exit code 2, the one-line message, before anything is loaded or written."""
    data = write_label_task(tmp_path / "t.jsonl", 8, seed=0)
    out = tmp_path / "ad"
    res = runner.invoke(app, ["train", "--base", str(tmp_path / "no-such-base"), "--data", str(data),
                              "--out", str(out), "--schedule", "wsd"])
    assert res.exit_code == 2, res.output
    assert "--schedule must be one of constant, constant-decay, cosine, linear (got wsd)" in res.output
    assert not out.exists()


def test_the_run_follows_the_schedule(tiny_dir, tmp_path, monkeypatch):
    """The optimizer steps at --lr times the schedule's factor, and training.json says which."""
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    data = write_label_task(tmp_path / "t.jsonl", 32, seed=0)
    base = str(tiny_dir("llama", tokenizer=True))
    res = runner.invoke(app, ["train", "--base", base, "--data", str(data), "--out", str(tmp_path / "ad"),
                              "--quant", "none", "--max-steps", "10", "--batch-size", "4", "--lr", "0.02",
                              "--schedule", "constant-decay", "--warmup", "0.2", "--quiet"])
    assert res.exit_code == 0, res.output
    # 2 warm-up steps (0.5, 1), then the peak, then a 2-step decay (10 steps x 20%): 2/2, 1/2
    assert seen == pytest.approx([0.01] + [0.02] * 8 + [0.01])
    report = json.loads((tmp_path / "ad" / "training.json").read_text())
    assert report["config"]["schedule"] == "constant-decay" and report["config"]["warmup_ratio"] == 0.2
    assert report["schedule"]["lr_schedule"] == "constant-decay" and report["schedule"]["warmup_steps"] == 2


# --- early signal: was the budget about right? ---------------------------------------------

def test_early_signal_verdicts_on_known_curves():
    """Loss per answer at 0, 1/4, 1/2, 3/4 and the end; shapes of real SmolLM2 runs (bench_sweep)."""
    from edgeia3.schedule import early_signal

    # intent, 30 steps of the old default: 68% exact match, 87% after 60 steps
    still = early_signal([(0, 9.6), (8, 2.3), (15, 1.7), (22, 1.34), (30, 1.2)], 30)
    assert still["verdict"] == "still improving"
    assert still["message"] == ("still improving: more steps would help (eval loss 1.700 at step 15, 1.340 at 22, "
                                "1.200 at 30: -29% over the second half of the run, -10% over the last quarter)")
    assert still["second_half_drop"] == 0.2941 and still["points"][-1] == [30, 1.2]
    # Gemma 3 270M's intent at 30 steps (81%): the last probe a little above the one before it
    gemma = early_signal([(0, 11.51), (8, 2.15), (15, 1.179), (22, 0.862), (30, 0.896)], 30)
    assert gemma["verdict"] == "still improving" and gemma["second_half_drop"] == 0.2689
    # the last quarter alone, steeply
    assert early_signal([(0, 5), (15, 1), (30, 0.8), (45, 0.7), (60, 0.55)], 60)["verdict"] == "still improving"
    # below the floor (answers nearly all right): no longer "still improving", however steep
    done = early_signal([(0, 9.6), (15, 0.8), (30, 0.66), (45, 0.19), (60, 0.11)], 60)  # intent, 100%
    assert done["verdict"] == "converged" and "few answers left to fix" in done["message"]
    flat_end = early_signal([(0, 4.1), (15, 0.3), (30, 0.032), (45, 0.004), (60, 0.002)], 60)
    assert flat_end["verdict"] == "plateaued" and flat_end["plateau_step"] == 30
    assert flat_end["message"].startswith("plateaued at step 30: eval loss 0.032 there, 0.002 at step 60")
    rose = early_signal([(0, 2.5), (15, 0.9), (30, 0.4), (45, 0.5), (60, 0.6)], 60)
    assert rose["verdict"] == "plateaued" and rose["plateau_step"] == 30 and "rose after it" in rose["message"]
    late = early_signal([(0, 2.5), (15, 0.6), (30, 0.38), (45, 0.33), (60, 0.31)], 60)
    assert late["verdict"] == "converged"  # -18% over the second half, near its best only at 45 of 60
    stuck = early_signal([(0, 2.5), (15, 2.49), (30, 2.5), (45, 2.48), (60, 2.47)], 60)
    assert stuck["verdict"] == "not improving" and "raise --lr" in stuck["message"]
    assert early_signal([(0, 1.0), (5, 0.5)], 5) is None


def test_checkpoints_and_quarter_means():
    from edgeia3.schedule import checkpoint_steps, quarter_means

    assert checkpoint_steps(60) == [15, 30, 45, 60] and checkpoint_steps(3) == [1, 2, 3]
    assert quarter_means([4, 4, 3, 3, 2, 2, 1, 1]) == [(2, 4), (4, 3), (6, 2), (8, 1)]
    assert quarter_means([1, 2, 3]) == []


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """A tiny model whose logits can move far (initializer_range 0.3: the default 0.02 caps the
    IA3-reachable loss near ln(vocab)), and the label task."""
    d = tmp_path_factory.mktemp("es")
    return write_label_task(d / "train.jsonl", 48, seed=0), write_label_task(d / "eval.jsonl", 16, seed=1)


def test_early_signal_says_still_improving_for_a_short_slow_run(tiny_dir, learnable, tmp_path):
    """lr 2e-2, 40 steps: the eval loss still falls steeply at the end (-40% over the second half) ->
    "still improving", recorded
    in training.json and printed in the CLI summary; the same verdict from the training loss alone."""
    base = str(tiny_dir("llama", tokenizer=True, initializer_range=0.3))
    args = ["train", "--base", base, "--data", str(learnable[0]), "--quant", "none", "--max-steps", "40",
            "--lr", "0.02", "--schedule", "constant"]
    res = runner.invoke(app, [*args, "--eval", str(learnable[1]), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ev" / "training.json").read_text())
    signal = report["early_signal"]
    assert signal["verdict"] == "still improving" and signal["source"] == "eval loss", signal
    assert [s for s, _ in signal["points"]] == [0, 10, 20, 30, 40] and signal["probe_rows"] == 16
    losses = [v for _, v in signal["points"]]
    assert losses[-1] < 0.7 * losses[2] and losses[-1] > 0.2  # -30% or more over the second half, above the floor
    assert "early signal: still improving: more steps would help" in " ".join(res.output.split())
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "tr"), "--quiet"])
    assert res.exit_code == 0, res.output
    signal = json.loads((tmp_path / "tr" / "training.json").read_text())["early_signal"]
    assert signal["verdict"] == "still improving" and signal["source"] == "training loss", signal
    assert [s for s, _ in signal["points"]] == [10, 20, 30, 40] and "probe_rows" not in signal


def test_early_signal_says_plateaued_when_the_loss_stops_early(tiny_dir, learnable, tmp_path):
    """lr 10 (far too high), 60 steps: the eval loss stops improving by step 30 of 60 -> "plateaued at
    step 30", with the loss there and at the end."""
    base = str(tiny_dir("llama", tokenizer=True, initializer_range=0.3))
    res = train(base, learnable[0], tmp_path / "ad", eval_data=learnable[1], quant="none", quiet=True,
                config=TrainConfig(max_steps=60, lr=10.0, schedule="constant", eval_accuracy=False))
    signal = res.early_signal
    assert signal["verdict"] == "plateaued" and signal["plateau_step"] == 30, signal
    losses = dict(signal["points"])
    assert min(losses.values()) > losses[30] - 0.05 * (losses[0] - min(losses.values()))  # near its best by 30
    assert signal["message"].startswith(f"plateaued at step 30: eval loss {losses[30]:.3f} there")
    assert json.loads((tmp_path / "ad" / "training.json").read_text())["early_signal"] == signal
