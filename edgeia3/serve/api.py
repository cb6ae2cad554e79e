"""The OpenAI-compatible HTTP API (FastAPI) over one ``Engine``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both also streaming, as OpenAI's server-sent events ending with ``data: [DONE]``),
``POST /v1/adapters`` / ``DELETE /v1/adapters/{name}`` (load / unload an IA3 adapter at
run time), ``GET /health``, ``GET /metrics``. Every error is OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``. Who may call it: ``security``
(Host check, API key on every path but ``/health``); what bodies it takes: ``bodies``.

Decoding is always greedy: ``temperature``, ``top_p`` and ``seed`` are accepted and
ignored; parameters that would change the answer in ways greedy decoding cannot
honour (``n`` > 1, ``logit_bias``, penalties, ``logprobs``, ``echo``, ``suffix``,
tools) are refused with a 400.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EdgeIA3Error
from .bodies import AdapterRequest, ChatRequest, CompletionRequest, Generation, parse, read_json
from .engine import Engine
from .hotload import check_name
from .requests import BASE, Job, ServeError, internal_error
from .security import Guard, HostCheck, confine

SAMPLING_NOTE = "greedy"  # sent as the x-edgeia3-decoding header


def _unsupported(param: str, what: str) -> ServeError:
    return ServeError(400, f"{param}: {what} is not supported by this server (greedy decoding, one choice)",
                      "unsupported_parameter", param)


def _check_common(req: Generation) -> list[str]:
    """Refuse what greedy decoding cannot honour; the stop strings."""
    if req.n != 1:
        raise _unsupported("n", "more than one choice")
    if req.logit_bias:
        raise _unsupported("logit_bias", "logit_bias")
    for p in ("frequency_penalty", "presence_penalty"):
        if getattr(req, p):
            raise _unsupported(p, "a non-zero penalty")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ServeError(400, "stop: up to 4 non-empty strings", "invalid_value", "stop")
    if req.stream_options is not None and not req.stream:
        raise ServeError(400, "stream_options is only allowed with stream: true", "invalid_value", "stream_options")
    return stop


def _check_max_tokens(value: int | None, engine: Engine, param: str = "max_tokens") -> int | None:
    cap = engine.limits.max_tokens
    if value is not None and value > cap:
        raise ServeError(400, f"{param} is too large: {value}; this server allows at most {cap} (--max-tokens)",
                         "invalid_value", param)
    return value


def _chat_messages(req: ChatRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ServeError(400, f"messages[{i}].content: only text parts are supported (got "
                                          f"'{part.type}')", "unsupported_parameter", "messages")
                texts.append(part.text)
            content = "\n".join(texts)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return out


def _completion_prompt(req: CompletionRequest) -> str | list[int]:
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise ServeError(400, "prompt: one prompt per request (got a batch of "
                                  f"{len(p)})", "unsupported_parameter", "prompt")
        p = p[0]
    if isinstance(p, list) and not p:
        raise ServeError(400, "prompt: empty", "invalid_value", "prompt")
    return p


def _usage(n_prompt: int, n_gen: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}


class _Disconnected(Exception):
    pass


async def _wait_disconnect(request: Any) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next_event(job: Job, watch: asyncio.Task | None) -> tuple:
    if watch is None:
        return await job.events.get()
    get = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    raise _Disconnected()


# -- the app ----------------------------------------------------------------------------------------
def create_app(engine: Engine, api_key: str | None = None, host: str = "127.0.0.1") -> Any:
    """A FastAPI app serving ``engine`` (started and closed with the app's lifespan); ``host``: the
    address it is bound to (which Host headers it answers)."""
    app = FastAPI(title="edgeia3 serve", version="1", lifespan=_lifespan(engine))
    server = _Server(engine)
    _add_error_handlers(app, server.error_response)
    app.add_middleware(Guard, hosts=HostCheck(host), api_key=api_key, reply=server.error_response)
    _add_info_routes(app, server)
    _add_adapter_routes(app, server)
    _add_generation_routes(app, server)
    return app


def _lifespan(engine: Engine) -> Any:
    """The app's lifespan: the engine's worker started (unless it runs or was closed), closed at the end."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        if not engine.thread.is_alive() and not engine.closed:
            engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.close)

    return lifespan


class _Server:
    """What the routes share: the engine, the headers on every reply, error and model bodies, and the
    generation replies (one JSON body, or server-sent events)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.fingerprint = f"edgeia3-{engine.rt.name}"
        self.headers = {"x-edgeia3-decoding": SAMPLING_NOTE}

    def error_response(self, err: ServeError) -> JSONResponse:
        self.engine.metrics.error(err.status)
        extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
        return JSONResponse(err.body(), status_code=err.status, headers={**self.headers, **extra})

    def model_object(self, name: str) -> dict:
        engine = self.engine
        info = {"kind": "base"} if name == BASE else {"kind": "adapter", **engine.names.get(name, {})}
        if name == BASE and engine.merged:
            info["merged"] = engine.merged
        return {"id": name, "object": "model", "created": engine.created, "owned_by": "edgeia3",
                "edgeia3": {**info, "runtime": engine.rt.name}}

    async def run(self, request: Request, job: Job, kind: str, model: str, stream: bool, include_usage: bool):
        """Submit ``job`` and answer it: a stream once its prompt is in, else the whole completion."""
        engine = self.engine
        engine.submit(job)
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            first = await _next_event(job, watch)
            if first[0] == "error":
                raise first[1]
            _, n_prompt, _max = first
            if stream:
                watch.cancel()  # from here Starlette watches the connection and cancels the stream
                watch = None
                return StreamingResponse(self._sse(job, kind, model, n_prompt, include_usage), headers={
                    **self.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    media_type="text/event-stream")
            parts = []
            while True:
                ev = await _next_event(job, watch)
                if ev[0] == "delta":
                    parts.append(ev[1])
                elif ev[0] == "error":
                    raise ev[1]
                else:
                    _, finish, n_prompt, n_gen = ev
                    break
        except _Disconnected:
            engine.cancel(job)
            return JSONResponse({"error": {"message": "client disconnected", "type": "invalid_request_error",
                                           "param": None, "code": "client_disconnected"}}, status_code=499)
        except BaseException:
            engine.cancel(job)
            raise
        finally:
            if watch is not None:
                watch.cancel()
        return self._completion("".join(parts), kind, model, finish, n_prompt, n_gen)

    def _completion(self, text: str, kind: str, model: str, finish: str, n_prompt: int, n_gen: int):
        cid, created = _id(kind), int(time.time())
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return JSONResponse({"id": cid, "object": obj, "created": created, "model": model,
                             "system_fingerprint": self.fingerprint, "choices": [choice],
                             "usage": _usage(n_prompt, n_gen)}, headers=self.headers)

    async def _sse(self, job: Job, kind: str, model: str, n_prompt: int, include_usage: bool):
        cid, created = _id(kind), int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        fingerprint = self.fingerprint

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            if kind == "chat":
                delta: dict = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
            body = {"id": cid, "object": obj, "created": created, "model": model,
                    "system_fingerprint": fingerprint, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if kind == "chat":
                yield chunk(None, role=True)
            while True:
                ev = await job.events.get()
                if ev[0] == "delta":
                    yield chunk(ev[1])
                elif ev[0] == "error":
                    self.engine.metrics.error(ev[1].status)
                    yield f"data: {json.dumps(ev[1].body())}\n\n"
                    return
                else:
                    _, finish, n_prompt, n_gen = ev
                    yield chunk(None if kind == "chat" else "", finish)
                    if include_usage:
                        body = {"id": cid, "object": obj, "created": created, "model": model,
                                "system_fingerprint": fingerprint, "choices": [], "usage": _usage(n_prompt, n_gen)}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            self.engine.cancel(job)  # the client went away mid-stream (no-op once the job finished)


# -- errors -----------------------------------------------------------------------------------------
def _add_error_handlers(app: Any, reply: Any) -> None:
    """Every error as OpenAI's JSON shape, through ``reply`` (which counts it and adds the headers)."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError):
        return reply(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()))
        return reply(ServeError(400, f"invalid request: {loc}: {first.get('msg', 'invalid')}", "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return reply(ServeError(err.status_code, str(err.detail), code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        return reply(internal_error(err))


# -- info -------------------------------------------------------------------------------------------
def _add_info_routes(app: Any, server: _Server) -> None:
    """``/health``, ``/metrics``, ``/v1/models`` and ``/v1/models/{id}``."""
    engine, model_object = server.engine, server.model_object

    @app.get("/health")
    async def health():
        if engine.closed or not engine.thread.is_alive():
            raise ServeError(503, "the worker is not running", "unavailable")
        if engine.unusable:
            raise engine.unusable_error()
        snap = engine.snapshot()
        return JSONResponse({"status": "ok", "runtime": engine.rt.name,
                             "adapters": snap["adapters_loaded"], "queue_depth": snap["queue_depth"],
                             "running": snap["running"]})

    @app.get("/metrics")
    async def metrics():
        return JSONResponse(engine.snapshot())

    @app.get("/v1/models")
    async def list_models():
        return JSONResponse({"object": "list", "data": [model_object(n) for n in [BASE] + engine.model_names()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        engine.resolve(model_id)
        return JSONResponse(model_object(model_id))


# -- adapters ---------------------------------------------------------------------------------------
def _add_adapter_routes(app: Any, server: _Server) -> None:
    """``POST /v1/adapters`` (load), ``GET /v1/adapters``, ``DELETE /v1/adapters/{name}`` (unload)."""
    engine, model_object = server.engine, server.model_object

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        req = parse(AdapterRequest, await read_json(request, engine.limits.max_body_bytes))
        try:
            check_name(req.name)
        except EdgeIA3Error as e:
            raise ServeError(400, str(e), "invalid_value", "name") from None
        reason = engine.rt.cannot_load()
        if reason:
            raise ServeError(400, reason, "adapter_loading_not_supported")
        path = confine(engine.adapters_dir, req.path)  # 403 outside --adapters-dir, or without one
        if not path.exists():
            raise ServeError(400, f"adapter not found: {req.path}", "invalid_adapter", "path")
        info = await asyncio.wrap_future(engine.load_adapter(req.name, path, req.path))
        return JSONResponse({**model_object(req.name), "edgeia3": {"kind": "adapter", **info,
                                                                    "runtime": engine.rt.name}})

    @app.get("/v1/adapters")
    async def list_adapters():
        return JSONResponse({"object": "list", "data": [model_object(n) for n in engine.model_names()]})

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        fut = engine.unload_adapter(name)
        await asyncio.wrap_future(fut)
        return JSONResponse({"id": name, "object": "model", "deleted": True})


# -- generation -------------------------------------------------------------------------------------
def _add_generation_routes(app: Any, server: _Server) -> None:
    """``POST /v1/chat/completions`` and ``POST /v1/completions``: checked, queued, answered by ``server.run``."""
    engine = server.engine

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await read_json(request, engine.limits.max_body_bytes))
        adapter = engine.resolve(req.model)
        stop = _check_common(req)
        if req.logprobs or req.top_logprobs:
            raise _unsupported("logprobs", "logprobs")
        if req.tools or req.functions:
            raise _unsupported("tools", "tool calling")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", f"response_format {req.response_format.get('type')!r}")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = _check_max_tokens(max_tokens, engine,
                                       "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        job = Job(adapter, _chat_messages(req), max_tokens, stop, req.ignore_eos)
        return await server.run(request, job, "chat", req.model, req.stream,
                                bool(req.stream_options and req.stream_options.include_usage))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_json(request, engine.limits.max_body_bytes))
        adapter = engine.resolve(req.model)
        stop = _check_common(req)
        if req.echo:
            raise _unsupported("echo", "echo")
        if req.suffix:
            raise _unsupported("suffix", "suffix")
        if req.best_of not in (None, 1):
            raise _unsupported("best_of", "best_of > 1")
        if req.logprobs:
            raise _unsupported("logprobs", "logprobs")
        max_tokens = (_check_max_tokens(req.max_tokens, engine) if req.max_tokens is not None
                      else min(16, engine.limits.max_tokens))  # OpenAI's default for completions
        job = Job(adapter, _completion_prompt(req), max_tokens, stop, req.ignore_eos)
        return await server.run(request, job, "completion", req.model, req.stream,
                                bool(req.stream_options and req.stream_options.include_usage))


def _id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
