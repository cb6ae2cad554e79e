"""The server under faults, in process (``serving.ThreadServer``) on tiny GGUF and ONNX side exports:
a slow run-time adapter load never holds up decoding (it is read and checked off the worker), and a
runtime that fails every request is reported unusable - ``/health`` and every request get a 503 at
once, without paths - instead of each request failing in turn. Faults are injected into edgeia3's
own runtime object (a slow ``prepare_adapter``, a ``generate_ids`` / ``batch_decoder`` that raise)."""

from __future__ import annotations

import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgeia3 import load_base
from edgeia3.serve import Limits
from serving import PROMPTS, ThreadServer, ascii_bpe_tokenizer, chat, error_of, export, paced
from tiny_models import make_tiny_model, random_peft_adapter

SLOW_LOAD = 3.0  # seconds the injected prepare_adapter takes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The serve tests' tiny llama, adapters a, b and c (PEFT dirs); c lies in the --adapters-dir's
    more/ (the server loads the dir's own adapters at start, and more/ is not one)."""
    root = tmp_path_factory.mktemp("serve_faults")
    base = make_tiny_model("llama", root / "base", seed=0, max_position_embeddings=2048)
    ascii_bpe_tokenizer(base)
    lb = load_base(base)
    peft = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        peft[name] = root / ("adir/more" if name == "c" else "peft") / name  # c: loaded at run time
        random_peft_adapter(copy.deepcopy(lb.model), "llama", peft[name], seed=seed)
    return {"base": base, "peft": peft, "adir": root / "adir", "root": root}


@pytest.fixture(scope="module", params=["gguf", "onnx"])
def served(request, tiny):
    return export(request.param, tiny, tiny["root"] / request.param, ["a", "b"])


def test_a_slow_adapter_load_never_holds_up_decoding(served, tiny, monkeypatch):
    """Before: the whole load ran on the worker, so every stream paused for as long as it took."""
    with paced(monkeypatch, 0.015), ThreadServer(served, adapters_dir=tiny["adir"]) as srv:
        rt = srv.engine.rt
        prepare, on_worker = rt.prepare_adapter, []

        def slow_prepare(*args):
            on_worker.append(threading.current_thread() is srv.engine.thread)
            time.sleep(SLOW_LOAD)
            return prepare(*args)

        monkeypatch.setattr(rt, "prepare_adapter", slow_prepare)
        arrivals, started = [], threading.Event()

        def stream():
            body = {"model": "a", "prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True}
            with srv.http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.perf_counter())
                        started.set()

        def load():
            assert started.wait(60)
            t0 = time.perf_counter()
            r = srv.http.post("/v1/adapters", json={"name": "c", "path": "more/c"})
            return t0, time.perf_counter(), r

        with ThreadPoolExecutor(2) as ex:
            streaming, loading = ex.submit(stream), ex.submit(load)
            t0, t1, r = loading.result(timeout=120)
            streaming.result(timeout=120)
        assert r.status_code == 200, r.text
        assert on_worker == [False] and t1 - t0 >= SLOW_LOAD
        assert arrivals[-1] > t1, "the stream must outlast the load for the check to mean anything"
        during = [t for t in arrivals if t0 <= t <= t1]
        gaps = [b - a for a, b in zip(during, during[1:])]
        assert len(during) > 20 and max(gaps) < 1.0, (len(during), max(gaps, default=None))
        assert chat(srv.client(), "c", PROMPTS[0])[0] != chat(srv.client(), "base", PROMPTS[0])[0]


@pytest.mark.parametrize("max_batch", [8, 1])
def test_a_runtime_that_fails_every_request_is_reported_unusable(served, monkeypatch, max_batch):
    failures = 3
    with ThreadServer(served, Limits(max_batch=max_batch, max_failures=failures)) as srv:
        rt = srv.engine.rt
        assert chat(srv.client(), "a", PROMPTS[0])  # it works before the fault
        secret = str(served)

        def broken(*args, **kw):
            raise RuntimeError(f"device lost while reading {secret}")

        # detokenizing: the runtime call every request makes, batched or one at a time
        monkeypatch.setattr(rt, "detokenize", broken)
        body = {"model": "a", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 8}

        def ask():
            r = srv.http.post("/v1/chat/completions", json=body)
            return r.status_code, error_of(r)

        codes = [(status, err["code"]) for status, err in (ask() for _ in range(failures + 2))]
        assert codes == [(500, "internal_error")] * failures + [(503, "runtime_unusable")] * 2, codes
        health = srv.http.get("/health")
        assert health.status_code == 503 and error_of(health)["code"] == "runtime_unusable"
        assert secret not in health.text and "RuntimeError" in health.text
        with ThreadPoolExecutor(6) as ex:  # nothing hangs: all answered at once
            assert {f.result(timeout=10)[0] for f in [ex.submit(ask) for _ in range(6)]} == {503}
        m = json.loads(srv.http.get("/metrics").text)
        assert m["unusable"] and m["failures_in_a_row"] >= failures and m["queue_depth"] == 0


def test_threads_reach_the_runtime_and_bad_values_are_refused(served, tiny):
    from edgeia3.cli import app
    from edgeia3.serve import build
    from cli_checks import runner

    engine = build(served, threads=1)
    try:
        rt = engine.rt
        if "llama" in rt.name:
            assert rt.n_threads == 1
        else:
            assert rt.ort_session().get_session_options().intra_op_num_threads == 1
        answer = list(rt.generate_ids(rt.prompt_ids(PROMPTS[0]), 4))
        assert len(answer) >= 1
    finally:
        engine.close()
    res = runner.invoke(app, ["serve", "--model", str(served), "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output
    res = runner.invoke(app, ["serve", "--model", str(tiny["base"]), "--threads", "2", "--port", "1"])
    assert res.exit_code == 2 and "threads" in res.output  # the torch runtime takes no thread count
