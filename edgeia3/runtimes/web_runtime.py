"""An ``export web`` folder run where it is meant to run: onnxruntime-web in headless Chromium.

``WebRuntime`` serves the folder on 127.0.0.1 (``edgeia3.web.make_server``: COOP/COEP, so WASM
threads work), opens its demo page in Chromium through Playwright and drives the page's own ES
module (``window.edgeia3Model``): the page tokenizes, renders chat, loads adapters and decodes,
exactly as a web app calling ``edgeia3.js`` would. It implements the ``Runtime`` protocol, so
``edgeia3 report`` measures a web export like any other (load, time to first token, decode
tok/s, adapter switch, drift and accuracy against the model the adapters were trained as).

Tokens stream out of the page as it makes them: the page's ``onToken`` pushes ids into a list
that this side polls (``POLL_SECONDS``); on a busy machine one poll can bring several tokens, so the
page's own clock (its ``stats``: ``ttft_ms``, ``decode_tok_s``) times each request (``last_timing``).
Needs ``playwright`` (pip; its driver only) and a Chromium at /usr/bin/chromium or
``$EDGEIA3_CHROMIUM`` (Debian: ``apt-get install -y chromium``); nothing downloads a browser.
"""

from __future__ import annotations

import base64
import importlib.util
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import EdgeIA3Error
from ..manifest import WEB_KIND, export_kind
from ..prompts import ChatTemplates, read_template
from ..tokens import TokenContract
from . import refuse_options, register_runtime
from .base_runtime import RuntimeBase

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
POLL_SECONDS = 0.002  # how often generate_ids asks the page for new tokens
LOAD_TIMEOUT_MS = 600_000

_START = """([key, r]) => {
  const s = {ids: [], done: false, error: null, stats: null, ctl: new AbortController()};
  (window.__edgeia3Streams ||= {})[key] = s;
  window.edgeia3Model.generate({...r, signal: s.ctl.signal, onToken: (d, text, id) => { s.ids.push(id); }})
    .then((res) => { s.stats = res.stats; s.done = true; },
          (e) => { s.error = String((e && e.message) || e); s.done = true; });
}"""
_POLL = """(key) => {
  const s = window.__edgeia3Streams[key];
  const out = {ids: s.ids.splice(0), done: s.done, error: s.error, stats: s.stats};
  if (s.done) delete window.__edgeia3Streams[key];
  return out;
}"""
_ABORT = "(key) => { const s = (window.__edgeia3Streams || {})[key]; if (s) s.ctl.abort(); }"
_LOGITS = """async ([ids, adapter]) => {
  const bytes = new Uint8Array((await window.edgeia3Model.logits(ids, adapter)).buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}"""


def _timing(stats: dict) -> dict:
    """The page's own timing of one request, in the report's units."""
    return {"ttft_s": stats["ttft_ms"] / 1000, "decode_tok_s": stats["decode_tok_s"]}


_BROWSER_THREAD: list = []  # the one thread every Playwright call runs on (see _on_browser_thread)


def _on_browser_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on edgeia3's browser thread. Playwright's sync API binds its objects to the thread
    that started its driver and refuses a second driver in a thread that runs one already (a test's,
    a notebook's): one dedicated thread holds edgeia3's driver and every page, whoever calls."""
    import concurrent.futures

    if not _BROWSER_THREAD:
        _BROWSER_THREAD.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeia3-chromium"))
    return _BROWSER_THREAD[0].submit(fn, *args).result()


def _launch(chromium: Path) -> Any:
    """A headless Chromium from this thread's Playwright driver (started on first use)."""
    global _DRIVER
    if _DRIVER is None:
        from playwright.sync_api import sync_playwright

        _DRIVER = sync_playwright().start()  # its node process ends with this one
    return _DRIVER.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)


_DRIVER: Any = None


def chromium_path() -> Path:
    """The system Chromium edgeia3 drives, or one error saying how to get it."""
    path = Path(os.environ.get("EDGEIA3_CHROMIUM", "/usr/bin/chromium"))
    if not path.is_file():
        raise EdgeIA3Error(f"running a web export needs Chromium at {path} (Debian/Ubuntu: apt-get install -y "
                           "chromium; or set EDGEIA3_CHROMIUM to a Chromium binary)")
    return path


class WebRuntime(RuntimeBase):
    """A web export in headless Chromium (see the module doc); ``threads``: WASM threads (None: the page's)."""

    name = "onnxruntime-web (Chromium)"

    def __init__(self, path: str | Path, threads: int | None = None, backend: str = "wasm"):
        from ..web import make_server, read_web_manifest

        self.path = Path(path)
        self.manifest = read_web_manifest(self.path)
        if importlib.util.find_spec("playwright") is None:
            raise EdgeIA3Error("running a web export needs playwright (pip install playwright; no browser "
                               "download: edgeia3 drives the system Chromium)")
        chromium = chromium_path()
        self._keys = itertools.count()
        self._active: str | None = None
        self.templates = ChatTemplates(read_template(self.path))
        for name, entry in self.manifest.adapters.items():
            if entry.chat_template is not None:
                self.templates.record(name, template=entry.chat_template)
        self._server = make_server(self.path, port=0)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        try:
            self.open_seconds = _on_browser_thread(self._open_page, chromium, backend, threads)
        except BaseException:
            self.close()
            raise

    def _open_page(self, chromium: Path, backend: str, threads: int | None) -> float:
        """On the browser thread: launch, load the page, wait until the model is ready."""
        self._browser = _launch(chromium)
        self.page = self._browser.new_page()
        query = f"backend={backend}" + (f"&threads={int(threads)}" if threads else "")
        t0 = time.perf_counter()
        self.page.goto(f"http://127.0.0.1:{self._server.server_address[1]}/index.html?{query}")
        self.page.wait_for_selector("#answer[data-state=ready], #answer[data-state=error]", timeout=LOAD_TIMEOUT_MS)
        seconds = time.perf_counter() - t0
        answer = self.page.locator("#answer")
        if answer.get_attribute("data-state") == "error":
            raise EdgeIA3Error(f"{self.path}: the page could not load the model: {answer.text_content()}")
        self.backend = self.page.evaluate("() => window.edgeia3Model.backend")
        return seconds

    def _eval(self, script: str, arg: Any = None) -> Any:
        return _on_browser_thread(self.page.evaluate, script, arg)

    # -- the protocol -------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self.manifest.side_adapters)

    @property
    def context_length(self) -> int:
        return int(self.manifest.extra["decoder"]["context_length"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest.extra["decoder"]["vocab_size"])

    @property
    def tokens(self) -> TokenContract:
        return TokenContract.from_json(self.manifest.token_contract)

    def describe(self) -> str:
        return f"per-request IA3 input tensors in one onnxruntime-web session ({self.backend}, Chromium)"

    def use_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise EdgeIA3Error(f"unknown adapter '{name}' (this export has: {', '.join(self.adapters) or 'none'})")
        self._active = name

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        """The page's own tokenization (its tokenizer and Jinja renderer) under the token contract;
        a template given when opening (``--chat-template``) is rendered here, then encoded there."""
        if isinstance(prompt, str):
            return self._eval("(t) => window.edgeia3Model.encodeText(t)", prompt)
        if self.templates.given:
            return self.prompt_ids(self.templates.render(prompt, self._active))
        return self._eval("([m, a]) => window.edgeia3Model.encodeChat(m, a)", [prompt, self._active])

    def detokenize(self, ids: list[int]) -> str:
        return self._eval("(ids) => window.edgeia3Model.decode(ids)", [int(i) for i in ids])

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64, ignore_eos: bool = False) -> Iterator[int]:
        """Greedy decoding in the page, each token yielded as the page's ``onToken`` reports it."""
        key = next(self._keys)
        request = {"ids": [int(i) for i in prompt_ids], "adapter": self._active, "maxTokens": int(max_tokens),
                   "ignoreEos": bool(ignore_eos)}
        self._eval(_START, [key, request])
        self.last_timing = None
        done = False
        try:
            while not done:
                state = self._eval(_POLL, key)
                done = state["done"]
                if state["error"]:
                    raise EdgeIA3Error(f"{self.path}: the page failed: {state['error']}")
                if done and state["stats"]:
                    self.last_timing = _timing(state["stats"])
                yield from state["ids"]
                if not done:
                    time.sleep(POLL_SECONDS)
        finally:
            if not done:  # abandoned (a first-token timing): stop the page and let it finish
                self._eval(_ABORT, key)
                while not self._eval(_POLL, key)["done"]:
                    time.sleep(POLL_SECONDS)

    def logits(self, token_ids: list[int]) -> np.ndarray:
        raw = self._eval(_LOGITS, [[int(i) for i in token_ids], self._active])
        return np.frombuffer(base64.b64decode(raw), dtype=np.float32).reshape(len(token_ids), self.vocab_size)

    def close(self) -> None:
        for closing in (lambda: _on_browser_thread(self._browser.close), self._server.shutdown,
                        self._server.server_close):
            try:
                closing()
            except Exception:  # already closed, or never opened
                pass


def _is_web_export(path: Path) -> bool:
    return path.is_dir() and export_kind(path) == WEB_KIND


def _open(path: Path, adapters: dict | None = None, provider: str | None = None, **options: Any) -> WebRuntime:
    threads = options.pop("threads", None)
    refuse_options(path, "onnxruntime-web", {**options, **({"provider": provider} if provider else {})})
    if adapters:
        raise EdgeIA3Error(f"{path}: a web export carries its own adapters; re-export with --adapter NAME=PATH")
    return WebRuntime(path, threads=threads)


register_runtime(_is_web_export, _open)
