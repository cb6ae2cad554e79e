"""ONNX / onnxruntime(-genai) export of IA3 adapters: side-tensors or exact merge."""
