"""`edgeia3 export onnx` / `edgeia3 run` through the CLI: success and one clear error per bad input."""

from __future__ import annotations

import copy

import pytest

from edgeia3 import load_base
from edgeia3.cli import app
from tiny_models import random_peft_adapter
from cli_checks import assert_refused, runner  # noqa: E402



@pytest.fixture(scope="module")
def llama(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx_cli")
    base_dir = tiny_dir("llama", tokenizer=True)
    random_peft_adapter(copy.deepcopy(load_base(base_dir).model), "llama", tmp / "a", seed=1)
    return base_dir, tmp / "a"


def export_cli(base, out, *extra):
    return runner.invoke(app, ["export", "onnx", "--base", str(base), "--out", str(out), *extra])


def test_export_then_run_with_adapter(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "onnx"
    res = export_cli(base, out, "--precision", "int4", "--adapter", f"a={adapter}")
    assert res.exit_code == 0, res.output
    assert "side-tensors" in res.output and (out / "adapters" / "a.onnx_adapter").exists()
    run = runner.invoke(app, ["run", "--model", str(out), "--adapter", "a", "--prompt", "hi", "--max-tokens", "4"])
    assert run.exit_code == 0, run.output
    # the answer alone on stdout, ending its line; what ran where goes to stderr
    assert run.stdout.endswith("\n") and "adapter a" not in run.stdout and "adapter a" in run.stderr
    bad = runner.invoke(app, ["run", "--model", str(out), "--adapter", "zzz", "--prompt", "hi"])
    assert bad.exit_code == 2 and "unknown adapter 'zzz'" in bad.output
    # --with (attach at run time) cannot apply to an ONNX export: refused, not silently ignored
    att = runner.invoke(app, ["run", "--model", str(out), "--with", f"b={adapter}", "--prompt", "hi"])
    assert att.exit_code == 2 and "carries its own adapters" in att.output


@pytest.mark.parametrize("args, needles", [
    (["--precision", "int3"], ["unsupported precision 'int3'"]),
    (["--provider", "tpu"], ["unsupported provider 'tpu'"]),
    (["--merge", "nope"], ["--merge nope", "no adapter of that name"]),
])
def test_bad_options(llama, tmp_path, args, needles):
    base, adapter = llama
    out = tmp_path / "onnx"
    assert_refused(export_cli(base, out, "--adapter", f"a={adapter}", *args), out, *needles)


def test_merge_with_two_adapters_refused(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "onnx"
    res = export_cli(base, out, "--adapter", f"a={adapter}", "--adapter", f"b={adapter}", "--merge", "a")
    assert_refused(res, out, "give only that adapter")


def test_unsupported_family(tiny_dir, tmp_path):
    out = tmp_path / "onnx"
    assert_refused(export_cli(tiny_dir("gpt2", tokenizer=True), out, "--precision", "fp32"), out,
                   "does not support the 'gpt2' family")


def test_adapter_for_another_shape(llama, tiny_dir, tmp_path):
    _, adapter = llama
    other = tiny_dir("llama", tokenizer=True, hidden_size=32, intermediate_size=48)
    out = tmp_path / "onnx"
    assert_refused(export_cli(other, out, "--adapter", f"a={adapter}"), out, "shape mismatch")


def test_bad_weights_value_is_refused_before_work(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "o"
    res = export_cli(base, out, "--weights", "q9_z")
    assert_refused(res, out, "--weights must be auto, builder or a llama.cpp type")
    res = export_cli(base, out, "--precision", "fp32", "--weights", "q4_0")
    assert_refused(res, out, "--weights q4_0 needs --precision int4 or int8")
