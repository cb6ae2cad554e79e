"""The web export as an edgeia3 runtime (``edgeia3.runtimes.web_runtime``: the folder's page in
Chromium) and ``edgeia3 report`` over it, each checked against native onnxruntime on the same graph."""

from __future__ import annotations

import json
import time

import numpy as np

from edgeia3.cli import app
from cli_checks import runner
from web_browser import PROMPTS, require_browser

require_browser()  # the ``exported`` fixture: tests/web_browser.py

def test_web_runtime_drives_the_page_as_native_onnxruntime_runs_the_graph(exported):
    """``open_runtime`` on a web folder runs it in Chromium (edgeia3.runtimes.web_runtime): prompt ids,
    greedy ids, every position's logits and streaming - each against native onnxruntime."""
    from edgeia3.runtimes import open_runtime

    out, native = exported
    with open_runtime(out) as rt:
        assert rt.name.startswith("onnxruntime-web") and rt.adapters == ["a", "b"]
        for adapter in (None, "a", "b"):
            rt.use_adapter(adapter)
            msgs = [{"role": "user", "content": PROMPTS[2]}]
            ids = rt.prompt_ids(msgs)
            assert ids == native.prompt_ids(msgs, adapter)
            np.testing.assert_allclose(rt.logits(ids), native.logits(ids, adapter), atol=1e-4, rtol=0)
            arrivals, got = [], []
            for tok in rt.generate_ids(ids, 24, ignore_eos=True):
                got.append(tok)
                arrivals.append(time.perf_counter())
            assert len(got) == 24 and got[:len(want := native.generate(ids, adapter, 24))] == want
            assert len(set(arrivals)) > 12  # streamed as the page made them, not all at the end
            timing = rt.last_timing  # the page's own clock: polling can bring several tokens at once
            assert 0 < timing["ttft_s"] < 60 and 0 < timing["decode_tok_s"] < 5000
        gen = rt.generate_ids(ids, 24, ignore_eos=True)  # abandoned after one token: the page stops
        first = next(gen)
        gen.close()
        assert list(rt.generate_ids(ids, 1, ignore_eos=True)) == [first]


def test_report_measures_the_web_export_in_chromium(exported, tmp_path):
    out, native = exported
    res = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "r"), "--runs", "1"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    [web] = doc["exports"]
    assert web["kind"] == "web" and web["label"].startswith("web int4 dequantize")
    speed = web["speed_base"]
    assert 0 < speed["ttft_s"]["median"] < 60 and 0 < speed["decode_tok_s"]["median"] < 5000
    assert web["switch_s"]["median"] < 1e-3  # a different set of input tensors for the next run
    for name in ("a", "b"):
        drift = web["adapters"][name]["drift"]
        assert drift["max_abs_logit_diff"] < 5.0 and 0 <= drift["greedy_token_agreement"] <= 1
    assert "web int4 dequantize side" in (tmp_path / "r" / "report.md").read_text()
