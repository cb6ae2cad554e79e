"""Render a report document (report.json's dict) as Markdown tables and PNG charts."""

from __future__ import annotations

from pathlib import Path


def _mb(n: int | None) -> str:
    return "-" if n is None else (f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB")


def _t(seconds: float) -> str:
    """A duration in the unit that keeps 2-3 significant digits."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _ms(s: dict | float | None) -> str:
    if s is None:
        return "-"
    if isinstance(s, dict):
        return f"{_t(s['median'])} ({_t(s['min'])}–{_t(s['max'])})"
    return _t(s)


def _tps(s: dict | None) -> str:
    return "-" if not s else f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def render_markdown(doc: dict, charts: list[str]) -> str:
    m = doc["machine"]
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items() if x)
    lines = ["# edgeia3 report", "", f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}.  ",
             f"Versions: {v}.", "", "Latencies are medians of "
             f"{doc['options']['runs']} runs after one warm-up (min–max in brackets).", ""]
    lines += ["## Size", "", "| export | base | adapter | adapter file | IA3 vectors | LoRA r=8 (same modules) "
              "| LoRA / IA3 |", "|---|---|---|---|---|---|---|"]
    for e in doc["exports"]:
        for name, a in e["adapters"].items():
            s = a["size"] or {}
            ratio = f"{s['lora_r8_bytes'] / s['vector_bytes']:.1f}x" if s else "-"
            lines.append(f"| {e['label']} | {_mb(e['model_bytes'])} | {name} | {_mb(s.get('bytes'))} | "
                         f"{_mb(s.get('vector_bytes'))} | {_mb(s.get('lora_r8_bytes'))} | {ratio} |")
    lines += ["", "## Latency", "", "| export | load | reload (load + 1st token) | adapter switch | "
              "switch + 1st token | TTFT (base) | decode tok/s (base) |", "|---|---|---|---|---|---|---|"]
    for e in doc["exports"]:
        sb = e["speed_base"]
        lines.append(f"| {e['label']} | {_ms(e['load_s'])} | {_ms(e['reload_s'])} | {_ms(e['switch_s'])} | "
                     f"{_ms(e['switch_first_token_s'])} | {_ms(sb['ttft_s'])} | {_tps(sb['decode_tok_s'])} |")
    refs = sorted({e["reference"] for e in doc["exports"]})
    lines += ["", "## Drift vs PyTorch", "", "Reference: " + "; ".join(refs) + ".", "",
              "| export | adapter | max abs Δlogit | mean abs Δlogit | KL(ref‖rt) | argmax agree | "
              "greedy tokens agree | decode tok/s | accuracy (runtime / trained) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in doc["exports"]:
        for name, a in e["adapters"].items():
            d = a["drift"]
            acc = a.get("accuracy")
            acc_s = f"{acc['runtime']:.0%} / {acc['trained']:.0%} (n={acc['rows']})" if acc else "-"
            lines.append(f"| {e['label']} | {name} | {d['max_abs_logit_diff']:.3f} | "
                         f"{d['mean_abs_logit_diff']:.4f} | {d['kl_ref_to_runtime']:.5f} | "
                         f"{d['argmax_agreement']:.1%} | {d['greedy_token_agreement']:.1%} | "
                         f"{_tps(a['speed']['decode_tok_s'])} | {acc_s} |")
    lines += ["", "## How to read this", "",
              "- **Size**: an IA3 adapter is a few hundred kB next to a base of tens of MB; the LoRA "
              "column is what a rank-8 LoRA on the same modules would weigh.",
              "- **Latency**: *adapter switch* is `use_adapter()` on the loaded model (onnxruntime-genai "
              "only records the choice; it activates with the next generator), *switch + 1st token* adds "
              "the first token of a short prompt; *reload* (open the model again + first token) is what "
              "switching would cost without swapping in place.",
              "- **Drift**: differences against PyTorch running, per adapter, the model it was trained as "
              "(its own quantization: the GGUF's blocks, dequantized NF4, or full precision) with the "
              "adapter unmerged; *accuracy* puts the runtime next to that trained model. Quantized exports "
              "(int4, Q4) drift by their quantization error; *greedy tokens agree* is the share of "
              "positions where 20 greedy tokens match; *accuracy* compares task answers directly.", ""]
    lines += [f"![{c}]({c})" for c in charts]
    return "\n".join(lines) + "\n"


def write_charts(doc: dict, out: Path) -> list[str]:
    """sizes.png, tokens_per_s.png, switch_vs_reload.png; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exports = doc["exports"]
    charts = (_sizes_chart(plt, exports, out), _speed_chart(plt, exports, out), _switch_chart(plt, exports, out))
    return [name for name in charts if name]


def _save_chart(plt, fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _sizes_chart(plt, exports: list[dict], out: Path) -> str:
    """Size per artifact, log scale."""
    labels, values, colors = [], [], []
    for e in exports:
        labels.append(f"{e['label']}: base")
        values.append(e["model_bytes"])
        colors.append("#4c72b0")
        for n, a in e["adapters"].items():
            if a["size"] and a["size"]["bytes"]:
                labels.append(f"{e['label']}: adapter '{n}'")
                values.append(a["size"]["bytes"])
                colors.append("#dd8452")
    first = next((a["size"] for e in exports for a in e["adapters"].values() if a["size"]), None)
    if first:
        labels.append("LoRA r=8, same modules (computed)")
        values.append(first["lora_r8_bytes"])
        colors.append("#8c8c8c")
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.5))
    ax.barh(labels, [v / 1e6 for v in values], color=colors)
    ax.set_xscale("log")
    ax.set_xlabel("size (MB, log scale)")
    ax.set_title("Artifact sizes")
    for y, v in enumerate(values):
        ax.text(v / 1e6, y, f"  {_mb(v)}", va="center", fontsize=8)
    ax.invert_yaxis()
    return _save_chart(plt, fig, out, "sizes.png")


def _speed_chart(plt, exports: list[dict], out: Path) -> str:
    """Decode tokens/s per export (base) and per adapter."""
    labels, med, lo, hi = [], [], [], []
    for e in exports:
        rows = [("base" if not e["merged"] else "merged", e["speed_base"])]
        rows += [(f"adapter '{n}'", a["speed"]) for n, a in e["adapters"].items() if not e["merged"]]
        for tag, sp in rows:
            if sp["decode_tok_s"]:
                labels.append(f"{e['label']}\n{tag}")
                s = sp["decode_tok_s"]
                med.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(labels) + 1.5))
    ax.barh(range(len(labels)), med, xerr=[lo, hi], capsize=4, color="#55a868")
    ax.set_yticks(range(len(labels)), [lab.replace("\n", ": ") for lab in labels], fontsize=9)
    for y, v in enumerate(med):
        ax.text(max(med) * 0.02, y, f"{v:.0f} tok/s", va="center", fontsize=8, color="white", weight="bold")
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens / s (median; whiskers: min–max)")
    ax.set_title("Greedy decode speed")
    return _save_chart(plt, fig, out, "tokens_per_s.png")


def _switch_chart(plt, exports: list[dict], out: Path) -> str | None:
    """Adapter switch vs reload, log scale (None: no export switches adapters)."""
    rows = [e for e in exports if e["switch_first_token_s"]]
    if not rows:
        return None
    bars = [("switch adapter (use_adapter)", "switch_s", "#dd8452"),
            ("switch + first token", "switch_first_token_s", "#c44e52"),
            ("reload model + first token", "reload_s", "#4c72b0")]
    fig, ax = plt.subplots(figsize=(max(6.5, 2.2 * len(rows)), 5))
    w = 0.27
    for k, (label, key, color) in enumerate(bars):
        vals = [e[key]["median"] * 1e3 for e in rows]
        xs = [i + (k - 1) * w for i in range(len(rows))]
        ax.bar(xs, vals, width=w, label=label, color=color)
        for x, v in zip(xs, vals):
            ax.text(x, v, _t(v / 1e3), ha="center", va="bottom", fontsize=7)
    for i, e in enumerate(rows):
        ratio = e["reload_s"]["median"] / e["switch_s"]["median"]
        ax.text(i, e["reload_s"]["median"] * 1e3 * 6, f"reload / switch: {ratio:,.0f}x", ha="center",
                fontsize=9, weight="bold")
    ax.set_yscale("log")
    ax.set_ylim(top=max(e["reload_s"]["median"] for e in rows) * 1e3 * 40)
    ax.set_xticks(range(len(rows)), [e["label"] for e in rows], fontsize=9)
    ax.set_ylabel("milliseconds (log scale)")
    ax.set_title("Adapter switch vs model reload")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False, fontsize=8)
    return _save_chart(plt, fig, out, "switch_vs_reload.png")
