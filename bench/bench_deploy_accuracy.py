"""Task accuracy of the trained model vs every deployed form of it, on the example tasks.

For each task: train with the README's command (defaults: the embedded GGUF's own
Q4_1 blocks), export GGUF (side + merged) and int4 ONNX (side + merged), and score
exact-match accuracy on the full eval split with the stock runtimes
(llama.cpp through llama-cpp-python, onnxruntime-genai) next to PyTorch running
the model the adapter was trained as. One run, one machine. One more column drives stock
llama-cpp-python as a user would: ``Llama(model_path=merged GGUF)`` and
``create_chat_completion`` (greedy), the prompt rendered by llama-cpp-python from the export's
chat template and tokenized by its defaults - no edgeia3 code on that path.

    python bench/bench_deploy_accuracy.py --out bench-out/deploy [--tasks sentiment,intent,extract]
        [--base DIR]   # another base, e.g. bench/smollm2_as_qwen2.py's second-family model
        [--base gemma3-270m --prompt-rows]   # a base model: no chat template of its own

``--prompt-rows`` turns each task's chat rows into prompt/completion rows (``prompt_row``), as
for a base model with no chat template: the completion ends with the tokenizer's EOS, where every
runtime stops. (``--chat-template chatml`` also trains, but on a base whose vocabulary has no
``<|im_end|>`` token the model learns to write it as text and no runtime stops there.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import header, prompt_rows, table

ROOT = Path(__file__).resolve().parents[1]


def edgeia3(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgeia3.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")


def stock_llama(path: Path, **kw):
    """llama-cpp-python's ``Llama`` with its defaults, except llama.cpp's CPU weight repacking
    (``use_extra_bufts``), which ``Llama()`` does not expose: on CPUs with AMX the repacked
    quantized weights crash the first decode (FACTS.md; llama-server's ``--no-repack``)."""
    import llama_cpp
    import llama_cpp.llama_cpp as ll

    defaults = ll.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    ll.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, seed=0, **kw)
    finally:
        ll.llama_model_default_params = defaults


def query(row: dict) -> tuple:
    """(prompt: messages or text, reference answer) of a chat or prompt/completion row."""
    if "messages" in row:
        return row["messages"][:-1], row["messages"][-1]["content"]
    return row["prompt"], row["completion"]


def accuracy(rt, ref_tokenizer_ids, rows: list[dict]) -> float:
    """Exact match of greedy answers (edgeia3.report.accuracy, for prompt rows too)."""
    hits = 0
    for row in rows:
        prompt, target = query(row)
        n = len(ref_tokenizer_ids(target)) + 4
        hits += rt.detokenize(list(rt.generate_ids(rt.prompt_ids(prompt), n))).strip() == target.strip()
    return hits / len(rows)


def stock_accuracy(export: Path, ref_tokenizer_ids, rows: list[dict]) -> float:
    """Exact match of stock llama-cpp-python's greedy answers on a merged GGUF export:
    ``create_completion`` for prompt rows, ``create_chat_completion`` for chat rows (the export's
    ``chat_template.jinja`` where the base has no template of its own, else the GGUF's)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = stock_llama(export / "model.gguf", n_ctx=1024)
    template = export / "chat_template.jinja"
    if template.exists():
        special = {k: llm.detokenize([t], special=True).decode() for k, t in
                   (("bos_token", llm.token_bos()), ("eos_token", llm.token_eos()))}
        llm.chat_handler = Jinja2ChatFormatter(template.read_text(), **special).to_chat_handler()
    hits = 0
    for row in rows:
        prompt, target = query(row)
        n = len(ref_tokenizer_ids(target)) + 4
        if isinstance(prompt, str):
            text = llm.create_completion(prompt, max_tokens=n, temperature=0.0)["choices"][0]["text"]
        else:
            out = llm.create_chat_completion(messages=prompt, temperature=0.0, max_tokens=n)
            text = out["choices"][0]["message"]["content"] or ""
        hits += text.strip() == target.strip()
    llm.close()
    return hits / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out/deploy")
    ap.add_argument("--tasks", default="sentiment,intent,extract")
    ap.add_argument("--epochs", default="2")
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--base", default="default")
    ap.add_argument("--chat-template", default=None, help="train --chat-template (chatml|FILE): a base with none")
    ap.add_argument("--prompt-rows", action="store_true", help="train and score prompt/completion rows (prompt_row)")
    ap.add_argument("--no-torch-column", action="store_true",
                    help="skip re-scoring the trained model in PyTorch (training.json has it; slow on long answers)")
    args = ap.parse_args()
    header("deployed vs trained task accuracy")
    from edgeia3.data import read_jsonl
    from edgeia3.export import read_export
    from edgeia3.report import reference_base, trained_as
    from edgeia3.runtimes import open_runtime
    from edgeia3.runtimes.torch_runtime import TorchRuntime

    out = Path(args.out)
    rows_out = []
    for task in args.tasks.split(","):
        data = ROOT / "examples" / "tasks" / task
        if args.prompt_rows:
            data = prompt_rows(data, out / "data" / task)
        ad = out / task
        if not ad.exists():
            extra = ["--chat-template", args.chat_template] if args.chat_template else []
            extra += ["--max-eval", str(args.rows)] if args.rows < 100 else []  # the same rows as below
            edgeia3("train", "--base", args.base, "--data", str(data / "train.jsonl"), "--eval", str(data / "eval.jsonl"),
                    "--out", str(ad), "--epochs", args.epochs, "--quiet", *extra)
        exports = {
            "gguf side": ["export", "gguf", "--base", args.base, "--adapter", f"{task}={ad}"],
            "gguf merged": ["export", "gguf", "--base", args.base, "--adapter", f"{task}={ad}", "--merge", task],
            "onnx int4 side": ["export", "onnx", "--base", args.base, "--adapter", f"{task}={ad}"],
            "onnx int4 merged": ["export", "onnx", "--base", args.base, "--adapter", f"{task}={ad}",
                                 "--merge", task],
        }
        rows = read_jsonl(data / "eval.jsonl")[: args.rows]
        tr = json.loads((ad / "training.json").read_text())
        dirs = {}
        for label, cmd in exports.items():
            d = out / f"{task}-{label.replace(' ', '-')}"
            if not d.exists():
                edgeia3(*cmd, "--out", str(d))
            dirs[label] = d
        first = read_export(dirs["gguf side"])
        adapter = first.adapters()[task]
        ref_base, _ = reference_base(first.base_spec, trained_as(adapter))
        tok = lambda s: ref_base.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        torch_acc = "-"
        if not args.no_torch_column:  # the model the adapter was trained as, in PyTorch
            ref = TorchRuntime(ref_base, {task: adapter})
            ref.use_adapter(task)
            torch_acc = f"{accuracy(ref, tok, rows):.1%}"
        row = {"task": task, "trained (training.json)": f"{tr['eval_after']['accuracy']:.1%}",
               "trained (torch, same scorer)": torch_acc}
        for label, d in dirs.items():
            rt = open_runtime(d)
            rt.use_adapter(task)
            row[label] = f"{accuracy(rt, tok, rows):.1%}"
            getattr(rt, "close", lambda: None)()
        row["gguf merged, stock llama-cpp-python"] = f"{stock_accuracy(dirs['gguf merged'], tok, rows):.1%}"
        row["rows"] = len(rows)
        row["train s"] = round(tr["wall_seconds"])
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(table(rows_out))


if __name__ == "__main__":
    main()
