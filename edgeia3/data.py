"""Training data: JSONL rows in three shapes, tokenized with loss masks.

- ``{"messages": [...]}``: chat, rendered with the tokenizer's chat template;
  loss on the assistant messages only.
- ``{"prompt": ..., "completion": ...}``: plain text; loss on the completion.
- ``{"text": ...}``: plain text; loss on every token.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgeIA3Error
from .prompts import OPTION, NoChatTemplate, render_chat
from .tokens import TokenContract

IGNORE = -100
ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    prompt: Any  # what a user would send: chat messages or text (for generation)
    target: str  # the reference answer (last assistant message / completion)


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; one clear error naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise EdgeIA3Error(f"data file not found: {path}")
    rows = []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        n = raw.count(b"\n", 0, e.start) + 1
        raise EdgeIA3Error(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    for n, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgeIA3Error(f"{path}:{n}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # a number too long to convert, nesting too deep
            raise EdgeIA3Error(f"{path}:{n}: not valid JSON ({str(e).split(':')[0]})") from None
        _check_row(row, f"{path}:{n}")
        rows.append(row)
    if not rows:
        raise EdgeIA3Error(f"{path} has no rows")
    return rows


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise EdgeIA3Error(f"{where}: each line must be a JSON object")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise EdgeIA3Error(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES \
                    or not isinstance(m.get("content"), str):
                raise EdgeIA3Error(f"{where}: each message needs a role ({', '.join(sorted(ROLES))}) "
                                   "and a string content")
        if msgs[-1]["role"] != "assistant":
            raise EdgeIA3Error(f"{where}: the last message must be the assistant's answer")
    elif "prompt" in row or "completion" in row:
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise EdgeIA3Error(f"{where}: 'prompt' and 'completion' must both be strings")
    elif "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise EdgeIA3Error(f"{where}: 'text' must be a non-empty string")
    else:
        raise EdgeIA3Error(f"{where}: expected a 'messages', 'prompt'/'completion' or 'text' row, "
                           f"got keys {sorted(row)}")
    texts = [m["content"] for m in row["messages"]] if "messages" in row else \
        [row[k] for k in ("prompt", "completion", "text") if k in row]
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # JSON can escape a lone surrogate; no tokenizer can encode it
            raise EdgeIA3Error(f"{where}: a string holds an unpaired surrogate (\\ud800-\\udfff)") from None


def encode(row: dict, tokenizer: Any, max_length: int, chat_template: str | None = None) -> Example:
    """Tokenize one row; labels mask everything the model should not learn to write.
    Chat rows render with ``chat_template`` (None: the tokenizer's own). The ids start with
    the BOS the base's tokenization adds (``tokens.TokenContract``), as every runtime feeds it."""
    if "messages" in row:
        msgs = row["messages"]
        template = chat_template or tokenizer.chat_template
        text = render_chat(template, msgs, add_generation_prompt=False)
        spans = []  # character ranges of assistant turns (content + end-of-turn marker)
        for k, m in enumerate(msgs):
            if m["role"] == "assistant":
                start = len(render_chat(template, msgs[:k], add_generation_prompt=True))
                end = len(render_chat(template, msgs[: k + 1], add_generation_prompt=False))
                spans.append((start, end))
        prompt, target = msgs[:-1], msgs[-1]["content"]
    elif "prompt" in row:
        eos = tokenizer.eos_token or ""
        text = row["prompt"] + row["completion"] + eos
        spans = [(len(row["prompt"]), len(text))]
        prompt, target = row["prompt"], row["completion"]
    else:
        text, spans, prompt, target = row["text"], [(0, len(row["text"]))], row["text"], ""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    bos = TokenContract.of_tokenizer(tokenizer).bos_prefix(enc["input_ids"])
    ids, labels = list(bos), [IGNORE] * len(bos)
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        ids.append(tid)
        inside = any(s <= a and b <= e and b > a for s, e in spans)
        labels.append(tid if inside else IGNORE)
    return Example(ids[:max_length], labels[:max_length], prompt, target)


def load_examples(path: str | Path, tokenizer: Any, max_length: int,
                  chat_template: str | None = None) -> list[Example]:
    """Read and encode a JSONL file; rows left with no trainable token are refused.
    ``chat_template``: renders chat rows (None: the tokenizer's own)."""
    if tokenizer is None:
        raise EdgeIA3Error("the base model has no tokenizer; cannot encode training text")
    examples = []
    for n, row in enumerate(read_jsonl(path), start=1):
        try:
            ex = encode(row, tokenizer, max_length, chat_template)
        except NoChatTemplate:
            raise NoChatTemplate(f"{path}: row {n} is a chat row but the base has no chat template; give one "
                                 f"with {OPTION} (or write prompt/completion rows)") from None
        if all(label == IGNORE for label in ex.labels):
            raise EdgeIA3Error(f"{path}: row {n} has no answer tokens within --max-length {max_length}")
        examples.append(ex)
    return examples


BUCKET = 8  # batches sorted by length together: less padding, still shuffled across buckets


def length_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of row indices in batches: shuffled, rows of similar length together within
    each span of BUCKET batches, then the batches shuffled."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = batch_size * BUCKET
    batches = []
    for i in range(0, len(order), size):
        bucket = sorted(order[i:i + size], key=lambda j: lengths[j])
        batches += [bucket[k:k + batch_size] for k in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches
