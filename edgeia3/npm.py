"""The browser runtime's JavaScript files, fetched from the npm registry without Node.

One table pins every package (exact version and the registry's sha512 integrity). The
tarball is downloaded over HTTPS with Python, checked against both the pinned integrity and
the registry's metadata for that version, cached under ``cache_home()/npm`` and only the
files the page needs are extracted. Offline with an empty cache is one ``EdgeIA3Error``.
``EDGEIA3_NPM_REGISTRY`` points at another registry (a mirror); the integrity pins still hold.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeIA3Error

REGISTRY = "https://registry.npmjs.org"
TIMEOUT_S = 60


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    integrity: str  # the registry's dist.integrity of that version ("sha512-<base64>")
    files: tuple[tuple[str, str], ...]  # (path inside the tarball, name in the export's runtime/ folder)
    license: str


# The pinned browser runtime: what `edgeia3 export web` puts into runtime/.
PACKAGES: tuple[Package, ...] = (
    Package("onnxruntime-web", "1.31.1",
            "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw==",
            (("package/dist/ort.wasm.min.mjs", "ort.wasm.min.mjs"),
             ("package/dist/ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.mjs"),
             ("package/dist/ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.wasm"),
             ("package/dist/ort.webgpu.min.mjs", "ort.webgpu.min.mjs"),
             ("package/dist/ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.mjs"),
             ("package/dist/ort-wasm-simd-threaded.asyncify.wasm", "ort-wasm-simd-threaded.asyncify.wasm")),
            "MIT"),
    Package("@huggingface/tokenizers", "0.2.0",
            "sha512-LidMHe1FpcSYH4vcSjXooda34pC0M8m1gmDOv7SQi6Iv+ib1zX7J3sHBCC9/3FPCkn2k1b55FneVqMRxrr99pg==",
            (("package/dist/tokenizers.min.mjs", "tokenizers.min.mjs"), ("package/LICENSE", "LICENSE.tokenizers")),
            "Apache-2.0"),
    Package("@huggingface/jinja", "0.5.13",
            "sha512-jM17MqFily1iyT/1LD3r5w8/CZiyapVB0+7vOw48PfVtzyKsXStmHE4jVTyDAD05Tqv3un1xrS9ILUU1ugQAYQ==",
            (("package/dist/index.js", "jinja.mjs"), ("package/LICENSE", "LICENSE.jinja")),
            "MIT"),
)


def _registry() -> str:
    return os.environ.get("EDGEIA3_NPM_REGISTRY", REGISTRY).rstrip("/")


def cache_dir() -> Path:
    from .base import cache_home

    return cache_home() / "npm"


def _tarball_name(pkg: Package) -> str:
    return f"{pkg.name.replace('@', '').replace('/', '-')}-{pkg.version}.tgz"


def _matches(blob: bytes, integrity: str) -> bool:
    algo, _, want = integrity.partition("-")
    if algo != "sha512":
        return False
    return base64.b64encode(hashlib.sha512(blob).digest()).decode() == want


def _get(url: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "edgeia3", "Accept": "application/json, */*"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
        return r.read()


def _download(pkg: Package) -> bytes:
    """The tarball of ``pkg`` from the registry, checked against its metadata and the pin."""
    meta_url = f"{_registry()}/{urllib.parse.quote(pkg.name, safe='@')}/{pkg.version}"
    try:
        meta = json.loads(_get(meta_url))
        dist = meta["dist"]
        if dist.get("integrity") != pkg.integrity:
            raise EdgeIA3Error(f"npm package {pkg.name}@{pkg.version}: the registry's integrity "
                               f"{dist.get('integrity')} is not the pinned {pkg.integrity}; refusing it")
        blob = _get(dist["tarball"])
    except EdgeIA3Error:
        raise
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise EdgeIA3Error(
            f"cannot download the browser runtime {pkg.name}@{pkg.version} from {_registry()} "
            f"({getattr(e, 'reason', None) or e}); `edgeia3 export web` needs the npm registry once "
            f"(the tarballs are then cached in {cache_dir()}), or put {_tarball_name(pkg)} there") from None
    except (ValueError, KeyError, TypeError) as e:
        raise EdgeIA3Error(f"npm registry {_registry()}: unexpected metadata for {pkg.name}@{pkg.version} ({e})") from None
    if not _matches(blob, pkg.integrity):
        raise EdgeIA3Error(f"npm package {pkg.name}@{pkg.version}: the downloaded tarball fails its sha512 "
                           "integrity check; refusing it")
    return blob


def tarball(pkg: Package) -> bytes:
    """The checked tarball of ``pkg``: from the cache, else downloaded once and cached."""
    from .atomic import atomic_file

    path = cache_dir() / _tarball_name(pkg)
    if path.is_file():
        blob = path.read_bytes()
        if _matches(blob, pkg.integrity):
            return blob
    blob = _download(pkg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, force=True) as tmp:  # a damaged cached copy is replaced
        Path(tmp).write_bytes(blob)
    return blob


def install_runtime(dest: Path, packages: tuple[Package, ...] = PACKAGES) -> list[dict]:
    """Extract the pinned runtime files into ``dest``; what went where (for the manifest)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for pkg in packages:
        with tarfile.open(fileobj=io.BytesIO(tarball(pkg)), mode="r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for src, name in pkg.files:
                if src not in members:
                    raise EdgeIA3Error(f"npm package {pkg.name}@{pkg.version} has no {src}")
                (dest / name).write_bytes(tar.extractfile(members[src]).read())
        done.append({"package": pkg.name, "version": pkg.version, "integrity": pkg.integrity,
                     "license": pkg.license, "files": [name for _, name in pkg.files]})
    return done
