"""What every runtime shares behind the ``Runtime`` protocol: run-time adapter loading
(checks, refusal, cleanup) and the answers of a runtime that cannot load adapters.

A runtime that can take adapters while it runs implements three hooks:
``_prepare(name, path, workdir) -> PreparedAdapter`` (read and validate the adapter against
its base, precompute what using it needs; it touches no state the decoding thread uses, so a
server runs it off that thread), ``_attach(prepared) -> dict`` (make it usable: quick, on the
decoding thread; returns facts about it) and ``_detach(name)`` (forget it, with any copy it
made). ``prepare_adapter`` / ``attach_prepared`` / ``load_adapter`` / ``unload_adapter`` do the
checks every runtime shares around them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter import CANONICAL_FILE, check_adapter_name
from ..errors import EdgeIA3Error
from ..prompts import ChatTemplates

log = logging.getLogger("edgeia3.runtimes")


class NotLoadable(EdgeIA3Error):
    """This runtime / export cannot take adapters at run time at all."""


def adapter_format(path: Path) -> str:
    """The form of the adapter at ``path``: "ia3.gguf", "onnx_adapter", "peft" or "edgeia3" (canonical)."""
    if path.name.endswith(".ia3.gguf") or path.suffix == ".gguf":
        return "ia3.gguf"
    if path.name.endswith(".onnx_adapter"):
        return "onnx_adapter"
    if path.is_dir() and not (path / CANONICAL_FILE).exists():
        return "peft"
    return "edgeia3"


@dataclass
class PreparedAdapter:
    """An adapter read and checked against a runtime's base, not yet usable there (``attach_prepared``)."""

    name: str
    path: Path
    payload: Any  # what the runtime's ``_prepare`` made (parsed vectors, scale plans, a copy's path)
    files: tuple[Path, ...] = ()  # copies made for it: removed if it is never attached

    def discard(self) -> None:
        for f in self.files:
            f.unlink(missing_ok=True)


class RuntimeBase:
    """Shared behaviour of the runtimes; by default a runtime cannot load adapters at run time."""

    name: str = "runtime"
    templates: ChatTemplates
    batch_decoder: Any = None  # one request at a time, unless a runtime decodes batches (ONNX, GGUF)
    last_timing: dict | None = None  # tokens reach the caller as they are made: time their arrivals
    _active: str | None = None

    @property
    def active(self) -> str | None:
        """The adapter the next request runs with (None: the base)."""
        return self._active

    @property
    def merged(self) -> str | None:
        """The adapter folded into this model's weights (None: none)."""
        return None

    @property
    def adapters(self) -> list[str]:  # every runtime overrides it
        raise NotImplementedError

    def cannot_load(self) -> str | None:
        """None if adapters can be loaded while this runtime runs, else why they cannot."""
        return (f"the {self.name} runtime cannot load adapters at run time (serve an ONNX or GGUF export, or "
                "attach adapters when opening it)")

    def load_adapter(self, name: str, path: str | Path, workdir: str | Path) -> dict:
        """Validate the adapter at ``path`` (any form this runtime takes) against this base and make
        it usable as ``name``; ``workdir``: where the runtime may keep its own copy. Returns facts about
        it (sites, params, format). A refused adapter leaves no trace; ``NotLoadable`` if this runtime
        cannot load adapters at all (``cannot_load``). The same as ``attach_prepared(prepare_adapter(...))``."""
        return self.attach_prepared(self.prepare_adapter(name, path, workdir))

    def prepare_adapter(self, name: str, path: str | Path, workdir: str | Path) -> PreparedAdapter:
        """The slow half of ``load_adapter``: read and validate the adapter against this base. Safe to
        call from another thread while this runtime decodes (a server parses loads off its worker)."""
        check_adapter_name(name)
        path = Path(path)
        if not path.exists():
            raise EdgeIA3Error(f"adapter not found: {path}")
        if name in self.adapters:
            raise EdgeIA3Error(f"adapter '{name}' is already loaded")
        reason = self.cannot_load()
        if reason:
            raise NotLoadable(reason)
        return self._prepare(name, path, Path(workdir))

    def attach_prepared(self, prepared: PreparedAdapter) -> dict:
        """The quick half of ``load_adapter``, on the thread that decodes: make a prepared adapter
        usable. Refused (and its copies removed) if its name was taken meanwhile."""
        if prepared.name in self.adapters:
            prepared.discard()
            raise EdgeIA3Error(f"adapter '{prepared.name}' is already loaded")
        try:
            return self._attach(prepared)
        except BaseException:
            self._forget_refused(prepared.name)
            prepared.discard()
            raise

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (the base becomes active if it was) and any copy of it this runtime
        made. ``NotLoadable`` for the merged adapter, or if this runtime cannot unload adapters."""
        if name not in self.adapters:
            raise EdgeIA3Error(f"unknown adapter '{name}'")
        if self.merged == name:
            raise NotLoadable(f"adapter '{name}' is merged into this export's weights; it cannot be unloaded")
        self._detach(name)
        self.templates.forget(name)

    def _prepare(self, name: str, path: Path, workdir: Path) -> PreparedAdapter:
        raise NotLoadable(self.cannot_load() or f"the {self.name} runtime cannot load adapters at run time")

    def _attach(self, prepared: PreparedAdapter) -> dict:
        raise NotLoadable(self.cannot_load() or f"the {self.name} runtime cannot load adapters at run time")

    def _detach(self, name: str) -> None:
        raise NotLoadable(f"the {self.name} runtime cannot unload adapters at run time")

    def _forget_refused(self, name: str) -> None:
        """A runtime may have recorded a refused adapter (or its chat template) before refusing it
        (llama.cpp: an overflowing scale); the name must stay loadable."""
        if name in self.adapters:
            try:
                self._detach(name)
            except Exception:  # never hide the refusal's own error
                log.exception("could not forget refused adapter %r", name)
        self.templates.forget(name)

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:  # every runtime overrides it
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
