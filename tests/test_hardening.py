"""--out safety, unwritable outputs, training options and damaged exports, through the real CLI.

Every refusal is one `error:` line and exit code 2 that names the user's path
or option; nothing the user had is changed, and nothing (not even a temp) is
left beside the output.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest

from edgeia3.converters.gguf.hf_writer import write_hf_gguf
from edgeia3 import load_base
from edgeia3.atomic import atomic_dir, atomic_file
from edgeia3.errors import EdgeIA3Error
from edgeia3.export import export_onnx
from tiny_models import random_peft_adapter, write_label_task
from cli_checks import assert_refused, invoke  # noqa: E402

MINE = "the user's own file\n"


@pytest.fixture(scope="module")
def env(tiny_dir, tmp_path_factory):
    """Tiny inputs for every writing command: a base with tokenizer, a PEFT adapter,
    a GGUF of the same base, chat training data and one ONNX export (for report/run)."""
    tmp = tmp_path_factory.mktemp("hardening")
    base = tiny_dir("llama", tokenizer=True)
    random_peft_adapter(copy.deepcopy(load_base(base).model), "llama", tmp / "adapter", seed=1)
    gguf = write_hf_gguf(tiny_dir("llama"), tmp / "tiny.gguf").path  # same weights, no tokenizer
    data = write_label_task(tmp / "train.jsonl", 16)
    onnx = export_onnx(str(base), tmp / "onnx", "fp32", adapters={"a": str(tmp / "adapter")}).out
    return {"base": base, "adapter": tmp / "adapter", "gguf": gguf, "data": data, "onnx": onnx}


# command name -> (CLI args before --out, what a successful run leaves at --out)
COMMANDS = {
    "train": (lambda e: ["train", "--base", e["base"], "--data", e["data"], "--quant", "none",
                         "--max-steps", "2", "--batch-size", "4", "--quiet"], "training.json"),
    "merge": (lambda e: ["merge", "--base", e["base"], "--adapter", e["adapter"]], "edgeia3_merge.json"),
    "export onnx": (lambda e: ["export", "onnx", "--base", e["base"], "--precision", "fp32",
                               "--adapter", f"a={e['adapter']}"], "model.onnx"),
    "export gguf": (lambda e: ["export", "gguf", "--base", e["gguf"], "--adapter", f"a={e['adapter']}"],
                    "model.gguf"),
    "report": (lambda e: ["report", e["onnx"], "--runs", "1", "--eval-rows", "1"], "report.json"),
}


def run_cli(env, command: str, out: Path, *extra):
    args, _ = COMMANDS[command]
    return invoke(*args(env), "--out", out, *extra)


def one_line(text: str) -> str:
    return " ".join(text.lower().split())  # rich may wrap long lines


def leftovers(out: Path) -> list[str]:
    """Temp or swapped-out entries beside ``out`` (atomic.py names them .NAME.*)."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def assert_one_error(result, *needles):
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert text.count("error:") == 1, result.output
    assert "traceback" not in text, result.output
    for n in needles:
        assert one_line(str(n)) in text, result.output


@pytest.mark.parametrize("command", list(COMMANDS))
def test_non_empty_out_is_refused_and_force_replaces_it(env, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text(MINE)
    res = run_cli(env, command, out)
    assert_one_error(res, out, "already exists and is not empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert (out / "mine.txt").read_text() == MINE
    assert leftovers(out) == []

    res = run_cli(env, command, out, "--force")
    assert res.exit_code == 0, res.output
    assert not (out / "mine.txt").exists()
    assert (out / COMMANDS[command][1]).is_file()
    assert leftovers(out) == []


@pytest.mark.parametrize("command", ["merge", "export gguf", "report"])
def test_existing_file_as_out_is_refused_and_force_replaces_it(env, tmp_path, command):
    out = tmp_path / "out"
    out.write_text(MINE)
    assert_one_error(run_cli(env, command, out), out, "already exists and is a file", "--force")
    assert out.read_text() == MINE
    assert leftovers(out) == []
    res = run_cli(env, command, out, "--force")
    assert res.exit_code == 0, res.output
    assert (out / COMMANDS[command][1]).is_file()
    assert leftovers(out) == []


def test_existing_empty_dir_is_used_without_force(env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    res = run_cli(env, "merge", out)
    assert res.exit_code == 0, res.output
    assert (out / "config.json").is_file() and (out / "edgeia3_merge.json").is_file()
    assert leftovers(out) == []


def test_gguf_merge_over_existing_file(env, tmp_path):
    """`merge --out X.gguf` writes a file: an existing one is refused, --force replaces it,
    and the base GGUF itself is never a valid --out, even with --force."""
    out = tmp_path / "merged.gguf"
    out.write_text(MINE)
    args = ["merge", "--base", env["gguf"], "--adapter", env["adapter"], "--out", out]
    assert_one_error(invoke(*args), out, "already exists", "--force")
    assert out.read_text() == MINE
    res = invoke(*args, "--force")
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"GGUF"
    assert leftovers(out) == []

    before = env["gguf"].read_bytes()
    res = invoke("merge", "--base", env["gguf"], "--adapter", env["adapter"], "--out", env["gguf"], "--force")
    assert_one_error(res, "--out must differ from the base gguf")
    assert env["gguf"].read_bytes() == before


def test_refusal_comes_before_any_work(env, tmp_path):
    """The --out check runs first: bad training data behind it is not even read."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text(MINE)
    res = invoke("train", "--base", env["base"], "--data", bad, "--quant", "none", "--out", out)
    assert_one_error(res, out, "already exists and is not empty")
    assert "valid json" not in one_line(res.output)
    assert (out / "mine.txt").read_text() == MINE


@pytest.mark.parametrize("command", list(COMMANDS) + ["merge gguf"])
def test_out_under_a_regular_file(env, tmp_path, command):
    blocker = tmp_path / "blocker"
    blocker.write_text(MINE)
    out = blocker / "sub" / ("out.gguf" if command == "merge gguf" else "out")
    if command == "merge gguf":
        res = invoke("merge", "--base", env["gguf"], "--adapter", env["adapter"], "--out", out)
    else:
        res = run_cli(env, command, out)
    assert_one_error(res, f"cannot create {out}", "is not a directory")
    assert blocker.read_text() == MINE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_failure_inside_the_write_removes_the_parents_it_created(env, tiny_dir, tmp_path):
    """A GGUF export fails while writing (the adapter does not fit the base): no
    partial output, and none of the missing parent directories it had to create."""
    other = tiny_dir("llama", hidden_size=32, intermediate_size=48)
    random_peft_adapter(copy.deepcopy(load_base(other).model), "llama", tmp_path / "wrong", seed=2)
    out = tmp_path / "new" / "deeper" / "out"
    res = invoke("export", "gguf", "--base", env["gguf"], "--adapter", f"a={tmp_path / 'wrong'}", "--out", out)
    assert_one_error(res, "shape mismatch")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("option, value, needle", [
    ("--max-steps", "-3", "--max-steps must be >= 1 (got -3)"),
    ("--max-steps", "0", "--max-steps must be >= 1 (got 0)"),
    ("--batch-size", "0", "--batch-size must be >= 1 (got 0)"),
    ("--epochs", "0", "--epochs must be a finite number > 0 (got 0.0)"),
    ("--epochs", "-1", "--epochs must be a finite number > 0 (got -1.0)"),
    ("--lr", "0", "--lr must be > 0 (got 0.0)"),
    ("--lr", "-0.001", "--lr must be > 0 (got -0.001)"),
    ("--max-length", "7", "--max-length must be >= 8 (got 7)"),
    ("--max-eval", "0", "--max-eval must be >= 1 (got 0)"),
])
def test_bad_training_options(env, tmp_path, option, value, needle):
    out = tmp_path / "out"
    res = invoke("train", "--base", env["base"], "--data", env["data"], "--quant", "none", "--out", out,
                 option, value)
    assert_one_error(res)
    assert_refused(res, out, needle)


def test_truncated_onnx_model_is_one_error(env, tmp_path):
    bad = tmp_path / "cut"
    shutil.copytree(env["onnx"], bad)
    model = bad / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    res = invoke("run", "--model", bad, "--prompt", "hi", "--max-tokens", "2")
    assert_one_error(res, bad, "cannot load model.onnx")


def test_truncated_onnx_adapter_is_one_error(env, tmp_path):
    bad = tmp_path / "cut"
    shutil.copytree(env["onnx"], bad)
    for f in (bad / "adapters").iterdir():
        f.write_bytes(f.read_bytes()[:64])
    res = invoke("run", "--model", bad, "--adapter", "a", "--prompt", "hi", "--max-tokens", "2")
    assert_one_error(res, bad, "cannot load adapter 'a'")


# -- atomic.py itself: what --force promises ------------------------------------------------------

def test_forced_replacement_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text(MINE)
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("half way")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert leftovers(out) == []
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert leftovers(out) == []


def test_output_that_appears_during_the_work_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(EdgeIA3Error, match="already exists and is not empty"):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            out.mkdir()
            (out / "mine.txt").write_text(MINE)  # someone else wrote here meanwhile
    assert (out / "mine.txt").read_text() == MINE and sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert leftovers(out) == []

    f = tmp_path / "f.bin"
    with pytest.raises(EdgeIA3Error, match="already exists"):
        with atomic_file(f) as tmp:
            tmp.write_bytes(b"new")
            f.write_text(MINE)
    assert f.read_text() == MINE
    assert leftovers(f) == []


def test_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    """--force: if renaming the new output into place fails, the user's old one is restored."""
    import edgeia3.atomic as atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text(MINE)
    real_replace = os.replace

    def flaky_replace(src, dst):
        if Path(src).name.endswith(".tmp") and Path(dst) == out:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    with pytest.raises(EdgeIA3Error, match="cannot write .*Input/output error"):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert (out / "mine.txt").read_text() == MINE
    assert leftovers(out) == []
