"""Real weights in a second family: the embedded SmolLM2-135M written as a Qwen2 model.

No other real model can be fetched here (no hub). Qwen2 is llama plus q/k/v
biases; with zero biases transformers computes the same function, while every
family-specific path differs: the qwen2 registry entry (PEFT targets q, v, down),
no RoPE row permutation and llama.cpp's NEOX RoPE in the qwen2 GGUF
architecture, the qwen2 builder in onnxruntime-genai, biases in merges.

    python bench/smollm2_as_qwen2.py --out bench-out/smollm2-qwen2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def write(out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from edgeia3.base import resolve_base

    src = resolve_base("default").hf_path
    llama = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    c = llama.config
    cfg = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), tie_word_embeddings=True,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        use_sliding_window=False, architectures=["Qwen2ForCausalLM"])
    qwen = Qwen2ForCausalLM(cfg).eval()
    missing, unexpected = qwen.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("_proj.bias") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for k in missing:
            qwen.get_parameter(k).zero_()
        ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
        gap = (qwen(input_ids=ids).logits - llama(input_ids=ids).logits).abs().max().item()
    print(f"qwen2 vs llama logits on the same weights: max |diff| {gap:.2e}")
    assert gap < 1e-3
    qwen.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out/smollm2-qwen2")
    out = Path(ap.parse_args().out)
    if not (out / "config.json").exists():
        write(out)
    print(out)


if __name__ == "__main__":
    main()
