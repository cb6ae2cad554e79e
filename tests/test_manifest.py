"""The typed export manifest (edgeia3.manifest): manifests earlier releases wrote read into
ExportManifest / AdapterEntry, one JSON round-trip keeps the keys on disk, damaged ones are refused
with one clear line."""

from __future__ import annotations

import copy
import json

import pytest

from edgeia3.errors import EdgeIA3Error
from edgeia3.manifest import (FORMAT_VERSION, MANIFEST, AdapterEntry, ExportManifest, Merged, export_kind,
                              read_manifest, write_manifest)

IDENT = {"fingerprint": "ab12", "content": "cd34", "name": "tiny"}
TOKENS = {"add_bos": False, "bos_id": None, "add_eos": False, "eos_id": None}

# -- manifests as earlier releases wrote them (literal, not produced by today's writer) ------------------
ONNX_V1 = {  # format 1: no "kind", said as "format"; merged an object
    "format": "edgeia3-onnx", "format_version": 1,
    "base": {"name": "tiny", "spec": "/m/tiny", **IDENT}, "fingerprint": "ab12/cd34", "family": "llama",
    "precision": "int4", "provider": "cpu", "mode": "merged",
    "merged": {"method": "MatMulNBits scale rows (exact, no re-quantization)", "into": "quantized weights",
               "name": "a"},
    "fuse_qkv": True, "sites": [], "ia3_inputs": [],
    "adapters": {"a": {"sites": ["k", "v"], "params": 96, "trained_on": "none", "source": "/ad/a",
                       "canonical": "adapters/a.ia3.safetensors"}},
    "model_file": "model.onnx", "builder": "onnxruntime-genai 0.9.0", "mobile": None,
    "builder_options": {}, "weights": {"kind": "requantized", "how": "x"}, "transcoded": None,
    "model_bytes": 12345, "notes": [], "export_seconds": 3.2,
}
ONNX_V2 = {  # format 2, side adapters
    "kind": "onnx", "format_version": 2,
    "base": {"name": "tiny", "spec": "/m/tiny", **IDENT}, "fingerprint": "ab12/cd34", "family": "llama",
    "precision": "fp32", "provider": "cpu", "mode": "side", "merged": None, "fuse_qkv": True, "sites": ["k", "v"],
    "ia3_inputs": [{"name": "ia3.layers.0.kv", "layer": 0, "scaling": "output", "size": 32,
                    "parts": [["k", 0, 16], ["v", 16, 32]]}],
    "adapters": {"a": {"sites": ["k", "v"], "params": 32, "trained_on": "q4_0", "source": "/ad/a",
                       "trained_weights": {"sha256": "ff"}, "same_weights": False, "token_contract": TOKENS,
                       "file": "adapters/a.onnx_adapter", "bytes": 400, "chat_template": "{{ x }}"}},
    "model_file": "model.onnx", "builder": "onnxruntime-genai 0.9.0", "mobile": None,
    "builder_options": {"fuse_qkv": "false"}, "weights": {"kind": "full", "dtype": "fp32"}, "transcoded": None,
    "model_bytes": 999, "token_contract": TOKENS, "notes": ["a note"], "export_seconds": 1.5,
}
GGUF_V1 = {  # format 1: merged the adapter's name
    "kind": "gguf", "format_version": 1, "model": "model.gguf",
    "base": {"spec": "default", "identity": IDENT, "source_identity": None}, "family": "llama", "quant": "Q4_1",
    "weights": {"kind": "gguf", "sha256": "ff"},
    "adapters": {"a": {"file": "adapters/a.ia3.gguf", "sites": ["k"], "params": 16, "bytes": 2048,
                       "trained_quant": "q4_1", "trained_weights": {}, "same_weights": True}},
    "merged": "a", "notes": [],
}
GGUF_V2 = {**GGUF_V1, "format_version": 2, "merged": None, "token_contract": None,
           "adapters": {"a": {**GGUF_V1["adapters"]["a"], "token_contract": TOKENS}}}
T5_V2 = {
    "kind": "onnx-t5", "format_version": 2, "family": "t5", "precision": "fp32", "provider": "cpu",
    "base": {"name": "t5", "spec": "/m/t5", "identity": IDENT}, "model_bytes": 777, "mode": "side", "merged": None,
    "encoder": "encoder.onnx", "decoder": "decoder_with_past.onnx", "decoder_with_past": True,
    "num_layers": 2, "num_heads": 4, "d_kv": 8,
    "ia3_inputs": [{"name": "ia3.layers.0.k", "layer": 0, "site": "k", "size": 32, "graph": "encoder"}],
    "adapters": {"a": {"sites": ["k"], "params": 32, "trained_on": "none", "trained_weights": {},
                       "file": "adapters/a.safetensors", "bytes": 300}},
    "decoder_start_token_id": 0, "eos_token_id": 1,
}
WEB_V1 = {
    "kind": "web", "format_version": 1, "family": "llama", "base": ONNX_V2["base"], "fingerprint": "ab12/cd34",
    "export_id": "0123456789abcdef", "precision": "int4", "weights": {"kind": "gguf"}, "transcoded": True,
    "builder_options": {}, "graph": {"file": "model.onnx", "matmul": "dequantize", "bytes": 10},
    "decoder": {"num_layers": 2}, "ia3_inputs": [{"name": "ia3.layers.0.kv", "size": 32, "layer": 0, "parts": []}],
    "adapters": {"a": {"file": "adapters/a.safetensors", "bytes": 128, "sha256": "00ff", "sites": ["k", "v"],
                       "params": 32, "trained_on": "q4_0", "same_weights": True, "token_contract": TOKENS}},
    "token_contract": TOKENS, "tokenizer": {"json": "tokenizer.json"}, "chat_template": None,
    "runtime": {"packages": []}, "notes": [], "export_seconds": 9.0,
}
OLD = {"onnx v1": ONNX_V1, "onnx v2": ONNX_V2, "gguf v1": GGUF_V1, "gguf v2": GGUF_V2, "onnx-t5": T5_V2,
       "web": WEB_V1}


@pytest.mark.parametrize("name", list(OLD))
def test_old_manifests_read_typed(name):
    doc = copy.deepcopy(OLD[name])
    m = ExportManifest.from_json(doc)
    assert m.kind == doc.get("kind", "onnx") and m.family == doc["family"] and m.base == doc["base"]
    assert m.base_spec == doc["base"]["spec"] and m.base_identity["fingerprint"] == "ab12"
    assert m.format_version == doc["format_version"]
    assert all(isinstance(a, AdapterEntry) for a in m.adapters.values()) and list(m.adapters) == ["a"]
    a = m.adapters["a"]
    assert a.sites == doc["adapters"]["a"]["sites"] and a.params == doc["adapters"]["a"]["params"]
    assert a.trained_quant == doc["adapters"]["a"].get("trained_on", doc["adapters"]["a"].get("trained_quant"))
    assert m.notes == doc.get("notes", [])
    # one round-trip: what is written back is the manifest as it was (merged in its kind's shape)
    assert m.to_json() == _written(doc)
    assert ExportManifest.from_json(m.to_json()) == m


def _written(doc: dict) -> dict:
    """``doc`` as today's writer writes it: the version-1 ``format`` becomes ``kind``, null optional
    fields are left out, ``merged``, ``notes`` and ``token_contract`` (null: unknown) always present."""
    out = {k: v for k, v in doc.items() if k != "format" and (v is not None or k in ("merged", "mobile", "transcoded",
                                                                                        "chat_template"))}
    out["kind"] = doc.get("kind", "onnx")
    out.setdefault("merged", None)
    out.setdefault("notes", [])
    out.setdefault("token_contract", None)
    return out


def test_merged_either_shape():
    onnx, gguf = ExportManifest.from_json(ONNX_V1), ExportManifest.from_json(GGUF_V1)
    assert onnx.merged == Merged("a", ONNX_V1["merged"]["method"], "quantized weights") and onnx.merged_name == "a"
    assert gguf.merged == Merged("a") and gguf.merged_name == "a"
    assert gguf.to_json()["merged"] == "a" and onnx.to_json()["merged"] == ONNX_V1["merged"]
    assert ExportManifest.from_json(ONNX_V2).merged is None and ExportManifest.from_json(ONNX_V2).merged_name is None
    # a GGUF manifest whose merged is an object (as ONNX writes it) reads the same
    assert ExportManifest.from_json({**GGUF_V1, "merged": {"name": "a"}}).merged_name == "a"


def test_kind_specific_keys():
    gguf, onnx = ExportManifest.from_json(GGUF_V2), ExportManifest.from_json(ONNX_V2)
    assert gguf.model_file == "model.gguf" and gguf.quant == "Q4_1" and gguf.precision is None
    assert onnx.model_file == "model.onnx" and onnx.precision == "fp32" and onnx.extra["provider"] == "cpu"
    assert "trained_quant" in gguf.to_json()["adapters"]["a"] and "trained_on" in onnx.to_json()["adapters"]["a"]
    assert onnx.adapters["a"].chat_template == "{{ x }}" and onnx.side_adapters == onnx.adapters
    merged = ExportManifest.from_json(ONNX_V1)
    assert merged.side_adapters == {} and merged.adapters["a"].canonical == "adapters/a.ia3.safetensors"
    web = ExportManifest.from_json(WEB_V1)
    assert web.adapters["a"].extra == {"sha256": "00ff"} and web.extra["graph"]["matmul"] == "dequantize"


def test_write_and_read(tmp_path):
    m = ExportManifest("gguf", "llama", {"spec": "default"}, {"a": AdapterEntry(["k"], 16, "adapters/a.ia3.gguf", 9)},
                       Merged("a"), quant="Q4_0", model_file="model.gguf")
    write_manifest(tmp_path, m)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    assert doc["kind"] == "gguf" and doc["format_version"] == FORMAT_VERSION and doc["merged"] == "a"
    assert doc["model"] == "model.gguf" and doc["adapters"]["a"] == {"file": "adapters/a.ia3.gguf", "sites": ["k"],
                                                                   "params": 16, "bytes": 9}
    assert read_manifest(tmp_path) == m and export_kind(tmp_path) == "gguf"


@pytest.mark.parametrize("change, why", [
    ({"adapters": {"a": None}}, "adapter a"), ({"adapters": {"a": {"sites": "k"}}}, "sites"),
    ({"adapters": {"a": {"sites": [], "file": "x"}}}, "bytes"), ({"merged": {"method": "x"}}, "merged name"),
    ({"base": None}, "base"), ({"family": 3}, "family"), ({"ia3_inputs": [None]}, "IA3 input"),
    ({"notes": {"x": 1}}, "notes"), ({"model": 7}, "model"),
])
def test_damaged_manifests_refused(tmp_path, change, why):
    (tmp_path / MANIFEST).write_text(json.dumps({**GGUF_V2, **change}))
    with pytest.raises(EdgeIA3Error, match="damaged export manifest") as e:
        read_manifest(tmp_path)
    assert why in str(e.value) and str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    assert export_kind(tmp_path) == "gguf"  # the header still names its runtime


def test_header_refusals(tmp_path):
    for doc, match in (([], "holds a JSON list"), ({**GGUF_V2, "kind": "x"}, "unknown export kind"),
                       ({**GGUF_V2, "format_version": FORMAT_VERSION + 1}, "newer than this edgeia3 reads"),
                       (WEB_V1, "unknown export kind 'web'")):
        (tmp_path / MANIFEST).write_text(json.dumps(doc))
        with pytest.raises(EdgeIA3Error, match=match):
            read_manifest(tmp_path)
        # a web folder is no export read_manifest reads by default, but a kind the web runtime opens
        assert export_kind(tmp_path) == ("web" if doc is WEB_V1 else None)
