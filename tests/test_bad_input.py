"""Each bad input gets one clear error, exit code 2, and no output left behind."""

from __future__ import annotations

import dataclasses

import copy
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgeia3 import load_adapter_for, load_base
from tiny_models import random_peft_adapter
from cli_checks import assert_refused, merge_cli as run_merge  # noqa: E402
from edgeia3.formats import load_adapter



@pytest.fixture()
def llama_adapter(tiny_dir, tmp_path):
    base = load_base(tiny_dir("llama"))
    random_peft_adapter(copy.deepcopy(base.model), "llama", tmp_path / "peft")
    return tmp_path / "peft"


def test_shape_mismatch(tiny_dir, tmp_path, llama_adapter):
    other = tiny_dir("llama", hidden_size=32, intermediate_size=48)
    assert_refused(run_merge(other, llama_adapter, tmp_path / "out"), tmp_path / "out", "shape mismatch")


def test_non_finite_values(tiny_dir, tmp_path, llama_adapter):
    f = llama_adapter / "adapter_model.safetensors"
    tensors = load_file(f)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = np.nan
    save_file(tensors, f)
    assert_refused(run_merge(tiny_dir("llama"), llama_adapter, tmp_path / "out"), tmp_path / "out", "non-finite")


def test_adapter_for_another_base(tiny_dir, tmp_path, llama_adapter):
    base_a = load_base(tiny_dir("llama"))
    adapter = load_adapter_for(llama_adapter, base_a)
    adapter = dataclasses.replace(adapter, base=base_a.identity)
    adapter.save(tmp_path / "stamped.safetensors")
    other = tiny_dir("llama", seed=7)  # same shapes, other weights
    out = tmp_path / "out"
    assert_refused(run_merge(other, tmp_path / "stamped.safetensors", out), out, "another base", "weights")
    # same file on its own base works
    assert run_merge(tiny_dir("llama"), tmp_path / "stamped.safetensors", out).exit_code == 0


def test_unknown_architecture(tmp_path, llama_adapter):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    out = tmp_path / "out"
    assert_refused(run_merge(tmp_path / "neox", llama_adapter, out), out, "unknown architecture 'gpt_neox'")


def test_unknown_family_in_adapter(tiny_dir, tmp_path, llama_adapter):
    base = load_base(tiny_dir("llama"))
    path = load_adapter_for(llama_adapter, base).save(tmp_path / "a.safetensors")
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), "np") as st:
        meta = dict(st.metadata())
    meta["family"] = "mamba"
    save_file(tensors, path, metadata=meta)
    out = tmp_path / "out"
    assert_refused(run_merge(tiny_dir("llama"), path, out), out, "unknown architecture family 'mamba'")


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_files(tiny_dir, tmp_path, llama_adapter, missing):
    (llama_adapter / missing).unlink()
    out = tmp_path / "out"
    assert_refused(run_merge(tiny_dir("llama"), llama_adapter, out), out, missing)


def test_missing_adapter_and_base(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert_refused(run_merge(tiny_dir("llama"), tmp_path / "nope", out), out, "adapter not found")
    assert_refused(run_merge(tmp_path / "nobase", tmp_path / "nope", out), out, "base not found")


def test_corrupt_and_wrong_type(tiny_dir, tmp_path, llama_adapter):
    out = tmp_path / "out"
    (llama_adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert_refused(run_merge(tiny_dir("llama"), llama_adapter, out), out, "not a readable safetensors")

    cfg = json.loads((llama_adapter / "adapter_config.json").read_text())
    cfg["peft_type"] = "LORA"
    (llama_adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert_refused(run_merge(tiny_dir("llama"), llama_adapter, out), out, "LORA adapter, not IA3")

    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    assert_refused(run_merge(tiny_dir("llama"), tmp_path / "junk.safetensors", out), out, "not a readable")


def test_failed_merge_keeps_previous_output(tiny_dir, tmp_path, llama_adapter):
    """A refused merge over an existing output directory leaves it untouched."""
    out = tmp_path / "out"
    assert run_merge(tiny_dir("llama"), llama_adapter, out).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    other = tiny_dir("llama", hidden_size=32, intermediate_size=48)
    result = run_merge(other, llama_adapter, out)
    assert result.exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == before


def test_canonical_nan_refused_on_save(tiny_dir, tmp_path):
    base = load_base(tiny_dir("llama"))
    from edgeia3 import EdgeIA3Error, identity_adapter

    ad = identity_adapter(base.family, base.model)
    ad.vectors[0].values[3] = np.inf
    with pytest.raises(EdgeIA3Error, match="non-finite"):
        ad.save(tmp_path / "never.safetensors")
    assert not list(tmp_path.iterdir())


def test_peft_feedforward_modules_must_be_targets(tiny_dir, tmp_path):
    """PEFT requires feedforward_modules to be a subset of target_modules; a directory that
    breaks the rule is refused with one clear error naming the file and the modules."""
    import json

    from edgeia3 import EdgeIA3Error
    from tiny_models import random_peft_adapter

    base = load_base(tiny_dir("llama"))
    random_peft_adapter(copy.deepcopy(base.model), "llama", tmp_path / "p", seed=1)
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert load_adapter(tmp_path / "p", base_config=base.config).sites == ["k", "v", "down"]
    cfg["feedforward_modules"] = ["down_proj", "up_proj"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(EdgeIA3Error, match=r"adapter_config.json: feedforward_modules \['up_proj'\] are not among"):
        load_adapter(tmp_path / "p", base_config=base.config)


def _sparse_safetensors(path, n_floats: int, metadata: dict, shape=None) -> None:
    """A valid safetensors header for one float32 tensor of ``n_floats`` values, the data a hole."""
    import struct

    header = json.dumps({"__metadata__": metadata,
                         "w": {"dtype": "F32", "shape": shape or [n_floats], "data_offsets": [0, 4 * n_floats]}})
    header += " " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
        f.truncate(8 + len(header) + 4 * n_floats)


@pytest.mark.parametrize("reader", ["canonical", "peft", "web"])
def test_large_or_foreign_files_are_refused_before_their_data_is_read(tmp_path, reader):
    """A server names files by request: a 1 GiB file, or a file of another kind, must be refused from
    its size or header - reading 1 GiB of tensors first (a finding of the server's audit) is not."""
    import time

    from edgeia3.adapter import FORMAT, IA3Adapter, read_adapter_safetensors
    from edgeia3.converters.onnx.web import ADAPTER_FORMAT, read_web_adapter
    from edgeia3.errors import EdgeIA3Error
    from edgeia3.formats.peft_dir import WEIGHTS_FILE

    path, fmt = tmp_path / "x.safetensors", {"canonical": FORMAT, "web": ADAPTER_FORMAT, "peft": "pt"}[reader]
    # PEFT dirs read their adapter_model.safetensors with read_adapter_safetensors (formats/peft_dir.py)
    read = {"canonical": IA3Adapter.load, "web": read_web_adapter, "peft": read_adapter_safetensors}[reader]
    if reader == "peft":
        path = tmp_path / WEIGHTS_FILE
    cases = [(1 << 28, {"format": fmt}, None, "no IA3 adapter is larger"),  # 1 GiB of float32
             (1 << 20, {"format": fmt}, [1024, 1024], "not an IA3 vector")]  # a matrix: a model's weight
    if reader != "peft":  # PEFT files carry no format of their own
        cases.append((1 << 20, {"format": "something-else"}, None, "is not an edgeia3"))
    for n, meta, shape, needle in cases:
        _sparse_safetensors(path, n, meta, shape)
        t0 = time.perf_counter()
        with pytest.raises(EdgeIA3Error, match=needle):
            read(path)
        assert time.perf_counter() - t0 < 1.0  # from the header: the data was never read
