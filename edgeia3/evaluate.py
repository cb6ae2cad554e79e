"""Evaluation used by training: eval loss, and exact-match accuracy by greedy
generation when the answers are short labels."""

from __future__ import annotations

from typing import Any

import torch

from .data import IGNORE, Example
from .prompts import render_chat
from .tokens import TokenContract, hf_encoder

SHORT_ANSWER_TOKENS = 48  # answers up to this long count as "short labels"
BATCH = 16


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids, mask


def eval_loss(model: Any, examples: list[Example], pad: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), BATCH):
            chunk = examples[i:i + BATCH]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, e in enumerate(chunk):
                ids[r, :len(e.input_ids)] = torch.tensor(e.input_ids)
                labels[r, :len(e.labels)] = torch.tensor(e.labels)
                mask[r, :len(e.input_ids)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=IGNORE, reduction="sum")
            total += float(loss)
            count += int((target != IGNORE).sum())
    return total / max(1, count)


def prompt_text(tokenizer: Any, prompt: Any, chat_template: str | None = None) -> str:
    """``prompt`` as text; chat renders with ``chat_template`` (None: the tokenizer's own)."""
    return prompt if isinstance(prompt, str) else render_chat(chat_template or tokenizer.chat_template, prompt)


def greedy_answers(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int,
                   chat_template: str | None = None) -> list[str]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    contract, encode = TokenContract.of_tokenizer(tokenizer), hf_encoder(tokenizer)  # as training encoded them
    answers = []
    with torch.no_grad():
        for i in range(0, len(prompts), BATCH):
            seqs = [contract.ids(encode, prompt_text(tokenizer, p, chat_template)) for p in prompts[i:i + BATCH]]
            ids, mask = _left_pad(seqs, pad)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
            answers += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return answers


def evaluate(model: Any, tokenizer: Any, examples: list[Example] | None,
             accuracy: bool | None = None, chat_template: str | None = None) -> dict | None:
    """Eval loss, plus exact-match accuracy (None = auto: only for short answers).
    ``chat_template``: what the training rows were rendered with (None: the tokenizer's)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result: dict = {"rows": len(examples), "loss": round(eval_loss(model, examples, pad), 5)}
    target_lens = [len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in examples]
    if accuracy is None:
        accuracy = all(0 < n <= SHORT_ANSWER_TOKENS for n in target_lens)
    if accuracy:
        preds = greedy_answers(model, tokenizer, [e.prompt for e in examples], max(target_lens) + 4,
                               chat_template)
        hits = [p.strip() == e.target.strip() for p, e in zip(preds, examples)]
        result["accuracy"] = round(sum(hits) / len(hits), 4)
        result["samples"] = [{"target": e.target, "prediction": p}
                             for e, p in list(zip(examples, preds))[:3]]
    if was_training:
        model.train()
    return result
