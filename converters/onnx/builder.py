"""Run onnxruntime-genai's model builder in-process, its chatter captured.

The builder writes model.onnx (+ model.onnx.data), genai_config.json and the
tokenizer files; it quantizes int4/int8 with ONNX Runtime's MatMulNBits
quantizer. In-process saves the ~5 s interpreter + import start of a
subprocess per build.

Where a family's registry entry translates config.json for the builder
(``Family.onnx_config``: it reads pre-transformers-5 field names), the builder
runs on a temporary folder holding the translated config.json and links to
every other file of the model folder (weights, tokenizer).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from edgeia3.errors import EdgeIA3Error

ConfigFix = Callable[[dict], dict]


def build(hf_dir: str | Path, out_dir: str | Path, precision: str, provider: str,
          extra_options: dict[str, str] | None = None, config_fix: ConfigFix | None = None) -> str:
    """Build a generation-ready genai folder from a transformers directory; returns the log."""
    from onnxruntime_genai.models import builder as gb

    opts = [f"{k}={v}" for k, v in (extra_options or {}).items()]
    log = io.StringIO()
    previous = logging.root.manager.disable
    with tempfile.TemporaryDirectory(prefix="edgeia3-builder-") as cache:
        src = _translated(Path(hf_dir), Path(cache) / "model", config_fix)
        try:
            # The int4/int8 quantizer logs two INFO lines per MatMul through `logging`.
            logging.disable(logging.INFO)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                kv = gb.parse_extra_options(None, str(src), str(out_dir), precision, provider, cache, opts)
                gb.create_model(None, str(src), str(out_dir), precision, provider, cache, **kv)
        except Exception as e:  # the builder raises bare Exception/ValueError/NotImplementedError
            tail = " | ".join(log.getvalue().strip().splitlines()[-3:])
            raise EdgeIA3Error(f"onnxruntime-genai's model builder failed ({precision}, {provider}): "
                               f"{type(e).__name__}: {e}" + (f" [log: {tail}]" if tail else "")) from e
        finally:
            logging.disable(previous)
    return log.getvalue()


def _translated(hf_dir: Path, where: Path, config_fix: ConfigFix | None) -> Path:
    """``hf_dir`` itself, or a folder of links to it whose config.json has the fields the
    translation changed (it reads transformers' view: old names converted, defaults filled)."""
    if config_fix is None:
        return hf_dir
    from transformers import AutoConfig

    view = AutoConfig.from_pretrained(hf_dir).to_dict()
    fixed = config_fix(copy.deepcopy(view))
    changed = {k: v for k, v in fixed.items() if k not in view or view[k] != v}
    if not changed:
        return hf_dir
    where.mkdir(parents=True)
    for f in hf_dir.iterdir():
        if f.name == "config.json":
            continue
        try:
            (where / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())
        except OSError:  # no symlinks (some Windows setups): copy
            shutil.copytree(f, where / f.name) if f.is_dir() else shutil.copy2(f, where / f.name)
    config = json.loads((hf_dir / "config.json").read_text())
    (where / "config.json").write_text(json.dumps({**config, **changed}, indent=2))
    return where


def builder_version() -> str:
    import onnxruntime_genai as og

    return og.__version__
