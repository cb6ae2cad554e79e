"""``edgeia3 serve``: a local OpenAI-compatible HTTP server with per-request IA3 adapters.

    from edgeia3.serve import serve
    serve("out/gguf", port=8000)          # blocks; Ctrl-C stops it

A request's ``model`` field picks the adapter ("base": none). One worker thread
owns the runtime and serves a bounded queue: ONNX exports decode up to
``Limits.max_batch`` requests together, each with its own adapter; GGUF exports decode
up to ``max_batch`` requests for one adapter together, in adapter turns (``batching``);
T5 GGUFs serve one at a time, grouping waiting requests by adapter. Decoding is
greedy, so an answer never depends on the other requests in flight. See ``engine``
(scheduling), ``api`` (the HTTP surface) and ``security`` (Host and key checks, which
files run-time adapter loading may read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import EdgeIA3Error
from .engine import Engine
from .requests import BASE, Limits, ServeError

__all__ = ["BASE", "Engine", "Limits", "ServeError", "build", "create_app", "serve"]


def create_app(engine: Engine, api_key: str | None = None, host: str = "127.0.0.1") -> Any:
    """The FastAPI app; ``host``: the address it is bound to (which ``Host`` headers it answers)."""
    from .api import create_app as _create

    return _create(engine, api_key=api_key, host=host)


def build(model: str | Path, adapters_dir: str | Path | None = None, limits: Limits | None = None,
          provider: str | None = None, progress: Callable[[str], None] | None = None,
          chat_template: str | Path | None = None, threads: int | None = None) -> Engine:
    """Open ``model`` (an ONNX or GGUF export dir; a transformers dir works without run-time adapter
    loading) and load every adapter found in ``adapters_dir`` (validated like ``POST /v1/adapters``;
    all of them, even beyond ``limits.max_adapters``, which caps run-time loads). Without
    ``adapters_dir``, ``POST /v1/adapters`` is refused (403).
    ``chat_template``: "chatml" or a Jinja file for every request (None: each adapter's recorded
    template, else the model's own). ``threads``: the runtime's compute threads (ONNX: the batched
    session's intra-op threads; GGUF: llama.cpp's; None: each runtime's default)."""
    from ..runtimes import open_runtime
    from .hotload import discover

    found = discover(adapters_dir) if adapters_dir is not None else {}
    options = {"threads": threads} if threads else {}  # else each runtime's own default
    rt = open_runtime(model, provider=provider, chat_template=chat_template, **options)
    engine = Engine(rt, limits, adapters_dir=adapters_dir)
    try:
        for i, (name, path) in enumerate(found.items()):
            try:
                engine.load_adapter_now(name, path)
            except ServeError as e:
                raise EdgeIA3Error(f"--adapters-dir: {e.message}") from None
            if progress and (i + 1) % 100 == 0:
                progress(f"loaded {i + 1}/{len(found)} adapters")
    except BaseException:
        engine.close()
        raise
    return engine


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          adapters_dir: str | Path | None = None, limits: Limits | None = None, provider: str | None = None,
          log_level: str = "warning", announce: Callable[[str], None] | None = print,
          chat_template: str | Path | None = None, insecure: bool = False, threads: int | None = None) -> None:
    """Serve ``model`` over HTTP until interrupted. A ``host`` beyond this machine needs ``api_key``
    unless ``insecure``."""
    from .security import check_bind, is_loopback

    check_bind(host, api_key, insecure)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:  # optional dependency
        raise EdgeIA3Error("edgeia3 serve needs FastAPI and uvicorn: pip install 'edgeia3[serve]'") from e

    engine = build(model, adapters_dir, limits, provider, progress=announce, chat_template=chat_template,
                   threads=threads)
    app = create_app(engine, api_key=api_key, host=host)
    if announce:
        names = engine.model_names()
        shown = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
        announce(f"serving {model} on http://{host}:{port}/v1 ({engine.rt.name}: {engine.rt.describe()}); "
                 f"models: {BASE}{', ' + shown if shown else ''}")
        if not is_loopback(host) and not api_key:
            announce(f"warning: listening on {host} without --api-key (--insecure): anyone who can reach this "
                     "port can use it")
        if len(names) > engine.limits.max_adapters:
            announce(f"note: {len(names)} adapters served, more than --max-adapters {engine.limits.max_adapters}: "
                     "run-time loads are refused until some are unloaded")
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level in ("info", "debug"),
                    timeout_graceful_shutdown=5)  # open streams get 5 s, then the worker stops them
    finally:
        engine.close()
