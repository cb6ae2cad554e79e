"""What one request is to the server: its limits, its job (events from the worker to the
HTTP handler), its errors in OpenAI's shape, and the text stream its tokens become."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable


log = logging.getLogger("edgeia3.serve")
BASE = "base"  # the model id of the base model (no adapter)


class ServeError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
             404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or self.TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error(e: BaseException) -> ServeError:
    """A bug or a runtime failure, as the 500 its request gets."""
    err = ServeError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")
    err.cause = type(e).__name__  # what /health may tell (the message may name files)
    return err


def not_found(model: str, names: list[str]) -> ServeError:
    return ServeError(404, f"The model '{model}' does not exist (served: {', '.join([BASE] + names)})",
                      "model_not_found", "model")


@dataclass
class Limits:
    max_queue: int = 64  # requests waiting (not counting those running); more: 429
    max_tokens: int = 1024  # cap on a request's max_tokens (and the default for chat)
    max_prompt_tokens: int = 4096  # cap on prompt tokens (the model's context caps too)
    max_body_bytes: int = 1 << 20  # request body; more: 413
    max_group_wait: float = 1.0  # seconds another adapter's oldest request may wait while one adapter is served
    max_batch: int = 16  # requests decoded together (runtimes that batch: ONNX, GGUF); 1: one at a time
    max_adapters: int = 64  # adapters served at once (the export's own included); a run-time load beyond: 400
    max_failures: int = 8  # requests failed inside the server in a row (none completing) that mark the runtime unusable


class Job:
    """One generation request and the channel its events go back on."""

    def __init__(self, adapter: str | None, prompt: str | list[dict] | list[int], max_tokens: int | None,
                 stop: list[str] | None = None, ignore_eos: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.id = uuid.uuid4().hex[:24]
        self.adapter = adapter  # None: the base
        self.prompt = prompt
        self.max_tokens = max_tokens  # None: as many as the caps and the context allow
        self.stop = [s for s in (stop or []) if s]
        self.ignore_eos = ignore_eos
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.first_token: float | None = None
        self.finished: float | None = None

    def post(self, *event: Any) -> None:
        """From the worker thread: hand an event to the request's handler."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass


class TextStream:
    """Token ids -> text deltas whose concatenation is the response text.

    Deltas hold back a trailing incomplete UTF-8 sequence (decoded as U+FFFD) and,
    with stop strings, the last ``max(len(stop)) - 1`` characters, so no part of a
    stop string is ever sent. Streaming and non-streaming responses are built from
    the same deltas, hence identical.
    """

    def __init__(self, detokenize: Callable[[list[int]], str], stop: list[str]):
        self.detokenize, self.stop = detokenize, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""
        self.full = ""
        self.stopped_at: int | None = None

    def push(self, token: int) -> str:
        self.ids.append(token)
        self.full = self.detokenize(self.ids)
        if self.stop:
            hits = [i for i in (self.full.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped_at = min(hits)
                return ""
        safe = min(len(self.full.rstrip("\ufffd")), len(self.full) - self.hold)
        return self._advance(self.full[:max(0, safe)])  # text shorter than the hold: nothing yet

    def finish(self) -> str:
        """The rest of the text once generation ended (stop string excluded)."""
        end = self.full if self.stopped_at is None else self.full[: self.stopped_at]
        return self._advance(end)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent):
            return ""
        if not text.startswith(self.sent):  # a tokenizer rewrote earlier text; never retract what was sent
            log.debug("detokenized text changed before position %d", len(self.sent))
        delta = text[len(self.sent):]
        self.sent += delta
        return delta


def run_control(fn: Callable[[], Any], fut: concurrent.futures.Future) -> bool:
    """Run a control task on the worker thread; its outcome goes to whoever awaits ``fut``."""
    if fut.set_running_or_notify_cancel():
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to whoever awaits the control task
            fut.set_exception(e)
    return True
