"""Which adapters an ``--adapters-dir`` holds, the names the server takes, and the engine's
run-time loads and unloads (``AdapterControl``).

Loading and unloading while serving is the runtime's own (``Runtime.load_adapter`` /
``unload_adapter``, ``cannot_load`` says why a runtime cannot): every adapter is validated
against the served base exactly as the export steps validate it (family, base identity,
vector lengths, finiteness). llama.cpp (a GGUF side export, T5 included) takes canonical,
PEFT or ``.ia3.gguf`` adapters; onnxruntime-genai (an ONNX side export) those and
``.onnx_adapter`` files fitting its IA3 inputs; merged exports, exports without IA3 inputs,
the torch and T5 ONNX runtimes take none.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from pathlib import Path
from typing import Any, Iterator

from ..adapter import check_adapter_name, is_adapter_name
from ..errors import EdgeIA3Error
from ..runtimes import NotLoadable
from .requests import BASE, ServeError, not_found

__all__ = ["ADAPTER_SUFFIXES", "AdapterControl", "NotLoadable", "check_name", "discover"]

ADAPTER_SUFFIXES = (".ia3.gguf", ".onnx_adapter", ".safetensors")
check_name = check_adapter_name  # one rule for exports and the server (edgeia3.adapter)


def discover(directory: str | Path) -> dict[str, Path]:
    """Adapters in ``directory``: NAME/ (canonical or PEFT dir), NAME.ia3.gguf, NAME.onnx_adapter,
    NAME.safetensors (canonical file). Names are sorted; anything else is ignored, and so is a
    name that differs from an earlier one only in case (names are case-insensitive)."""
    d = Path(directory)
    if not d.is_dir():
        raise EdgeIA3Error(f"adapters dir not found: {d}")
    found: dict[str, tuple[str, Path]] = {}  # lower-case name -> (name, path)
    for p in sorted(d.iterdir()):
        if p.name.startswith("."):
            continue
        name = None
        if p.is_dir() and ((p / "edgeia3_adapter.safetensors").exists() or (p / "adapter_config.json").exists()):
            name = p.name
        elif p.is_file():
            for suffix in ADAPTER_SUFFIXES:
                if p.name.endswith(suffix) and len(p.name) > len(suffix):
                    name = p.name[: -len(suffix)]
                    break
        if name is not None and is_adapter_name(name):
            found.setdefault(name.lower(), (name, p))
    return dict(found.values())


@contextlib.contextmanager
def load_errors(name: str, shown: str | Path) -> Iterator[None]:
    """A refused load as the 400 its request gets; the path as the client gave it (``shown``)."""
    try:
        yield
    except NotLoadable as e:
        raise ServeError(400, str(e), "adapter_loading_not_supported") from None
    except EdgeIA3Error as e:
        raise ServeError(400, f"cannot load adapter '{name}' from {shown}: {e}", "invalid_adapter", "path") from None


class AdapterControl:
    """The engine's run-time adapter loads and unloads (a mixin of ``engine.Engine``, which owns
    ``rt``, ``cond``, ``names``, ``pending``, ``limits``, ``workdir``, ``loader`` and ``call``).

    A load is read and checked on the loader thread (``Runtime.prepare_adapter``: parsing a large
    or bad file never holds up decoding); only making it usable (``attach_prepared``, quick) runs on
    the worker, between requests or steps. Names are reserved when the request arrives, so loads in
    flight count against ``max_adapters`` like served adapters."""

    def _check_new(self, name: str, others: Any = ()) -> None:
        """409 if ``name`` is taken (names are case-insensitive: the server's copies of adapters are
        files named after them, on filesystems that may not tell case apart). Under ``cond``."""
        taken = next((n for n in (BASE, *self.names, *others) if n.lower() == name.lower()), None)
        if taken is not None:
            raise ServeError(409, f"a model named '{taken}' is already served or being loaded (names are "
                                  "case-insensitive); unload it first", "model_exists", "name")

    def load_adapter(self, name: str, path: Path, shown: str) -> concurrent.futures.Future:
        """A run-time load: reserve ``name`` now (unique; at most ``max_adapters`` served or being loaded,
        so pending loads are bounded too), read and check it on the loader thread, add it on the worker."""
        with self.cond:
            self._check_new(name, self.pending)
            cap = self.limits.max_adapters
            if len(self.names) + len(self.pending) >= cap:
                raise ServeError(400, f"this server already serves or is loading {cap} adapters, the most "
                                      "--max-adapters allows; unload one first (DELETE /v1/adapters/NAME)",
                                 "too_many_adapters", "name")
            self.pending.add(name)
        fut = self.loader.submit(self._load_off_worker, name, Path(path), shown)
        fut.add_done_callback(lambda _: self._release(name))  # loaded, refused or cancelled
        return fut

    def _release(self, name: str) -> None:
        with self.cond:
            self.pending.discard(name)

    def _load_off_worker(self, name: str, path: Path, shown: str) -> dict:
        t0 = time.perf_counter()
        with load_errors(name, shown):
            prepared = self.rt.prepare_adapter(name, path, self.workdir / "adapters")
        try:
            return self.call(lambda: self._attach(prepared, shown, t0, "request")).result()
        finally:
            with self.cond:
                attached = name in self.names
            if not attached:  # refused, or the server closed before the worker took it
                prepared.discard()

    def _attach(self, prepared: Any, shown: str, t0: float, source: str) -> dict:
        """On the worker thread: make a prepared adapter usable and list it."""
        with load_errors(prepared.name, shown):
            info = self.rt.attach_prepared(prepared)
        info = {**info, "source": source, "load_seconds": round(time.perf_counter() - t0, 6)}
        with self.cond:
            self.names[prepared.name] = info
        return info

    def load_adapter_now(self, name: str, path: str | Path, shown: str | None = None,
                         source: str = "adapters_dir") -> dict:
        """Before the worker starts (``--adapters-dir``): validate and add adapter ``name``. Errors name
        the path as ``shown`` (what the client sent); the model list never shows paths."""
        with self.cond:
            self._check_new(name)
        t0 = time.perf_counter()
        with load_errors(name, shown or path):
            prepared = self.rt.prepare_adapter(name, path, self.workdir / "adapters")
        return self._attach(prepared, str(shown or path), t0, source)

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        """Stop serving ``name`` now (waiting requests for it get 404), then free it on the worker
        thread after the running request. Raises 404 for an unknown name."""
        if name == BASE:
            raise ServeError(400, "the base model cannot be unloaded", "invalid_value", "name")
        with self.cond:
            if name not in self.names:
                raise not_found(name, list(self.names))
            if self.names[name].get("merged"):
                raise ServeError(400, f"adapter '{name}' is merged into this export's weights; it cannot be "
                                      "unloaded", "adapter_loading_not_supported")
            del self.names[name]
            dropped = [j for j in self.waiting if j.adapter == name]
            self.waiting = [j for j in self.waiting if j.adapter != name]
        for job in dropped:
            job.finished = time.perf_counter()
            job.post("error", ServeError(404, f"The model '{name}' was unloaded before this request ran",
                                         "model_not_found", "model"))

        def remove() -> None:
            self.rt.unload_adapter(name)  # and the server's copy of it, if the runtime made one
            if self.active == name:
                self.active = self.rt.active

        return self.call(remove, holds=name)
