"""The training task: what differs between a decoder-only and an encoder-decoder model, chosen once.

train.py runs one loop for every family (schedule, gradient guards, progress, saving) and asks
a ``Task`` for everything that depends on the kind of model - how rows are encoded, batched,
scored and evaluated - as mlx-lm's ``trainer.train(..., loss=, iterate_batches=)`` takes them.
``task_for`` picks it from the registry (``Family.encoder_decoder``), never by family name.

The decoder-only pieces (batches cut after the last labelled token, the labelled-position
loss, the early signal's probe) live here; the encoder-decoder ones in seq2seq.py.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import data, evaluate, seq2seq
from .data import IGNORE, Example, length_batches

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (input ids, labels, attention mask)


@dataclass(frozen=True)
class Task:
    """How one kind of model trains; every field is a function train() calls as is."""

    name: str
    # Refuses a loaded base this task cannot train (encoder-decoder: full precision only).
    check_loaded: Callable[[Any], None]
    # (given template or None, tokenizer) -> the template chat rows render with.
    chat_template: Callable[[str | None, Any], str | None]
    # (JSONL path, tokenizer, max length, template) -> encoded rows.
    load_examples: Callable[[str | Path, Any, int, str | None], list[Example]]
    # (rows, batch size, rng, pad id) -> one epoch of shuffled batches.
    batches: Callable[[list[Example], int, random.Random, int], Iterator[Batch]]
    # (model, ids, mask, labels) -> the mean training loss of a batch.
    loss: Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # (mask, labels) -> the tokens a step processed (throughput).
    tokens: Callable[[torch.Tensor, torch.Tensor], int]
    # (model, tokenizer, rows, accuracy, template) -> eval loss (+ exact-match accuracy).
    evaluate: Callable[..., dict | None]
    # (model, rows, pad id, device, bf16) -> eval loss at the early signal's checkpoints;
    # None: the early signal reads the training loss instead.
    probe_loss: Callable[..., float] | None


def task_for(family: Any, processes: int = 1) -> Task:
    """The task ``family`` trains as; ``processes`` > 1: under DDP, which syncs gradients only
    through the model's own forward, so a decoder-only model's loss is its ``labels=`` loss."""
    if family.encoder_decoder:
        return SEQ2SEQ
    return CAUSAL if processes == 1 else CAUSAL_DDP


def labelled_len(e: Example) -> int:
    """Length up to and including the last labelled token (all of it when nothing is labelled)."""
    last = max((i for i, x in enumerate(e.labels) if x != IGNORE), default=len(e.labels) - 1)
    return last + 1


def batches(examples: list[Example], batch_size: int, rng: random.Random, pad_id: int) -> Iterator[Batch]:
    """One epoch of shuffled decoder-only batches, rows of similar length together."""
    for rows in length_batches([labelled_len(e) for e in examples], batch_size, rng):
        chunk = [examples[j] for j in rows]
        # Tokens after a row's last labelled one cannot change the (causal) loss: cut them.
        width = max(labelled_len(e) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            n = min(len(e.input_ids), width)
            ids[r, :n] = torch.tensor(e.input_ids[:n])
            labels[r, :n] = torch.tensor(e.labels[:n])
            mask[r, :n] = 1
        yield ids, labels, mask


def labelled_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, with the LM head applied at
    those positions only (on label-style rows nearly every other position is wasted work;
    the head is ~20% of SmolLM2's FLOPs). Same value as the model's own ``labels=`` loss."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)  # gemma2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits, target[keep])


def model_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's own ``labels=`` loss (its full forward)."""
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def probe_loss(model: Any, rows: list[Example], pad: int, device: torch.device, bf16: bool) -> float:
    """Loss per answer of ``rows`` (labelled-token loss summed per row, averaged over rows),
    computed as training computes its loss (labelled_loss, the same autocast): the early
    signal's eval points."""
    total = 0.0
    with torch.no_grad():
        for ids, labels, mask in batches(rows, len(rows), random.Random(0), pad):
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            n = int((labels[:, 1:] != IGNORE).sum())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                total += float(labelled_loss(model, ids, mask, labels)) * n
    return total / max(1, len(rows))


def _any_base(lb: Any) -> None:
    """Decoder-only training runs on every quantization load_base gives."""


def _given_or_own(given: str | None, tokenizer: Any) -> str | None:
    return given or getattr(tokenizer, "chat_template", None)


def _all_tokens(mask: torch.Tensor, labels: torch.Tensor) -> int:
    return int(mask.sum())


CAUSAL = Task("decoder-only", _any_base, _given_or_own, data.load_examples, batches, labelled_loss, _all_tokens,
              evaluate.evaluate, probe_loss)
CAUSAL_DDP = dataclasses.replace(CAUSAL, loss=model_loss)
SEQ2SEQ = Task("encoder-decoder", seq2seq.check_loaded, seq2seq.chat_template, seq2seq.load_examples,
               seq2seq.batches, seq2seq.loss, seq2seq.tokens, seq2seq.evaluate, None)
