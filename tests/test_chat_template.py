"""Bases without a chat template: `--chat-template chatml|FILE` on train and run, recorded
in the adapter, carried into exports, and rendered to the same tokens by torch,
onnxruntime-genai and llama.cpp. Expected prompts are built here by plain string
formatting, never by edgeia3's own renderer."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from cli_checks import assert_refused, invoke
from edgeia3.adapter import IA3Adapter
from edgeia3.errors import EdgeIA3Error
from edgeia3.export import export_gguf, export_onnx
from edgeia3.manifest import read_manifest
from edgeia3.run import run
from edgeia3.runtimes import open_runtime, prompt_ids_for
from tiny_models import make_tiny_model, write_label_task

MSGS = [{"role": "system", "content": "label it"}, {"role": "user", "content": "sun"}]
# A template of our own for the FILE form: "[role] content" lines.
FILE_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")
TRAIN = ["--quant", "none", "--max-steps", "2", "--batch-size", "4", "--quiet"]


def chatml(messages) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) \
        + "<|im_start|>assistant\n"


def bracketed(messages) -> str:
    return "".join(f"[{m['role']}] {m['content']}\n" for m in messages) + "[assistant] "


def one_line(text: str) -> str:
    return " ".join(text.lower().split())


def byte_level_tokenizer(out) -> None:
    """Byte-level BPE over printable ASCII with NO chat template (as test_serve's, which loads in
    transformers, onnxruntime-genai and llama.cpp alike)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_end|>", "<|im_start|>"]
    alphabet = sorted(c for c in pre_tokenizers.ByteLevel.alphabet() if 33 <= ord(c) <= 126) + ["Ġ", "Ċ"]
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    merges = [("s", "u"), ("a", "r"), ("Ġ", "i")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                            additional_special_tokens=["<|im_start|>"]).save_pretrained(out)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny llama whose tokenizer has no chat template, chat rows, a template file."""
    tmp = tmp_path_factory.mktemp("chat_template")
    base = make_tiny_model("llama", tmp / "base", seed=0)
    byte_level_tokenizer(base)
    tok = AutoTokenizer.from_pretrained(base)
    assert tok.chat_template is None
    (tmp / "brackets.jinja").write_text(FILE_TEMPLATE)
    return {"tmp": tmp, "base": base, "file": tmp / "brackets.jinja",
            "data": write_label_task(tmp / "train.jsonl", 8),
            "ids": lambda text: tok(text, add_special_tokens=False)["input_ids"]}


@pytest.fixture(scope="module")
def trained(env):
    """Two adapters trained through the CLI: with the built-in ChatML and with the template file."""
    out = {}
    for name, value in (("chatml", "chatml"), ("file", env["file"])):
        out[name] = env["tmp"] / f"ad_{name}"
        res = invoke("train", "--base", env["base"], "--data", env["data"], "--out", out[name],
                     "--chat-template", value, *TRAIN)
        assert res.exit_code == 0, res.output
    return out


def test_train_refuses_chat_rows_without_a_template(env):
    out = env["tmp"] / "refused"
    res = invoke("train", "--base", env["base"], "--data", env["data"], "--out", out, *TRAIN)
    assert_refused(res, out, "--chat-template chatml|FILE", "train.jsonl")
    assert "--raw" not in res.output  # train has no such option


def test_bad_template_files_are_named(env):
    broken = env["tmp"] / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    for path in (env["tmp"] / "missing.jinja", broken):
        out = env["tmp"] / "refused_bad"
        res = invoke("train", "--base", env["base"], "--data", env["data"], "--out", out,
                     "--chat-template", path, *TRAIN)
        assert_refused(res, out, "--chat-template", str(path))
    res = invoke("run", "--model", env["base"], "--prompt", "sun", "--chat-template", broken)
    assert res.exit_code == 2 and str(broken).lower() in one_line(res.output), res.output


def test_adapters_record_the_template_they_were_trained_with(env, trained):
    recorded = {n: IA3Adapter.load(d).extra.get("chat_template") for n, d in trained.items()}
    assert recorded["file"] == FILE_TEMPLATE
    assert recorded["chatml"] and recorded["chatml"] != FILE_TEMPLATE
    for name, source in (("chatml", "chatml"), ("file", str(env["file"]))):
        assert json.loads((trained[name] / "training.json").read_text())["chat_template"] == source
    shown = invoke("inspect", trained["chatml"])
    assert shown.exit_code == 0 and "chatml (built-in)" in shown.output, shown.output


def test_run_renders_the_recorded_template_and_the_option_overrides_it(env, trained):
    base, ids = env["base"], env["ids"]
    user = [MSGS[1]]
    for name, render in (("chatml", chatml), ("file", bracketed)):
        res = run(base, "sun", adapter=name, adapters={name: str(trained[name])}, max_tokens=2)
        assert res.prompt_ids == ids(render(user))
    res = run(base, "sun", adapter="c", adapters={"c": str(trained["chatml"])}, max_tokens=2,
              chat_template=str(env["file"]))
    assert res.prompt_ids == ids(bracketed(user))
    # the CLI: the recorded template without repeating the option; the base alone has none
    ok = invoke("run", "--model", base, "--with", f"c={trained['chatml']}", "--adapter", "c",
                "--prompt", "sun", "--max-tokens", "2")
    assert ok.exit_code == 0, ok.output
    res = invoke("run", "--model", base, "--prompt", "sun", "--max-tokens", "2")
    assert res.exit_code == 2
    assert "--chat-template chatml|file" in one_line(res.output) and "--raw" in res.output
    ok = invoke("run", "--model", base, "--prompt", "sun", "--max-tokens", "2", "--chat-template", "chatml")
    assert ok.exit_code == 0, ok.output


def test_every_runtime_renders_the_same_tokens(env, trained):
    tmp, ids = env["tmp"], env["ids"]
    want = {"chatml": ids(chatml(MSGS)), "file": ids(bracketed(MSGS))}
    torch_rt = open_runtime(env["base"], adapters={n: str(p) for n, p in trained.items()})
    for name in trained:
        torch_rt.use_adapter(name)
        assert torch_rt.prompt_ids(MSGS) == want[name]
    torch_rt.close()

    # ONNX: one adapter; the base has no template, so the export carries the adapter's
    onnx = export_onnx(str(env["base"]), tmp / "onnx", "fp32", adapters={"c": str(trained["chatml"])}).out
    assert (onnx / "chat_template.jinja").read_text() == IA3Adapter.load(trained["chatml"]).extra["chat_template"]
    rt = open_runtime(onnx)
    assert rt.name == "onnxruntime-genai"
    rt.use_adapter("c")
    assert rt.prompt_ids(MSGS) == want["chatml"]
    rt.use_adapter(None)  # the carried template serves the base too
    assert rt.prompt_ids(MSGS) == want["chatml"]
    rt.close()
    # report's PyTorch reference renders its chat prompts as the export does
    res = invoke("report", onnx, "--out", tmp / "report", "--runs", "1", "--eval-rows", "2",
                 "--eval", f"c={env['data']}")
    assert res.exit_code == 0, res.output

    # GGUF: two adapters with different templates: each renders its own, the base has none
    gguf = export_gguf(str(env["base"]), tmp / "gguf", quant="f32",
                       adapters={n: str(p) for n, p in trained.items()}).out
    assert not (gguf / "chat_template.jinja").exists()
    assert read_manifest(gguf).adapters["file"].chat_template == FILE_TEMPLATE
    rt = open_runtime(gguf, n_ctx=128)
    assert rt.name == "llama.cpp"
    for name in trained:
        rt.use_adapter(name)
        assert rt.prompt_ids(MSGS) == want[name]
    assert prompt_ids_for(rt, MSGS, "chatml") == want["chatml"]  # the server renders before swapping
    rt.use_adapter(None)
    with pytest.raises(EdgeIA3Error, match="--chat-template chatml\\|FILE"):
        rt.prompt_ids(MSGS)
    rt.close()
    rt = open_runtime(gguf, n_ctx=128, chat_template=str(env["file"]))  # the option wins over recorded
    rt.use_adapter("chatml")
    assert rt.prompt_ids(MSGS) == want["file"]
    rt.close()
