"""SentencePiece tokenizers (Gemma, Phi-3, Llama 2) through edgeia3's GGUF writer: a
SentencePiece model trained here, on tiny random models of three families. llama.cpp
must tokenize like transformers and compute what transformers computes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeia3 import load_base
from edgeia3.converters.gguf.base_gguf import GGUFBase
from edgeia3.converters.gguf.hf_writer import write_hf_gguf
from edgeia3.fingerprint import identity_of_dir
from edgeia3.registry import family_for_config
from edgeia3.runtimes.llama_runtime import LlamaCppRuntime
from test_gguf_families import assert_deploys
from tiny_models import make_tiny_model

VOCAB = 300  # 256 byte-fallback pieces + a few dozen learned ones
# Ordinary text. Runs of leading spaces are where llama.cpp's SentencePiece and transformers'
# converted tokenizer are known to differ; the writer then notes "unverified" (probe text).
TEXTS = ["hello red fox", "the lazy dog\nsees the sea", "fine day, cold snow!", "zebra 42"]
OVERRIDES = {"gemma3_text": {"query_pre_attn_scalar": 16}}


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    lines = ["the quick brown fox jumps over the lazy dog", "hello world, it is a fine day",
             "red warm sun fire ice cold snow sea wet rain lake frost"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(d / "sp"), vocab_size=VOCAB,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, minloglevel=3)
    tok = d / "tok"
    tok.mkdir()
    shutil.copy(d / "sp.model", tok / "tokenizer.model")
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))
    return tok


# phi3: llama.cpp puts a space prefix before this tokenizer's first piece where transformers
# does not, so only the weights are claimed there (the writer's note says "unverified").
@pytest.mark.parametrize("family,same_tokens", [("phi3", False), ("gemma3_text", True), ("llama", True)])
def test_sentencepiece_model_through_the_writer(family, same_tokens, spm_tokenizer, tmp_path):
    # not named after the family: llama.cpp special-cases some model names (phi3)
    d = make_tiny_model(family, tmp_path / "model", vocab_size=VOCAB, **OVERRIDES.get(family, {}))
    for f in spm_tokenizer.iterdir():
        shutil.copy(f, d / f.name)
    written = write_hf_gguf(d, tmp_path / "m.gguf")
    assert written.tokenizer.startswith("SentencePiece"), written.tokenizer
    hf_tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    with LlamaCppRuntime(written.path) as rt:
        for text in TEXTS:
            ids = hf_tok(text, add_special_tokens=False)["input_ids"]
            got = rt._model.tokenize(text.encode(), add_bos=False, special=False)
            assert (got == ids) == same_tokens, (text, got, ids)
        ids = hf_tok(TEXTS[1], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        assert np.abs(rt.logits(ids) - want).max() < 5e-3
    fam = family_for_config({"model_type": family})
    assert GGUFBase(written.path).identity.matches(identity_of_dir(d, fam))
    # transformers reads the written vocabulary back (its SentencePiece GGUF path) as the same base
    assert load_base(str(written.path), quant="none").identity.matches(identity_of_dir(d, fam))
    assert_deploys(d, written.path, family, tmp_path, ids=ids)
