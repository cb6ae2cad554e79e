"""Chat prompts rendered the same way on every runtime.

Each artifact carries its model's chat template (a Jinja string: HF
``chat_template.jinja``, or GGUF ``tokenizer.chat_template``); rendering it
here, not in each runtime's own helper, keeps the prompt text - hence the
tokens - identical across torch, onnxruntime-genai and llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

from .errors import EdgeIA3Error

TEMPLATE_FILE = "chat_template.jinja"


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                **special: str) -> str:
    """Render ``messages`` with a HF-style Jinja chat template (sandboxed)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not template:
        raise EdgeIA3Error("this model has no chat template; send plain text (--raw)")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise EdgeIA3Error(f"chat messages need 'role' and 'content', got {m!r}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg: str):
        raise EdgeIA3Error(f"chat template error: {msg}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special)


def read_template(directory: str | Path) -> str | None:
    """The chat template stored in an artifact directory, if any."""
    import json

    d = Path(directory)
    if (d / TEMPLATE_FILE).exists():
        return (d / TEMPLATE_FILE).read_text()
    cfg = d / "tokenizer_config.json"
    if cfg.exists():
        t = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(t, str):
            return t
    return None
