"""One exception type for every user-facing failure.

The CLI turns an ``EdgeIA3Error`` into one red line and exit code 2; anything
else is a bug and keeps its traceback.
"""


class EdgeIA3Error(Exception):
    """A problem with the user's input (file, adapter, model, data)."""


def note_or_refuse(msg: str, strict: bool, notes: list[str]) -> None:
    """A deployment mismatch: a note for the user, or, under ``--strict``, the refusal."""
    if strict:
        raise EdgeIA3Error(msg + "; refused (--strict)")
    notes.append(msg)
