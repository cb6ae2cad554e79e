import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny_models import make_tiny_model, make_tiny_tokenizer  # noqa: E402
from fuzzing import valid  # noqa: E402,F401  (the reader fuzz tests' valid files, one set per module)

pytest_plugins = ["web_browser"]  # the browser tests' fixtures (site, browser, page, exported)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: path of a saved tiny random model per family (cached per session)."""
    cache: dict = {}

    def get(family: str, seed: int = 0, tokenizer: bool | str = False, **overrides) -> Path:
        """``tokenizer``: True (character-level WordLevel) or "bpe" (GGUF-writable)."""
        key = (family, seed, tokenizer, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{family}_{seed}")
            cache[key] = make_tiny_model(family, out, seed=seed, **overrides)
            if tokenizer:
                make_tiny_tokenizer(out, bpe=tokenizer == "bpe")
        return cache[key]

    return get


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (fp32), loaded once per session."""
    from edgeia3 import load_base

    return load_base("default")
