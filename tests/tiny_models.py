"""Tiny random models, one per registered family, built from configs (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=16)
    if family == "phi3":
        return tf.Phi3Config(**common, pad_token_id=0)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    if family == "falcon":  # FalconConfig's defaults (multi_query, parallel attention, no biases)
        return tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "falcon"]


def make_tiny_model(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random causal LM of ``family`` to ``out`` and return the path."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(family)
    for k, v in overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms/biases so no site is trivially symmetric
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def input_ids(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = input_ids() if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _randomize_and_save(pm, out: Path, seed: int) -> None:
    """Every IA3 vector of the PEFT model ``pm`` to 1 + 0.2 * N(0, 1) (seeded), saved to ``out``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)


def random_peft_adapter(model, family_name: str, out: Path, seed: int = 1, sites=None):
    """Wrap ``model`` with PEFT IA3 on the registry's default sites, randomize, save to ``out``."""
    from peft import IA3Config, get_peft_model

    from edgeia3.formats.peft_dir import peft_target_modules
    from edgeia3.registry import get_family

    fam = get_family(family_name)
    targets, ff = peft_target_modules(fam, list(sites or fam.default_targets))
    cfg = IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=ff,
                    fan_in_fan_out=fam.conv1d)
    pm = get_peft_model(model, cfg)
    _randomize_and_save(pm, out, seed)
    return pm


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(out: Path, bpe: bool = False):
    """A character-level fast tokenizer (< VOCAB ids) with a chat template, saved to ``out``
    (``bpe``: as a BPE model without merges, which edgeia3's GGUF writer accepts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_end|>", "<|im_start|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    if bpe:
        vocab.update({f"<unused{i}>": i for i in range(len(vocab), VOCAB)})  # the model's full vocab
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>") if bpe
                    else models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def write_label_task(path: Path, rows: int = 48, seed: int = 0) -> Path:
    """A tiny chat task: a word -> one of three labels (deterministic)."""
    import json
    import random

    rng = random.Random(seed)
    labels = {"red": "warm", "sun": "warm", "fire": "warm", "ice": "cold", "snow": "cold", "sea": "wet",
              "rain": "wet", "lake": "wet", "frost": "cold"}
    words = sorted(labels)
    with open(path, "w") as f:
        for _ in range(rows):
            w = rng.choice(words)
            msgs = [{"role": "user", "content": w}, {"role": "assistant", "content": labels[w]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def make_tiny_t5(out: Path, feed_forward_proj: str = "relu", **overrides):
    """Save a tiny random T5 (``relu``: the original MLP, ``gated-gelu``: Flan-T5's) to ``out``;
    returns the model (eval mode)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                   feed_forward_proj=feed_forward_proj, decoder_start_token_id=0, eos_token_id=1, **overrides)
    model = T5ForConditionalGeneration(cfg)
    with torch.no_grad():  # random norms so no site is trivially symmetric
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return model.eval()


def random_t5_peft_adapter(model, out: Path, seed: int = 1, every_site: bool = False):
    """PEFT's own IA3 defaults for t5 (k, v, wo in every stack), or every edgeia3 site
    (q, k, v, o of the three attentions and both wo), randomized and saved to ``out``."""
    from peft import IA3Config, get_peft_model

    kw = {"target_modules": ["q", "k", "v", "o", "wo"], "feedforward_modules": ["wo"]} if every_site else {}
    pm = get_peft_model(model, IA3Config(task_type="SEQ_2_SEQ_LM", **kw))
    _randomize_and_save(pm, out, seed)
    return pm.eval()


def make_tiny_t5_tokenizer(out: Path):
    """``make_tiny_tokenizer``'s characters as a T5 tokenizer is to edgeia3: no chat template, ids
    decode back to the text, pad 0 (make_tiny_t5's decoder start) and EOS 1 (its eos_token_id)."""
    from tokenizers import decoders

    fast = make_tiny_tokenizer(out)
    fast.backend_tokenizer.decoder = decoders.Fuse()
    fast.chat_template = None
    (Path(out) / "chat_template.jinja").unlink(missing_ok=True)
    fast.save_pretrained(out)
    assert (fast.pad_token_id, fast.eos_token_id) == (0, 1)
    return fast
