"""GGUF merge/export refuse bad input with one clear error, exit code 2, and no output left behind."""

from __future__ import annotations

import dataclasses

import copy

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgeia3.converters.gguf.base_gguf import GGUFBase
from edgeia3.converters.gguf.hf_writer import write_hf_gguf
from edgeia3 import load_base
from edgeia3.adapter import IA3Adapter, IA3Vector
from edgeia3.cli import app
from edgeia3.registry import Scaling
from tiny_models import random_peft_adapter
from cli_checks import assert_refused, merge_cli as merge, runner  # noqa: E402
from edgeia3.formats import load_adapter



@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory):
    return write_hf_gguf(tiny_dir("llama"), tmp_path_factory.mktemp("g") / "tiny.gguf").path


def ones_adapter(base: GGUFBase, sites=("k", "v", "down")) -> IA3Adapter:
    vectors = []
    for i in range(base.config.num_hidden_layers):
        for name in sites:
            s = base.family.site(name)
            ne = base.index.tensor(s.gguf_tensor.format(i=i) + ".weight").ne
            n = ne[0] if s.scaling is Scaling.INPUT else ne[1]
            if s.fused_rows and s.scaling is Scaling.OUTPUT:
                a, b = s.fused_rows(base.config)
                n = b - a
            vectors.append(IA3Vector(i, name, s.scaling, np.full(n, 1.5, np.float32)))
    return IA3Adapter(base.family.name, vectors)


def test_adapter_for_another_base(tiny_dir, tiny_gguf, tmp_path):
    other = GGUFBase(write_hf_gguf(tiny_dir("llama", seed=7), tmp_path / "other.gguf").path)
    ad = ones_adapter(other)
    ad = dataclasses.replace(ad, base=other.identity)  # same shapes, other weights
    path = ad.save(tmp_path / "a.safetensors")
    out = tmp_path / "out.gguf"
    assert_refused(merge(tiny_gguf, path, out), out, "adapter was made for another base", "weights")
    assert merge(tmp_path / "other.gguf", path, out).exit_code == 0  # fine on its own base


def test_shape_mismatch(tiny_dir, tiny_gguf, tmp_path):
    big = GGUFBase(write_hf_gguf(tiny_dir("llama", hidden_size=256, intermediate_size=512),
                                 tmp_path / "big.gguf").path)
    path = ones_adapter(big).save(tmp_path / "a.safetensors")
    out = tmp_path / "out.gguf"
    assert_refused(merge(tiny_gguf, path, out), out, "shape mismatch")


def test_non_finite_values(tiny_dir, tiny_gguf, tmp_path):
    base = load_base(tiny_dir("llama"))
    random_peft_adapter(copy.deepcopy(base.model), "llama", tmp_path / "peft")
    f = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(f)
    tensors[sorted(tensors)[0]][0, 0] = np.inf
    save_file(tensors, f)
    out = tmp_path / "out.gguf"
    assert_refused(merge(tiny_gguf, tmp_path / "peft", out), out, "non-finite")


def test_corrupt_and_wrong_files(tiny_gguf, tmp_path):
    good = ones_adapter(GGUFBase(tiny_gguf)).save(tmp_path / "a.safetensors")
    out = tmp_path / "out.gguf"
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    assert_refused(merge(junk, good, out), out, "not a gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:2000])
    assert_refused(merge(cut, good, out), out, "not a valid gguf")
    # an IA3 adapter GGUF is not a base, and a base GGUF is not an adapter
    from edgeia3.converters.gguf.adapter_file import write_ia3_gguf

    ia3 = write_ia3_gguf(load_adapter(good), tmp_path / "a.ia3.gguf", GGUFBase(tiny_gguf))
    assert_refused(merge(ia3, good, out), out, "adapter gguf, not a base")
    assert_refused(merge(tiny_gguf, tiny_gguf, out), out, "not an ia3 adapter gguf")
    bad_ia3 = tmp_path / "bad.ia3.gguf"
    bad_ia3.write_bytes(ia3.read_bytes()[:300])
    assert_refused(merge(tiny_gguf, bad_ia3, out), out, "not a valid gguf")


def _write_gguf(path, arch: str, tensors: dict, hidden=32, ff=64, layers=1):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(4)
    for name, arr in tensors.items():
        w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_architecture(tiny_gguf, tmp_path):
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba", {"token_embd.weight": np.ones((16, 32))})
    good = ones_adapter(GGUFBase(tiny_gguf)).save(tmp_path / "a.safetensors")
    out = tmp_path / "out.gguf"
    assert_refused(merge(path, good, out), out, "unknown gguf architecture 'mamba'")


def test_non_gated_mlp_input_site_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((16, 32)), "output_norm.weight": np.ones(32),
               "blk.0.attn_qkv.weight": rng.standard_normal((96, 32)),
               "blk.0.attn_output.weight": rng.standard_normal((32, 32)),
               "blk.0.ffn_up.weight": rng.standard_normal((64, 32)),
               "blk.0.ffn_down.weight": rng.standard_normal((32, 64))}
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", tensors)
    base = GGUFBase(path)
    out = tmp_path / "out.gguf"
    assert_refused(merge(path, ones_adapter(base, ("k", "down")).save(tmp_path / "d.safetensors"), out),
                   out, "no gated mlp", "ffn_down")
    # without the feed-forward site the fused qkv rows merge fine
    assert merge(path, ones_adapter(base, ("k",)).save(tmp_path / "k.safetensors"), out).exit_code == 0


def test_export_unknown_merge_name_and_quant(tiny_gguf, tmp_path):
    good = ones_adapter(GGUFBase(tiny_gguf)).save(tmp_path / "a.safetensors")
    out = tmp_path / "exp"
    res = runner.invoke(app, ["export", "gguf", "--base", str(tiny_gguf), "--out", str(out),
                              "--adapter", f"a={good}", "--merge", "b"])
    assert_refused(res, out, "--merge b", "no adapter of that name")
    res = runner.invoke(app, ["export", "gguf", "--base", str(tiny_gguf), "--out", str(out), "--quant", "q3_x"])
    assert_refused(res, out, "unknown --quant")
    res = runner.invoke(app, ["export", "gguf", "--base", str(tiny_gguf), "--out", str(out),
                              "--adapter", f"a={tmp_path / 'missing'}"])
    assert_refused(res, out, "not found")
