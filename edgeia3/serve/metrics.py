"""What the server counts (``/metrics``): requests, errors by status, tokens, latencies, batches."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from .requests import BASE


class Metrics:
    """Counters, under ``lock`` (the worker and the HTTP handlers both update them)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.t0 = time.time()
        self.requests = 0  # accepted into the queue
        self.completed = 0
        self.cancelled = 0  # client went away
        self.rejected_queue_full = 0
        self.errors: dict[str, int] = {}  # HTTP status -> count (every error response)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.decode_seconds = 0.0  # time spent generating (prefill included)
        self.adapter_swaps = 0
        self.swap_seconds = 0.0
        self.batch_steps = 0  # batched decoding: steps run, and rows decoded over those steps
        self.batch_rows = 0
        self.batch_peak = 0
        self.by_model: dict[str, int] = {}
        self.latency: deque = deque(maxlen=2048)  # submit -> done, seconds
        self.ttft: deque = deque(maxlen=2048)  # submit -> first token
        self.queue_wait: deque = deque(maxlen=2048)

    def error(self, status: int) -> None:
        with self.lock:
            self.errors[str(status)] = self.errors.get(str(status), 0) + 1


def _pct(values: deque, q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 6)


def snapshot(engine: Any) -> dict:
    """The JSON of ``/metrics`` for an ``Engine``."""
    m = engine.metrics
    with engine.cond:
        depth, running, adapters = len(engine.waiting), len(engine.running), len(engine.names)
        loading = len(engine.pending)
    with m.lock:
        uptime = time.time() - m.t0
        return {
            "uptime_s": round(uptime, 3),
            "runtime": engine.rt.name,
            "requests": m.requests,
            "completed": m.completed,
            "cancelled": m.cancelled,
            "rejected_queue_full": m.rejected_queue_full,
            "errors": dict(m.errors),
            "queue_depth": depth,
            "running": running,
            "prompt_tokens": m.prompt_tokens,
            "generated_tokens": m.generated_tokens,
            "tokens_per_s": round(m.generated_tokens / m.decode_seconds, 3) if m.decode_seconds else 0.0,
            "tokens_per_s_uptime": round(m.generated_tokens / uptime, 3) if uptime else 0.0,
            "batch": {"max_rows": engine.max_batch, "steps": m.batch_steps, "rows_decoded": m.batch_rows,
                      "mean_rows": round(m.batch_rows / m.batch_steps, 3) if m.batch_steps else 0.0,
                      "peak_rows": m.batch_peak},
            "unusable": engine.unusable,  # None while the runtime works (see Engine._count_failure)
            "failures_in_a_row": engine.failures,
            "adapter_swaps": m.adapter_swaps,
            "swap_seconds_total": round(m.swap_seconds, 6),
            "adapters_loaded": adapters,
            "adapters_loading": loading,
            "active_adapter": engine.active or BASE,
            "requests_by_model": dict(m.by_model),
            "latency_s": {"p50": _pct(m.latency, 0.5), "p99": _pct(m.latency, 0.99)},
            "ttft_s": {"p50": _pct(m.ttft, 0.5), "p99": _pct(m.ttft, 0.99)},
            "queue_wait_s": {"p50": _pct(m.queue_wait, 0.5), "p99": _pct(m.queue_wait, 0.99)},
            "limits": {"max_queue": engine.limits.max_queue, "max_tokens": engine.limits.max_tokens,
                       "max_prompt_tokens": engine.limits.max_prompt_tokens,
                       "max_body_bytes": engine.limits.max_body_bytes, "context": engine.context,
                       "max_adapters": engine.limits.max_adapters, "max_failures": engine.limits.max_failures},
        }
