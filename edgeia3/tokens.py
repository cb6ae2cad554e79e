"""The token contract: how a row or a request becomes token ids, one rule for every step.

Stock runtimes feed a model the special tokens its tokenizer asks for: transformers'
``tokenizer(text)`` runs the post-processor (Gemma, Llama, Mistral, Phi-3 put BOS first;
T5 puts EOS last), llama.cpp's ``tokenize(add_special=True)`` (llama-server, ollama,
llama-cpp-python's defaults) reads ``tokenizer.ggml.add_bos_token`` /
``add_eos_token``, onnxruntime-genai's ``Tokenizer.encode`` runs tokenizer.json's
post-processor. An adapter trained on ids without them learns another task than the one
the device runs, so training, evaluation, report, every edgeia3 runtime and the server
encode through this module, and the adapter records the contract it was trained with.

The rule (``TokenContract.ids``): the text is tokenized with special tokens parsed and
none added; then BOS goes first where the base adds BOS, unless the text already starts
with it (a chat template that renders ``bos_token``: never two), and EOS goes last where
the base adds EOS (T5's source), unless already there. Chat is rendered first (``prompts``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping

RECORD_KEY = "token_contract"  # key in the adapter's metadata (IA3Adapter.extra)
# Adapters written before the contract was recorded were trained with no special tokens added.
LEGACY = {"add_bos": False, "add_eos": False}
PROBE = "a"  # any text: what matters is what the defaults put around it


@dataclass(frozen=True)
class TokenContract:
    """Which special tokens the base's own tokenization adds around a text."""

    add_bos: bool = False
    bos_id: int | None = None
    add_eos: bool = False
    eos_id: int | None = None

    # -- where a contract comes from ------------------------------------------------
    @classmethod
    def observed(cls, plain: list[int], full: list[int], bos: int | None, eos: int | None) -> "TokenContract":
        """The contract seen in one text tokenized with nothing added (``plain``) and with the
        tokenizer's defaults (``full``): observed, not guessed from config keys."""
        plain, full = [int(t) for t in plain], [int(t) for t in full]
        extra = len(full) > len(plain)
        add_bos = extra and bos is not None and bos >= 0 and full[0] == bos and full[1:1 + len(plain)] == plain
        add_eos = extra and eos is not None and eos >= 0 and full[-1] == eos and full[len(full) - 1 - len(plain):-1] == plain
        return cls(add_bos, int(bos) if add_bos else None, add_eos, int(eos) if add_eos else None)

    @classmethod
    def of_tokenizer(cls, tokenizer: Any, encoder_source: bool = False) -> "TokenContract":
        """What a transformers tokenizer's defaults (its post-processor) add. ``encoder_source``:
        an encoder-decoder's source, which ends with EOS whatever the post-processor says (T5 is
        trained so; llama.cpp's T5 vocabulary adds it)."""
        if tokenizer is None:
            return cls()
        eos = tokenizer.eos_token_id
        seen = cls.observed(tokenizer(PROBE, add_special_tokens=False)["input_ids"], tokenizer(PROBE)["input_ids"],
                            tokenizer.bos_token_id, eos)
        return replace(seen, add_eos=True, eos_id=int(eos)) if encoder_source and eos is not None else seen

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> "TokenContract":
        d = dict(LEGACY if data is None else data)
        return cls(bool(d.get("add_bos")), d.get("bos_id"), bool(d.get("add_eos")), d.get("eos_id"))

    @classmethod
    def recorded(cls, adapter: Any) -> "TokenContract":
        """The contract an adapter was trained with (older adapters: none added)."""
        return cls.from_json((getattr(adapter, "extra", None) or {}).get(RECORD_KEY))

    def to_json(self) -> dict:
        return asdict(self)

    # -- applying it ---------------------------------------------------------------
    def wrap(self, ids: list[int]) -> list[int]:
        """``ids`` (a text tokenized with nothing added) as the base's tokenization feeds them."""
        out = list(ids)
        if self.add_bos and (not out or out[0] != self.bos_id):
            out.insert(0, self.bos_id)
        if self.add_eos and (not out or out[-1] != self.eos_id):
            out.append(self.eos_id)
        return out

    def ids(self, encode: Callable[[str], list[int]], text: str) -> list[int]:
        """``text`` through ``encode`` (special tokens parsed, none added), then wrapped."""
        return self.wrap([int(t) for t in encode(text)])

    def bos_prefix(self, ids: list[int]) -> list[int]:
        """The BOS to put before a training row's ids (empty where none is due)."""
        return [self.bos_id] if self.add_bos and (not ids or ids[0] != self.bos_id) else []

    def same_as(self, other: "TokenContract") -> bool:
        return (self.add_bos, self.add_eos) == (other.add_bos, other.add_eos)

    def describe(self) -> str:
        parts = ([f"BOS (id {self.bos_id}) first"] if self.add_bos else []) + \
            ([f"EOS (id {self.eos_id}) last"] if self.add_eos else [])
        return " + ".join(parts) or "no special tokens"


def hf_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """A transformers tokenizer as ``encode``: special tokens in the text parsed, none added."""
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def check_tokens(name: str, adapter: Any, runtime: TokenContract, where: str, strict: bool,
                 notes: list[str]) -> bool:
    """Append a note to ``notes`` (raise under ``strict``) when ``where`` feeds the adapter other
    special tokens than it was trained with; True when they agree."""
    from .errors import note_or_refuse

    trained = TokenContract.recorded(adapter)
    if trained.same_as(runtime):
        return True
    msg = (f"adapter '{name}' was trained with {trained.describe()} around each text, but {where} feeds "
           f"{runtime.describe()}: its answers there may differ from the trained model's (retrain it with this "
           "edgeia3, which trains on the base's own tokenization)")
    note_or_refuse(msg, strict, notes)
    return False
