"""Batched decoding of a GGUF export: the decoder over llama.cpp's parallel sequences
(``edgeia3.runtimes.llama_batch``) and the server's batch loop in adapter groups
(``edgeia3.serve.batching``), on the serve tests' tiny llama (f32 GGUF, adapters a and b).

The reference for every request is the same request decoded alone (``generate_ids``, the
one-at-a-time path): greedy ids must be identical, and each row's logits must match a forward
pass over the whole sequence without a KV cache.
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
from edgeia3.runtimes import llama_batch, open_runtime
from edgeia3.serve import Limits
from serving import PROMPTS, ThreadServer, ascii_bpe_tokenizer, chat, drive_rows, paced, wait_until
from tiny_models import make_tiny_model, random_peft_adapter

MODELS = ["base", "a", "b"]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """The serve tests' tiny llama (2048 context, byte-level BPE, chat template) as a GGUF export."""
    from edgeia3.export import export_gguf

    root = tmp_path_factory.mktemp("gguf_batch")
    base = make_tiny_model("llama", root / "base", seed=0, max_position_embeddings=2048)
    ascii_bpe_tokenizer(base)
    lb = load_base(base)
    adapters = {}
    for name, seed in (("a", 1), ("b", 2)):
        random_peft_adapter(copy.deepcopy(lb.model), "llama", root / f"peft_{name}", seed=seed)
        adapters[name] = str(root / f"peft_{name}")
    return export_gguf(str(base), root / "gguf", quant="f32", adapters=adapters).out


@pytest.fixture(scope="module")
def rt(served):
    runtime = open_runtime(served)
    yield runtime
    runtime.close()


# -- the decoder -----------------------------------------------------------------------------------------
def alone(rt, ids, adapter, max_tokens, ignore_eos=False) -> list[int]:
    rt.use_adapter(adapter)
    return list(rt.generate_ids(ids, max_tokens, ignore_eos=ignore_eos))


def early_enders(rt, adapter, n: int, max_tokens: int) -> list[list[int]]:
    """Prompts whose greedy answer (with ``adapter``) ends with EOS before ``max_tokens``."""
    rng, found = np.random.RandomState(1), []
    for _ in range(300):
        ids = [int(x) for x in rng.randint(3, rt.vocab_size, rng.randint(2, 20))]
        if len(alone(rt, ids, adapter, max_tokens)) < max_tokens:
            found.append(ids)
        if len(found) == n:
            return found
    pytest.fail(f"only {len(found)} of {n} seeded prompts end early: the early-EOS case would go untested")


@pytest.mark.parametrize("adapter", [None, "a"])
def test_batched_rows_decode_exactly_as_alone(rt, adapter, monkeypatch):
    rng, T = np.random.RandomState(0), 30
    # one long prompt: its row's KV spans more cells than the others' (llama.cpp pads to 256)
    prompts = [[int(x) for x in rng.randint(3, rt.vocab_size, n)] for n in (5, 300, 9, 23, 3, 12)]
    # (prompt, max_tokens, ignore_eos, step it may join at, steps after which the server drops it)
    cases = [(prompts[0], T, False, 0, None), (prompts[1], T, False, 0, None),
             (prompts[2], 7, False, 1, None),  # leaves early: max_tokens
             (prompts[3], T, True, 1, None), (prompts[4], T, False, 2, 4),  # leaves early: dropped
             (prompts[5], 1, False, 4, None)]  # one token: done as it joins
    cases += [(ids, T, ie, 3 + k, None) for k, (ids, ie) in
              enumerate(zip(early_enders(rt, adapter, 2, T) * 2, (False, False, True, True)))]  # EOS, EOS ignored
    want = [alone(rt, ids, adapter, n, ie) for ids, n, ie, _, _ in cases]
    assert sum(len(w) < T for (_, n, ie, _, _), w in zip(cases, want) if n == T and not ie) >= 2  # EOS

    seen: dict = {}  # key -> logits the decoder chose each token from
    take = llama_batch.LlamaBatchDecoder._take

    def recording_take(self, row, i):
        ptr = self.ll.llama_get_logits_ith(self.ctx, i)
        seen.setdefault(row.key, []).append(np.array(np.ctypeslib.as_array(ptr, shape=(rt.vocab_size,))))
        return take(self, row, i)

    monkeypatch.setattr(llama_batch.LlamaBatchDecoder, "_take", recording_take)
    rt.use_adapter(None if adapter else "b")  # the decoder swaps to the rows' adapter as the first one joins
    dec = rt.batch_decoder(max_rows=4)  # fewer rows than requests: some wait for a free row
    try:
        got, joined, widest = drive_rows(dec, [(ids, adapter, *rest) for ids, *rest in cases])
    finally:
        dec.close()
    assert rt.active == adapter
    assert widest == 4 and max(joined.values()) > 4  # some waited for a free row
    for i, (ids, n, ie, _, drop) in enumerate(cases):
        assert got[i] == (want[i] if drop is None else want[i][: drop + 1]), (i, got[i], want[i])
    # the logits too: those of a full forward pass without a KV cache
    for i, (ids, n, ie, _, drop) in enumerate(cases):
        full = rt.logits(ids + want[i])[len(ids) - 1:]
        np.testing.assert_allclose(np.stack(seen[i]), full[: len(seen[i])], atol=1e-4, rtol=0)


def test_one_adapter_at_a_time_and_what_does_not_fit(rt):
    ids = [5, 6, 7]
    want_a, want_b = alone(rt, ids, "a", 8), alone(rt, ids, "b", 8)
    dec = rt.batch_decoder(max_rows=2)
    try:
        with pytest.raises(Exception, match="context"):
            dec.join(0, [5] * 10, "a", 10_000)
        with pytest.raises(Exception, match="unknown adapter"):
            dec.join(0, ids, "nope", 4)
        assert len(dec) == 0
        assert dec.join(0, ids, "a", 8) == want_a[0]
        with pytest.raises(Exception, match="one adapter at a time"):  # 'a' runs: 'b' waits
            dec.join(1, ids, "b", 8)
        assert dec.join(1, ids, "a", 8) == want_a[0]
        with pytest.raises(Exception, match="full"):
            dec.join(2, ids, "a", 4)
        got = {0: [want_a[0]], 1: [want_a[0]]}
        while len(dec):
            for key, tok in dec.step():
                got[key] += [tok] if tok is not None else []
        assert got == {0: want_a, 1: want_a}
        assert dec.join(2, ids, "b", 8) == want_b[0] and rt.active == "b"  # none running: swapped
    finally:
        dec.close()


def test_decoder_survives_a_reloading_swap(served):
    """``swap="reload"`` frees and reloads the model at every swap: the decoder's context goes with
    it and a new one opens at the next join."""
    with open_runtime(served, swap="reload") as rt:
        ids = [9, 10, 11, 12]
        want = {ad: alone(rt, ids, ad, 6) for ad in ("a", "b")}
        dec = rt.batch_decoder(max_rows=2)
        for ad in ("a", "b", "a"):
            got = {k: [dec.join(k, ids, ad, 6)] for k in (0, 1)}
            while len(dec):
                for key, tok in dec.step():
                    got[key] += [tok] if tok is not None else []
            assert got == {0: want[ad], 1: want[ad]}, ad
        dec.close()


# -- the server ----------------------------------------------------------------------------------------------
def concurrently(client, cases, **kw) -> list:
    barrier = threading.Barrier(len(cases))

    def one(case):
        barrier.wait()
        return chat(client, *case, **kw)

    with ThreadPoolExecutor(len(cases)) as ex:
        return list(ex.map(one, cases))


def test_server_batches_gguf_groups_and_answers_as_one_at_a_time(served, monkeypatch):
    same = [("a", p) for p in PROMPTS] * 3  # 12 requests for one adapter
    mixed = [(m, p) for p in PROMPTS for m in MODELS] * 2  # 24 requests over base, a, b
    stops = [(m, p) for p in PROMPTS for m in MODELS]
    with paced(monkeypatch, 0.002), ThreadServer(served, Limits(max_batch=1)) as one:
        assert one.batch()["max_rows"] == 1
        ref = {c: chat(one.client(), *c) for c in set(same + mixed)}
        long_a = chat(one.client(), "a", PROMPTS[1], 400, extra_body={"ignore_eos": True})
        full = {c: chat(one.client(), *c, 40, extra_body={"ignore_eos": True}) for c in stops}
        assert one.batch()["steps"] == 0  # one request at a time
    assert len({ref[(m, PROMPTS[0])][0] for m in MODELS}) == 3  # the adapters matter
    with paced(monkeypatch, 0.002), ThreadServer(served, Limits(max_batch=8)) as srv:
        client = srv.client()
        # one adapter: decoded together
        assert concurrently(client, same) == [ref[c] for c in same]
        b = srv.batch()
        assert b["max_rows"] == 8 and b["peak_rows"] == 8 and b["rows_decoded"] > 3 * b["steps"]
        # mixed adapters: groups of one adapter, in adapter turns
        swaps = srv.http.get("/metrics").json()["adapter_swaps"]
        assert concurrently(client, mixed) == [ref[c] for c in mixed]
        assert srv.http.get("/metrics").json()["adapter_swaps"] - swaps <= 4
        # stop strings, in a batch: cut where the answer alone is cut, never leaked
        cut = {}  # a stop string first found a few characters in, and the text before it
        for c in stops:
            text = full[c][0]
            i = next((i for i in range(2, len(text) - 3) if text.find(text[i:i + 3]) == i), None)
            if i is not None:
                cut[c] = (text[i:i + 3], text[:i])
        stops = list(cut)
        assert len(stops) >= 3
        got = concurrently(client, stops * 2, max_tokens=40, extra_body={"ignore_eos": True})
        assert got == [full[c] for c in stops * 2]
        with ThreadPoolExecutor(len(stops)) as ex:
            got = list(ex.map(lambda c: chat(client, *c, 40, stop=[cut[c][0]], extra_body={"ignore_eos": True}),
                              stops))
        assert got == [(cut[c][1], "stop") for c in stops]

        # joining mid-batch: a long 'a' answer runs; 'a' requests join it, a 'b' request waits for the group
        with ThreadPoolExecutor(8) as ex:
            with srv.http.stream("POST", "/v1/chat/completions", json={
                    "model": "a", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 400,
                    "stream": True, "ignore_eos": True}) as r:
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data: "))  # 'a' runs (>= 0.8 s)
                before = srv.http.get("/metrics").json()
                joiners = [ex.submit(chat, client, "a", p) for p in PROMPTS]
                waiter = ex.submit(chat, client, "b", PROMPTS[0])
                wait_until(lambda: srv.http.get("/metrics").json()["running"] >= 2, 30, "rows joining the long one")
                assert [f.result() for f in joiners] == [ref[("a", p)] for p in PROMPTS]
                events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]  # to its end
            assert waiter.result() == ref[("b", PROMPTS[0])]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert long_a[0].endswith(text) and [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] \
            == "length"
        after = srv.http.get("/metrics").json()
        # to 'b' once the 'a' group was done; a joiner that reached the queue after 'b' (the threads race
        # under load) runs in the next 'a' turn: one swap back. Never one per request.
        assert 1 <= after["adapter_swaps"] - before["adapter_swaps"] <= 2

        # a running group keeps its adapter through an unload; a disconnected client frees its row
        with ThreadPoolExecutor(1) as ex, srv.http.stream(
                "POST", "/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 1000, "stream": True,
                                                 "ignore_eos": True}) as r:
            lines = r.iter_lines()  # kept: a dropped line iterator closes the connection
            next(line for line in lines if line.startswith("data: "))  # 'a' runs (>= 2 s)
            keep = ex.submit(lambda: list(client.chat.completions.create(
                model="a", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=400, stream=True,
                extra_body={"ignore_eos": True})))
            wait_until(lambda: srv.http.get("/metrics").json()["running"] == 2, 30, "two running rows")
            delete = threading.Thread(target=lambda: setattr(delete, "r", srv.http.delete("/v1/adapters/a")))
            delete.start()
            wait_until(lambda: "a" not in [m["id"] for m in srv.http.get("/v1/models").json()["data"]], 30,
                       "'a' unlisted")
            with pytest.raises(openai.NotFoundError):
                chat(client, "a", PROMPTS[0])
            chunks = keep.result()
        # leaving the block hung up on the 1000-token answer mid-way
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == long_a[0]
        delete.join(60)
        assert delete.r.status_code == 200
        m = wait_until(lambda: (m := srv.http.get("/metrics").json())["running"] == 0 and m, 30, "idle")
        assert m["cancelled"] >= 1
        assert chat(client, "b", PROMPTS[0]) == ref[("b", PROMPTS[0])]
        assert chat(client, "base", PROMPTS[0]) == ref[("base", PROMPTS[0])]
        assert srv.engine.thread.is_alive() and srv.http.get("/health").status_code == 200
