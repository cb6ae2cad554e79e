"""GGUF / llama.cpp converter: export, IA3 adapter GGUFs, exact merge into
already-quantized weights by rescaling block scales, and the pieces the
llama.cpp runtime uses to swap adapters in place.

Modules:
- ggml_index:   tensor offsets/shapes and metadata of a GGUF through libggml
- blocks:       where each quant type keeps its per-block scale fields
- plan:         canonical adapter -> row scalings of GGUF tensors (registry-driven)
- base_gguf:    identity of a GGUF base and adapter validation against it
- adapter_file: the ``.ia3.gguf`` adapter format (write and read)
- merge:        exact merge into a GGUF file
- hf_writer, vocab, quantize: transformers dir -> GGUF, llama.cpp's quantizer
- to_hf:        the cached conversions edgeia3.base asks for (GGUF -> transformers dir,
                a base quantized by llama.cpp, whether edgeia3 can write a base as GGUF)

``edgeia3 export gguf`` and ``merge --out X.gguf`` are steps (edgeia3/steps/) that use these;
nothing here imports a step.
"""
