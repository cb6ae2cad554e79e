"""Batched decoding of an ONNX export: the decoder (``edgeia3.runtimes.onnx_batch``) and the server's
batch loop (``edgeia3.serve.batching``), on tiny random models with real onnxruntime(-genai).

The reference for every request is the same request decoded alone by onnxruntime-genai (the
one-at-a-time path): greedy ids must be identical, and each row's logits must equal those it
computes alone (and those of a forward pass over the whole sequence without a KV cache).
"""

from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest

from edgeia3 import load_base
from edgeia3.runtimes import onnx_batch, open_runtime
from edgeia3.serve import Limits
from serving import PROMPTS, ThreadServer, ascii_bpe_tokenizer, chat, drive_rows, error_of, paced, wait_until
from tiny_models import make_tiny_model, random_peft_adapter

MODELS = ["base", "a", "b"]
LONG_B = 400  # tokens of the answer that runs through an unload of its adapter


def side_export(base_dir: Path, root: Path) -> Path:
    from edgeia3.export import export_onnx

    lb = load_base(base_dir)
    adapters = {}
    for name, seed in (("a", 1), ("b", 2)):
        random_peft_adapter(copy.deepcopy(lb.model), lb.config.model_type, root / f"peft_{name}", seed=seed)
        adapters[name] = str(root / f"peft_{name}")
    return export_onnx(str(base_dir), root / "onnx", "fp32", adapters=adapters).out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def rt(request, tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"batch_{request.param}")
    runtime = open_runtime(side_export(tiny_dir(request.param, tokenizer=True), root))
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """The serve tests' tiny llama (2048 context, byte-level BPE, chat template) as a side export."""
    root = tmp_path_factory.mktemp("batch_serve")
    base = make_tiny_model("llama", root / "base", seed=0, max_position_embeddings=2048)
    ascii_bpe_tokenizer(base)
    return side_export(base, root)


# -- the decoder -----------------------------------------------------------------------------------------
def alone(rt, ids, adapter, max_tokens, ignore_eos=False) -> list[int]:
    rt.use_adapter(adapter)
    return list(rt.generate_ids(ids, max_tokens, ignore_eos=ignore_eos))


def early_enders(rt, n: int, max_tokens: int) -> list[tuple[list[int], str | None]]:
    """Prompts (and adapters) whose greedy answer ends with EOS before ``max_tokens``."""
    rng, vocab, found = np.random.RandomState(1), rt.vocab_size, []
    for _ in range(200):
        ids = [int(x) for x in rng.randint(3, vocab, rng.randint(2, 20))]
        for adapter in (None, "a", "b"):
            if len(alone(rt, ids, adapter, max_tokens)) < max_tokens:
                found.append((ids, adapter))
                break
        if len(found) == n:
            return found
    pytest.fail(f"only {len(found)} of {n} seeded prompts end early: the early-EOS case would go untested")


def test_batched_rows_decode_exactly_as_alone(rt, monkeypatch):
    monkeypatch.setattr(onnx_batch, "FIRST_CAPACITY", 8)  # the KV buffers grow (and get copied) mid-batch
    monkeypatch.setattr(onnx_batch, "PREFILL_CHUNK", 4)  # prompts prefill in chunks of 4 (the last one shorter)
    rng, vocab, T = np.random.RandomState(0), rt.vocab_size, 30
    prompts = [[int(x) for x in rng.randint(3, vocab, n)] for n in (5, 17, 9, 23, 3, 12)]
    # (prompt, adapter, max_tokens, ignore_eos, step it may join at, steps after which the server drops it)
    cases = [(prompts[0], "a", T, False, 0, None), (prompts[1], None, T, False, 0, None),
             (prompts[2], "b", 7, False, 1, None),  # leaves early: max_tokens
             (prompts[3], "a", T, True, 1, None), (prompts[4], "b", T, False, 2, 4),  # leaves early: dropped
             (prompts[5], None, 1, False, 4, None)]  # one token: done as it joins
    cases += [(ids, ad, T, ie, 3 + k, None) for k, ((ids, ad), ie) in
              enumerate(zip(early_enders(rt, 2, T) * 2, (False, False, True, True)))]  # EOS, and EOS ignored
    want = [alone(rt, ids, ad, n, ie) for ids, ad, n, ie, _, _ in cases]
    assert sum(len(w) < T for (_, _, n, ie, _, _), w in zip(cases, want) if n == T and not ie) >= 2  # EOS

    seen: dict = {}  # key -> logits the decoder chose each token from
    take = onnx_batch.BatchDecoder._take

    def recording_take(self, row, logits):
        seen.setdefault(row.key, []).append(np.array(logits, dtype=np.float32))
        return take(self, row, logits)

    monkeypatch.setattr(onnx_batch.BatchDecoder, "_take", recording_take)
    run, positions = onnx_batch.BatchDecoder._run, []  # logits positions each model call allocates

    def recording_run(self, ids, mask, logits, rows):
        positions.append(logits.shape[1])
        return run(self, ids, mask, logits, rows)

    monkeypatch.setattr(onnx_batch.BatchDecoder, "_run", recording_run)
    dec = rt.batch_decoder(max_rows=4)  # fewer rows than requests: some wait for a free row
    got, joined, widest = drive_rows(dec, cases)
    assert widest == 4 and dec.peak[1] > 8 and max(joined.values()) > 4  # some waited for a free row
    assert dec.capacity == (0, 0) and dec.kv == []  # every row left: the grown buffers were released
    assert max(positions) == 4  # prompts of up to 23 tokens never had logits for every position
    for i, (ids, ad, n, ie, _, drop) in enumerate(cases):
        assert got[i] == (want[i] if drop is None else want[i][: drop + 1]), (i, got[i], want[i])
    # the logits too: each row's equal what it computes alone (batch 1), and a full forward without cache
    for i, (ids, ad, n, ie, _, drop) in enumerate(cases):
        solo = rt.batch_decoder(max_rows=1)
        seen_batch, seen[("solo", i)] = seen.pop(i), []
        tok = solo.join(("solo", i), ids, ad, n, ignore_eos=ie)
        while len(solo):
            solo.step()
        assert len(seen[("solo", i)]) >= len(seen_batch)
        diff = max(np.abs(a - b).max() for a, b in zip(seen_batch, seen[("solo", i)]))
        assert diff <= 1e-5, (i, diff)
        rt.use_adapter(ad)
        full = rt.logits(ids + want[i])[len(ids) - 1:]
        np.testing.assert_allclose(np.stack(seen_batch), full[: len(seen_batch)], atol=1e-4, rtol=0)
        assert tok == (want[i][0] if want[i] else None)


def test_decoder_refuses_what_does_not_fit(rt):
    dec = rt.batch_decoder(max_rows=1)
    with pytest.raises(Exception, match="context"):
        dec.join(0, [5] * 10, None, 10_000)
    with pytest.raises(Exception, match="unknown adapter"):
        dec.join(0, [5, 6], "nope", 4)
    assert len(dec) == 0
    assert dec.join(0, [5, 6], None, 8, ignore_eos=True) is not None
    with pytest.raises(Exception, match="full"):
        dec.join(1, [5, 6], "a", 4)
    assert len(dec) == 1


# -- the server ----------------------------------------------------------------------------------------------
def test_server_batches_mixed_adapters_and_answers_as_one_at_a_time(served, monkeypatch):
    cases = [(m, p) for p in PROMPTS for m in MODELS] * 2  # 24 requests over base, a, b
    with paced(monkeypatch, 0.002), ThreadServer(served, Limits(max_batch=1)) as one:
        assert one.batch()["max_rows"] == 1
        ref = {c: chat(one.client(), *c) for c in set(cases)}
        long_b = chat(one.client(), "b", PROMPTS[1], LONG_B, extra_body={"ignore_eos": True})
        assert one.batch()["steps"] == 0  # onnxruntime-genai, one request at a time
    assert len({ref[(m, PROMPTS[0])][0] for m in MODELS}) == 3  # the adapters matter
    with paced(monkeypatch, 0.002), ThreadServer(served, Limits(max_batch=8)) as srv:
        client, barrier = srv.client(), threading.Barrier(len(cases))

        def one_request(case):
            barrier.wait()
            return chat(client, *case)

        with ThreadPoolExecutor(len(cases)) as ex:
            got = list(ex.map(one_request, cases))
        assert got == [ref[c] for c in cases]
        b = srv.batch()
        assert b["max_rows"] == 8 and b["peak_rows"] == 8 and b["rows_decoded"] > 3 * b["steps"]
        # a running row keeps its adapter through an unload; a disconnected client frees its row
        with ThreadPoolExecutor(1) as ex, srv.http.stream(
                "POST", "/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 1000, "stream": True,
                                                 "ignore_eos": True}) as r:
            lines = r.iter_lines()  # kept: a dropped line iterator closes the connection
            next(line for line in lines if line.startswith("data: "))  # 'a' runs (>= 2 s)
            keep = ex.submit(lambda: list(client.chat.completions.create(
                model="b", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=LONG_B, stream=True,
                extra_body={"ignore_eos": True})))
            wait_until(lambda: srv.http.get("/metrics").json()["running"] == 2, 30, "two running rows")
            assert srv.http.delete("/v1/adapters/b").status_code == 200  # while 'b' runs (>= 0.8 s)
            chunks = keep.result()
        # leaving the block hung up on 'a' mid-answer
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == long_b[0]
        with pytest.raises(openai.NotFoundError):
            chat(client, "b", PROMPTS[0])
        m = wait_until(lambda: (m := srv.http.get("/metrics").json())["running"] == 0 and m, 30, "idle")
        assert m["cancelled"] == 1 and m["generated_tokens"] < len(cases) * 24 + LONG_B + 1000
        assert chat(client, "a", PROMPTS[0]) == ref[("a", PROMPTS[0])]


# -- faults: the worker never dies silently ----------------------------------------------------------------------
FAULT_FIRST, FAULT_LATER, FAULT_FINISH = "\x01fault-first", "\x01fault-later", "\x01fault-finish"


def inject_faults(monkeypatch):
    """Requests carrying a marker stop string fail inside the worker: detokenizing their first token
    (as it joins the batch), a later one (in a batch step), or finishing (``Engine.complete``)."""
    from edgeia3.serve import batching, engine
    from edgeia3.serve.requests import TextStream

    class FaultyText(TextStream):
        def __init__(self, detokenize, stop):
            at = 1 if FAULT_FIRST in stop else 3 if FAULT_LATER in stop else None

            def faulty(ids):
                if at is not None and len(ids) >= at:
                    raise RuntimeError(f"injected fault at token {len(ids)}")
                return detokenize(ids)

            super().__init__(faulty, stop)

    complete = engine.Engine.complete

    def faulty_complete(self, job, *args):
        if FAULT_FINISH in job.stop:
            raise RuntimeError("injected fault while finishing")
        return complete(self, job, *args)

    for module in (batching, engine):
        monkeypatch.setattr(module, "TextStream", FaultyText)
    monkeypatch.setattr(engine.Engine, "complete", faulty_complete)


@pytest.mark.parametrize("max_batch", [8, 1])
def test_a_failing_request_gets_500_and_the_others_are_served(served, monkeypatch, max_batch):
    inject_faults(monkeypatch)
    cases = [(m, p) for p in PROMPTS[:2] for m in MODELS]
    with paced(monkeypatch, 0.002), ThreadServer(served, Limits(max_batch=max_batch)) as srv:
        client = srv.client()
        ref = {c: chat(client, *c, 30) for c in cases}  # no marker: no fault
        stream_body = {"model": "a", "prompt": "x", "max_tokens": 30, "stream": True, "stop": [FAULT_LATER],
                       "ignore_eos": True}

        def faulty(marker):
            r = srv.http.post("/v1/chat/completions", json={
                "model": "b", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 30,
                "stop": [marker], "ignore_eos": True})
            return r.status_code, error_of(r)

        def streamed():
            with srv.http.stream("POST", "/v1/completions", json=stream_body) as r:
                return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]

        with ThreadPoolExecutor(len(cases) + 4) as ex:
            good = [ex.submit(chat, client, *c, 30) for c in cases]
            bad = [ex.submit(faulty, mark) for mark in (FAULT_FIRST, FAULT_LATER, FAULT_FINISH)]
            events = ex.submit(streamed).result(timeout=60)
            assert [f.result(timeout=60) for f in good] == [ref[c] for c in cases]
            for f in bad:
                status, err = f.result(timeout=60)
                assert status == 500 and err["code"] == "internal_error" and err["type"] == "server_error"
                assert "injected fault" in err["message"]
        assert "error" in events[-1] and events[-1]["error"]["code"] == "internal_error"
        m = wait_until(lambda: (m := srv.http.get("/metrics").json())["running"] == 0 and m, 30, "idle")
        assert m["errors"]["500"] == 4 and m["queue_depth"] == 0
        assert srv.engine.thread.is_alive() and srv.http.get("/health").status_code == 200
        assert [chat(client, *c, 30) for c in cases] == [ref[c] for c in cases]  # still serving
