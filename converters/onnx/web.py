"""An ONNX export's graph as onnxruntime-web runs it, and IA3 adapters as files a page fetches.

onnxruntime-web (1.30/1.31, WASM and WebGPU) differs from native onnxruntime in three ways
that matter here (measured, FACTS.md):

- graph inputs that also have an initializer are not exposed: ``run()`` refuses the
  ``ia3.*`` inputs with their all-ones defaults. The browser graph makes them plain
  inputs (no initializer); "no adapter" is the page feeding ones;
- it reads IR versions up to 13 (onnx 1.23 writes 14);
- its WASM build has no 4-bit kernels: ``MatMulNBits`` dequantizes every weight on every
  step. ``matmul="dequantize"`` rewrites each MatMulNBits as ``DequantizeLinear`` (blocked,
  int4/uint4 or int8/uint8, the same codes, scales and zero points: exact) + ``MatMul``;
  with the session option ``session.disable_quant_qdq=1`` onnxruntime folds the
  dequantization into fp32 weights once, at load. ``matmul="dequantize-fold"`` also folds the
  transcoder's per-block minimum term (Q4_1 and other GGUF types with a minimum:
  ``blocksum(x) @ M``, two small MatMuls and an Add per linear) into that weight - fewer ops,
  but onnxruntime keeps every intermediate of constant folding until the pass ends (SmolLM2:
  renderer peak 2.9 GB at 1 thread, the 2-thread page crashed). ``matmul="nbits"`` keeps
  MatMulNBits.

Adapters become ``.safetensors`` files (float32 tensors named like the graph inputs, shape
[1, 1, N], every input of the export present; the header's ``__metadata__`` names the
export they belong to), parsed by the page without a library.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeia3.errors import EdgeIA3Error
from edgeia3.manifest import ExportManifest

MATMUL_MODES = ("dequantize", "int8", "nbits", "dequantize-fold")
MAX_IR = 13  # newest IR version onnxruntime-web 1.30/1.31 accept
ADAPTER_FORMAT = "edgeia3-web-ia3/1"
DATA_SUFFIX = ".data"


def browser_graph(src: Path, dst: Path, ia3_names: list[str], matmul: str = "dequantize",
                  model_file: str = "model.onnx") -> dict:
    """Write ``src``'s graph (an ONNX export folder's ``model_file``) into ``dst`` as the browser
    runs it; the weights go to ``model_file + '.data'``. Returns what was changed."""
    if matmul not in MATMUL_MODES:
        raise EdgeIA3Error(f"matmul must be one of {', '.join(MATMUL_MODES)}, got {matmul!r}")
    model = onnx.load(str(Path(src) / model_file), load_external_data=True)
    graph = model.graph
    names = set(ia3_names)
    inputs = {i.name for i in graph.input}
    missing = sorted(names - inputs)
    if missing:
        raise EdgeIA3Error(f"the ONNX graph has no IA3 inputs {', '.join(missing[:4])}")
    kept = [t for t in graph.initializer if t.name not in names]
    dropped = len(graph.initializer) - len(kept)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    rewritten = dequantize_matmuls(graph) if matmul != "nbits" else 0
    folded = fold_block_minimum(graph) if matmul in ("dequantize-fold", "int8") else 0
    int8 = int8_matmuls(graph) if matmul == "int8" else 0
    model.ir_version = min(model.ir_version, max(MAX_IR, _min_ir(model)))
    if model.ir_version > MAX_IR:
        raise EdgeIA3Error(f"the graph needs ONNX IR {model.ir_version}; onnxruntime-web reads up to {MAX_IR}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    data = model_file + DATA_SUFFIX
    onnx.save(model, str(dst / model_file), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data, size_threshold=1024)
    (dst / data).chmod(0o644)  # onnx writes it owner-only; a web server must read it
    ops: dict[str, int] = {}
    for n in graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"matmul": matmul, "dequantized_matmuls": rewritten, "block_minimum_folded": folded, "int8_matmuls": int8,
            "ia3_initializers_dropped": dropped,
            "ir_version": model.ir_version, "ops": dict(sorted(ops.items())),
            "files": [model_file, data], "bytes": sum((dst / f).stat().st_size for f in (model_file, data))}


def _min_ir(model: onnx.ModelProto) -> int:
    try:
        return helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:  # an opset onnx does not know: keep what the model says
        return model.ir_version


# -- MatMulNBits -> DequantizeLinear + MatMul ------------------------------------------------------
def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _unpack4(packed: np.ndarray, count: int) -> np.ndarray:
    """Two 4-bit codes a byte, the first in the low nibble -> ``count`` codes per row."""
    lo, hi = packed & 0x0F, packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)[:, :count]


def _pack4_tensor(name: str, codes: np.ndarray, signed: bool) -> onnx.TensorProto:
    """An ONNX INT4/UINT4 tensor of ``codes`` (row-major, two a byte, the first in the low nibble)."""
    flat = (codes.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4, list(codes.shape), raw,
                              raw=True)


def dequantize_matmuls(graph: onnx.GraphProto) -> int:
    """Rewrite every MatMulNBits whose weight is an initializer as DequantizeLinear (blocked) +
    MatMul (+ Add for a bias), over the same codes, scales and zero points. Returns the count."""
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            users[x] = users.get(x, 0) + 1
    out_nodes, new_inits, done = [], [], 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or node.input[1] not in inits:
            out_nodes.append(node)
            continue
        if len(node.input) > 4 and node.input[4]:
            raise EdgeIA3Error(f"{node.name}: MatMulNBits with g_idx has no DequantizeLinear form")
        k, n, bits, block = (int(_attr(node, a)) for a in ("K", "N", "bits", "block_size"))
        if bits not in (4, 8):
            raise EdgeIA3Error(f"{node.name}: {bits}-bit MatMulNBits has no DequantizeLinear form")
        b = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1)
        scales = numpy_helper.to_array(inits[node.input[2]])
        blocks = -(-k // block)
        scales = scales.reshape(n, blocks).T.copy()  # [blocks, N]
        codes = (_unpack4(b, blocks * block) if bits == 4 else b.reshape(n, -1))[:, :k]  # [N, K]
        zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
        zp = numpy_helper.to_array(inits[zp_name]) if zp_name else None
        base = node.name.strip("/").replace("/", ".")
        w, s, z = f"{base}.dq_codes", f"{base}.dq_scales", f"{base}.dq_zero_points"
        if zp is not None and zp.dtype.kind == "f":  # float zero points: scale * (q - zp) is not integer
            values = scales.T.repeat(block, axis=1)[:, :k] * (codes.astype(np.float32) -
                                                              zp.reshape(n, blocks).repeat(block, axis=1)[:, :k])
            new_inits.append(numpy_helper.from_array(values.T.astype(scales.dtype), f"{base}.dq_weight"))
            weight = f"{base}.dq_weight"
            dq = []
        else:
            centre = 1 << (bits - 1)  # MatMulNBits' default zero point: 8 / 128
            if zp is None:  # signed codes, zero point 0
                signed = codes.T.astype(np.int16) - centre
                new_inits.append(_pack4_tensor(w, signed, True) if bits == 4
                                 else numpy_helper.from_array(signed.astype(np.int8), w))
                dq_inputs = [w, s]
            else:
                zps = (_unpack4(zp.reshape(n, -1), blocks) if bits == 4 else zp.reshape(n, blocks)).T  # [blocks, N]
                if bits == 4:
                    new_inits += [_pack4_tensor(w, codes.T, False), _pack4_tensor(z, zps, False)]
                else:
                    new_inits += [numpy_helper.from_array(np.ascontiguousarray(codes.T), w),
                                  numpy_helper.from_array(np.ascontiguousarray(zps), z)]
                dq_inputs = [w, s, z]
            new_inits.append(numpy_helper.from_array(scales, s))
            weight = f"{base}.dq_weight"
            dq = [helper.make_node("DequantizeLinear", dq_inputs, [weight], name=f"{node.name}/DequantizeLinear",
                                   axis=0, block_size=block)]
        bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
        mm_out = f"{node.output[0]}/matmul" if bias else node.output[0]
        out_nodes += dq + [helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=f"{node.name}/MatMul")]
        if bias:
            out_nodes.append(helper.make_node("Add", [mm_out, bias], [node.output[0]], name=f"{node.name}/Add"))
        for x in node.input[1:4]:  # the packed tensors are gone unless another node reads them
            if x and users.get(x, 0) == 1:
                inits.pop(x, None)
        done += 1
    keep_names = set(inits)
    kept = [t for t in graph.initializer if t.name in keep_names]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(out_nodes)
    return done


def int8_matmuls(graph: onnx.GraphProto) -> int:
    """Rewrite every dequantized MatMul (after ``dequantize_matmuls`` + ``fold_block_minimum``) as
    ``com.microsoft:DynamicQuantizeMatMul``: the weight's exact fp32 values re-rounded to int8 with one
    symmetric scale per output column, activations quantized to uint8 per call - onnxruntime's integer
    GEMM (WASM SIMD kernels in onnxruntime-web). Not the GGUF grid any more: a re-quantization, whose
    cost is measured (bench/bench_web.py). Returns the count."""
    from onnx.reference import ReferenceEvaluator

    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    done, out_nodes, new_inits = 0, [], []
    for node in graph.node:
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        chain = _constant_chain(w, producer, inits) if w else None
        if chain is None or not any(n.op_type == "DequantizeLinear" for n in chain):
            out_nodes.append(node)
            continue
        sub = helper.make_graph(chain, "w", [], [helper.make_tensor_value_info(w, TensorProto.FLOAT, None)],
                                [inits[x] for n in chain for x in n.input if x in inits])
        model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        values = np.asarray(ReferenceEvaluator(model).run(None, {})[0], np.float32)  # [K, N]
        scale = np.abs(values).max(axis=0) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
        base = node.name.strip("/").replace("/", ".") or w
        new_inits += [numpy_helper.from_array(q, f"{base}.int8_weight"),
                      numpy_helper.from_array(scale.astype(np.float32), f"{base}.int8_scale")]
        out_nodes.append(helper.make_node("DynamicQuantizeMatMul", [node.input[0], f"{base}.int8_weight",
                                                                     f"{base}.int8_scale"], [node.output[0]],
                                          name=f"{node.name}/DynamicQuantizeMatMul", domain="com.microsoft"))
        done += 1
    _replace_nodes(graph, out_nodes, new_inits)  # and drop the weight chains nothing reads any more
    return done


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto]) -> None:
    """``graph`` with ``nodes`` (and ``new_inits``), less the nodes nothing reads any more and the
    initializers no node reads."""
    outputs = {o.name for o in graph.output}
    while True:
        needed = {i for n in nodes for i in n.input} | outputs
        alive = [n for n in nodes if any(o in needed for o in n.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in list(graph.initializer) + new_inits if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _constant_chain(name: str, producer: dict, inits: dict) -> list[onnx.NodeProto] | None:
    """The nodes (in order) computing ``name`` from initializers only; None if it reads anything else."""
    if name in inits:
        return []
    node = producer.get(name)
    if node is None or not node.name:
        return None
    chain: list[onnx.NodeProto] = []
    for x in node.input:
        if not x:
            continue
        sub = _constant_chain(x, producer, inits)
        if sub is None:
            return None
        chain += [n for n in sub if n not in chain]
    return chain + [node]


def fold_block_minimum(graph: onnx.GraphProto) -> int:
    """Fold the transcoder's per-block minimum term (``x @ W + blocksum(x) @ M``, GGUF types with a
    minimum such as Q4_1) into the dequantized weight: ``x @ (W + spread(M))``, one MatMul whose weight
    onnxruntime computes once at load (``W + m`` is the GGUF's own dequantized value ``d * q + m``).
    Only after ``dequantize_matmuls``; returns how many linears were folded."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    counts: dict[str, int] = {}
    for n in graph.node:
        counts[n.name] = counts.get(n.name, 0) + 1
    unique = {name for name, c in counts.items() if name and c == 1}
    drop: set[str] = set()
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    new_inits = []
    for add in graph.node:
        found = _minimum_term(add, producer, inits, consumers, unique)
        if found is None:
            continue
        mm, mn, table, block = found
        new_nodes[add.name], fold_inits = _folded_minimum(add, mm, mn, table, block)
        new_inits += fold_inits
        drop |= {mm.name, mn.name}
    if not new_nodes:
        return 0
    nodes = []
    for n in graph.node:
        if n.name in drop:
            continue
        nodes.extend(new_nodes.get(n.name, [n]))
    _replace_nodes(graph, nodes, new_inits)  # and drop the block-sum MatMuls nothing reads any more
    return len(new_nodes)


def _minimum_term(add: onnx.NodeProto, producer: dict, inits: dict, consumers: dict,
                  unique: set[str]) -> tuple[onnx.NodeProto, onnx.NodeProto, np.ndarray, int] | None:
    """(weight MatMul, minimum MatMul, minimum table [blocks, N], block size) when ``add`` sums
    ``x @ DequantizeLinear(...)`` and ``(x @ E) @ M`` with E the exact block-membership matrix
    (each node read once, named uniquely); None otherwise."""
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    mm, mn = (producer.get(add.input[0]), producer.get(add.input[1]))
    if mm is None or mn is None or mm.op_type != "MatMul" or mn.op_type != "MatMul":
        return None
    if producer.get(mm.input[1]) is None or producer[mm.input[1]].op_type != "DequantizeLinear":
        mm, mn = mn, mm
    dq = producer.get(mm.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or mn.input[1] not in inits:
        return None
    sums = producer.get(mn.input[0])
    if sums is None or sums.op_type != "MatMul" or sums.input[0] != mm.input[0] or sums.input[1] not in inits:
        return None
    if len(consumers.get(mm.output[0], [])) != 1 or len(consumers.get(mn.output[0], [])) != 1:
        return None
    if not {add.name, mm.name, mn.name} <= unique:
        return None
    e = numpy_helper.to_array(inits[sums.input[1]])  # [K, blocks], 1 where row k is in block b
    table = numpy_helper.to_array(inits[mn.input[1]])  # [blocks, N]
    k, blocks = e.shape
    if blocks == 0 or k % blocks or table.shape[0] != blocks:
        return None
    block = k // blocks
    want = np.zeros_like(e)
    want[np.arange(k), np.arange(k) // block] = 1
    if not np.array_equal(e, want):
        return None
    return mm, mn, table, block


def _folded_minimum(add: onnx.NodeProto, mm: onnx.NodeProto, mn: onnx.NodeProto, table: np.ndarray,
                    block: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes computing ``x @ (W + spread(M))`` into ``add``'s output, and their shape constants."""
    blocks, n = table.shape
    k = blocks * block
    base = f"{add.name.strip('/').replace('/', '.')}.min_fold"
    shape3 = numpy_helper.from_array(np.array([blocks, 1, n], np.int64), f"{base}.shape3")
    expand = numpy_helper.from_array(np.array([blocks, block, n], np.int64), f"{base}.expand")
    shape2 = numpy_helper.from_array(np.array([k, n], np.int64), f"{base}.shape2")
    w = f"{base}.weight"
    nodes = [
        helper.make_node("Reshape", [mn.input[1], shape3.name], [f"{base}/r3"], name=f"{base}/Reshape3"),
        helper.make_node("Expand", [f"{base}/r3", expand.name], [f"{base}/ex"], name=f"{base}/Expand"),
        helper.make_node("Reshape", [f"{base}/ex", shape2.name], [f"{base}/spread"], name=f"{base}/Reshape2"),
        helper.make_node("Add", [mm.input[1], f"{base}/spread"], [w], name=f"{base}/Add"),
        helper.make_node("MatMul", [mm.input[0], w], [add.output[0]], name=f"{base}/MatMul"),
    ]
    return nodes, [shape3, expand, shape2]


# -- adapters as files the page fetches ------------------------------------------------------------
def write_web_adapter(tensors: dict[str, np.ndarray], path: Path, export_id: str, name: str) -> dict:
    """``tensors`` (graph input name -> [1, 1, N]) as a float32 safetensors file whose metadata names
    the export (``export_id``); returns its manifest entry (file size and sha256)."""
    from safetensors.numpy import save

    data = {k: np.ascontiguousarray(v, dtype=np.float32).reshape(1, 1, -1) for k, v in sorted(tensors.items())}
    for k, v in data.items():
        if not np.all(np.isfinite(v)):
            raise EdgeIA3Error(f"adapter {name}: tensor {k} has non-finite values")
    blob = save(data, metadata={"format": ADAPTER_FORMAT, "export": export_id, "name": name})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def read_web_adapter(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and metadata of a web adapter file (one EdgeIA3Error for anything else)."""
    from edgeia3.adapter import read_adapter_safetensors

    def web_adapter(meta: dict, shapes: dict) -> None:
        if meta.get("format") != ADAPTER_FORMAT:
            raise EdgeIA3Error(f"{path} is not an edgeia3 web adapter (format {meta.get('format')!r})")

    return read_adapter_safetensors(path, web_adapter)  # size-capped, checked before its data is read


def export_id(manifest: ExportManifest) -> str:
    """What identifies an export's IA3 layout: the base's fingerprint and every input's name and size."""
    inputs = [(p["name"], int(p["size"])) for p in manifest.ia3_inputs or []]
    doc = json.dumps({"fingerprint": manifest.fingerprint, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]
