"""The serving engine: one runtime, one worker thread, one bounded queue.

Runtimes are not thread-safe, so exactly one thread - the worker - ever calls
the runtime (tokenizing, swapping adapters, generating, loading adapters).
HTTP handlers put a ``Job`` into the queue and read its events (start, text
deltas, done or error) from an asyncio queue the worker feeds.

Two ways to schedule, by what the runtime can do:
- batched (runtimes with ``batch_decoder``: ONNX and GGUF exports, unless
  ``Limits.max_batch`` is 1): up to ``max_batch`` requests decode together, each
  row with its own KV cache; requests join and leave between steps
  (``batching.BatchLoop``). ONNX rows each carry their own adapter's vectors, so any
  mix of adapters decodes together; llama.cpp rows share the weights, so a batch is
  a *group* of requests for one adapter, formed in adapter turns (``Scheduler``), and
  the adapter is swapped only once the group has drained.
- one request at a time (``max_batch`` 1, or a runtime without ``batch_decoder``:
  T5, torch), in adapter turns (``Scheduler``): all requests for the oldest
  request's adapter, then the next - which saves swaps without starving anyone. A
  swap only ever happens between two requests.
Either way every request decodes greedily with its adapter's exact weights from
its own KV cache, so its answer never depends on which other requests were in flight.

Control tasks (adding / unloading an adapter) run on the same thread, between
requests (batched: between steps; a running ONNX row keeps its own copy of its
adapter's vectors; unloading the adapter a llama.cpp group decodes with waits until
the group is done), before the next waiting request. A run-time load is read and
checked first on a loader thread (``hotload.AdapterControl``): only its quick attach
waits for the worker, so a large or bad file never holds up decoding.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from ..errors import EdgeIA3Error
from ..prompts import NoChatTemplate
from ..runtimes import Runtime, prompt_ids_for
from .hotload import AdapterControl
from .metrics import Metrics, snapshot
from .requests import BASE, Job, Limits, ServeError, TextStream, internal_error, not_found, run_control

# Seconds to wait after each generated token. For tests and demos only: it paces a tiny
# model so that queueing, grouping and disconnects can be observed deterministically.
TOKEN_DELAY = float(os.environ.get("EDGEIA3_SERVE_TOKEN_DELAY", "0") or 0)

log = logging.getLogger("edgeia3.serve")


class Scheduler:
    """Which waiting job runs next: requests are served in adapter *turns*.

    A turn starts on the adapter of the oldest waiting request and serves every
    request for that adapter waiting at that moment (oldest first). Requests for
    the same adapter that arrive during the turn join it while no request for
    another adapter has waited longer than ``max_wait`` seconds; then the next
    turn starts. Swaps happen only between turns, and a request waits at most
    for the turns of the adapters already waiting when it arrived (plus
    ``max_wait``): grouping without starvation.
    """

    def __init__(self, max_wait: float):
        self.max_wait = max_wait
        self.turn: set[str] = set()  # ids of the jobs the current turn still owes

    def pick(self, waiting: list[Job], current: str | None, now: float) -> int:
        same = self.join(waiting, current, now)
        if same is not None:
            return same
        nxt = waiting[0].adapter  # a new turn, for the oldest request's adapter
        self.turn = {j.id for j in waiting[1:] if j.adapter == nxt}
        return 0

    def join(self, waiting: list[Job], current: str | None, now: float) -> int | None:
        """A waiting job that the current turn (adapter ``current``) still serves, or None: the turn
        is over (a batch group then drains, and ``pick`` starts the next turn)."""
        owed = next((i for i, j in enumerate(waiting) if j.id in self.turn), None)
        if owed is not None:
            self.turn.discard(waiting[owed].id)
            return owed
        same = next((i for i, j in enumerate(waiting) if j.adapter == current), None)
        if same is not None:
            other = next((j for j in waiting if j.adapter != current), None)
            if other is None or now - other.submitted <= self.max_wait:
                return same
        return None


class Engine(AdapterControl):
    """One runtime served by one worker thread (run-time adapter loads: ``hotload.AdapterControl``)."""

    def __init__(self, runtime: Runtime, limits: Limits | None = None, workdir: str | Path | None = None,
                 adapters_dir: str | Path | None = None):
        import tempfile

        self.rt = runtime
        self.limits = limits or Limits()
        self._tmp = tempfile.TemporaryDirectory(prefix="edgeia3-serve-", dir=workdir)
        self.workdir = Path(self._tmp.name)
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        self.context = runtime.context_length  # the runtime protocol's, T5 runtimes' included
        self.vocab = runtime.vocab_size
        self.metrics = Metrics()
        self.cond = threading.Condition()
        self.waiting: list[Job] = []
        self.controls: deque = deque()
        self.scheduler = Scheduler(self.limits.max_group_wait)
        self.running: list[Job] = []  # decoding now (one, or a batch's rows)
        self.max_batch = max(1, int(self.limits.max_batch)) if runtime.batch_decoder is not None else 1
        self.active: str | None = runtime.active
        self.closed = False
        self.failures = 0  # requests failed inside the server (500) in a row, since one last completed
        self.unusable: str | None = None  # why the runtime no longer serves (set once; /health says it)
        self.names: dict[str, dict] = {n: {"source": "export"} for n in runtime.adapters}
        self.pending: set[str] = set()  # names reserved by run-time loads not done yet
        self.merged = runtime.merged  # the adapter in the weights: "base" runs it, it cannot be unloaded
        if self.merged:
            self.names.setdefault(self.merged, {"source": "export"})["merged"] = True
        self.created = int(time.time())
        if self.max_batch > 1:
            from .batching import BatchLoop

            loop = BatchLoop(self).run
        else:
            loop = self._loop
        self.thread = threading.Thread(target=loop, name="edgeia3-serve-worker", daemon=True)
        # run-time loads are read and checked here, off the worker (hotload.AdapterControl)
        self.loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeia3-serve-loader")

    # -- lifetime -------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self.thread.start()
        return self

    def close(self) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
            dropped, self.waiting = self.waiting, []
            for job in self.running:  # stop the running requests at their next token
                job.cancelled.set()
                dropped.append(job)
            controls = [fut for _, fut, _ in self.controls]  # never run now: their callers get a 503
            self.controls.clear()
            self.cond.notify_all()
        for job in dropped:
            job.post("error", ServeError(503, "the server is shutting down", "shutting_down"))
        for fut in controls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(ServeError(503, "the server is shutting down", "shutting_down"))
        self.loader.shutdown(wait=False, cancel_futures=True)
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        try:
            self.rt.close()
        finally:
            self._tmp.cleanup()

    # -- models ---------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        with self.cond:
            return list(self.names)

    def resolve(self, model: Any) -> str | None:
        """The adapter a request's ``model`` selects (None: base); 404 if there is none."""
        if model == BASE:
            return None
        with self.cond:
            if isinstance(model, str) and model in self.names:
                return model
            raise not_found(str(model), list(self.names))

    # -- requests -------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise ServeError(503, "the server is shutting down", "shutting_down")
            if self.unusable:
                raise self.unusable_error()
            if job.adapter is not None and job.adapter not in self.names:
                raise not_found(job.adapter, list(self.names))
            if len(self.waiting) >= self.limits.max_queue:
                with self.metrics.lock:
                    self.metrics.rejected_queue_full += 1
                raise ServeError(429, f"the request queue is full ({self.limits.max_queue} waiting); retry later",
                                 "queue_full")
            self.waiting.append(job)
            with self.metrics.lock:
                self.metrics.requests += 1
                key = job.adapter or BASE
                self.metrics.by_model[key] = self.metrics.by_model.get(key, 0) + 1
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, stop it if it runs."""
        if job.cancelled.is_set() or job.finished is not None:
            return
        job.cancelled.set()
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                job.finished = time.perf_counter()
                with self.metrics.lock:
                    self.metrics.cancelled += 1

    def call(self, fn: Callable[[], Any], holds: str | None = None) -> concurrent.futures.Future:
        """Run ``fn`` on the worker thread between requests (before any waiting request). ``holds``:
        an adapter ``fn`` changes; where a batch shares the weights (llama.cpp), ``fn`` waits while
        a batch decodes with that adapter."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if self.closed:
                fut.set_exception(ServeError(503, "the server is shutting down", "shutting_down"))
                return fut
            self.controls.append((fn, fut, holds))
            self.cond.notify()
        return fut

    # -- the worker -----------------------------------------------------------------------------
    def _loop(self) -> None:
        """One request at a time (llama.cpp, or ``max_batch`` 1). The thread never dies silently."""
        while True:
            try:
                if not self._serve_next():
                    return
            except Exception as e:
                self.fail_all(e)

    def _serve_next(self) -> bool:
        """Run the next control task or request; False once the engine is closed."""
        with self.cond:
            while not (self.controls or self.waiting or self.closed):
                self.cond.wait()
            control = self.controls.popleft()[:2] if self.controls else None
            if control is None and self.closed:
                return False
            if control is None:
                job = self.waiting.pop(self.scheduler.pick(self.waiting, self.active, time.perf_counter()))
                self.running = [job]
        if control is not None:  # run without the lock: handlers keep answering meanwhile
            return run_control(*control)
        try:
            self._run(job)
        except Exception as e:  # a bug or a runtime failure: answer 500, keep serving
            log.exception("request %s failed", job.id)
            self.fail(job, internal_error(e))
        finally:
            job.finished = job.finished or time.perf_counter()
            with self.cond:
                self.running = []
        return True

    def fail_all(self, e: Exception) -> None:
        """The worker loop itself failed (a bug outside any one request's handling): every request
        running or waiting gets a 500, and the loop goes on serving."""
        log.exception("the worker loop failed; answering every request in flight with an error")
        with self.cond:
            jobs, self.waiting, self.running = self.waiting + self.running, [], []
        for job in jobs:
            self.fail(job, internal_error(e))

    def fail(self, job: Job, err: ServeError) -> None:
        job.finished = time.perf_counter()
        job.post("error", err)
        if err.status == 500:
            self._count_failure(getattr(err, "cause", "error"))
        return None

    def _count_failure(self, cause: str) -> None:
        """One more request failed inside the server. ``max_failures`` in a row with none completing
        between them: the runtime counts as unusable - every waiting and later request gets a 503 at
        once and ``/health`` says so (restart the server) - rather than each failing in turn."""
        with self.cond:
            self.failures += 1
            if self.unusable or self.failures < self.limits.max_failures:
                return
            self.unusable = f"the runtime failed {self.failures} requests in a row (last: {cause})"
            dropped, self.waiting = self.waiting, []
        log.error("%s; answering every request with 503 until the server is restarted", self.unusable)
        for job in dropped:
            job.finished = time.perf_counter()
            job.post("error", self.unusable_error())

    def unusable_error(self) -> ServeError:
        return ServeError(503, f"{self.unusable}; the server must be restarted", "runtime_unusable")

    def admit(self, job: Job) -> tuple[list[int], int] | None:
        """A job about to run: its prompt ids and max_tokens, or None once it was answered (an
        error) or dropped (cancelled). Shared by both schedules."""
        lim = self.limits
        job.started = time.perf_counter()
        if job.cancelled.is_set():
            job.finished = job.finished or time.perf_counter()
            with self.metrics.lock:
                self.metrics.cancelled += 1
            return None
        with self.cond:
            known = job.adapter is None or job.adapter in self.names
        if not known:
            return self.fail(job, ServeError(404, f"The model '{job.adapter}' was unloaded before this request "
                                                   "ran", "model_not_found", "model"))
        try:
            if isinstance(job.prompt, list) and all(isinstance(t, int) for t in job.prompt):
                ids = list(job.prompt)
                if self.vocab is not None and any(not 0 <= t < self.vocab for t in ids):
                    return self.fail(job, ServeError(400, f"prompt token ids must lie in [0, {self.vocab})",
                                                      "invalid_value", "prompt"))
            else:  # rendered with the job's adapter's template (before any swap to it)
                ids = prompt_ids_for(self.rt, job.prompt, job.adapter)
        except NoChatTemplate as e:
            return self.fail(job, ServeError(400, f"{e} when starting edgeia3 serve, or send plain text to "
                                                   "/v1/completions", "invalid_value", "messages"))
        except EdgeIA3Error as e:
            return self.fail(job, ServeError(400, str(e), "invalid_value", "messages"))
        n_prompt = len(ids)
        if n_prompt == 0:
            return self.fail(job, ServeError(400, "the prompt is empty (no tokens)", "invalid_value", "prompt"))
        cap_prompt = min(lim.max_prompt_tokens, self.context - 1)
        if n_prompt > cap_prompt:
            return self.fail(job, ServeError(
                400, f"the prompt has {n_prompt} tokens; this server accepts at most {cap_prompt} "
                     f"(--max-prompt-tokens {lim.max_prompt_tokens}, context {self.context})",
                "context_length_exceeded", "messages"))
        room = self.context - n_prompt
        if job.max_tokens is None:
            return ids, min(lim.max_tokens, room)
        if n_prompt + job.max_tokens > self.context:
            return self.fail(job, ServeError(
                400, f"this model's maximum context length is {self.context} tokens; you requested "
                     f"{n_prompt + job.max_tokens} tokens ({n_prompt} in the prompt, {job.max_tokens} for the "
                     "completion)", "context_length_exceeded", "max_tokens"))
        return ids, job.max_tokens

    def _run(self, job: Job) -> None:
        rt, m = self.rt, self.metrics
        admitted = self.admit(job)
        if admitted is None:
            return
        ids, max_tokens = admitted
        n_prompt = len(ids)
        self.use(job.adapter)  # only ever between requests
        job.post("start", n_prompt, max_tokens)
        text = TextStream(rt.detokenize, job.stop)
        n, finish, t0 = 0, None, time.perf_counter()
        gen = rt.generate_ids(ids, max_tokens, ignore_eos=job.ignore_eos)
        try:
            for tok in gen:
                n += 1
                if n == 1:
                    job.first_token = time.perf_counter()
                delta = text.push(tok)
                if delta:
                    job.post("delta", delta)
                if text.stopped_at is not None:
                    finish = "stop"
                    break
                if job.cancelled.is_set():
                    break
                self.pace()
        except EdgeIA3Error as e:
            gen.close()
            return self.fail(job, ServeError(400, str(e), "invalid_value"))
        finally:
            gen.close()
            with m.lock:
                m.generated_tokens += n
                m.prompt_tokens += n_prompt
                m.decode_seconds += time.perf_counter() - t0
        return self.complete(job, text, finish, n, max_tokens, n_prompt)

    def use(self, adapter: str | None) -> None:
        """Swap the runtime to ``adapter`` unless it is active (counted in the metrics)."""
        if adapter == self.active:
            return
        t0 = time.perf_counter()
        self.rt.use_adapter(adapter)
        dt = time.perf_counter() - t0
        self.active = adapter
        with self.metrics.lock:
            self.metrics.adapter_swaps += 1
            self.metrics.swap_seconds += dt

    def complete(self, job: Job, text: TextStream, finish: str | None, n: int, max_tokens: int,
                  n_prompt: int) -> None:
        """A job's generation ended (``finish`` None: by EOS or max_tokens): its last delta and done,
        or nothing if it was cancelled."""
        m = self.metrics
        job.finished = time.perf_counter()
        if job.cancelled.is_set():
            with m.lock:
                m.cancelled += 1
            return
        self.failures = 0  # the runtime works
        if finish is None:
            finish = "length" if n >= max_tokens else "stop"
        rest = text.finish()
        if rest:
            job.post("delta", rest)
        with m.lock:
            m.completed += 1
            m.latency.append(job.finished - job.submitted)
            m.queue_wait.append(job.started - job.submitted)
            if job.first_token is not None:
                m.ttft.append(job.first_token - job.submitted)
        job.post("done", finish, n_prompt, n)

    # -- metrics --------------------------------------------------------------------------------
    def pace(self) -> None:
        """Test/demo pacing (EDGEIA3_SERVE_TOKEN_DELAY): one wait per token or batch step."""
        if TOKEN_DELAY:
            time.sleep(TOKEN_DELAY)

    def snapshot(self) -> dict:
        return snapshot(self)
