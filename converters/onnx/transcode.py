"""Put a GGUF's quantized blocks into an onnxruntime-genai int4 graph, without re-rounding.

The builder quantizes the (dequantized) weights again to its own 4-bit grid,
so ONNX would run a different model from the one trained on the GGUF. Here
every builder ``MatMulNBits`` (and the embedding's ``GatherBlockQuantized``)
gets the GGUF tensor's own codes and scales instead (``decompose.Decomposed``):

Each GGML type's route is its entry in the block-type table (``quant_types``:
``has_minimum``, ``onnx_bits``, ``is_float``):

- types without a per-block minimum (Q4_0, Q8_0, Q5_0, Q3_K, Q6_K) are
  ``scale * (q - zero)`` with ONNX Runtime's default zero point once the codes
  are shifted (4-bit: 8, 8-bit: 128): exact, on the fast integer kernels;
- types with a minimum (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) are ``scale * q + m``:
  MatMulNBits with zero points 0 computes ``scale * q``; the ``m`` term is
  ``sum over a block of x`` times ``m``, added by two small fp32 MatMuls
  (block sums of x, shared by every node reading the same x, times the [blocks, N]
  minimum table). Exact up to fp32 summation order; float zero points would
  also be exact but leave the fast kernel (65x slower, FACTS.md);
- F32/F16/BF16 tensors become plain MatMuls with their exact values.

llama.cpp's q/k RoPE row permutation is undone by reordering rows (whole block runs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from gguf import GGMLQuantizationType as T
from onnx import helper, numpy_helper

from edgeia3.converters.gguf.decompose import Decomposed, decompose, float_values
from edgeia3.converters.gguf.ggml_index import OUTPUT, TOKEN_EMBD, GGUFIndex
from edgeia3.converters.gguf.quant_types import BLOCK_TYPES, FLOAT_TYPES
from edgeia3.converters.gguf.torch_weights import gguf_row_order
from edgeia3.errors import EdgeIA3Error
from edgeia3.registry import Family

from .graph import find_node

LM_HEAD_NODE = "/lm_head/MatMul"  # onnxruntime-genai builder names, the same for every family
EMBED_NODES = ("/model/embed_tokens/GatherBlockQuantized", "/model/embed_tokens/Gather")


@dataclass
class NBits:
    """One weight in MatMulNBits form: B [N, blocks, block*bits/8], scales [N, blocks]."""

    bits: int
    block: int
    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None  # uint8, packed like B; None = ONNX Runtime's default
    minimum: np.ndarray | None  # [N, blocks] per-block additive term, or None


def to_nbits(d: Decomposed) -> NBits:
    """Codes, scales and minimum of a decomposed weight in MatMulNBits' layout."""
    bits = BLOCK_TYPES[d.qtype].onnx_bits
    n, k = d.shape
    blocks = k // d.block
    if d.offset is None:
        codes = d.q.astype(np.int16) - d.zero + (1 << (bits - 1))  # default zero point 8 / 128
        zp = None
    else:
        codes = d.q.astype(np.int16)
        zp = np.zeros((n, (blocks + 1) // 2 if bits == 4 else blocks), np.uint8)
    if codes.min() < 0 or codes.max() >= (1 << bits):
        raise EdgeIA3Error(f"{d.qtype.name} codes do not fit {bits}-bit MatMulNBits")
    codes = codes.astype(np.uint8).reshape(n, blocks, d.block)
    if bits == 4:  # two codes a byte, the first in the low nibble
        codes = codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)
    return NBits(bits, d.block, np.ascontiguousarray(codes), d.scale.copy(), zp,
                 None if d.offset is None else d.offset.copy())


def concat_rows(parts: list[Decomposed]) -> Decomposed:
    """Stack weights along the output dimension (a fused q|k|v)."""
    first = parts[0]
    for p in parts[1:]:
        if (p.qtype, p.block, p.zero, p.offset is None) != (first.qtype, first.block, first.zero, first.offset is None):
            raise EdgeIA3Error(f"cannot fuse {first.qtype.name} and {p.qtype.name} weights into one MatMulNBits")
    offset = None if first.offset is None else np.concatenate([p.offset for p in parts])
    return Decomposed(first.qtype, np.concatenate([p.q for p in parts]), np.concatenate([p.scale for p in parts]),
                      offset, first.zero, max(p.bits for p in parts), first.block)


class GGUFSource:
    """Tensors of one GGUF file in the transformers row order (q/k unpermuted)."""

    def __init__(self, path: str | Path, family: Family, config: Any):
        self.path = Path(path)
        self.index = GGUFIndex(self.path)
        self.family, self.config = family, config
        self.buf = np.memmap(self.path, dtype=np.uint8, mode="r")

    def qtype(self, name: str) -> T:
        return T(self.index.tensor(name).type)

    def weight(self, name: str, module: str | None = None) -> Decomposed | np.ndarray:
        """Decomposed quant tensor, or float32 [out, in] for float tensors."""
        info = self.index.tensor(name)
        raw = self.buf[info.offset: info.offset + info.nbytes]
        order = gguf_row_order(self.family, module, self.config, info.rows) if module else None
        rows = slice(None) if order is None else order
        if T(info.type) in FLOAT_TYPES:
            return float_values(raw, info.type, info.ne[0])[rows]
        d = decompose(raw, info.type, info.ne[0])
        return d if order is None else d.take_rows(order)

    def lm_head_name(self) -> str:
        return OUTPUT if OUTPUT in self.index.tensors else TOKEN_EMBD


def node_weights(graph: onnx.GraphProto, family: Family, n_layers: int) -> list[tuple[onnx.NodeProto, list[tuple[str, str]]]]:
    """Each builder linear node and the GGUF tensors (name, HF module) whose rows it stacks."""
    out = []
    for i in range(n_layers):
        seen: set[str] = set()
        for site in family.sites:
            if site.gguf_tensor is None or site.fused_rows is not None:
                continue
            fused = site.onnx_fused_node and find_node(graph, site.onnx_fused_node.format(i=i))
            if fused is not None and fused:
                if fused.name in seen:
                    continue
                seen.add(fused.name)
                sibs = [s for s in family.sites if s.onnx_fused_node == site.onnx_fused_node]
                out.append((fused, [(s.gguf_tensor.format(i=i) + ".weight", s.module) for s in sibs]))
                continue
            node = site.onnx_node and find_node(graph, site.onnx_node.format(i=i))
            if node is None or not node:
                raise EdgeIA3Error(f"the builder's graph has no node {site.onnx_node.format(i=i)}")
            out.append((node, [(site.gguf_tensor.format(i=i) + ".weight", site.module)]))
    return out


class _Rewriter:
    """Replaces nodes and initializers of one graph in place."""

    def __init__(self, model: onnx.ModelProto, act_type: int, accuracy_level: int | None):
        self.model, self.graph = model, model.graph
        self.act_type = act_type
        self.np_act = helper.tensor_dtype_to_np_dtype(act_type)
        self.accuracy_level = accuracy_level
        self.block_sums: dict[tuple[str, int, int], str] = {}  # (x, K, block) -> block sums of x
        self.new_nodes: dict[str, list[onnx.NodeProto]] = {}  # replaced node name -> nodes in its place
        self.nbits_inputs: dict[str, list[str]] = {}  # node name -> its MatMulNBits B, scales[, zp]
        self.types: Counter = Counter()

    def init(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def linear(self, node: onnx.NodeProto, w: Decomposed | np.ndarray, qtype: str) -> None:
        """Nodes computing node.output[0] = node.input[0] @ w.T (+ the node's own bias)."""
        x, y, base = node.input[0], node.output[0], node.name
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias = node.input[5] if node.op_type == "MatMulNBits" and len(node.input) > 5 else ""
        self.types[qtype] += 1
        if isinstance(w, np.ndarray):  # a float tensor: its exact values
            wname = self.init(f"{base}.gguf_weight", w.T.astype(self.np_act))
            nodes = [helper.make_node("MatMul", [x, wname], [y + ("/nobias" if bias else "")], name=base)]
            if bias:
                nodes.append(helper.make_node("Add", [y + "/nobias", bias], [y], name=f"{base}/bias"))
            self.new_nodes[node.name] = nodes
            return
        nb = to_nbits(w)
        n, k = w.shape
        level = self.accuracy_level if self.accuracy_level is not None else attrs.get("accuracy_level", 4)
        inputs = [x, self.init(f"{base}.gguf_B", nb.b), self.init(f"{base}.gguf_scales", nb.scales.astype(self.np_act))]
        if nb.zero_points is not None or bias:
            inputs.append(self.init(f"{base}.gguf_zp", nb.zero_points) if nb.zero_points is not None else "")
        if bias:
            inputs += ["", bias]
        self.nbits_inputs[base] = inputs[1:4]
        mm_out = y if nb.minimum is None else f"{y}/nbits"
        nodes = [helper.make_node("MatMulNBits", inputs, [mm_out], name=base if node.op_type == "MatMulNBits"
                                  else f"{base}_Q{nb.bits}", domain="com.microsoft", K=k, N=n, bits=nb.bits,
                                  block_size=nb.block, accuracy_level=level)]
        if nb.minimum is not None:
            sums = self._block_sums(x, k, nb.block, nodes)
            table = self.init(f"{base}.gguf_min", nb.minimum.T.astype(self.np_act))  # [blocks, N]
            nodes += [helper.make_node("MatMul", [sums, table], [f"{y}/min"], name=f"{base}/gguf_min/MatMul"),
                      helper.make_node("Add", [mm_out, f"{y}/min"], [y], name=f"{base}/gguf_min/Add")]
        self.new_nodes[node.name] = nodes

    def _block_sums(self, x: str, k: int, block: int, nodes: list[onnx.NodeProto]) -> str:
        """x @ E with E [K, K/block] 0/1: the sum of x over every block (computed once per x)."""
        key = (x, k, block)
        if key not in self.block_sums:
            ename = f"gguf_block_sum_matrix.{k}.{block}"  # one E per shape, shared by every x
            if not any(kk == k and b == block for _, kk, b in self.block_sums):
                e = np.zeros((k, k // block), self.np_act)
                e[np.arange(k), np.arange(k) // block] = 1
                self.init(ename, e)
            name = f"{x}/gguf_block_sums{block}"
            nodes.insert(0, helper.make_node("MatMul", [x, ename], [name], name=f"{name}/MatMul"))
            self.block_sums[key] = name
        return self.block_sums[key]

    def embedding(self, node: onnx.NodeProto, w: Decomposed | np.ndarray, qtype: str,
                  tied_to: str | None = None) -> None:
        """GatherBlockQuantized over the GGUF's token_embd (plain Gather for float tensors).

        ``tied_to``: a node transcoded from the same tensor whose codes/scales it reuses."""
        _data, ids = node.input[0], node.input[1]
        y, base = node.output[0], node.name
        self.types[qtype] += 1
        if isinstance(w, np.ndarray):
            table = self.init(f"{base}.gguf_table", w.astype(self.np_act))
            self.new_nodes[node.name] = [helper.make_node("Gather", [table, ids], [y], name=base)]
            return
        nb = to_nbits(w)
        v, k = w.shape
        nodes = []
        if tied_to in self.nbits_inputs:  # same bytes as the LM head's: a Reshape, not a copy
            b, scales, *zp = self.nbits_inputs[tied_to]
            shape = self.init(f"{base}.gguf_data_shape", np.array([v, -1], np.int64))
            nodes.append(helper.make_node("Reshape", [b, shape], [f"{base}/gguf_data"], name=f"{base}/gguf_data"))
            inputs = [f"{base}/gguf_data", ids, scales] + [z for z in zp if z]
        else:
            inputs = [self.init(f"{base}.gguf_data", nb.b.reshape(v, -1)), ids,
                      self.init(f"{base}.gguf_scales", nb.scales.astype(self.np_act))]
            if nb.zero_points is not None:
                inputs.append(self.init(f"{base}.gguf_zp", nb.zero_points))
        g_out = y if nb.minimum is None else f"{y}/codes"
        attrs = {"gather_axis": 0, "quantize_axis": 1}  # rows gathered, blocks along the row
        attrs.update(bits=nb.bits, block_size=nb.block)
        nodes.append(helper.make_node("GatherBlockQuantized", inputs, [g_out], name=base, domain="com.microsoft",
                                      **attrs))
        if nb.minimum is not None:  # per-block minimum of the gathered rows, spread over each block
            e = np.zeros((k // nb.block, k), self.np_act)
            e[np.arange(k) // nb.block, np.arange(k)] = 1
            nodes += [helper.make_node("Gather", [self.init(f"{base}.gguf_min", nb.minimum.astype(self.np_act)), ids],
                                       [f"{y}/min_blocks"], name=f"{base}/gguf_min/Gather"),
                      helper.make_node("MatMul", [f"{y}/min_blocks", self.init(f"{base}.gguf_min_spread", e)],
                                       [f"{y}/min"], name=f"{base}/gguf_min/MatMul"),
                      helper.make_node("Add", [g_out, f"{y}/min"], [y], name=f"{base}/gguf_min/Add")]
        self.new_nodes[node.name] = nodes

    def finish(self) -> None:
        nodes = []
        for n in self.graph.node:
            nodes.extend(self.new_nodes.get(n.name, [n]))
        # drop what only fed the replaced nodes (e.g. the builder's Reshape of its own LM head codes)
        outputs = {o.name for o in self.graph.output}
        while True:
            needed = {i for n in nodes for i in n.input} | outputs
            alive = [n for n in nodes if any(o in needed for o in n.output)]
            if len(alive) == len(nodes):
                break
            nodes = alive
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        used = {i for n in self.graph.node for i in n.input} | {i.name for i in self.graph.input}
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        if not any(o.domain == "com.microsoft" for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _embed_node(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The builder's token embedding lookup: quantized (tied to the LM head) or a plain Gather."""
    for n in graph.node:
        if n.name in EMBED_NODES:
            return n
    return None


def transcode(model_dir: str | Path, gguf: str | Path, family: Family, config: Any, act_type: int,
              accuracy_level: int | None = None, model_file: str = "model.onnx") -> dict:
    """Rewrite ``model_dir/model_file`` (a builder int4/int8 graph) to run ``gguf``'s own weights.

    Returns {"gguf": path, "types": {GGML type: nodes}, "not_carried": [tensor (type)]}. The graph's other parts
    (norms, attention, side inputs already inserted) are left as they are.
    """
    model_dir = Path(model_dir)
    path = model_dir / model_file
    model = onnx.load(str(path), load_external_data=True)
    src = GGUFSource(gguf, family, config)
    rw = _Rewriter(model, act_type, accuracy_level)
    kept: list[str] = []
    for node, parts in node_weights(model.graph, family, config.num_hidden_layers):
        unsupported = [f"{n} ({src.qtype(n).name})" for n, _ in parts
                       if src.qtype(n) not in BLOCK_TYPES]
        if unsupported:  # e.g. the IQ types: no exact MatMulNBits form known
            kept += unsupported
            continue
        weights = [src.weight(name, module) for name, module in parts]
        qtypes = {src.qtype(name).name for name, _ in parts}
        if len(qtypes) > 1:
            raise EdgeIA3Error(f"{src.path}: {', '.join(n for n, _ in parts)} have different types ({', '.join(sorted(qtypes))}); "
                               "export with --no-fuse-qkv to keep them in separate MatMulNBits")
        w = weights[0] if len(weights) == 1 else (
            np.concatenate(weights) if isinstance(weights[0], np.ndarray) else concat_rows(weights))
        rw.linear(node, w, qtypes.pop())
    head_name = src.lm_head_name()
    head = find_node(model.graph, LM_HEAD_NODE)
    carried = {t: src.qtype(t) in BLOCK_TYPES for t in (head_name, TOKEN_EMBD)}
    kept += [f"{t} ({src.qtype(t).name})" for t, ok in carried.items() if not ok]
    if head is not None and carried[head_name]:
        rw.linear(head, src.weight(head_name), src.qtype(head_name).name)
    embed = _embed_node(model.graph)
    if embed is not None and carried[TOKEN_EMBD]:
        tied = head.name if head is not None and carried[head_name] and head_name == TOKEN_EMBD else None
        rw.embedding(embed, src.weight(TOKEN_EMBD), src.qtype(TOKEN_EMBD).name, tied)
    rw.finish()
    data = model_dir / (model_file + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return {"gguf": str(src.path), "types": dict(rw.types),
            # tensors of types without an exact MatMulNBits form keep the builder's own rounding
            "not_carried": sorted(set(kept))}


def carries(family: Family) -> bool:
    """False where an HF-fused module's GGUF tensor feeds several builder nodes (phi3's ffn_up:
    gate_up_proj, which the builder splits); node_weights skips such sites."""
    return not any(s.fused_rows is not None and s.onnx_node for s in family.sites)


def fusable_qkv(gguf: str | Path, family: Family, n_layers: int) -> bool:
    """True when every layer's fused-q|k|v tensors share one GGML type (so one MatMulNBits can hold them)."""
    index = GGUFIndex(gguf)
    fused = [s for s in family.sites if s.onnx_fused_node and s.gguf_tensor]
    for i in range(n_layers):
        if len({index.tensor(s.gguf_tensor.format(i=i) + ".weight").type for s in fused}) > 1:
            return False
    return True


def not_carried(gguf: str | Path) -> list[str]:
    """Weight tensors of ``gguf`` whose type has no exact MatMulNBits form (e.g. IQ types)."""
    index = GGUFIndex(gguf)
    return sorted(f"{t.name} ({T(t.type).name})" for t in index.tensors.values()
                  if len(t.ne) > 1 and T(t.type) not in BLOCK_TYPES)
