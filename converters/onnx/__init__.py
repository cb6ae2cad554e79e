"""ONNX / onnxruntime(-genai) side of IA3 adapters: the model builder, graph edits (side
inputs, MatMulNBits scale rows), the GGUF transcode, ``.onnx_adapter`` files, T5 graphs and
the browser form. ``export onnx`` itself is a step (edgeia3/steps/onnx_export.py)."""
