"""Chat prompts rendered the same way on every runtime.

Each artifact carries its model's chat template (a Jinja string: HF
``chat_template.jinja``, or GGUF ``tokenizer.chat_template``); rendering it
here, not in each runtime's own helper, keeps the prompt text - hence the
tokens - identical across torch, onnxruntime-genai and llama.cpp.

A base without a template gets one with ``--chat-template chatml|FILE``
(``resolve_template``). Training records the template its chat rows were
rendered with in the adapter (``IA3Adapter.extra["chat_template"]``), so
run / report / serve render that adapter's prompts the same way
(``ChatTemplates``: given > recorded by the adapter > the artifact's own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import EdgeIA3Error

TEMPLATE_FILE = "chat_template.jinja"
OPTION = "--chat-template chatml|FILE"  # how every error names the way forward
RECORD_KEY = "chat_template"  # key in the adapter's metadata (IA3Adapter.extra) and manifest entries

# Built-in templates, by the name --chat-template takes.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NAMED_TEMPLATES = {"chatml": CHATML}
# Encoder-decoder models (T5) ship no chat template: the conversation before the answer as
# plain text - a lone user message is its content as is (so it trains and runs exactly like a
# prompt/completion row), anything longer one "role: content" line per message.
FLAT_CHAT = ("{% if messages|length == 1 and messages[0]['role'] == 'user' %}{{ messages[0]['content'] }}"
             "{% else %}{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
             "{{ m['role'] }}: {{ m['content'] }}{% endfor %}{% endif %}")


class NoChatTemplate(EdgeIA3Error):
    """Chat input for a model with no chat template; commands add the options they have."""


def _env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg: str):
        raise EdgeIA3Error(f"chat template error: {msg}")

    env.globals["raise_exception"] = raise_exception
    return env


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                **special: str) -> str:
    """Render ``messages`` with a HF-style Jinja chat template (sandboxed)."""
    from jinja2 import TemplateError

    if not template:
        raise NoChatTemplate(f"this model has no chat template; give one with {OPTION}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise EdgeIA3Error(f"chat messages need 'role' and 'content', got {m!r}")
    try:
        return _env().from_string(template).render(messages=messages,
                                                   add_generation_prompt=add_generation_prompt, **special)
    except TemplateError as e:  # a broken template must not surface as a traceback
        raise EdgeIA3Error(f"chat template error: {e}") from None


def resolve_template(value: str | Path | None) -> str | None:
    """A ``--chat-template`` value - a built-in name (chatml) or a Jinja file - as template text.

    None stays None. A name wins over a file of the same name (use ./chatml for the file).
    """
    if value is None:
        return None
    if isinstance(value, str) and value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or ("not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e)
        raise EdgeIA3Error(f"--chat-template {path}: cannot read it ({why}); give "
                           f"{' or '.join(NAMED_TEMPLATES)} or a Jinja chat template file") from None
    if not text.strip():
        raise EdgeIA3Error(f"--chat-template {path}: the file is empty")
    check_template(text, str(path))
    return text


def check_template(text: str, where: str) -> None:
    """One EdgeIA3Error naming ``where`` if ``text`` is not valid Jinja."""
    from jinja2 import TemplateSyntaxError

    try:
        _env().parse(text)
    except TemplateSyntaxError as e:
        raise EdgeIA3Error(f"--chat-template {where}: not a valid Jinja template (line {e.lineno}: "
                           f"{e.message})") from None


def recorded_template(adapter: Any) -> str | None:
    """The chat template an adapter was trained with, if it recorded one."""
    t = (getattr(adapter, "extra", None) or {}).get(RECORD_KEY)
    return t if isinstance(t, str) and t else None


class ChatTemplates:
    """Which template renders chat for which adapter, the same rule on every runtime:
    the one given (--chat-template) > the one the adapter recorded at training > the
    artifact's own (None: the base)."""

    def __init__(self, own: str | None, given: str | None = None):
        self.own = own or None
        self.given = given
        self.recorded: dict[str, str] = {}

    def record(self, name: str, adapter: Any = None, template: str | None = None) -> None:
        t = template or recorded_template(adapter)
        if t:
            self.recorded[name] = t

    def forget(self, name: str) -> None:
        self.recorded.pop(name, None)

    def for_adapter(self, name: str | None) -> str | None:
        return self.given or (self.recorded.get(name) if name else None) or self.own

    def render(self, messages: list[dict], adapter: str | None) -> str:
        return render_chat(self.for_adapter(adapter), messages)


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
