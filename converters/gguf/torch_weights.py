"""Train on a GGUF's own quantized tensors: frozen Linear layers that keep the
file's blocks and dequantize them on the fly (the values llama.cpp computes).

Each weight is held as its integer codes (two per byte for <= 4 bits), one
scale and optionally one offset per sub-block (``decompose.Decomposed``):
about the memory of an NF4 base. Forward and backward dequantize again instead
of keeping an fp32 copy for the backward pass, as bitsandbytes' 4-bit matmul does.

llama.cpp's RoPE row permutation of q/k is undone by reordering rows, which
is exact: a row is a run of whole blocks.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from edgeia3.errors import EdgeIA3Error
from edgeia3.registry import Family

from .decompose import Decomposed, decompose, float_values
from .quant_types import BLOCK_TYPES, FLOAT_TYPES, names
from .ggml_index import GGUFIndex, TensorInfo


class PackedWeight:
    """A frozen [out, in] weight in decomposed block form, dequantized on demand."""

    def __init__(self, d: Decomposed | None = None, dense: np.ndarray | None = None):
        if dense is not None:  # F32/F16/BF16 tensors: kept as they are stored (exact in fp32)
            self.dense = torch.from_numpy(np.ascontiguousarray(dense, np.float32))
            self.shape = tuple(self.dense.shape)
            return
        self.dense = None
        rows, cols = d.shape
        self.shape, self.zero, self.block, self.bits = (rows, cols), d.zero, d.block, d.bits
        q = d.q
        self.packed = d.bits <= 4
        if self.packed:  # two codes per byte: even columns in the low nibble
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        self.codes = torch.from_numpy(np.ascontiguousarray(q))
        self.scale = torch.from_numpy(np.ascontiguousarray(d.scale))[:, :, None]
        self.offset = None if d.offset is None else torch.from_numpy(np.ascontiguousarray(d.offset))[:, :, None]

    @property
    def nbytes(self) -> int:
        if self.dense is not None:
            return self.dense.numel() * 4
        n = self.codes.numel() + self.scale.numel() * 4
        return n + (self.offset.numel() * 4 if self.offset is not None else 0)

    def to(self, device: torch.device) -> "PackedWeight":
        for name in ("dense", "codes", "scale", "offset"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def dequantize(self) -> torch.Tensor:
        """fp32 [out, in]: scale * (q - zero) + offset, in ggml's order of operations."""
        if self.dense is not None:
            return self.dense
        rows, cols = self.shape
        c = self.codes
        if self.packed:
            c = torch.stack((c & 0x0F, c >> 4), dim=-1).reshape(rows, cols)
        w = (c.to(torch.float32) - self.zero).reshape(rows, cols // self.block, self.block) * self.scale
        if self.offset is not None:
            w = w + self.offset
        return w.reshape(rows, cols)


class _PackedMatmul(torch.autograd.Function):
    """x @ W.T with W dequantized in forward and, in fp32, again in backward (no fp32 copy
    kept, like bitsandbytes' 4-bit matmul). Under bf16 autocast the bf16 copy the matmul
    needs anyway is kept for backward: half the size of fp32, and no second dequantization."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:  # type: ignore[override]
        w = weight.dequantize().to(x.dtype)
        ctx.weight = weight
        ctx.keep = x.dtype in (torch.bfloat16, torch.float16)
        if ctx.keep:
            ctx.save_for_backward(w)
        return x @ w.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w = ctx.saved_tensors[0] if ctx.keep else ctx.weight.dequantize()
        return grad @ w.to(grad.dtype), None


class GGUFLinear(torch.nn.Linear):
    """A frozen Linear whose weight lives in a GGUF's quantized blocks.

    It subclasses ``nn.Linear`` so PEFT's IA3 wraps it like any Linear; the
    ``weight`` attribute is an empty placeholder (device/dtype only).
    """

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None, qtype: str):
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.packed = weight
        self.qtype = qtype
        self.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _PackedMatmul.apply(x, self.packed)
        return y if self.bias is None else y + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        return self.packed.dequantize()

    def _apply(self, fn, recurse=True):  # keep the packed tensors on the module's device
        out = super()._apply(fn, recurse)
        self.packed.to(self.weight.device)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf={self.qtype}"


def _tensor_name_map(index: GGUFIndex, n_layers: int) -> Any:
    import gguf

    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(index.arch)
    if arch is None:
        raise EdgeIA3Error(f"{index.path}: gguf-py has no tensor map for architecture {index.arch}")
    return gguf.get_tensor_name_map(arch, n_layers)


def read_weight(index: GGUFIndex, buf: np.ndarray, info: TensorInfo,
                order: np.ndarray | None = None) -> PackedWeight:
    """One 2-D tensor of the file as a PackedWeight (rows = ggml ne[1], taken in ``order``)."""
    raw = buf[info.offset: info.offset + info.nbytes]
    qt = T(info.type)
    rows = slice(None) if order is None else order
    if qt in FLOAT_TYPES:
        return PackedWeight(dense=float_values(raw, qt, info.ne[0])[rows].copy())
    if qt not in BLOCK_TYPES:
        raise EdgeIA3Error(f"{index.path}: tensor {info.name} is {qt.name}; training on the file's own "
                           f"weights supports {names()}")
    d = decompose(raw, qt, info.ne[0])
    return PackedWeight(d if order is None else d.take_rows(order))


def gguf_row_order(family: Family, module: str, config: Any, rows: int) -> np.ndarray | None:
    """HF row r of a q/k weight is GGUF row ``order[r]`` (None: same order)."""
    from .plan import rope_permute

    sites = family.site_for_module(module)
    perm = sites[0].gguf_permute if sites else None
    if perm is None:
        return None
    groups = config.num_attention_heads if perm == "q" else (config.num_key_value_heads or config.num_attention_heads)
    return np.argsort(rope_permute(np.arange(rows), groups))


def attach_gguf_weights(model: Any, family: Family, gguf_path: str | Path, embeddings: bool = False) -> dict:
    """Replace every layer Linear of ``model`` by a GGUFLinear over the file's own tensor.

    Returns a summary: {"types": {GGML type: count}, "modules": n, "packed_mb": size}.
    Norms stay as loaded. ``embeddings``: also set the token embedding and LM head to
    the file's dequantized ones (needed when ``model`` was loaded from another source
    than this GGUF; a model transformers loaded from this GGUF already has them).
    """
    index = GGUFIndex(gguf_path)
    n_layers = model.config.num_hidden_layers
    names = _tensor_name_map(index, n_layers)
    buf = np.memmap(index.path, dtype=np.uint8, mode="r")
    types: Counter = Counter()
    nbytes = 0
    prefix = family.layers + "."
    # Linear and plain subclasses (Falcon's FalconLinear), not layers already on blocks
    targets = [(n, m) for n, m in model.named_modules()
               if n.startswith(prefix) and isinstance(m, torch.nn.Linear) and not isinstance(m, GGUFLinear)]
    if not targets:
        raise EdgeIA3Error(f"{gguf_path}: no Linear layers to attach GGUF weights to")
    for name, module in targets:
        gguf_name = names.get_name(name)
        if gguf_name is None or f"{gguf_name}.weight" not in index.tensors:
            raise EdgeIA3Error(f"{gguf_path}: no GGUF tensor for module {name} (looked for {gguf_name}.weight)")
        info = index.tensor(f"{gguf_name}.weight")
        if (info.rows, info.ne[0]) != (module.out_features, module.in_features):
            raise EdgeIA3Error(f"{gguf_path}: {info.name} is {(info.rows, info.ne[0])}, model expects "
                               f"{(module.out_features, module.in_features)}")
        layer_module = name[len(prefix):].split(".", 1)[1]
        weight = read_weight(index, buf, info, gguf_row_order(family, layer_module, model.config, info.rows))
        qtype = T(info.type).name
        new = GGUFLinear(weight, module.bias, qtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        types[qtype] += 1
        nbytes += weight.nbytes
    if embeddings:
        _set_embeddings(model, index, buf, names)
    del buf
    return {"file": str(gguf_path), "types": dict(types), "modules": len(targets),
            "packed_mb": round(nbytes / 2**20, 1)}



def _set_embeddings(model: Any, index: GGUFIndex, buf: np.ndarray, names: Any) -> None:
    """Token embedding and LM head := the GGUF's dequantized tensors (tied: token_embd for both)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    with torch.no_grad():
        for module, hf_name in ((emb, "model.embed_tokens"), (head, "lm_head")):
            if module is None:
                continue
            name = names.get_name(hf_name)
            if name is None or f"{name}.weight" not in index.tensors:
                name = names.get_name("model.embed_tokens")  # tied output
            w = read_weight(index, buf, index.tensor(f"{name}.weight")).dequantize()
            if tuple(w.shape) != tuple(module.weight.shape):
                raise EdgeIA3Error(f"{index.path}: {name} is {tuple(w.shape)}, model expects {tuple(module.weight.shape)}")
            module.weight.copy_(w)


def densify(model: Any) -> Any:
    """``model`` with every GGUFLinear replaced by an nn.Linear holding its dequantized weight
    (same function, fp32 speed: used to evaluate with generation)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GGUFLinear):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    return model
