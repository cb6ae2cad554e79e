"""Exact block-scale merge into quantized GGUFs, and the IA3 adapter GGUF round trip.

A tiny random llama (rows of 256 and 512 so K-quants apply) is written to GGUF
by edgeia3 and quantized by llama.cpp to every supported type; after the merge,
gguf-py's dequantization of each patched tensor must equal diag(l) times the
dequantized original, within the fp16 rounding of the new scales.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFReader, quants

from edgeia3.converters.gguf.adapter_file import read_ia3_gguf, write_ia3_gguf
from edgeia3.converters.gguf.base_gguf import GGUFBase
from edgeia3.converters.gguf.hf_writer import write_hf_gguf
from edgeia3.converters.gguf.merge import adapter_plan
from edgeia3.steps.gguf_merge import merge_gguf
from edgeia3.converters.gguf.plan import rope_permute
from edgeia3.converters.gguf.quantize import quantize
from edgeia3.adapter import IA3Adapter
from edgeia3.base import default_gguf
from edgeia3.validate import adapter_for_base

# llama.cpp ftype -> the GGML types its mix must put on the adapted tensors
FTYPES = {"f32": {T.F32}, "f16": {T.F16}, "bf16": {T.BF16}, "q4_0": {T.Q4_0}, "q4_1": {T.Q4_1},
          "q5_0": {T.Q5_0}, "q5_1": {T.Q5_1}, "q8_0": {T.Q8_0}, "q2_k": {T.Q2_K}, "q3_k_m": {T.Q3_K},
          "q4_k_m": {T.Q4_K}, "q5_k_m": {T.Q5_K}, "q6_k": {T.Q6_K}}
SITES = ("k", "v", "up", "down")
# Largest factor the fp16 d multiplies in a dequantized value (quant level x sub-block scale)
D_TIMES = {T.Q4_0: 8, T.Q4_1: 16, T.Q5_0: 16, T.Q5_1: 32, T.Q8_0: 128, T.Q2_K: 64, T.Q3_K: 128,
           T.Q4_K: 64 * 16, T.Q5_K: 64 * 32, T.Q6_K: 128 * 32}  # k: RoPE-permuted rows; down: folded into ffn_up rows


def random_adapter(base: GGUFBase, sites=SITES, seed: int = 0) -> IA3Adapter:
    return adapter_for_base(base, list(sites), seed=seed, spread=0.3)


def dequantized(path) -> dict[str, np.ndarray]:
    return {t.name: (quants.dequantize(t.data, t.tensor_type), t.tensor_type) for t in GGUFReader(str(path)).tensors}


def expected_rows(adapter: IA3Adapter, base: GGUFBase) -> dict[str, np.ndarray]:
    """Row multipliers computed independently of the plan code: permute k, fold down into up."""
    out = {}
    for v in adapter.vectors:
        site = base.family.site(v.site)
        target = ("blk.{i}.ffn_up" if v.site == "down" else site.gguf_tensor).format(i=v.layer) + ".weight"
        l = rope_permute(v.values, base.heads["k"]) if v.site == "k" else v.values
        out[target] = out.get(target, 1.0) * l
    return out


@pytest.fixture(scope="module")
def tiny_f32(tiny_dir, tmp_path_factory):
    d = tiny_dir("llama", hidden_size=256, intermediate_size=512)
    return write_hf_gguf(d, tmp_path_factory.mktemp("gguf") / "tiny.f32.gguf").path


def check_exact(base_path, merged_path, adapter, base, allowed_types):
    before, after = dequantized(base_path), dequantized(merged_path)
    rows = expected_rows(adapter, base)
    seen = set()
    for name, (w0, qt) in before.items():
        w1 = after[name][0]
        if name not in rows:
            assert np.array_equal(w0, w1), f"{name} changed although no IA3 vector touches it"
            continue
        seen.add(qt)
        l = rows[name].astype(np.float32)[:, None]
        want = w0 * l
        # fp16 rounding of each new scale: 2^-11 relative, or half the 2^-24 subnormal step
        # (tiny weights give subnormal K-quant super-block scales) times what d multiplies
        tol = 2.0 ** -9 * np.abs(l) * np.abs(w0).max(axis=1, keepdims=True) + 2.0 ** -24 * D_TIMES.get(qt, 1)
        if qt == T.F32:
            tol = 1e-6 * np.abs(want) + 1e-9
        if qt == T.BF16:
            tol = 2.0 ** -8 * np.abs(want) + 1e-9
        err = np.abs(w1 - want)
        assert np.all(err <= tol), f"{name} ({qt.name}): max error {err.max()} > tolerance"
        assert np.abs(w1 - w0).max() > 10 * err.max() + 1e-6  # the merge did change the tensor
    assert seen & allowed_types, f"no tensor of type {allowed_types} was patched (saw {seen})"
    return seen


def test_every_quant_type_merges_exactly(tiny_f32, tmp_path):
    covered = set()
    for ftype, types in FTYPES.items():
        src = tiny_f32 if ftype == "f32" else quantize(tiny_f32, tmp_path / f"{ftype}.gguf", ftype)
        base = GGUFBase(src)
        adapter = random_adapter(base, seed=len(covered))
        res = merge_gguf(src, _saved(adapter, tmp_path / f"{ftype}.safetensors"), tmp_path / f"{ftype}.m.gguf")
        covered |= check_exact(src, res.out, adapter, base, types)
    listed = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
              T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
    assert listed <= covered, f"types never exercised: {sorted(t.name for t in listed - covered)}"


def _saved(adapter: IA3Adapter, path):
    return adapter.save(path)


def test_embedded_smollm2_q4_1_merge(tmp_path):
    src = default_gguf()
    base = GGUFBase(src)
    adapter = random_adapter(base, sites=("k", "v", "down"), seed=3)
    res = merge_gguf("default", _saved(adapter, tmp_path / "a.safetensors"), tmp_path / "m.gguf")
    assert "Q4_1" in res.into and res.seconds < 10
    assert check_exact(src, res.out, adapter, base, {T.Q4_1}) == {T.Q4_1}


def test_adapter_gguf_round_trip(tiny_f32, tmp_path):
    base = GGUFBase(tiny_f32)
    adapter = random_adapter(base, sites=("q", "k", "v", "o", "gate", "up", "down"), seed=7)
    path = write_ia3_gguf(adapter, tmp_path / "x.ia3.gguf", base, "x")
    reader = GGUFReader(str(path))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "ia3"
    assert reader.fields["adapter.ia3.sites"].contents() == ["q", "k", "v", "o", "gate", "up", "down"]
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    k0 = adapter.get(0, "k").values
    assert np.array_equal(stored["blk.0.attn_k.ia3_out"], rope_permute(k0, base.heads["k"]))  # GGUF row order
    assert not np.array_equal(stored["blk.0.attn_k.ia3_out"], k0)
    assert "blk.1.ffn_down.ia3_in" in stored
    back = read_ia3_gguf(path)
    assert back.base.matches(base.identity)  # stamped with the GGUF base
    assert [v.key for v in back.vectors] == [v.key for v in adapter.vectors]
    for a, b in zip(adapter.vectors, back.vectors):
        assert a.scaling == b.scaling and np.array_equal(a.values, b.values)
    # Merging from the .ia3.gguf and from the canonical file gives the same bytes.
    m1 = merge_gguf(tiny_f32, path, tmp_path / "m1.gguf").out
    m2 = merge_gguf(tiny_f32, _saved(adapter, tmp_path / "c.safetensors"), tmp_path / "m2.gguf").out
    assert m1.read_bytes() == m2.read_bytes()


def test_qwen2_biases_scale_with_their_rows(tiny_dir, tmp_path):
    path = write_hf_gguf(tiny_dir("qwen2"), tmp_path / "qwen2.gguf").path
    base = GGUFBase(path)
    adapter = random_adapter(base, sites=("q", "v"), seed=2)
    plan = adapter_plan(adapter, base)
    assert "blk.0.attn_q.bias" in plan and "blk.1.attn_v.bias" in plan
    merged = merge_gguf(path, _saved(adapter, tmp_path / "a.safetensors"), tmp_path / "m.gguf").out
    before, after = dequantized(path), dequantized(merged)
    l = adapter.get(0, "q").values  # qwen2: no RoPE permutation in GGUF
    np.testing.assert_allclose(after["blk.0.attn_q.bias"][0], before["blk.0.attn_q.bias"][0] * l, rtol=1e-6)
