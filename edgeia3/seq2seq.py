"""Training encoder-decoder (T5 / Flan-T5) models: data encoding, batches, loss, evaluation.

train.py runs the same loop for every family (schedule, gradient guards, progress,
saving); where an encoder-decoder model differs it calls into this module through
``tasks.SEQ2SEQ``, chosen once by the registry (``Family.encoder_decoder``), never by family name.

Rows are the JSONL the decoder-only path reads (data.py); for an encoder-decoder model

- ``prompt``/``completion``: the prompt is the encoder input, the completion the decoder target;
- ``messages``: the conversation before the last message (which must be the assistant's)
  is the encoder input, rendered as text by a chat template - the one given with
  ``--chat-template``, else the tokenizer's own, else ``prompts.FLAT_CHAT`` (T5 has no chat
  template): a lone user message is its content as is (so it trains exactly like a
  prompt/completion row), anything longer one ``role: content`` line per message. The
  template used is recorded in the adapter, so run / serve render prompts the same way;
  the last assistant message is the decoder target;
- ``text``: refused (no input / target split).

Encoder input = tokens of the prompt text + EOS (what T5 tokenizers add, and what
runtimes send); labels = tokens of the target + EOS; decoder inputs are the model's
own right shift of the labels (``labels=``: decoder_start_token_id, then the labels).
Each side is cut to ``--max-length`` tokens, keeping the encoder's EOS.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from .data import IGNORE, Example, length_batches, read_jsonl
from .errors import EdgeIA3Error
from .evaluate import BATCH, SHORT_ANSWER_TOKENS
from .prompts import FLAT_CHAT, render_chat
from .tokens import TokenContract, hf_encoder

QUANTS = ("none",)  # what encoder-decoder training runs on ("auto" picks none)


def _quant_error(name: str, quant: str) -> EdgeIA3Error:
    return EdgeIA3Error(f"--quant {quant}: training {name} (encoder-decoder) models runs in full precision only "
                        f"(--quant {' | '.join(QUANTS)}; auto picks none); 4-bit training (nf4, gguf, "
                        "q4_0, ...) exists for decoder-only families")


def training_quant(base: str, quant: str) -> str:
    """``quant`` to load ``base`` with for training: for an encoder-decoder model in a local
    directory "auto" becomes "none" and anything else but "none" is refused before loading;
    other bases (and hub ids, checked by ``check_loaded`` once loaded) keep ``quant``."""
    from .base import QUANTS as ALL_QUANTS, locate_base
    from .fingerprint import hf_config
    from .registry import family_for_config

    if quant not in ALL_QUANTS:
        return quant  # load_base names the ones that exist
    try:
        gguf, hf = locate_base(base)
    except EdgeIA3Error:
        return quant  # load_base says what is wrong with it
    if gguf is not None or not (Path(hf) / "config.json").is_file():
        return quant
    family = family_for_config(hf_config(hf))
    if not family.encoder_decoder:
        return quant
    if quant == "auto":
        return "none"
    if quant not in QUANTS:
        raise _quant_error(family.name, quant)
    return quant


def check_loaded(lb: Any) -> None:
    if lb.quant not in QUANTS:
        raise _quant_error(lb.family.name, lb.quant)


def chat_template(given: str | None, tokenizer: Any) -> str:
    """The template chat rows render with: given > the tokenizer's own > FLAT_CHAT."""
    return given or getattr(tokenizer, "chat_template", None) or FLAT_CHAT


def source_ids(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """Encoder input: the text's tokens wrapped as the tokenizer's own defaults do (T5: + EOS,
    kept when cut to ``max_length``)."""
    contract = TokenContract.of_tokenizer(tokenizer, encoder_source=True)
    room = max_length - int(contract.add_bos) - int(contract.add_eos)
    return contract.wrap(hf_encoder(tokenizer)(text)[:room])


def encode(row: dict, tokenizer: Any, max_length: int, template: str, where: str) -> Example:
    """One row as an Example: ``input_ids`` the encoder input, ``labels`` the decoder target."""
    if "messages" in row:
        prompt, target = row["messages"][:-1], row["messages"][-1]["content"]
        text = render_chat(template, prompt, add_generation_prompt=True) if prompt else ""
    elif "prompt" in row:
        prompt, target = row["prompt"], row["completion"]
        text = prompt
    else:
        raise EdgeIA3Error(f"{where}: a 'text' row has no input / target split for an encoder-decoder model; "
                           "write prompt/completion or messages rows")
    labels = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(source_ids(tokenizer, text, max_length), labels[:max_length], prompt, target)


def load_examples(path: str | Path, tokenizer: Any, max_length: int, template: str) -> list[Example]:
    """Read and encode a JSONL file for an encoder-decoder model (see the module docstring)."""
    if tokenizer is None:
        raise EdgeIA3Error("the base model has no tokenizer; cannot encode training text")
    if tokenizer.eos_token_id is None:
        raise EdgeIA3Error("the base model's tokenizer has no EOS token; cannot end the targets")
    examples = [encode(row, tokenizer, max_length, template, f"{path}: row {n}")
                for n, row in enumerate(read_jsonl(path), start=1)]
    # transformers builds an empty T5 tokenizer for a model directory without tokenizer files
    # (every character unknown): no target decodes back to any of its text
    answers = [e for e in examples if e.target.strip()]
    if answers and not any(tokenizer.decode(e.labels, skip_special_tokens=True).strip() for e in answers):
        raise EdgeIA3Error(f"{path}: the base's tokenizer turns every answer into unknown or special tokens: "
                           "are its tokenizer files missing?")
    return examples


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for r, ids in enumerate(rows):
        out[r, :len(ids)] = torch.tensor(ids)
    return out


def collate(chunk: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(encoder ids, labels, encoder mask), right-padded (labels with IGNORE)."""
    ids = _pad([e.input_ids for e in chunk], pad_id)
    mask = _pad([[1] * len(e.input_ids) for e in chunk], 0)
    return ids, _pad([e.labels for e in chunk], IGNORE), mask


def batches(examples: list[Example], batch_size: int, rng: random.Random, pad_id: int):
    """One epoch of shuffled batches, rows of similar length together (as tasks.batches)."""
    for rows in length_batches([len(e.input_ids) + len(e.labels) for e in examples], batch_size, rng):
        yield collate([examples[j] for j in rows], pad_id)


def loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the target tokens; the model shifts the labels into decoder inputs."""
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def tokens(mask: torch.Tensor, labels: torch.Tensor) -> int:
    """Tokens a step processed: encoder inputs + decoder targets."""
    return int(mask.sum()) + int((labels != IGNORE).sum())


def evaluate(model: Any, tokenizer: Any, examples: list[Example] | None, accuracy: bool | None = None,
             template: str | None = None) -> dict | None:
    """Eval loss and (None = auto: for short answers) exact-match accuracy by greedy generation,
    the same report as evaluate.evaluate."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count, preds = 0.0, 0, []
    target_lens = [len(e.labels) - 1 for e in examples]
    if accuracy is None:
        accuracy = all(0 < n <= SHORT_ANSWER_TOKENS for n in target_lens)
    with torch.no_grad():
        for i in range(0, len(examples), BATCH):
            ids, labels, mask = collate(examples[i:i + BATCH], pad)
            logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             labels.reshape(-1), ignore_index=IGNORE,
                                                             reduction="sum"))
            count += int((labels != IGNORE).sum())
            if accuracy:
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(target_lens) + 4,
                                     do_sample=False, num_beams=1)
                preds += tokenizer.batch_decode(out, skip_special_tokens=True)
    result: dict = {"rows": len(examples), "loss": round(total / max(1, count), 5)}
    if accuracy:
        hits = [p.strip() == e.target.strip() for p, e in zip(preds, examples)]
        result["accuracy"] = round(sum(hits) / len(hits), 4)
        result["samples"] = [{"target": e.target, "prediction": p} for e, p in list(zip(examples, preds))[:3]]
    if was_training:
        model.train()
    return result
