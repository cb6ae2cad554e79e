"""edgeia3 serve: the real server (``python -m edgeia3 serve`` in a subprocess, uvicorn) on
127.0.0.1, driven by the official ``openai`` client, for a tiny ONNX and a tiny GGUF export
with two adapters each.

Tests that need requests to wait in the queue first keep the worker busy with a few long
base-model requests (``ignore_eos``; a full batch of them where the server batches, ONNX),
then synchronize on ``/metrics`` - never on sleeps. Batching itself: tests/test_serve_batching.py.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from edgeia3 import load_base
from edgeia3.formats import load_adapter
from edgeia3.serve.engine import Job, Scheduler, TextStream
from serving import (LONG, MAX_QUEUE, MODELS, PROMPTS, SERVED, Blocker, Server, ThreadServer, ascii_bpe_tokenizer,
                     chat, error_of, expected_alone, export, long_request, wait_until)
from tiny_models import make_tiny_model, random_peft_adapter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The base, adapters a, b, c (PEFT dirs), and the servers' --adapters-dir: c0 (c as an edgeia3
    canonical dir, loaded at start) and more/ (files the tests load at run time; not an adapter itself)."""
    root = tmp_path_factory.mktemp("serve_tiny")
    base_dir = make_tiny_model("llama", root / "base", seed=0, max_position_embeddings=2048)
    ascii_bpe_tokenizer(base_dir)
    lb = load_base(base_dir)
    adir = root / "adapters"
    more = adir / "more"
    peft = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        random_peft_adapter(copy.deepcopy(lb.model), "llama", more / f"peft_{name}", seed=seed)
        peft[name] = more / f"peft_{name}"
    c = dataclasses.replace(load_adapter(peft["c"], base_config=lb.config), base=lb.identity)
    canonical_c = c.save(more / "canonical_c" / "edgeia3_adapter.safetensors").parent
    c.save(adir / "c0" / "edgeia3_adapter.safetensors")
    other = load_base(make_tiny_model("llama", root / "other", seed=5, max_position_embeddings=2048))
    foreign = dataclasses.replace(c, base=other.identity).save(more / "foreign" / "edgeia3_adapter.safetensors")
    garbage = more / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64 + b"not an adapter")
    return {"root": root, "base": base_dir, "adir": adir, "more": more, "peft": peft, "canonical_c": canonical_c,
            "foreign": foreign.parent, "garbage": garbage}


@pytest.fixture(scope="module", params=["onnx", "gguf"])
def srv(request, tiny, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"serve_{kind}")
    main = export(kind, tiny, root / "main", ["a", "b"])
    # llama.cpp: 4 rows, so that a full batch of the blocking requests (serving.Blocker) is not too slow
    rows = {"onnx": 16, "gguf": 4}[kind]
    server = Server(main, root / "server.log", "--adapters-dir", str(tiny["adir"]), "--max-batch", str(rows))
    server.kind, server.root, server.main, server.rows = kind, root, main, rows
    server.ref = export(kind, tiny, root / "ref", ["a", "b", "c"])  # what a runtime-loaded 'c' must equal
    native = "c.onnx_adapter" if kind == "onnx" else "c.ia3.gguf"
    server.native = tiny["more"] / f"{kind}-{native}"
    shutil.copyfile(server.ref / "adapters" / native, server.native)
    times = []
    for _ in range(2):  # the second one is warm: what a blocking request really takes
        t0 = time.perf_counter()
        assert long_request(server) == LONG
        times.append(time.perf_counter() - t0)
    server.long_s = min(times)
    server.alone = {}
    yield server
    server.close()



# -- pure parts: the scheduler and the text deltas ------------------------------------------------------------
def test_scheduler_serves_adapter_turns_without_starving():
    loop = asyncio.new_event_loop()
    try:
        def job(adapter, age):
            j = Job(adapter, "x", 1, loop=loop)
            j.submitted = 100.0 - age
            return j

        sched = Scheduler(max_wait=1.0)
        waiting = [job("a", 9), job("b", 8), job("a", 7), job(None, 6), job("b", 5), job("a", 4)]
        order, current = [], None
        while waiting:
            j = waiting.pop(sched.pick(waiting, current, 100.0))
            order.append(j.adapter)
            current = j.adapter
        assert order == ["a", "a", "a", "b", "b", None]  # three turns, oldest adapter first
        # the active adapter's new requests join while nobody else waited long ...
        sched = Scheduler(max_wait=1.0)
        assert sched.pick([job("b", 0.5), job("a", 0.1)], "a", 100.0) == 1
        # ... but not once another adapter's request waited longer than max_wait
        assert sched.pick([job("b", 1.5), job("a", 0.1)], "a", 100.0) == 0
    finally:
        loop.close()


def test_text_deltas_hold_back_stop_strings_and_partial_utf8():
    pieces = {1: b"Hel", 2: b"lo ", 3: b"EN", 4: b"D!", 5: "é".encode()[:1], 6: "é".encode()[1:]}

    def detok(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    ts = TextStream(detok, ["END"])
    assert [ts.push(t) for t in (1, 2, 3)] == ["H", "ell", "o "]  # "EN" could start "END": held back
    assert ts.push(4) == "" and ts.stopped_at == len("Hello ") and ts.finish() == ""
    ts = TextStream(detok, ["END"])
    assert [ts.push(t) for t in (1, 2, 3)] + [ts.finish()] == ["H", "ell", "o ", "EN"]  # no stop: all of it
    ts = TextStream(detok, [])
    assert ts.push(1) == "Hel" and ts.push(5) == "" and ts.push(6) == "é" and ts.finish() == ""
    # stop strings longer than the text so far: nothing is sent until the text outgrows the hold
    ts = TextStream(detok, ["Hello world!"])
    assert [ts.push(t) for t in (1, 2, 3, 4)] == ["", "", "", ""] and ts.finish() == "Hello END!"
    ts = TextStream(detok, ["lo END!", "x" * 30])
    assert [ts.push(t) for t in (1, 2, 3)] == ["", "", ""]
    assert ts.push(4) == "" and ts.stopped_at == 3 and ts.finish() == "Hel"
    ts = TextStream(detok, ["lo END!"])
    assert [ts.push(t) for t in (1, 2, 3)] == ["", "", "He"]
    assert ts.push(4) == "" and ts.finish() == "l"


# -- the server, per export ---------------------------------------------------------------------------------------
def test_health_and_models(srv):
    r = httpx.get(srv.url + "/health")  # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok"
    client = srv.client()
    assert [m.id for m in client.models.list()] == SERVED
    for text in (r.text, srv.http.get("/v1/models").text, srv.http.get("/v1/models/c0").text):  # no paths
        assert str(srv.root.parent) not in text and str(srv.main) not in text and "/" not in text, text
    assert client.models.retrieve("a").id == "a"
    runtime = {"onnx": "onnxruntime-genai", "gguf": "llama.cpp"}[srv.kind]
    assert srv.metrics()["runtime"] == runtime


def test_concurrent_requests_answer_as_alone(srv):
    from edgeia3.runtimes import generate, open_runtime

    client = srv.client()
    cases = [(MODELS[i % 3], PROMPTS[i % 4]) for i in range(24)]
    alone = expected_alone(srv, client, cases)
    # the adapters matter, and the server answers what the runtime answers by itself
    assert len({alone[(m, PROMPTS[0])][0] for m in MODELS}) == 3
    rt = open_runtime(srv.main)
    try:
        for m in MODELS:
            rt.use_adapter(None if m == "base" else m)
            assert alone[(m, PROMPTS[1])][0] == generate(rt, [{"role": "user", "content": PROMPTS[1]}], 24)
    finally:
        rt.close()
    barrier = threading.Barrier(24)

    def one(case):
        barrier.wait()
        return chat(client, *case)

    before = srv.metrics()["batch"]
    with ThreadPoolExecutor(24) as ex:
        got = list(ex.map(one, cases))
    assert got == [alone[c] for c in cases]
    after = srv.metrics()["batch"]
    # decoded in batches of several rows (ONNX: mixed adapters; llama.cpp: groups of one adapter, in adapter
    # turns), not one at a time
    assert after["max_rows"] == srv.rows and after["peak_rows"] > 1
    assert after["rows_decoded"] - before["rows_decoded"] > 2 * (after["steps"] - before["steps"])


def test_waiting_requests_are_grouped_by_adapter(srv):
    client = srv.client()
    cases = [(MODELS[i % 3], PROMPTS[i % 4]) for i in range(24)]  # interleaved: FIFO would swap ~16 times
    alone = expected_alone(srv, client, cases)
    with Blocker(srv), ThreadPoolExecutor(24) as ex:
        before = srv.metrics()
        futures = [ex.submit(chat, client, *c) for c in cases]
        wait_until(lambda: srv.metrics()["requests"] - before["requests"] >= 24, 60, "24 queued requests")
        got = [f.result() for f in futures]
    assert got == [alone[c] for c in cases]
    after = srv.metrics()
    assert after["adapter_swaps"] - before["adapter_swaps"] <= 3  # one turn per adapter


def test_streamed_text_equals_non_streamed(srv):
    client = srv.client()
    for model in MODELS:
        for prompt in PROMPTS[:2]:
            text, finish = chat(client, model, prompt, max_tokens=40)
            stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=40, stream=True,
                                                    stream_options={"include_usage": True})
            chunks = list(stream)
            assert chunks[0].choices[0].delta.role == "assistant"
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 40
            # plain completions, both ways
            full = client.completions.create(model=model, prompt=prompt, max_tokens=30)
            parts = list(client.completions.create(model=model, prompt=prompt, max_tokens=30, stream=True))
            assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
            assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason
    # the raw wire format: data: {...} events, ending with data: [DONE]
    with srv.http.stream("POST", "/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 5,
                                                           "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_stop_strings_cut_the_answer_the_same_way_streamed(srv):
    client = srv.client()
    extra = {"extra_body": {"ignore_eos": True}}
    text, finish = chat(client, "b", PROMPTS[2], max_tokens=40, **extra)
    assert finish == "length" and len(text) >= 16
    i = next(i for i in range(6, len(text) - 3) if text.find(text[i:i + 3]) == i)
    stop = text[i:i + 3]
    cut, finish = chat(client, "b", PROMPTS[2], max_tokens=40, stop=[stop, "\x00never"], **extra)
    assert (cut, finish) == (text[:i], "stop")
    stream = client.chat.completions.create(model="b", messages=[{"role": "user", "content": PROMPTS[2]}],
                                            max_tokens=40, stop=stop, stream=True, **extra)
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[:i]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_strings_longer_than_the_text_so_far_never_leak(srv):
    client = srv.client()
    extra = {"extra_body": {"ignore_eos": True}}
    text, finish = chat(client, "a", PROMPTS[0], max_tokens=40, **extra)
    assert finish == "length" and len(text) >= 20
    i = next(i for i in range(1, 5) if text.find(text[i:i + 12]) == i)
    for stop, want in (([text[:12]], ("", "stop")),  # at the very start
                       ([text[i:i + 12]], (text[:i], "stop")),  # a few characters in
                       ([text[:10] + "\x00", "y" * 40], (text, "length"))):  # never matches
        assert chat(client, "a", PROMPTS[0], max_tokens=40, stop=stop, **extra) == want, stop
        stream = client.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                max_tokens=40, stop=stop, stream=True, **extra)
        chunks = [c for c in stream if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want[0], stop
        assert chunks[-1].choices[0].finish_reason == want[1]


def test_adapters_load_and_unload_at_run_time(srv, tiny):
    from edgeia3.runtimes import generate, open_runtime

    client = srv.client()
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    r = srv.http.post("/v1/adapters", json={"name": "c", "path": str(tiny["canonical_c"])})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "c" and r.json()["edgeia3"]["params"] > 0
    assert [m.id for m in client.models.list()] == SERVED + ["c"]
    text_c = chat(client, "c", PROMPTS[0], 24)[0]
    ref = open_runtime(srv.ref)  # an export made with 'c' from the start
    try:
        ref.use_adapter("c")
        assert text_c == generate(ref, msgs, 24)
    finally:
        ref.close()
    assert text_c not in {chat(client, m, PROMPTS[0], 24)[0] for m in MODELS}
    assert chat(client, "c0", PROMPTS[0], 24)[0] == text_c  # the same adapter, from --adapters-dir
    # the same adapter in other forms: a PEFT dir (a path relative to --adapters-dir), the runtime's own format
    for name, path in (("c_peft", "more/peft_c"), ("c_native", str(srv.native))):
        r = srv.http.post("/v1/adapters", json={"name": name, "path": path})
        assert r.status_code == 200, r.text
        assert chat(client, name, PROMPTS[0], 24)[0] == text_c
    # refused loads
    bad = [({"name": "c", "path": str(tiny["canonical_c"])}, 409, "already"),
           ({"name": "base", "path": str(tiny["canonical_c"])}, 400, "base"),
           ({"name": "../x", "path": str(tiny["canonical_c"])}, 400, "name"),
           ({"name": "x", "path": str(tiny["more"] / "missing")}, 400, "not found"),
           ({"name": "x", "path": str(tiny["foreign"])}, 400, "another base"),
           ({"name": "x", "path": str(tiny["garbage"])}, 400, "garbage"),
           ({"name": "x", "path": str(tiny["base"])}, 403, "--adapters-dir"),  # outside the adapters dir
           ({"name": "x"}, 400, "path")]
    for body, status, words in bad:
        r = srv.http.post("/v1/adapters", json=body)
        assert r.status_code == status and words in error_of(r)["message"], (body, r.text)
    # unload
    r = srv.http.delete("/v1/adapters/c")
    assert r.status_code == 200 and r.json() == {"id": "c", "object": "model", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        chat(client, "c", PROMPTS[0])
    assert srv.http.delete("/v1/adapters/c").status_code == 404
    assert srv.http.delete("/v1/adapters/base").status_code == 400
    for name in ("c_peft", "c_native"):
        assert srv.http.delete(f"/v1/adapters/{name}").status_code == 200
    assert [m.id for m in client.models.list()] == SERVED
    # and back again, with the same answer; the others are unchanged
    assert srv.http.post("/v1/adapters", json={"name": "c", "path": str(tiny["canonical_c"])}).status_code == 200
    assert chat(client, "c", PROMPTS[0], 24)[0] == text_c
    assert srv.http.delete("/v1/adapters/c").status_code == 200
    alone = expected_alone(srv, client, [(m, PROMPTS[0]) for m in MODELS])
    assert [chat(client, m, PROMPTS[0]) for m in MODELS] == [alone[(m, PROMPTS[0])] for m in MODELS]


def test_unloading_an_adapter_fails_its_queued_requests(srv, tiny):
    client = srv.client()
    assert srv.http.post("/v1/adapters", json={"name": "q", "path": str(tiny["canonical_c"])}).status_code == 200
    with Blocker(srv) as blk, ThreadPoolExecutor(3) as ex:
        before = srv.metrics()["requests"]
        futures = [ex.submit(chat, client, "q", p) for p in PROMPTS[:3]]
        wait_until(lambda: srv.metrics()["requests"] - before >= 3, 60, "3 queued requests for q")
        r = srv.http.delete("/v1/adapters/q")
        assert r.status_code == 200
        for f in futures:
            with pytest.raises(openai.NotFoundError) as e:
                f.result()
            assert "unloaded" in str(e.value)
    assert blk.results == [LONG] * blk.k
    assert chat(client, "base", PROMPTS[0]) == expected_alone(srv, client, [("base", PROMPTS[0])])[("base", PROMPTS[0])]
    assert srv.http.get("/health").status_code == 200


def test_a_client_that_disconnects_frees_its_slot(srv):
    before = srv.idle()
    # mid-generation: read the first chunk, then hang up
    with srv.http.stream("POST", "/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": LONG,
                                                           "stream": True, "ignore_eos": True}) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))
    after = srv.idle()
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    assert after["generated_tokens"] - before["generated_tokens"] < LONG
    # while waiting in the queue: the request is dropped before it runs
    with Blocker(srv) as blk:
        before = srv.metrics()
        with pytest.raises(httpx.ReadTimeout):
            srv.http.post("/v1/chat/completions", timeout=httpx.Timeout(60, read=0.5),
                          json={"model": "b", "messages": [{"role": "user", "content": "hi"}]})
        wait_until(lambda: srv.metrics()["cancelled"] == before["cancelled"] + 1, 30, "the waiting job to go")
    after = srv.idle()
    assert after["completed"] - before["completed"] <= blk.k and after["requests_by_model"].get("b", 0) \
        == before["requests_by_model"].get("b", 0) + 1
    assert after["cancelled"] == before["cancelled"] + 1


def test_errors_have_openai_shape_and_status(srv):
    client = srv.client()
    # 401
    with pytest.raises(openai.AuthenticationError):
        srv.client(key="wrong").models.list()
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "base", "messages": []})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert httpx.get(srv.url + "/metrics").status_code == 401
    # 404
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "nope", "hi")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    r = srv.http.get("/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)
    # 400: malformed bodies (never 422)
    for body in (b"{not json", b"[1, 2]", json.dumps({"model": "base"}).encode(),
                 json.dumps({"model": "base", "messages": "hi"}).encode(),
                 json.dumps({"model": "base", "messages": [{"role": "robot", "content": "x"}]}).encode(),
                 json.dumps({"model": "base", "messages": [{"role": "user", "content": "x"}],
                             "max_tokens": "many"}).encode()):
        r = srv.http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        assert error_of(r)["type"] == "invalid_request_error"
    # 400: caps and unsupported parameters
    for kw, code in (({"max_tokens": LONG + 1}, "invalid_value"), ({"n": 2}, "unsupported_parameter"),
                     ({"logit_bias": {"5": 10}}, "unsupported_parameter")):
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, "a", "hi", **kw)
        assert e.value.body["code"] == code
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "a", "hello " * 200)  # more than --max-prompt-tokens 300
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "a", "hello " * 20, max_tokens=LONG)  # prompt + max_tokens > the context (2048)
    assert e.value.body["code"] == "context_length_exceeded"
    # temperature is accepted and ignored: decoding is greedy
    assert chat(client, "a", PROMPTS[0], temperature=1.5, top_p=0.5, seed=7) == \
        expected_alone(srv, client, [("a", PROMPTS[0])])[("a", PROMPTS[0])]
    # 413: too large a body, announced or streamed (chunked)
    big = json.dumps({"model": "base", "prompt": "x" * 70_000}).encode()
    r = srv.http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    r = srv.http.post("/v1/completions", content=iter([big[:40_000], big[40_000:]]),
                      headers={"content-type": "application/json"})
    assert r.status_code == 413
    # 429: a full queue
    with Blocker(srv), ThreadPoolExecutor(MAX_QUEUE + 8) as ex:
        def one(i):
            try:
                return chat(client, MODELS[i % 3], PROMPTS[0], 4)
            except openai.RateLimitError as e:
                return e

        results = list(ex.map(one, range(MAX_QUEUE + 8)))
    full = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert full and all(e.status_code == 429 and e.body["code"] == "queue_full" for e in full)
    assert len(results) - len(full) >= MAX_QUEUE - 8  # the queue took what it could hold
    m = srv.idle()
    assert m["rejected_queue_full"] >= len(full) and m["errors"]["429"] >= len(full)


def test_merged_export_says_it_cannot_load_adapters(srv, tiny):
    merged = export(srv.kind, tiny, srv.root / "merged", ["a"], merge="a")
    with ThreadServer(merged) as ts:
        client = ts.client()
        r = ts.http.post("/v1/adapters", json={"name": "x", "path": str(tiny["canonical_c"])})
        assert r.status_code == 400 and "merged" in error_of(r)["message"]
        assert error_of(r)["code"] == "adapter_loading_not_supported"
        # the merged export answers like the side export with 'a' active
        assert chat(client, "base", PROMPTS[0]) == expected_alone(srv, srv.client(), [("a", PROMPTS[0])])[
            ("a", PROMPTS[0])]
