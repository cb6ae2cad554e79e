"""Batched greedy decoding over an ONNX export: many requests, each with its own adapter, one step at a time.

``BatchDecoder`` drives the plain ``onnxruntime`` session of an ``OnnxRuntime``
(not onnxruntime-genai: genai feeds one adapter per generator, while the graph
takes IA3 vectors per batch row, [batch, 1, N]). Each request is a *row*:

- ``join`` prefills the request alone (batch 1, its prompt, its adapter's
  vectors) straight into a free row of the shared KV buffers and returns its
  first token;
- ``step`` decodes one token for every row together;
- rows leave on EOS / ``max_tokens`` (by themselves) or ``leave`` (stop string,
  cancelled request), between steps; the last row moves into the freed one.

Prefill runs ``PREFILL_CHUNK`` prompt tokens at a time into the row's cache, so a long
prompt of a large vocabulary never allocates logits for every position ([n, vocab]: a 4k
prompt of a 128k vocabulary would be 2 GB); only the last position's are used.

KV cache: one buffer per past input, [rows, kv_heads, capacity, head_size],
bound with IOBinding as both ``past_key_values.*`` and ``present.*``, so
GroupQueryAttention sees the same pointer and writes each new key/value in place
(``past_present_share_buffer``) instead of copying the whole cache every step.
The buffers grow by doubling up to ``max_rows`` x the context (the most the server's
``--max-batch`` can need) and are released once every row has left, so one long
request does not keep its memory after it ends.
Each row's cache is *right-padded*: its ``length`` valid positions first.

Masking: the builder's graph reduces ``attention_mask`` to ``seqlens_k = sum(mask) - 1``
per row and ``total_sequence_length = mask width``. GQA (CPU) then attends row b
over exactly its first ``seqlens_k[b] + 1`` positions (causal softmax over that
length only), writes the new key/value at position ``seqlens_k[b]`` and rotates
it to position ``seqlens_k[b]``: a row's padding is never read, so a row's
logits are those it computes alone (tests/test_serve_batching.py checks it).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import EdgeIA3Error
from .batch_rows import RowDecoder, next_token

FIRST_CAPACITY = 256  # KV positions per row at first; doubled as rows grow longer, released when all leave
PREFILL_CHUNK = 256  # prompt tokens per prefill run: logits exist for one chunk only, never [n, vocab]


@dataclass
class Row:
    key: Hashable
    adapter: str | None
    max_tokens: int
    eos: frozenset  # empty with ignore_eos
    masked: tuple  # logits forced to -inf before argmax (ignore_eos: the EOS ids, as genai's min_length)
    length: int = 0  # positions in the KV cache
    last: int = -1  # the newest token: the next step's input
    generated: int = 0
    done: bool = False


class BatchDecoder(RowDecoder):
    """Greedy decoding of up to ``max_rows`` requests at once (see the module doc)."""

    one_adapter = False  # each row carries its own adapter's vectors

    def __init__(self, rt: Any, max_rows: int = 16):
        if max_rows < 1:
            raise EdgeIA3Error("max_rows must be at least 1")
        self.rt, self.max_rows = rt, max_rows
        self.sess = rt.ort_session()
        types = rt.input_types
        dec = rt.genai_config["model"]["decoder"]
        names_in, names_out = dec["inputs"], dec.get("outputs", {})
        self.heads, self.head_size = int(dec["num_key_value_heads"]), int(dec["head_size"])
        self.context = int(rt.genai_config["model"]["context_length"])
        self.kv_names: list[tuple[str, str]] = []  # (past input, present output)
        for i in range(int(dec["num_hidden_layers"])):
            for kind in ("key", "value"):
                past = names_in[f"past_{kind}_names"] % i
                present = names_out.get(f"present_{kind}_names", f"present.%d.{kind}") % i
                self.kv_names.append((past, present))
        self.kv_dtype = _np_type(types[self.kv_names[0][0]])
        self.ids_dtype = _np_type(types["input_ids"])
        self.mask_dtype = _np_type(types["attention_mask"])
        self.logits_dtype = _np_type(next(o.type for o in self.sess.get_outputs() if o.name == "logits"))
        self.vocab = int(rt.genai_config["model"]["vocab_size"])
        self.ia3 = [(p["name"], int(p["size"])) for p in rt.manifest.ia3_inputs or []]
        self.ia3_dtype = getattr(rt, "_ia3_dtype", np.float32)
        self.eos = tuple(int(t) for t in rt.eos_ids())
        self.rows: list[Row] = []
        self.kv: list[np.ndarray] = []
        self.vec: list[np.ndarray] = []
        self.capacity = (0, 0)  # (rows, positions) the buffers hold
        self.peak = (0, 0)  # the most they held
        self.binding = self.sess.io_binding()
        self.bound: tuple | None = None  # what the binding's buffers are bound to
        self.steps = 0

    # -- requests --------------------------------------------------------------------------------
    def join(self, key: Hashable, prompt_ids: list[int], adapter: str | None, max_tokens: int,
             ignore_eos: bool = False) -> int | None:
        """Prefill a new row; its first token (None: the model ended at once). A row that is done
        after this token (``max_tokens`` 1) is gone again when ``join`` returns."""
        n = len(prompt_ids)
        self._check_join(key, n, max_tokens)
        vectors = self._vectors_of(adapter)
        row = Row(key, adapter, max_tokens, frozenset() if ignore_eos else frozenset(self.eos),
                  self.eos if ignore_eos else ())
        self._ensure(len(self.rows) + 1, n + 1)
        slot = len(self.rows)
        self.rows.append(row)
        for (name, _), buf in zip(self.ia3, self.vec):
            buf[slot] = vectors[name]
        try:
            last = self._prefill(prompt_ids, slot)
        except BaseException:
            self.rows.pop()
            raise
        row.length = n
        tok = self._take(row, last)
        self._drop_done()
        return tok

    def step(self) -> list[tuple[Hashable, int | None]]:
        """One token for every row, in row order: (key, token), token None where the model ended
        the row (EOS). Rows done after this step (EOS, ``max_tokens``) have left."""
        if not self.rows:
            return []
        b = len(self.rows)
        width = max(r.length for r in self.rows) + 1
        self._ensure(b, width)
        ids = np.asarray([[r.last] for r in self.rows], dtype=self.ids_dtype)
        mask = np.zeros((b, width), dtype=self.mask_dtype)
        for i, r in enumerate(self.rows):  # the row's cache + its new token, right-padded
            mask[i, : r.length + 1] = 1
        logits = np.empty((b, 1, self.vocab), dtype=self.logits_dtype)
        self._run(ids, mask, logits, slice(0, b))
        return self._collect(lambda r, i: self._take(r, logits[i, 0]))

    def _prefill(self, prompt_ids: list[int], slot: int) -> np.ndarray:
        """The prompt into row ``slot``'s cache, ``PREFILL_CHUNK`` tokens a run (each chunk attends
        to the cache the ones before it wrote); the logits at its last position."""
        for start in range(0, len(prompt_ids), PREFILL_CHUNK):
            chunk = prompt_ids[start: start + PREFILL_CHUNK]
            ids = np.asarray([chunk], dtype=self.ids_dtype)
            mask = np.ones((1, start + len(chunk)), dtype=self.mask_dtype)
            logits = np.empty((1, len(chunk), self.vocab), dtype=self.logits_dtype)
            self._run(ids, mask, logits, slice(slot, slot + 1))
        return logits[0, -1]

    def close(self) -> None:
        """Drop the rows and the KV buffers (the decoder stays usable)."""
        self.rows, self.kv, self.vec, self.capacity, self.bound = [], [], [], (0, 0), None

    # -- internals -------------------------------------------------------------------------------
    def _take(self, row: Row, logits: np.ndarray) -> int | None:
        if row.masked:
            logits = logits.astype(np.float32)
            logits[list(row.masked)] = -np.inf
        tok = int(np.argmax(logits))
        return next_token(row, tok, tok in row.eos)

    def _drop_done(self) -> None:
        i = 0
        while i < len(self.rows):
            if not self.rows[i].done:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:  # the last row takes the freed slot: rows stay contiguous
                moved = self.rows[last]
                for buf in self.kv:
                    buf[i, :, : moved.length] = buf[last, :, : moved.length]
                for buf in self.vec:
                    buf[i] = buf[last]
                self.rows[i] = moved
            self.rows.pop()
        if not self.rows and self.capacity[1] > FIRST_CAPACITY:
            self.close()  # all rows left: give grown buffers back (the next join allocates anew)

    def _vectors_of(self, adapter: str | None) -> dict[str, np.ndarray]:
        """The row's own copy of its adapter's vectors: unloading the adapter cannot touch a running row."""
        side = self.rt.side_adapter(adapter)  # None for the base and for an adapter merged into the weights
        return {inp["name"]: np.asarray(self.rt.side_vector(side, inp), dtype=self.ia3_dtype).reshape(1, -1)
                for inp in self.rt.manifest.ia3_inputs or []}

    def _ensure(self, rows: int, positions: int) -> None:
        """Buffers for ``rows`` rows of ``positions`` KV positions (grown by doubling, contents kept)."""
        have_rows, have_pos = self.capacity
        if rows <= have_rows and positions <= have_pos:
            return
        new_rows = have_rows if rows <= have_rows else min(self.max_rows, max(rows, 2 * have_rows, 1))
        new_pos = have_pos if positions <= have_pos else min(self.context, max(positions, 2 * have_pos,
                                                                                FIRST_CAPACITY))
        shape = (new_rows, self.heads, new_pos, self.head_size)
        kv = []
        for old in self.kv or [None] * len(self.kv_names):
            buf = np.zeros(shape, dtype=self.kv_dtype)
            if old is not None:
                buf[: have_rows, :, : have_pos] = old
            kv.append(buf)
        vec = []
        for k, (_, size) in enumerate(self.ia3):
            buf = np.ones((new_rows, 1, size), dtype=self.ia3_dtype)
            if self.vec:
                buf[: have_rows] = self.vec[k]
            vec.append(buf)
        self.kv, self.vec, self.capacity = kv, vec, (new_rows, new_pos)
        self.peak = (max(self.peak[0], new_rows), max(self.peak[1], new_pos))
        self.bound = None

    def _run(self, ids: np.ndarray, mask: np.ndarray, logits: np.ndarray, rows: slice) -> None:
        import onnxruntime as ort

        b = self.binding
        key = (rows.start, rows.stop, id(self.kv[0]) if self.kv else 0)
        if self.bound != key:  # the cache views only change when rows come / go or buffers grow
            b.clear_binding_inputs()
            b.clear_binding_outputs()
            for (past, present), buf in zip(self.kv_names, self.kv):
                v = ort.OrtValue.ortvalue_from_numpy(buf[rows])
                b.bind_ortvalue_input(past, v)
                b.bind_ortvalue_output(present, v)  # the same memory: GQA appends in place
            for (name, _), buf in zip(self.ia3, self.vec):
                b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buf[rows]))
            self.bound = key
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", mask)
        b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.sess.run_with_iobinding(b)


def _np_type(ort_type: str):
    return {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
            "tensor(float16)": np.float16}[ort_type]
