"""Batched greedy decoding over a GGUF with llama.cpp's parallel sequences: many requests, one adapter.

``LlamaBatchDecoder`` drives its own llama.cpp context over the runtime's model
(the same, live weights: an adapter swapped in place reaches it too) through
llama-cpp-python's public low-level bindings (``llama_init_from_model``,
``llama_batch_init``, ``llama_decode``, ``llama_memory_seq_rm``). Each request is a
*row*, one llama.cpp sequence (``seq_id``):

- ``join`` prefills the request alone (its prompt, its sequence) and returns its
  first token;
- ``step`` decodes one token for every row in one ``llama_decode`` (one token per
  sequence);
- rows leave on EOS / ``max_tokens`` (by themselves) or ``leave`` (stop string,
  cancelled request), between steps; their sequence's KV cells are removed and the
  sequence id is free for the next row.

One adapter at a time: the weights hold the runtime's active adapter, so every row
decodes with it (``one_adapter``). ``join`` swaps the runtime to another adapter only
while no row runs, and refuses it otherwise; the server's batch loop forms groups
of requests for one adapter and swaps between groups (``edgeia3.serve.batching``).

KV budget: the context has ``n_seq_max = max_rows`` sequences and
``kv_unified = False``, so llama.cpp gives every sequence its own KV stream of
``n_ctx / n_seq_max`` cells (with ``kv_unified`` on, ``n_ctx`` cells would be shared by
all sequences and a long row could take another's room). ``n_ctx`` is
``max_rows x context``: every row may hold a full context, as the request alone may,
so the server checks requests against the same ``context_length`` and a row never runs
out of cells. The KV memory is allocated when the decoder opens, up front:
``max_rows x context x`` (bytes per token: layers x 2 x kv heads x head size x 2,
f16). SmolLM2-135M (30 layers, 3 KV heads of 64): 23 kB per token, 45 MiB per
2048-token row, 720 MiB for 16 rows; a smaller ``max_rows`` (``--max-batch``) or
context (``n_ctx``) lowers it.

Equal to the request alone: a row's sequence starts at cell 0 of its own stream and
fills it in order, as the one-sequence context of ``generate_ids`` does, decoding is
greedy over the same logits (argmax; ``ignore_eos`` keeps end-of-generation tokens as
``generate_ids`` does), and llama.cpp's CPU matmuls compute each token's row on its own
(tests/test_serve_gguf_batching.py compares tokens and logits with the request alone).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import EdgeIA3Error
from .batch_rows import RowDecoder, next_token


def flash_attn_type(ll: Any) -> int:
    """Flash attention off, in every context the llama.cpp runtime makes (one request, or a batch,
    here): llama.cpp's CPU flash attention splits the KV cells of a step into chunks by their count,
    and a batch's count is its longest row's - a row's logits would then depend on the other rows.
    Without it the masked cells of a batch add exact zeros, so each row computes what it computes
    alone."""
    return ll.LLAMA_FLASH_ATTN_TYPE_DISABLED


@dataclass
class Row:
    key: Hashable
    seq: int  # llama.cpp sequence id
    max_tokens: int
    ignore_eos: bool
    length: int = 0  # positions in the sequence's KV cells
    last: int = -1  # the newest token: the next step's input
    generated: int = 0
    done: bool = False


class LlamaBatchDecoder(RowDecoder):
    """Greedy decoding of up to ``max_rows`` requests for one adapter at once (see the module doc)."""

    one_adapter = True  # every row decodes with the runtime's active adapter

    def __init__(self, rt: Any, max_rows: int = 16):
        ll = rt._ll
        if max_rows < 1:
            raise EdgeIA3Error("max_rows must be at least 1")
        if max_rows > ll.llama_max_parallel_sequences():
            raise EdgeIA3Error(f"llama.cpp decodes at most {ll.llama_max_parallel_sequences()} sequences at once")
        self.rt, self.ll, self.max_rows = rt, ll, max_rows
        self.context = int(rt.context_length)
        self.rows: list[Row] = []
        self.ctx: Any = None  # opened at the first join; released when the runtime reloads its model
        self.batch: Any = None
        self.mem: Any = None
        self.steps = 0
        rt._decoders.add(self)

    # -- the llama.cpp context ---------------------------------------------------------------------
    def _open(self) -> None:
        ll, rt = self.ll, self.rt
        cp = ll.llama_context_default_params()
        cp.n_seq_max = self.max_rows
        cp.kv_unified = False  # a KV stream per sequence (see the module doc)
        cp.n_ctx = self.max_rows * self.context
        cp.n_batch = max(self.context, self.max_rows)  # a whole prompt in one llama_decode
        cp.n_ubatch = min(512, cp.n_batch)
        cp.n_threads = cp.n_threads_batch = rt.n_threads
        cp.flash_attn_type = flash_attn_type(ll)  # as the runtime's own context
        ctx = ll.llama_init_from_model(rt._model_ptr(), cp)
        if not ctx:
            raise EdgeIA3Error(f"llama.cpp cannot make a context of {self.max_rows} sequences x {self.context} "
                               "tokens (out of memory? lower --max-batch)")
        if ll.llama_n_ctx_seq(ctx) < self.context:
            n = ll.llama_n_ctx_seq(ctx)
            ll.llama_free(ctx)
            raise EdgeIA3Error(f"llama.cpp gave {n} KV cells per sequence, fewer than the context ({self.context})")
        self.ctx, self.mem = ctx, ll.llama_get_memory(ctx)
        self.batch = ll.llama_batch_init(cp.n_batch, 0, 1)

    def _release(self) -> None:
        """Free the context (its rows are gone); the next ``join`` opens a new one. The runtime calls
        it before it frees or reloads its model."""
        self.rows = []
        if self.batch is not None:
            self.ll.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.ll.llama_free(self.ctx)
            self.ctx = self.mem = None

    def close(self) -> None:
        self._release()
        self.rt._decoders.discard(self)

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:  # interpreter shutdown: best effort
            pass

    # -- requests --------------------------------------------------------------------------------
    def join(self, key: Hashable, prompt_ids: list[int], adapter: str | None, max_tokens: int,
             ignore_eos: bool = False) -> int | None:
        """Prefill a new row; its first token (None: the model ended at once). A row that is done
        after this token (``max_tokens`` 1) is gone again when ``join`` returns. ``adapter`` must be
        the runtime's active one while other rows run; with none running, the runtime swaps to it."""
        n = len(prompt_ids)
        self._check_join(key, n, max_tokens)
        if not self.rt._runs(adapter):
            if self.rows:
                raise EdgeIA3Error(f"rows decode with adapter '{self.rt.active or 'base'}'; adapter "
                                   f"'{adapter or 'base'}' waits until they are done (one adapter at a time)")
            self.rt.use_adapter(adapter)  # unknown adapter: refused here
        if self.ctx is None:
            self._open()
        seq = min(set(range(self.max_rows)) - {r.seq for r in self.rows})
        row = Row(key, seq, max_tokens, ignore_eos)
        self._fill([(t, p, seq, p == n - 1) for p, t in enumerate(prompt_ids)])
        try:
            self._decode()
        except BaseException:
            self.ll.llama_memory_seq_rm(self.mem, seq, -1, -1)
            raise
        self.rows = sorted([*self.rows, row], key=lambda r: r.seq)  # a step's tokens in sequence order
        row.length = n
        tok = self._take(row, -1)
        self._drop_done()
        return tok

    def step(self) -> list[tuple[Hashable, int | None]]:
        """One token for every row, in row (sequence id) order: (key, token), token None where the model
        ended the row (EOS). Rows done after this step (EOS, ``max_tokens``) have left."""
        if not self.rows:
            return []
        self._fill([(r.last, r.length, r.seq, True) for r in self.rows])
        self._decode()
        return self._collect(self._take)

    # -- internals -------------------------------------------------------------------------------
    def _fill(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        b.n_tokens = len(tokens)
        for k, (tok, pos, seq, logits) in enumerate(tokens):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, 1, logits
            b.seq_id[k][0] = seq

    def _decode(self) -> None:
        rc = self.ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise EdgeIA3Error(f"llama_decode returned {rc} for a batch of {self.batch.n_tokens} tokens")

    def _take(self, row: Row, i: int) -> int | None:
        """The row's greedy token from the logits of batch token ``i``: as ``generate_ids`` picks it."""
        logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, i), shape=(self.rt.vocab_size,))
        tok = int(np.argmax(logits))
        return next_token(row, tok, not row.ignore_eos and self.rt._is_eog(tok))

    def _drop_done(self) -> None:
        for r in [r for r in self.rows if r.done]:
            self.ll.llama_memory_seq_rm(self.mem, r.seq, -1, -1)  # the whole sequence: never fails
        self.rows = [r for r in self.rows if not r.done]
