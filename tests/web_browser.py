"""The browser side of the web tests: Debian's Chromium, headless, driven by Playwright, and a static
server on 127.0.0.1 (COOP/COEP headers, ``.wasm`` as application/wasm) that serves exported folders.

Needs ``playwright`` (pip; its driver only - never ``playwright install``) and a Chromium at
/usr/bin/chromium (Debian: ``apt-get install -y chromium``) or $EDGEIA3_CHROMIUM. Without them
every module importing this one is skipped, unless EDGEIA3_REQUIRE_BROWSER=1 (CI) makes that a
failure (``require_browser``). tests/conftest.py registers this module as a plugin, so its fixtures
are every test module's; they are module-scoped: each module that asks gets its own browser, server
and tiny export.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import urllib.parse
from pathlib import Path

import pytest

from edgeia3 import load_base
from edgeia3.cli import app
from edgeia3.web import NativeWeb, make_server
from cli_checks import runner
from tiny_models import random_peft_adapter

CHROMIUM = os.environ.get("EDGEIA3_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPTS = ["hello there", "sun is warm", "what is 2+2?"]
ROOT = Path(__file__).resolve().parents[1]


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set EDGEIA3_CHROMIUM)"
    return None


def require_browser() -> None:
    """Called at the top of a browser test module: skips it when Playwright or Chromium is missing,
    or fails the run when EDGEIA3_REQUIRE_BROWSER=1 (CI) says they must be there."""
    missing = _browser_missing()
    if missing:
        if os.environ.get("EDGEIA3_REQUIRE_BROWSER") == "1":
            raise RuntimeError(f"browser tests required (EDGEIA3_REQUIRE_BROWSER=1) but {missing}")
        pytest.skip(missing, allow_module_level=True)


# -- the browser and the server ----------------------------------------------------------------
class Page:
    """One Chromium tab on the static server."""

    def __init__(self, browser, root_url: str):
        self.page = browser.new_page()
        self.root = root_url
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, folder: str, **query) -> dict:
        """Open ``folder``/index.html with ``query``; wait for done/error; what #answer says."""
        q = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        self.page.goto(f"{self.root}/{folder}/index.html" + (f"?{q}" if q else ""))
        if not query:
            self.page.wait_for_selector("#answer[data-state=ready], #answer[data-state=error]", timeout=60_000)
        else:
            self.page.wait_for_selector("#answer[data-state=done], #answer[data-state=error]", timeout=60_000)
        a = self.page.locator("#answer")
        out = {"state": a.get_attribute("data-state"), "text": a.text_content()}
        if out["state"] == "done":
            out["ids"] = json.loads(a.get_attribute("data-ids"))
            out["prompt_ids"] = json.loads(a.get_attribute("data-prompt-ids"))
            out["stats"] = json.loads(self.page.locator("#stats").text_content())
        return out

    def generate(self, **request) -> dict:
        """``window.edgeia3Model.generate(request)`` on the loaded page."""
        return self.page.evaluate("""async (r) => {
            const res = await window.edgeia3Model.generate(r);
            return {text: res.text, ids: res.ids, prompt_ids: res.promptIds, aborted: res.aborted, stats: res.stats};
        }""", request)

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A static server over one folder (exports are copied or linked into it)."""
    root = tmp_path_factory.mktemp("site")
    srv = make_server(root, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def playwright():
    """One Playwright driver per module (a second sync_playwright() inside the first is refused)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright):
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory, site):
    """A tiny llama (BPE tokenizer), two adapters, exported with the CLI into the site."""
    tmp = tmp_path_factory.mktemp("web")
    base = tiny_dir("llama", tokenizer="bpe")
    for name, seed in (("a", 1), ("b", 2)):
        random_peft_adapter(copy.deepcopy(load_base(base).model), "llama", tmp / name, seed=seed)
        scale_adapter(tmp / name, 2.5)  # far enough from ones that the greedy answers differ
    out = site[0] / "tiny"
    res = runner.invoke(app, ["export", "web", "--base", str(base), "--out", str(out),
                              "--adapter", f"a={tmp / 'a'}", "--adapter", f"b={tmp / 'b'}"])
    assert res.exit_code == 0, res.output
    assert "web export of" in res.output
    return out, NativeWeb(out)


def scale_adapter(path: Path, k: float) -> None:
    """Spread an adapter's vectors: 1 + k * (v - 1), in both files it holds."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as h:
            meta = h.metadata()
        t = load_file(str(f))
        save_file({n: (1 + k * (v - 1)).astype(v.dtype) for n, v in t.items()}, str(f), metadata=meta)


@pytest.fixture(scope="module")
def page(browser, site):
    p = Page(browser, site[1])
    yield p
    p.page.close()
