"""The browser graph's matmul forms, checked on native onnxruntime (no browser needed): MatMulNBits
rewritten as DequantizeLinear + MatMul computes the same values, and the int8 form stays within int8
rounding of it."""

from __future__ import annotations

import numpy as np
import pytest

def _nbits_model(k: int, n: int, bits: int, block: int, zero_points: bool, bias: bool, minimum: bool = False,
                 seed: int = 0):
    """One MatMulNBits (accuracy_level 0: fp32 compute) with random codes, scales, zero points, bias;
    ``minimum``: plus the transcoder's per-block minimum term (x @ E block sums, @ M, Add: Q4_1's form)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    per = block * bits // 8
    b = rng.integers(0, 256, (n, blocks, per), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (n * blocks,)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["x", "B", "S"]
    if zero_points:
        zp = rng.integers(0, 256, (n * (-(-blocks // 2) if bits == 4 else blocks),), dtype=np.uint8)
        inits.append(numpy_helper.from_array(zp, "Z"))
        inputs.append("Z")
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"))
        inputs += [""] * (4 - len(inputs)) + ["", "bias"]
    out = "y/nbits" if minimum else "y"
    nodes = [helper.make_node("MatMulNBits", inputs, [out], name="/m/MatMul_Q4", domain="com.microsoft",
                              K=k, N=n, bits=bits, block_size=block, accuracy_level=0)]
    if minimum:
        e = np.zeros((k, k // block), np.float32)
        e[np.arange(k), np.arange(k) // block] = 1
        inits += [numpy_helper.from_array(e, "E"),
                  numpy_helper.from_array(rng.uniform(-0.3, 0.3, (k // block, n)).astype(np.float32), "M")]
        nodes += [helper.make_node("MatMul", ["x", "E"], ["sums"], name="/m/sums"),
                  helper.make_node("MatMul", ["sums", "M"], ["y/min"], name="/m/gguf_min/MatMul"),
                  helper.make_node("Add", ["y/nbits", "y/min"], ["y"], name="/m/gguf_min/Add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


@pytest.mark.parametrize("bits, k, zero_points, bias, minimum", [
    (4, 96, False, False, False), (4, 80, True, True, False), (8, 64, False, True, False),
    (8, 96, True, False, False), (4, 96, True, False, True)])
def test_matmulnbits_as_dequantize_linear_is_exact(bits, k, zero_points, bias, minimum):
    """DequantizeLinear (blocked) + MatMul over the same codes, scales and zero points computes what
    MatMulNBits computes at fp32 (K not a multiple of the block included); a Q4_1-style minimum term
    folds into the weight (one MatMul left)."""
    import onnxruntime as ort

    from edgeia3.converters.onnx.web import dequantize_matmuls, fold_block_minimum

    model = _nbits_model(k, 48, bits, 32, zero_points, bias, minimum)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert dequantize_matmuls(model.graph) == 1
    assert fold_block_minimum(model.graph) == int(minimum)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulNBits" not in ops and ops.count("MatMul") == 1 and ops[0] == "DequantizeLinear"
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    got = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("bits, k, zero_points, bias, minimum", [(4, 96, True, False, True), (4, 80, False, True, False),
                                                                 (8, 64, True, False, False)])
def test_int8_form_is_one_integer_matmul_within_int8_rounding(bits, k, zero_points, bias, minimum):
    """matmul="int8": the exact weight (minimum term folded) re-rounded to int8 per column, one
    DynamicQuantizeMatMul (int8 activations): within int8 rounding of MatMulNBits at fp32."""
    import onnxruntime as ort

    from edgeia3.converters.onnx.web import dequantize_matmuls, fold_block_minimum, int8_matmuls

    model = _nbits_model(k, 48, bits, 32, zero_points, bias, minimum)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    dequantize_matmuls(model.graph)
    fold_block_minimum(model.graph)
    assert int8_matmuls(model.graph) == 1
    assert [n.op_type for n in model.graph.node] == ["DynamicQuantizeMatMul"] + (["Add"] if bias else [])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert 0 < np.abs(got - want).max() < 0.02 * np.abs(want).max()
