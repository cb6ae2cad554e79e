"""Edit a builder-made ONNX graph: IA3 side inputs (Mul nodes) and exact row scaling.

Where each IA3 site lives in the graph comes from the registry
(``Site.onnx_node``, ``Site.onnx_fused_node``/``onnx_fused_rows``); which of the
two exists is read from the graph itself, since the builder fuses q/k/v for
some precisions and providers but not others.

Only the graph structure (model.onnx) is rewritten; weights stay in the
builder's external data file, whose int4/int8 scale rows are patched in place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeia3.errors import EdgeIA3Error
from edgeia3.manifest import ExportManifest
from edgeia3.registry import Family, Scaling

INPUT_PREFIX = "ia3.layers."
BATCH_DIM = "ia3_batch"  # first dim of every IA3 input: 1 (broadcast) or one vector per batch row


@dataclass
class IA3Input:
    """One IA3 graph input: a vector multiplied into one builder node's output (or input)."""

    name: str  # graph input / adapter tensor name, e.g. ia3.layers.3.qkv
    layer: int
    node: str  # builder node it acts on
    scaling: str  # "output": after the node (and its bias); "input": on the node's first input
    size: int
    parts: list[list] = field(default_factory=list)  # [site, start, stop] inside the vector

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IA3Input":
        return cls(**d)


def find_node(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    """The builder node ``name``; quantized builds append _Q4/_Q8 (MatMulNBits)."""
    for n in graph.node:
        if n.name == name or (n.op_type == "MatMulNBits" and n.name.startswith(name + "_Q")):
            return n
    return None


def node_out_features(graph: onnx.GraphProto, node: onnx.NodeProto) -> int:
    """N (output channels) of a MatMul or MatMulNBits node with a constant weight."""
    if node.op_type == "MatMulNBits":
        return next(helper.get_attribute_value(a) for a in node.attribute if a.name == "N")
    for init in graph.initializer:
        if init.name == node.input[1]:
            return int(init.dims[-1])
    raise EdgeIA3Error(f"ONNX node {node.name} has no constant weight")


def plan_inputs(graph: onnx.GraphProto, family: Family, config: Any, sites: list[str],
                sizes: dict[tuple[int, str], int], n_layers: int) -> list[IA3Input]:
    """One IA3Input per (layer, builder node) that the given sites touch.

    ``sizes`` maps (layer, site) to the vector length of unfused sites. Sites
    sharing a fused node (q, k, v -> qkv_proj) get one combined input holding
    every sibling's rows, ones where an adapter leaves a sibling alone.
    """
    if not sites:
        return []
    for s in sites:
        if family.site(s).onnx_node is None:
            raise EdgeIA3Error(
                f"ONNX export does not support IA3 site '{s}' of family '{family.name}' "
                "(no onnxruntime-genai builder node is known for it)"
            )
    plans: list[IA3Input] = []
    for i in range(n_layers):
        seen: set[str] = set()
        for name in [s.name for s in family.sites if s.name in sites]:
            site = family.site(name)
            fused = site.onnx_fused_node and find_node(graph, site.onnx_fused_node.format(i=i))
            if fused:
                if fused.name in seen:
                    continue
                seen.add(fused.name)
                siblings = [s for s in family.sites if s.onnx_fused_node == site.onnx_fused_node]
                parts = [[s.name, *s.onnx_fused_rows(config)] for s in siblings]
                plan = IA3Input(f"{INPUT_PREFIX}{i}.{''.join(s.name for s in siblings)}", i,
                                site.onnx_fused_node.format(i=i), Scaling.OUTPUT.value,
                                max(p[2] for p in parts), parts)
            else:
                node = site.onnx_node.format(i=i)
                n = sizes[(i, name)]
                plan = IA3Input(f"{INPUT_PREFIX}{i}.{name}", i, node, site.scaling.value, n, [[name, 0, n]])
            _check_plan(graph, plan)
            plans.append(plan)
    return plans


def _check_plan(graph: onnx.GraphProto, plan: IA3Input) -> None:
    node = find_node(graph, plan.node)
    if node is None:
        raise EdgeIA3Error(f"the builder's graph has no node {plan.node} (for {plan.name}); "
                           "unsupported builder version or model layout")
    if plan.scaling == Scaling.OUTPUT.value and node_out_features(graph, node) != plan.size:
        raise EdgeIA3Error(f"{plan.node} has {node_out_features(graph, node)} outputs, "
                           f"IA3 input {plan.name} expects {plan.size}")


def _bias_add(graph: onnx.GraphProto, out: str) -> onnx.NodeProto | None:
    """The Add that puts a constant bias on ``out`` (PEFT scales the bias too)."""
    inits = {t.name for t in graph.initializer}
    users = [n for n in graph.node if out in n.input]
    if len(users) == 1 and users[0].op_type == "Add":
        other = [x for x in users[0].input if x != out]
        if other and other[0] in inits:
            return users[0]
    return None


def add_side_inputs(model: onnx.ModelProto, plans: list[IA3Input], elem_type: int) -> None:
    """Insert one Mul per plan, fed by a graph input whose default is all ones."""
    graph = model.graph
    np_dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    after: dict[str, list[onnx.NodeProto]] = {}  # producer node name -> Muls to place right after it
    before: dict[str, list[onnx.NodeProto]] = {}  # consumer node name -> Muls to place right before it
    for p in plans:
        node = find_node(graph, p.node)
        mul_name = f"/edgeia3/{p.name}/Mul"
        if p.scaling == Scaling.OUTPUT.value:
            anchor = _bias_add(graph, node.output[0]) or node
            src = anchor.output[0]
            dst = f"{src}/ia3"
            for user in graph.node:
                for k, x in enumerate(user.input):
                    if x == src:
                        user.input[k] = dst
            after.setdefault(anchor.name, []).append(helper.make_node("Mul", [src, p.name], [dst], name=mul_name))
        else:
            src = node.input[0]
            dst = f"{src}/ia3.{p.layer}"
            node.input[0] = dst
            before.setdefault(node.name, []).append(helper.make_node("Mul", [src, p.name], [dst], name=mul_name))
        graph.input.append(helper.make_tensor_value_info(p.name, elem_type, [BATCH_DIM, 1, p.size]))
        graph.initializer.append(numpy_helper.from_array(np.ones((1, 1, p.size), dtype=np_dtype), p.name))
    nodes = []
    for n in graph.node:
        nodes.extend(before.get(n.name, []))
        nodes.append(n)
        nodes.extend(after.get(n.name, []))
    del graph.node[:]
    graph.node.extend(nodes)


def activation_type(model: onnx.ModelProto) -> int:
    """ONNX element type of the activations (that of the logits output)."""
    for o in model.graph.output:
        if o.name == "logits":
            return o.type.tensor_type.elem_type
    return model.graph.output[0].type.tensor_type.elem_type


def activation_np_dtype(model_file: Path) -> np.dtype:
    """The numpy dtype of the activations of the graph in ``model_file`` (its IA3 inputs' dtype;
    the graph is read without its external data)."""
    model = onnx.load(str(model_file), load_external_data=False)
    return np.dtype(helper.tensor_dtype_to_np_dtype(activation_type(model)))


# -- exact merge into quantized weights ---------------------------------------------------------


def _external_view(tensor: onnx.TensorProto, model_dir: Path) -> np.memmap:
    """A writable view of an initializer stored in the external data file."""
    info = {e.key: e.value for e in tensor.external_data}
    if tensor.data_location != onnx.TensorProto.EXTERNAL or "location" not in info:
        raise EdgeIA3Error(f"initializer {tensor.name} is not in external data; cannot patch in place")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims))
    return np.memmap(model_dir / info["location"], dtype=dtype, mode="r+",
                     offset=int(info.get("offset", 0)), shape=(count,))


def scale_output_rows(model: onnx.ModelProto, model_dir: Path, node_name: str, start: int, stop: int,
                      values: np.ndarray) -> None:
    """Multiply output channels [start, stop) of a MatMulNBits node by ``values``.

    MatMulNBits dequantizes W[n, k] = scale[n, block(k)] * (q[n, k] - zero_point), so
    scaling row n's scales (and its bias, if any) scales output n; the packed
    weights and zero points stay as they are.
    """
    graph = model.graph
    node = find_node(graph, node_name)
    if node is None or node.op_type != "MatMulNBits":
        raise EdgeIA3Error(f"cannot scale rows of {node_name}: not a MatMulNBits node in this graph")
    n_out = node_out_features(graph, node)
    inits = {t.name: t for t in graph.initializer}
    scales = _external_view(inits[node.input[2]], model_dir).reshape(n_out, -1)
    v = np.asarray(values, dtype=np.float32)
    scales[start:stop] = (scales[start:stop].astype(np.float32) * v[:, None]).astype(scales.dtype)
    scales.flush()
    biases = [node.input[5]] if len(node.input) > 5 and node.input[5] else []  # MatMulNBits' own bias
    add = _bias_add(graph, node.output[0])  # or a separate bias Add after it
    biases += [x for x in (add.input if add else []) if x in inits]
    for name in biases:
        bias = _external_view(inits[name], model_dir)
        bias[start:stop] = (bias[start:stop].astype(np.float32) * v).astype(bias.dtype)
        bias.flush()


def plans_of(manifest: ExportManifest) -> list[IA3Input]:
    """The IA3 inputs an export's manifest records."""
    return [IA3Input.from_dict(d) for d in manifest.ia3_inputs or []]
