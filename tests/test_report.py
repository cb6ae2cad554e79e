"""edgeia3 report on tiny exports: the JSON's fields and values are plausible."""

from __future__ import annotations

import dataclasses

import copy
import json


import pytest

from edgeia3 import load_base
from edgeia3.export import export_gguf, export_onnx
from edgeia3.report import ReportOptions, report
from edgeia3.runtimes import open_runtime
from tiny_models import random_peft_adapter, write_label_task
from edgeia3.formats import load_adapter

OPTS = ReportOptions(runs=2, decode_tokens=8, greedy_tokens=5, eval_rows=6)


@pytest.fixture(scope="module")
def exports(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    base_dir = tiny_dir("llama", tokenizer=True)
    base = load_base(base_dir)
    adapters = {}
    for name, seed in (("a", 1), ("b", 2)):
        random_peft_adapter(copy.deepcopy(base.model), "llama", tmp / name, seed=seed)
        adapters[name] = str(tmp / name)
    dirs = {
        "onnx_side": export_onnx(str(base_dir), tmp / "onnx_side", "fp32", adapters=adapters).out,
        "onnx_merged": export_onnx(str(base_dir), tmp / "onnx_merged", "fp32", adapters={"a": adapters["a"]},
                                   merge="a").out,
    }
    return tmp, dirs, write_label_task(tmp / "eval.jsonl", 6)


def test_report_fields_and_values(exports, tiny_dir):
    tmp, dirs, eval_file = exports
    out = tmp / "rep"
    doc = report(list(dirs.values()), out, {"a": str(eval_file)}, OPTS)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "sizes.png",
                                                    "switch_vs_reload.png", "tokens_per_s.png"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["versions"]["onnxruntime"]
    by_path = {e["path"]: e for e in doc["exports"]}
    side, merged = (by_path[str(dirs[k])] for k in ("onnx_side", "onnx_merged"))

    # sizes are the files' sizes; LoRA r=8 on 2 layers x (k, v, down) of the tiny model
    for name in ("a", "b"):
        assert side["adapters"][name]["size"]["bytes"] == \
            (dirs["onnx_side"] / "adapters" / f"{name}.onnx_adapter").stat().st_size
    assert side["model_bytes"] == sum(f.stat().st_size for f in dirs["onnx_side"].iterdir()
                                      if f.name.startswith("model.onnx"))
    size = side["adapters"]["a"]["size"]
    assert size["params"] == 2 * (32 + 32 + 96)  # k, v: 2 kv heads x 16; down: intermediate 96
    assert size["lora_r8_bytes"] == 2 * 8 * ((64 + 32) * 2 + (96 + 64)) * 4

    # fp32 exports compute what PyTorch computes: merged and side agree with it and each other
    for e, name in ((side, "a"), (side, "b"), (merged, "a")):
        d = e["adapters"][name]["drift"]
        assert d["max_abs_logit_diff"] < 1e-3, (e["label"], d)
        assert d["argmax_agreement"] == 1.0 and d["greedy_token_agreement"] == 1.0
    assert list(merged["adapters"]) == ["a"] and merged["merged"] == "a"
    # fp32 exports answer exactly as PyTorch does: same greedy token ids on every eval row, for
    # each adapter of the side export and for the merged one, against a reference built apart
    # from the report (a fresh fp32 base + the original PEFT adapters, not the export's files)
    ref_ids = greedy_eval_ids(reference_runtime(tiny_dir("llama", tokenizer=True), tmp, ["a", "b"]), eval_file)
    for key, name in (("onnx_side", "a"), ("onnx_side", "b"), ("onnx_merged", "a")):
        rt = open_runtime(dirs[key])
        try:
            got = greedy_eval_ids(rt, eval_file, name)
        finally:
            rt.close()
        assert got == ref_ids[name], (key, name, got, ref_ids[name])
    assert any(ids for _, ids in ref_ids["a"]), "no eval row produced a token: nothing was compared"
    a, b, plain = ([ids for _, ids in ref_ids[n]] for n in ("a", "b", None))
    assert a != b and a != plain and b != plain, "the adapters do not change the answers: nothing told apart"
    # and the report's accuracies are the exact-match rates of exactly those answers
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()]
    tok = load_base(tiny_dir("llama", tokenizer=True)).tokenizer
    hits = sum(tok.decode(ids, skip_special_tokens=True).strip() == r["messages"][-1]["content"].strip()
               for (_, ids), r in zip(ref_ids["a"], rows))
    for e in (side, merged):
        assert e["adapters"]["a"]["accuracy"] == {"runtime": hits / len(rows), "trained": hits / len(rows),
                                                  "rows": len(rows)}, e["label"]

    # latencies are positive and ordered as they must be
    for e in doc["exports"]:
        assert e["load_s"] > 0 and e["reload_s"]["median"] > 0
        assert e["speed_base"]["decode_tok_s"]["median"] > 0
        assert e["speed_base"]["ttft_s"]["min"] <= e["speed_base"]["ttft_s"]["median"]
    # (which is faster - switch or reload - is a benchmark question: bench/, not a timed test)
    assert side["switch_s"]["median"] > 0 and side["switch_first_token_s"]["median"] > 0
    md = (out / "report.md").read_text()
    assert "## Drift vs PyTorch" in md and "onnx fp32 merged 'a'" in md


def reference_runtime(base_dir, adapter_root, names):
    """PyTorch on a fresh fp32 load of the base, with the original PEFT adapters."""
    from edgeia3 import load_adapter_for
    from edgeia3.runtimes.torch_runtime import TorchRuntime

    base = load_base(base_dir)
    return TorchRuntime(base, {n: load_adapter_for(adapter_root / n, base) for n in names})


def greedy_eval_ids(rt, eval_file, only: str | None = "all") -> dict | list:
    """(prompt ids, greedy answer ids) per eval row, with the report's token budget (target
    length + 4); ``only`` one adapter's (None: the base's), else a dict for every adapter and None."""
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()]
    names = rt.adapters + [None] if only == "all" else [only]
    out = {}
    for name in names:
        rt.use_adapter(name)
        out[name] = []
        for row in rows:
            msgs, target = row["messages"][:-1], row["messages"][-1]["content"]
            budget = len(rt.prompt_ids(target)) + 4
            ids = rt.prompt_ids(msgs)
            out[name].append((ids, list(rt.generate_ids(ids, budget))))
    return out if only == "all" else out[only]


@pytest.mark.integration
def test_report_on_embedded_gguf(smollm2, tmp_path):
    """GGUF side adapters vs the exact merge, on SmolLM2 Q4_1: the in-place swap makes the
    live weights bit-identical to the merged file, so both drift identically from PyTorch."""
    from edgeia3.validate import adapter_for_base

    path = adapter_for_base(smollm2, seed=0).save(tmp_path / "a.safetensors")
    side = export_gguf("default", tmp_path / "side", adapters={"a": str(path)}).out
    merged = export_gguf("default", tmp_path / "merged", adapters={"a": str(path)}, merge="a").out
    doc = report([side, merged], tmp_path / "rep", options=OPTS)
    s, m = doc["exports"]
    assert s["model_bytes"] == (side / "model.gguf").stat().st_size
    assert s["adapters"]["a"]["size"]["bytes"] == (side / "adapters" / "a.ia3.gguf").stat().st_size
    assert s["adapters"]["a"]["size"]["params"] == 57_600
    assert s["adapters"]["a"]["size"]["lora_r8_bytes"] == 30 * 8 * ((576 + 192) * 2 + (1536 + 576)) * 4
    assert s["adapters"]["a"]["drift"] == m["adapters"]["a"]["drift"]
    # llama.cpp computes on the same (dequantized Q4_1) weights as the reference: small drift
    assert s["adapters"]["a"]["drift"]["argmax_agreement"] > 0.8
    assert s["switch_s"]["median"] > 0 and s["reload_s"]["median"] > 0


def test_inspect_describes_exports(exports):
    from cli_checks import invoke

    _, dirs, _ = exports
    def flat(out: str) -> str:  # rich wraps table cells: drop borders and line breaks
        return " ".join(out.replace("│", " ").split())

    res = invoke("inspect", dirs["onnx_side"])
    text = flat(res.output)
    assert res.exit_code == 0, res.output
    assert "edgeia3 onnx export" in text and "adapter 'a'" in text and "sites k, v, down, 320 parameters" in text
    res = invoke("inspect", dirs["onnx_merged"])
    assert res.exit_code == 0 and "merged into the weights" in flat(res.output)


def test_each_adapter_is_compared_with_the_model_it_was_trained_as(tiny_dir, tmp_path):
    """One export, an NF4-trained and a full-precision adapter: each gets its own PyTorch
    reference (the bug: the NF4 reference was used for every adapter of the export)."""

    base_dir = tiny_dir("llama", tokenizer=True)
    base = load_base(base_dir)
    paths = {}
    for name, quant, seed in (("full", "none", 1), ("nf4", "nf4", 2)):
        random_peft_adapter(copy.deepcopy(base.model), "llama", tmp_path / f"peft_{name}", seed=seed)
        ad = load_adapter(tmp_path / f"peft_{name}", base_config=base.config)
        ad = dataclasses.replace(ad, base=base.identity, quant=quant)
        paths[name] = str(ad.save(tmp_path / f"{name}.safetensors"))
    out = export_onnx(str(base_dir), tmp_path / "onnx", "fp32", adapters=paths).out
    doc = report([out], tmp_path / "rep", options=OPTS)
    e = doc["exports"][0]["adapters"]
    assert "fp32 base" in e["full"]["reference"] and "NF4" in e["nf4"]["reference"]
    # the fp32 export runs the full-precision base: exact for the adapter trained on it ...
    assert e["full"]["drift"]["max_abs_logit_diff"] < 1e-3
    # ... and off by NF4's rounding for the one trained on NF4 (the report says so, not hides it)
    assert e["nf4"]["drift"]["max_abs_logit_diff"] > 1e-2
