"""The batched worker loop: up to ``max_batch`` requests decode together (runtimes with
``batch_decoder``: ONNX and GGUF exports).

Between two steps the worker runs pending control tasks (adapter loads and
unloads), then admits waiting requests into free rows - each is checked like any
request (``Engine.admit``) and prefilled alone - then decodes one token for every
row. Which requests join: with a decoder whose rows each carry their adapter (ONNX),
the oldest waiting, whatever their adapters; with one whose rows share the weights'
adapter (llama.cpp, ``one_adapter``), the batch is a *group* for one adapter: a
request joins while the adapter's turn lasts (``Scheduler.join``); once it is over,
the group drains (no one joins), the runtime swaps to the next turn's adapter
(``Scheduler.pick``) and a new group starts. An unload of the group's adapter waits
until the group is done. A row leaves on EOS, ``max_tokens``, a stop string, or
when its client went away; a step never waits for a slow client (events are
queued to the HTTP handlers).

An exception while handling one row (detokenizing, finishing it) fails that request
alone with a 500 in OpenAI's error shape; a failed step fails the batch's rows; the
loop itself never dies (``run``).

Every ONNX row has its own adapter vectors (copied when it joins, so an unload
cannot change a running request: it finishes with the adapter it started with,
while waiting requests for that adapter fail with 404, as without batching); a
llama.cpp group keeps its adapter's weights until it is done. Every row has its own
KV cache (a llama.cpp sequence); decoding is greedy. See ``edgeia3.runtimes.onnx_batch``
and ``edgeia3.runtimes.llama_batch``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..errors import EdgeIA3Error
from .requests import Job, ServeError, TextStream, internal_error, run_control

log = logging.getLogger("edgeia3.serve")


class _Row:
    """A request decoding in the batch: what its response has so far."""

    __slots__ = ("job", "text", "n", "n_prompt", "max_tokens")

    def __init__(self, job: Job, text: TextStream, n_prompt: int, max_tokens: int):
        self.job, self.text, self.n_prompt, self.max_tokens = job, text, n_prompt, max_tokens
        self.n = 0  # tokens generated


class BatchLoop:
    """The worker thread's loop for an engine whose runtime decodes batches."""

    def __init__(self, engine: Any):
        self.e = engine
        self.dec: Any = None  # the runtime's BatchDecoder, made on the worker thread at first use
        self.rows: dict[str, _Row] = {}

    def run(self) -> None:
        """The worker thread's loop. It never dies silently: a failure in one row fails that request
        (500), a failure of the loop itself fails every request in flight, and serving goes on."""
        while True:
            try:
                if not self._once():
                    return
            except Exception as ex:
                self.rows = {}
                self._discard()  # a fresh decoder for whatever comes next
                self.e.fail_all(ex)

    def _once(self) -> bool:
        """One control task, or admissions then one step; False once the engine is closed."""
        e = self.e
        with e.cond:
            while not (e.controls or e.waiting or self.rows or e.closed):
                e.cond.wait()
            if e.closed:
                return False  # close() answered every waiting and running request
            control, admit = self._control(), []
            opening = control is None and self.dec is None and bool(e.waiting)
            if control is None and not opening:
                admit = self._admissions()
                e.running.extend(admit)  # so that close() reaches them
        if control is not None:  # run without the lock: handlers keep answering meanwhile
            return run_control(*control)
        if opening:  # the runtime's decoder, made on the worker thread at first use
            self.dec = e.rt.batch_decoder(e.max_batch)
            return True
        for job in admit:
            self._guarded(job, self._join, job)
        for row in [r for r in self.rows.values() if r.job.cancelled.is_set()]:
            self._guarded(row.job, self._end, row, None)  # gone before this step: no token spent on it
        if self.rows:
            self._step()
        return True

    @property
    def grouped(self) -> bool:
        """Rows share one adapter (the decoder's ``one_adapter``: llama.cpp)."""
        return self.dec is not None and bool(self.dec.one_adapter)

    def _control(self) -> tuple | None:
        """The next control task that may run now (under ``cond``): in order, but one that changes the
        adapter a group decodes with waits until the group is done."""
        e = self.e
        for k, (fn, fut, holds) in enumerate(e.controls):
            if not (self.grouped and self.rows and holds is not None and holds == e.active):
                del e.controls[k]
                return fn, fut
        return None

    def _admissions(self) -> list[Job]:
        """The waiting jobs that join now (under ``cond``), taken out of ``waiting``."""
        e = self.e
        free = e.max_batch - len(self.rows)
        if free <= 0 or not e.waiting:
            return []
        if not self.grouped:  # each row carries its adapter: the oldest, any adapters
            admit, e.waiting = e.waiting[:free], e.waiting[free:]
            return admit
        now, admit = time.perf_counter(), []
        group = e.active
        if not self.rows:  # a new group: the next turn's adapter (swapped in as it joins)
            admit.append(e.waiting.pop(e.scheduler.pick(e.waiting, e.active, now)))
            group = admit[0].adapter
        while len(admit) < free and e.waiting:
            i = e.scheduler.join(e.waiting, group, now)
            if i is None:  # the turn is over: the group drains
                break
            admit.append(e.waiting.pop(i))
        return admit

    def _discard(self) -> None:
        if self.dec is not None:
            dec, self.dec = self.dec, None
            dec.close()

    def _guarded(self, job: Job, fn: Any, *args: Any) -> None:
        """``fn(*args)`` for one request; if it raises (a bug, a runtime failure), that request alone
        fails with a 500 and leaves the batch."""
        try:
            fn(*args)
        except Exception as ex:
            log.exception("request %s failed", job.id)
            self._drop(job, internal_error(ex))

    # -- rows --------------------------------------------------------------------------------------
    def _join(self, job: Job) -> None:
        e, m = self.e, self.e.metrics
        admitted = e.admit(job)
        if admitted is None:
            return self._forget(job)
        ids, max_tokens = admitted
        job.post("start", len(ids), max_tokens)
        row = _Row(job, TextStream(e.rt.detokenize, job.stop), len(ids), max_tokens)
        if self.dec is None:
            self.dec = e.rt.batch_decoder(e.max_batch)
        if self.grouped:
            e.use(job.adapter)  # the group's first row swaps; the others find it active
        t0 = time.perf_counter()
        try:
            tok = self.dec.join(job.id, ids, job.adapter, max_tokens, ignore_eos=job.ignore_eos)
        except EdgeIA3Error as ex:
            return self._drop(job, ServeError(400, str(ex), "invalid_value"))
        finally:
            with m.lock:
                m.prompt_tokens += len(ids)
                m.decode_seconds += time.perf_counter() - t0
        self.rows[job.id] = row
        self._token(row, tok)
        return None

    def _step(self) -> None:
        m = self.e.metrics
        t0 = time.perf_counter()
        try:
            out = self.dec.step()
        except Exception as ex:  # which row failed is unknown: fail them all, start a fresh decoder
            log.exception("a batch step failed")
            self._discard()
            for row in list(self.rows.values()):
                self._drop(row.job, internal_error(ex))
            return
        with m.lock:
            m.decode_seconds += time.perf_counter() - t0
            m.batch_steps += 1
            m.batch_rows += len(out)
            m.batch_peak = max(m.batch_peak, len(out))
        for key, tok in out:
            row = self.rows[key]
            self._guarded(row.job, self._token, row, tok)
        self.e.pace()

    def _token(self, row: _Row, tok: int | None) -> None:
        """A row's new token (None: the model ended it)."""
        job = row.job
        if tok is None:
            return self._end(row, None)
        row.n += 1
        with self.e.metrics.lock:
            self.e.metrics.generated_tokens += 1
        if row.n == 1:
            job.first_token = time.perf_counter()
        delta = row.text.push(tok)
        if delta:
            job.post("delta", delta)
        if row.text.stopped_at is not None:
            return self._end(row, "stop")
        if job.cancelled.is_set() or row.n >= row.max_tokens:
            return self._end(row, None)
        return None

    def _end(self, row: _Row, finish: str | None) -> None:
        self.dec.leave(row.job.id)  # no-op if the decoder already let it go (EOS, max_tokens)
        del self.rows[row.job.id]
        self._forget(row.job)
        self.e.complete(row.job, row.text, finish, row.n, row.max_tokens, row.n_prompt)

    def _drop(self, job: Job, err: ServeError) -> None:
        """``job`` fails with ``err``, and its row (if it has one) leaves the batch."""
        self.rows.pop(job.id, None)
        if self.dec is not None:
            self.dec.leave(job.id)
        self._forget(job)
        self.e.fail(job, err)

    def _forget(self, job: Job) -> None:
        with self.e.cond:
            if job in self.e.running:
                self.e.running.remove(job)
