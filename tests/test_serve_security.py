"""edgeia3 serve's guards, against the real server on 127.0.0.1 (a tiny f16 GGUF export): who may
call it (Host header, API key on every path but /health, JSON bodies only, no key beyond loopback
without --insecure), which files run-time adapter loading may read (only inside --adapters-dir,
errors that never tell whether a path outside exists), adapter names (case-insensitive, capped
by --max-adapters), and that a refused adapter leaves no trace."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys

import httpx
import pytest

from edgeia3 import load_base
from edgeia3.formats import load_adapter
from serving import KEY, PROMPTS, REPO, Server, ThreadServer, ascii_bpe_tokenizer, chat, error_of
from tiny_models import make_tiny_model, random_peft_adapter

MAX_ADAPTERS = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A base-only f16 GGUF export (f16 scale fields overflow where f32 ones cannot), served with
    --adapters-dir adir (adapters under adir/more/, none loaded at start) and --max-adapters 3;
    an adapter, the same adapter with huge values, and files outside adir."""
    from edgeia3.export import export_gguf

    root = tmp_path_factory.mktemp("serve_security")
    base = make_tiny_model("llama", root / "base", seed=0, max_position_embeddings=2048)
    ascii_bpe_tokenizer(base)
    lb = load_base(base)
    adir, outside = root / "adapters", root / "outside"
    more = adir / "more"
    random_peft_adapter(copy.deepcopy(lb.model), "llama", root / "peft", seed=1)
    good = dataclasses.replace(load_adapter(root / "peft", base_config=lb.config), base=lb.identity)
    good.save(more / "good" / "edgeia3_adapter.safetensors")
    huge = [dataclasses.replace(v, values=v.values * 1e8) for v in good.vectors]
    dataclasses.replace(good, vectors=huge).save(more / "huge" / "edgeia3_adapter.safetensors")
    good.save(outside / "secret" / "edgeia3_adapter.safetensors")  # a valid adapter, but outside adir
    (more / "escape").symlink_to(outside / "secret")
    (more / "dangling").symlink_to(outside / "missing")
    model = export_gguf(str(base), root / "gguf", quant="f16").out
    srv = Server(model, root / "server.log", "--adapters-dir", str(adir), "--max-adapters", str(MAX_ADAPTERS))
    yield {"root": root, "srv": srv, "model": model, "adir": adir, "outside": outside}
    srv.close()


def load(srv: Server, name: str, path: str, **kw) -> httpx.Response:
    return srv.http.post("/v1/adapters", json={"name": name, "path": path}, **kw)


def test_every_path_but_health_needs_the_key_and_none_shows_paths(env):
    srv = env["srv"]
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/metrics", "/v1/models",
                 "/v1/models/base", "/v1/adapters", "/nothing-here"):
        r = httpx.get(srv.url + path)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key", (path, r.text)
    for path in ("/docs", "/openapi.json"):
        assert srv.http.get(path).status_code == 200  # with the key
    assert httpx.post(srv.url + "/v1/adapters", json={"name": "x", "path": "more/good"}).status_code == 401
    health = httpx.get(srv.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert load(srv, "shown", "more/good").status_code == 200
    try:
        for text in (health.text, srv.http.get("/v1/models").text, srv.http.get("/v1/models/shown").text,
                     srv.http.get("/metrics").text):
            assert str(env["root"]) not in text and "/" not in text, text
    finally:
        assert srv.http.delete("/v1/adapters/shown").status_code == 200


def test_host_header_must_name_this_server(env):
    srv = env["srv"]
    for host in ("evil.example", f"evil.example:{srv.port}", "127.0.0.1.evil.example", "localhost.evil.example"):
        for path in ("/health", "/v1/models"):
            r = srv.http.get(path, headers={"Host": host})
            assert r.status_code == 403 and error_of(r)["code"] == "host_not_allowed", (host, path, r.text)
    r = srv.http.post("/v1/completions", headers={"Host": "evil.example"},
                      json={"model": "base", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 403
    for host in (f"127.0.0.1:{srv.port}", "localhost", f"LOCALHOST:{srv.port}", "[::1]:1234", "127.0.0.1"):
        assert srv.http.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_json_endpoints_refuse_other_content_types(env):
    srv = env["srv"]
    before = srv.metrics()["requests"]
    body = '{"name": "form", "path": "more/good"}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        for path in ("/v1/adapters", "/v1/chat/completions", "/v1/completions"):
            r = srv.http.post(path, content=body, headers=headers)
            assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type", (ctype, path)
    assert [m["id"] for m in srv.http.get("/v1/models").json()["data"]] == ["base"]  # nothing loaded
    assert srv.metrics()["requests"] == before  # no generation was queued
    r = srv.http.post("/v1/completions", headers={"Content-Type": "Application/JSON; charset=utf-8"},
                      content='{"model": "base", "prompt": "hi", "max_tokens": 2}')
    assert r.status_code == 200, r.text


def test_adapter_paths_are_confined_to_the_adapters_dir(env):
    srv, outside = env["srv"], env["outside"]
    refused = [str(outside / "secret"), str(outside / "missing"),  # outside: existing or not
               "../outside/secret", "../outside/missing", "more/../../outside/secret",  # .. escapes
               "more/escape", "more/dangling", str(env["adir"] / "more" / "escape"),  # symlinks out
               "/etc/passwd", "/etc/no-such-file", "/", "..", str(env["adir"])]
    bodies = set()
    for path in refused:
        r = load(srv, "x", path)
        assert r.status_code == 403, (path, r.text)
        err = error_of(r)
        assert err["code"] == "path_not_allowed" and "--adapters-dir" in err["message"]
        bodies.add(r.text)
    assert len(bodies) == 1  # the same answer whether the file exists or not
    r = load(srv, "x", "more/missing")  # inside: may say so
    assert r.status_code == 400 and "not found" in error_of(r)["message"]
    assert [m["id"] for m in srv.http.get("/v1/models").json()["data"]] == ["base"]


def test_without_an_adapters_dir_loading_by_path_is_off(env):
    with ThreadServer(env["model"]) as ts:
        texts = set()
        for path in (str(env["adir"] / "more" / "good"), str(env["outside"] / "missing"), "/etc/passwd"):
            r = ts.http.post("/v1/adapters", json={"name": "x", "path": path})
            assert r.status_code == 403 and error_of(r)["code"] == "adapter_loading_disabled", r.text
            texts.add(r.text)
        assert len(texts) == 1 and "--adapters-dir" in texts.pop()
        assert [m.id for m in ts.client().models.list()] == ["base"]


def test_adapter_names_are_case_insensitive(env):
    srv = env["srv"]
    assert load(srv, "Sent", "more/good").status_code == 200
    try:
        for name in ("sent", "SENT", "sEnT"):
            r = load(srv, name, "more/good")
            assert r.status_code == 409 and "Sent" in error_of(r)["message"], r.text
        for name in ("Base", "BASE"):
            assert load(srv, name, "more/good").status_code == 400
        assert [m["id"] for m in srv.http.get("/v1/models").json()["data"]] == ["base", "Sent"]
    finally:
        assert srv.http.delete("/v1/adapters/Sent").status_code == 200
    assert load(srv, "sent", "more/good").status_code == 200  # free again once unloaded
    assert srv.http.delete("/v1/adapters/sent").status_code == 200


def test_a_refused_adapter_leaves_no_trace(env):
    srv, client = env["srv"], env["srv"].client()
    r = load(srv, "big", "more/huge")
    assert r.status_code == 400 and "overflow" in error_of(r)["message"], r.text
    assert [m["id"] for m in srv.http.get("/v1/models").json()["data"]] == ["base"]
    assert srv.http.delete("/v1/adapters/big").status_code == 404
    r = load(srv, "big", "more/good")  # the name is free, and the good adapter works under it
    assert r.status_code == 200, r.text
    try:
        assert load(srv, "good", "more/good").status_code == 200
        assert chat(client, "big", PROMPTS[0]) == chat(client, "good", PROMPTS[0])
        assert chat(client, "big", PROMPTS[0]) != chat(client, "base", PROMPTS[0])
    finally:
        for name in ("big", "good"):
            assert srv.http.delete(f"/v1/adapters/{name}").status_code == 200


def test_resident_adapters_are_capped(env):
    srv = env["srv"]
    names = [f"cap{i}" for i in range(MAX_ADAPTERS)]
    try:
        for name in names:
            assert load(srv, name, "more/good").status_code == 200
        r = load(srv, "one_more", "more/good")
        assert r.status_code == 400 and error_of(r)["code"] == "too_many_adapters"
        assert "--max-adapters" in error_of(r)["message"]
        assert srv.metrics()["adapters_loaded"] == MAX_ADAPTERS
        assert srv.http.delete(f"/v1/adapters/{names.pop()}").status_code == 200
        assert load(srv, "one_more", "more/good").status_code == 200  # room again
        names.append("one_more")
    finally:
        for name in names:
            srv.http.delete(f"/v1/adapters/{name}")


def test_listening_beyond_loopback_needs_a_key_or_insecure(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EDGEIA3_API_KEY"}

    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgeia3", "serve", "--model", str(tmp_path / "none"), *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    for host in ("0.0.0.0", "::", "192.0.2.7", "example.com"):
        r = serve("--host", host)
        assert r.returncode == 2 and "--api-key" in r.stderr and "--insecure" in r.stderr, r.stderr
    for args in (("--host", "0.0.0.0", "--insecure"), ("--host", "0.0.0.0", "--api-key", KEY),
                 ("--host", "localhost")):  # past the check: the missing model stops them
        r = serve(*args)
        assert r.returncode == 2 and "--insecure" not in r.stderr and r.stderr.strip(), r.stderr
