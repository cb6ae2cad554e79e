"""ORT-format conversion and ONNX Runtime's mobile usability check of an export.

``model.ort`` is what the ORT mobile packages load (set ``"filename":
"model.ort"`` in genai_config.json to use it with onnxruntime-genai). The
usability checker reports, per mobile execution provider (NNAPI on Android,
CoreML on iOS/macOS), which ops it cannot take; those run on the CPU EP, which
in the full ORT mobile packages includes the com.microsoft contrib ops the
builder emits (GroupQueryAttention, MatMulNBits, SimplifiedLayerNormalization).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
from pathlib import Path

from edgeia3.errors import EdgeIA3Error

ORT_FILE = "model.ort"
_EP_OPS = {  # checker tables shipped with onnxruntime.tools.mobile_helpers
    "NNAPI": "nnapi_supported_ops.md",
    "CoreML NeuralNetwork": "coreml_supported_neuralnetwork_ops.md",
    "CoreML MLProgram": "coreml_supported_mlprogram_ops.md",
}


def convert_to_ort(model_dir: Path, model_file: str = "model.onnx") -> Path:
    """Write ``model.ort`` (ORT flatbuffer format, weights inside) beside ``model_file``."""
    import onnxruntime as ort

    target = model_dir / ORT_FILE
    so = ort.SessionOptions()
    # Same as onnxruntime.tools.convert_onnx_models_to_ort with its default ("fixed", basic-level
    # optimizations kept portable): the tool itself only handles whole directories of .onnx files.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(target)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(model_dir / model_file), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise EdgeIA3Error(f"ORT-format conversion failed: {e}") from e
    return target


def check_usability(model_path: Path) -> dict:
    """Run the mobile usability checker's per-EP op analysis; unsupported ops per EP."""
    import onnx
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    model = onnx.load(str(model_path), load_external_data=False)
    here = pathlib.Path(uc.__file__).parent
    report: dict = {"unsupported_ops": {}, "supported_nodes": {}, "partitions": {}}
    for ep, table in _EP_OPS.items():
        checker = uc._SupportedOpsChecker(here / table)
        info = uc.check_partitioning(model.graph, checker, require_fixed_input_sizes=False)
        report["unsupported_ops"][ep] = sorted(info.unsupported_ops)
        report["supported_nodes"][ep] = f"{info.num_supported_nodes}/{info.num_nodes}"
        report["partitions"][ep] = info.num_partitions
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        logger = logging.getLogger("edgeia3.mobile_usability")
        logger.addHandler(logging.StreamHandler(log))
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            report["nnapi_or_coreml_useful"] = bool(uc.analyze_model(pathlib.Path(model_path), logger=logger))
        except Exception as e:  # the checker's optimizer pass can fail on contrib ops; keep the op table
            report["nnapi_or_coreml_useful"] = None
            report["checker_error"] = f"{type(e).__name__}: {e}"
        logger.handlers.clear()
    report["checker_log"] = [line for line in log.getvalue().splitlines() if "Unsupported ops" in line
                             or "should perform well" in line][:12]
    return report


def make_mobile(model_dir: Path, model_file: str = "model.onnx") -> dict:
    """Convert to ORT format, check it loads, and record mobile op coverage."""
    import onnxruntime as ort

    ort_path = convert_to_ort(model_dir, model_file)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(ort_path), so, providers=["CPUExecutionProvider"])
        loads = True
    except Exception:  # recorded, not fatal: the ONNX export itself is fine
        loads = False
    report = check_usability(model_dir / model_file)
    return {"ort_file": ORT_FILE, "ort_bytes": ort_path.stat().st_size, "ort_loads": loads, **report}
