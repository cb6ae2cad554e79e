"""Run onnxruntime-genai's model builder in-process, its chatter captured.

The builder writes model.onnx (+ model.onnx.data), genai_config.json and the
tokenizer files; it quantizes int4/int8 with ONNX Runtime's MatMulNBits
quantizer. In-process saves the ~5 s interpreter + import start of a
subprocess per build.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

from edgeia3.errors import EdgeIA3Error


def build(hf_dir: str | Path, out_dir: str | Path, precision: str, provider: str,
          extra_options: dict[str, str] | None = None) -> str:
    """Build a generation-ready genai folder from a transformers directory; returns the log."""
    from onnxruntime_genai.models import builder as gb

    opts = [f"{k}={v}" for k, v in (extra_options or {}).items()]
    log = io.StringIO()
    previous = logging.root.manager.disable
    with tempfile.TemporaryDirectory(prefix="edgeia3-builder-") as cache:
        try:
            # The int4/int8 quantizer logs two INFO lines per MatMul through `logging`.
            logging.disable(logging.INFO)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                kv = gb.parse_extra_options(None, str(hf_dir), str(out_dir), precision, provider, cache, opts)
                gb.create_model(None, str(hf_dir), str(out_dir), precision, provider, cache, **kv)
        except Exception as e:  # the builder raises bare Exception/ValueError/NotImplementedError
            tail = " | ".join(log.getvalue().strip().splitlines()[-3:])
            raise EdgeIA3Error(f"onnxruntime-genai's model builder failed ({precision}, {provider}): "
                               f"{type(e).__name__}: {e}" + (f" [log: {tail}]" if tail else "")) from e
        finally:
            logging.disable(previous)
    return log.getvalue()


def builder_version() -> str:
    import onnxruntime_genai as og

    return og.__version__
