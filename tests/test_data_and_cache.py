"""Loss masks of the three JSONL row shapes, and where the cache lives."""

from __future__ import annotations

from pathlib import Path

from edgeia3.base import cache_home
from edgeia3.data import IGNORE, encode
from tiny_models import make_tiny_tokenizer


def trained_text(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_chat_rows_train_only_assistant_turns(tmp_path):
    tok = make_tiny_tokenizer(tmp_path)
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sky?"},
                        {"role": "assistant", "content": "blue"}, {"role": "user", "content": "grass?"},
                        {"role": "assistant", "content": "green"}]}
    ex = encode(row, tok, 512)
    # both assistant turns with their end-of-turn marker, nothing of system/user/headers
    assert trained_text(tok, ex).replace(" ", "") == "blue<|im_end|>\ngreen<|im_end|>\n".replace(" ", "")
    assert ex.target == "green" and ex.prompt == row["messages"][:-1]
    assert len(ex.input_ids) == len(ex.labels)


def test_prompt_completion_and_text_rows(tmp_path):
    tok = make_tiny_tokenizer(tmp_path)
    ex = encode({"prompt": "sea is ", "completion": "wet"}, tok, 512)
    assert trained_text(tok, ex).replace(" ", "") == "wet<|im_end|>"
    ex = encode({"text": "all of it"}, tok, 512)
    assert all(lab != IGNORE for lab in ex.labels)
    ex = encode({"text": "truncated text"}, tok, 5)
    assert len(ex.input_ids) == 5


def test_cache_home_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEIA3_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "xdg" / "edgeia3"
    monkeypatch.setenv("EDGEIA3_HOME", str(tmp_path / "mine"))
    assert cache_home() == tmp_path / "mine"
    monkeypatch.delenv("EDGEIA3_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_home() == Path.home() / ".cache" / "edgeia3"
