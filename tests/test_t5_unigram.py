"""T5 whose tokenizer is only ``tokenizer.json`` (a Unigram model, no ``spiece.model``), as
transformers 5 saves a tokenizer built in memory, through edgeia3's GGUF writer and llama.cpp's
"t5" (UGM) tokenizer. Three layouts: a SentencePiece model loaded and saved again by
transformers 5, a T5Tokenizer built in memory from pieces trained here with the tokenizers
library, and a tokenizers pipeline with the charsmap nested in a Sequence normalizer and
special ids off llama.cpp's defaults. Oracles: transformers' tokenizer and model."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer, T5ForConditionalGeneration

from edgeia3 import EdgeIA3Error
from edgeia3.converters.gguf.hf_writer import write_hf_gguf
from edgeia3.converters.gguf.unigram import read_unigram
from edgeia3.converters.gguf.vocab import tokenizer_kind
from edgeia3.runtimes.t5_llama import T5LlamaRuntime
from cli_checks import assert_refused, invoke
from test_t5_gguf import SRC, TEXTS, TGT, _close, _logits, _t5_dir, unigram_tokenizer  # noqa: F401 (a fixture)
from tiny_models import VOCAB, make_tiny_t5

MORE = ["two  spaces inside", "café naïve ＡＢＣ ①", "x\ty, 你好 hello", "ZEBRA 42"]
# special tokens typed in the text: the spaces beside them are dropped by a WhitespaceSplit
# pre-tokenizer, by llama.cpp always; a bare Metaspace keeps them as "▁" pieces
SPECIAL_TEXT = "a <unk> b </s> c"


def _lines() -> list[str]:
    rng = random.Random(0)
    syllables = [a + b for a in "bdfgklmnprstvz" for b in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(300)]
    lines = ["the quick brown fox jumps over the lazy dog", "hello world, it is a fine day",
             "red warm sun fire ice cold snow sea wet rain lake frost"] * 50
    return lines + [" ".join(rng.choices(words, k=8)) for _ in range(400)]


def _charsmap(spm_dir) -> bytes:
    """The compiled normalization rules (SentencePiece's nmt_nfkc) of a trained model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((spm_dir / "spiece.model").read_bytes())
    assert proto.normalizer_spec.precompiled_charsmap
    return bytes(proto.normalizer_spec.precompiled_charsmap)


def _trained(specials: list[str], normalizer=None, pre_tokenizer=None):
    """A tokenizers Unigram model trained here on _lines(), specials first."""
    from tokenizers import Tokenizer, models, trainers

    tk = Tokenizer(models.Unigram())
    if normalizer is not None:
        tk.normalizer = normalizer
    if pre_tokenizer is not None:
        tk.pre_tokenizer = pre_tokenizer
    tk.train_from_iterator(_lines(), trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=specials,
                                                             unk_token="<unk>", show_progress=False))
    assert tk.get_vocab_size() == VOCAB
    return tk


def _layout(kind: str, spm_dir, out):
    """Save the ``kind`` tokenizer to ``out`` as transformers 5 does: tokenizer.json and
    tokenizer_config.json, no SentencePiece model."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.models.t5 import T5Tokenizer

    charsmap, meta = _charsmap(spm_dir), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    if kind == "saved":  # a spiece.model T5 tokenizer loaded and saved again
        AutoTokenizer.from_pretrained(spm_dir).save_pretrained(out)
    elif kind == "in-memory":  # transformers 5's T5Tokenizer built from pieces trained here
        tk = _trained(["<pad>", "</s>", "<unk>"], normalizers.Precompiled(charsmap),
                      pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), meta]))
        pieces = [(p, s) for p, s in json.loads(tk.to_str())["model"]["vocab"]]
        T5Tokenizer(vocab=pieces, _spm_precompiled_charsmap=charsmap, extra_ids=0).save_pretrained(out)
    else:  # "nested": a tokenizers pipeline, the charsmap inside a Sequence, unk 0 / pad 1 / eos 2
        collapse = normalizers.Replace(Regex(" {2,}"), " ")
        tk = _trained(["<unk>", "<pad>", "</s>"], normalizers.Sequence([normalizers.Precompiled(charsmap), collapse]),
                      meta)
        tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                          special_tokens=[("</s>", 2)])
        tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                eos_token="</s>").save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    return out


def _t5_with(kind, spm_dir, tmp_path, ff):
    """A tiny random T5 whose tokenizer is the ``kind`` layout (its config's special ids the
    tokenizer's); returns (dir, model, transformers tokenizer)."""
    d, model = _t5_dir(tmp_path, ff)
    _layout(kind, spm_dir, tmp_path / "tok")
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, d / f.name)
    tok = AutoTokenizer.from_pretrained(d)
    if (tok.pad_token_id, tok.eos_token_id) != (0, 1):
        cfg = json.loads((d / "config.json").read_text())
        cfg |= {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                "decoder_start_token_id": tok.pad_token_id}
        (d / "config.json").write_text(json.dumps(cfg))
        model = T5ForConditionalGeneration.from_pretrained(d).eval()
    return d, model, tok


def _fields(path) -> dict:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if k.startswith("tokenizer.")}


@pytest.mark.parametrize("kind,ff", [("saved", "relu"), ("in-memory", "gated-gelu"), ("nested", "relu")])
def test_llama_cpp_tokenizes_and_runs_a_tokenizer_json_only_t5_like_transformers(kind, ff, unigram_tokenizer,
                                                                                  tmp_path):
    d, model, tok = _t5_with(kind, unigram_tokenizer, tmp_path, ff)
    written = write_hf_gguf(d, tmp_path / "t5.gguf")
    assert written.tokenizer.startswith("Unigram tokenizer (tokenizer.json)"), written.tokenizer
    assert "counterpart" not in written.tokenizer and written.pre_verified  # llama.cpp tokenizes PROBE alike
    f = _fields(written.path)
    assert f["tokenizer.ggml.model"] == "t5"
    assert f["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(VOCAB)))
    assert bytes(f["tokenizer.ggml.precompiled_charsmap"]) == _charsmap(unigram_tokenizer)
    assert (f["tokenizer.ggml.unknown_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == (tok.unk_token_id, tok.eos_token_id, tok.pad_token_id)
    if kind == "nested":  # every id off llama.cpp's UGM defaults (pad 0, eos 1, unk 2)
        assert (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    with T5LlamaRuntime(written.path) as rt:
        for text in TEXTS + MORE + ([SPECIAL_TEXT] if kind != "nested" else []):
            assert rt.prompt_ids(text) == tok(text)["input_ids"], text  # EOS included, as transformers
        assert tok.unk_token_id in rt.prompt_ids("你好")
        got, want = rt.logits(SRC, TGT), _logits(model)
        assert got.shape == (len(TGT) + 1, VOCAB) and _close(got, want)
        assert rt.decoder_start == model.config.decoder_start_token_id


def test_tokenizer_json_writes_the_fields_spiece_model_writes(unigram_tokenizer, tmp_path):
    """The same vocabulary as spiece.model and as transformers 5 saves it: equal GGUF
    tokenizer fields (tokens, scores, types, charsmap, whitespace flags, special ids)."""
    got = {}
    for kind in ("spm", "saved"):
        d, _ = _t5_dir(tmp_path / kind, "relu")
        src = unigram_tokenizer if kind == "spm" else _layout("saved", unigram_tokenizer, tmp_path / "saved-tok")
        for f in src.iterdir():
            shutil.copy(f, d / f.name)
        assert (d / "spiece.model").exists() == (kind == "spm")
        got[kind] = _fields(write_hf_gguf(d, tmp_path / f"{kind}.gguf").path)
    spm, saved = got["spm"], got["saved"]
    for key in ("model", "pre", "tokens", "token_type", "add_space_prefix", "remove_extra_whitespaces",
                "eos_token_id", "padding_token_id"):
        assert spm[f"tokenizer.ggml.{key}"] == saved[f"tokenizer.ggml.{key}"], key
    assert np.array_equal(np.float32(spm["tokenizer.ggml.scores"]), np.float32(saved["tokenizer.ggml.scores"]))
    assert bytes(spm["tokenizer.ggml.precompiled_charsmap"]) == bytes(saved["tokenizer.ggml.precompiled_charsmap"])
    assert saved["tokenizer.ggml.unknown_token_id"] == 2 and saved["tokenizer.ggml.add_eos_token"]


def test_reading_the_normalizer_and_pre_tokenizer(tmp_path):
    """The llama.cpp settings read from a Unigram tokenizer.json: a charsmap nested in Sequences,
    whitespace collapsing from WhitespaceSplit or Replace(" {2,}"), the space prefix from
    Metaspace's scheme (or the older add_prefix_space); what llama.cpp cannot follow is named."""
    import base64

    blob = base64.b64encode(b"\x01\x02charsmap").decode()

    def read(normalizer, pre_tokenizer):
        doc = {"model": {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["\u2581a", -1.5]]},
               "normalizer": normalizer, "pre_tokenizer": pre_tokenizer}
        (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
        return read_unigram(tmp_path / "tokenizer.json")

    meta = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    u = read({"type": "Sequence", "normalizers": [
        {"type": "Sequence", "normalizers": [{"type": "Precompiled", "precompiled_charsmap": blob}]},
        {"type": "Strip", "strip_left": False, "strip_right": True},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"}]}, meta)
    assert (u.charsmap, u.add_space_prefix, u.remove_extra_whitespaces, u.unmatched) == \
        (b"\x01\x02charsmap", True, True, ())
    assert u.pieces == [("<unk>", 0.0), ("\u2581a", -1.5)] and u.unk_id == 0
    u = read(None, {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"},
                                                          meta | {"prepend_scheme": "never"}]})
    assert (u.charsmap, u.add_space_prefix, u.remove_extra_whitespaces, u.unmatched) == (b"", False, True, ())
    u = read({"type": "Lowercase"}, {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True})
    assert (u.add_space_prefix, u.remove_extra_whitespaces, u.unmatched) == (True, False, ("normalizer Lowercase",))
    u = read(None, {"type": "ByteLevel"})
    assert u.unmatched == ("pre-tokenizer ByteLevel", "no Metaspace: spaces are not written as '\u2581'")


def test_a_step_llama_cpp_cannot_follow_is_named_and_unverified(unigram_tokenizer, tmp_path):
    """A Lowercase normalizer (no llama.cpp counterpart): written, the note names it, and the
    probe text marks the tokenizer unverified."""
    from tokenizers import Tokenizer, normalizers

    d, _ = _t5_dir(tmp_path, "relu")
    for f in _layout("saved", unigram_tokenizer, tmp_path / "tok").iterdir():
        shutil.copy(f, d / f.name)
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.normalizer = normalizers.Sequence([tk.normalizer, normalizers.Lowercase()])
    tk.save(str(d / "tokenizer.json"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(cfg | {"tokenizer_class": "PreTrainedTokenizerFast"}))
    written = write_hf_gguf(d, tmp_path / "t5.gguf")
    assert "normalizer Lowercase" in written.tokenizer and "unverified" in written.tokenizer
    assert not written.pre_verified


def test_an_unsupported_tokenizer_json_model_is_one_error_naming_the_file(tmp_path):
    """A WordPiece tokenizer.json: write_hf_gguf and `export gguf` refuse it with one error that
    names the file and its model type; nothing is written; the base is not GGUF-writable."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path / "t5"
    make_tiny_t5(d, "relu")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[SEP]", "[UNK]", *"abcdefghij"])}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[SEP]").save_pretrained(d)
    path = d / "tokenizer.json"
    assert tokenizer_kind(d) is None
    with pytest.raises(EdgeIA3Error) as e:
        write_hf_gguf(d, tmp_path / "t.gguf")
    assert str(path) in str(e.value) and "'WordPiece'" in str(e.value)
    assert not (tmp_path / "t.gguf").exists()
    out = tmp_path / "e"
    res = invoke("export", "gguf", "--base", d, "--quant", "f32", "--out", out)
    assert_refused(res, out, "tokenizer.json", "wordpiece", "convert_hf_to_gguf")
    assert res.output.lower().count("error") == 1
