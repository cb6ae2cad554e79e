"""What the two batch decoders (``onnx_batch``, ``llama_batch``) share: the bookkeeping of their
rows around the model call - the checks before a row joins, a greedy token taken into its row,
one step's tokens collected, a row leaving. How a row's KV cache is held, prefilled and dropped
is each decoder's own (``_drop_done``)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from ..errors import EdgeIA3Error


class RowDecoder:
    """Base of a batch decoder over ``rows`` (each with ``key``, ``max_tokens``, ``length``,
    ``last``, ``generated``, ``done``), up to ``max_rows`` of them, each within ``context``."""

    rows: list[Any]
    max_rows: int
    context: int
    steps: int

    def __len__(self) -> int:
        return len(self.rows)

    def leave(self, key: Hashable) -> None:
        """Stop decoding row ``key`` (no-op if it already left)."""
        for r in self.rows:
            if r.key == key:
                r.done = True
        self._drop_done()

    def _drop_done(self) -> None:
        raise NotImplementedError

    def _check_join(self, key: Hashable, n: int, max_tokens: int) -> None:
        """Refuse a row that cannot join: the batch is full, ``key`` decodes already, or a prompt of
        ``n`` tokens and ``max_tokens`` new ones does not fit the context."""
        if len(self.rows) >= self.max_rows:
            raise EdgeIA3Error(f"the batch is full ({self.max_rows} rows)")
        if any(r.key == key for r in self.rows):
            raise EdgeIA3Error(f"row {key!r} is already decoding")
        if n == 0 or n + max_tokens > self.context or max_tokens < 1:
            raise EdgeIA3Error(f"prompt of {n} tokens + {max_tokens} new ones does not fit the context "
                               f"({self.context})")

    def _collect(self, take: Callable[[Any, int], int | None]) -> list[tuple[Hashable, int | None]]:
        """After a step's model call: every row one position longer and its token, ``take(row, i)``
        for the row at index ``i``; the rows that are done leave."""
        self.steps += 1
        out = []
        for i, r in enumerate(self.rows):
            r.length += 1
            out.append((r.key, take(r, i)))
        self._drop_done()
        return out


def next_token(row: Any, tok: int, ended: bool) -> int | None:
    """Greedy token ``tok`` into ``row``: None where it ends the row (``ended``: an end-of-generation
    token the row does not ignore); the row is done then or at its ``max_tokens``."""
    if ended:
        row.done = True
        return None
    row.last = tok
    row.generated += 1
    if row.generated >= row.max_tokens:
        row.done = True
    return tok
