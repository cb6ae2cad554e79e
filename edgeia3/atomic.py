"""Write outputs under a temporary name and rename them into place.

A failed step must never leave a half-written file or directory where the
user asked for output: the rename happens only after everything succeeded.

Nothing the user already has is replaced unless they said so: an existing
non-empty directory, or an existing file, at the output path is refused
(``EdgeIA3Error``) unless ``force=True`` (the CLI's ``--force``); then the old
one is swapped out only once the new one is complete. An existing *empty*
directory (for a directory output) or empty file (for a file output) holds
nothing to lose and is simply replaced. Commands call :func:`check_out` first,
so the user hears about it before minutes of work, not after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import EdgeIA3Error

DIR, FILE = "dir", "file"


def _target(out: str | os.PathLike) -> Path:
    """Absolute path the output will occupy (a symlink is followed: we write where it points)."""
    if not os.fspath(out):
        raise EdgeIA3Error("no output path given (--out)")
    target = Path(os.path.realpath(os.fspath(out)))
    if target.name in ("", ".", ".."):
        raise EdgeIA3Error(f"cannot write output to {out}")
    return target


def _describe_existing(target: Path, kind: str) -> str | None:
    """Why replacing ``target`` would lose something (None: nothing there, or nothing to lose)."""
    if not os.path.lexists(target):
        return None
    if target.is_dir():
        if kind == FILE:
            return "already exists and is a directory"
        try:
            with os.scandir(target) as it:
                empty = next(it, None) is None
        except OSError as e:
            raise EdgeIA3Error(f"cannot use {target} as output: {e.strerror or e}") from None
        return None if empty else "already exists and is not empty"
    if kind == DIR:
        return "already exists and is a file"
    if target.is_file() and target.stat().st_size == 0:
        return None
    return "already exists"


def _reusable(target: Path, kind: str) -> bool:
    """True when ``target`` is an empty directory (dir output) or empty regular file (file output)."""
    try:
        return _describe_existing(target, kind) is None
    except EdgeIA3Error:
        return False


def check_out(out: str | os.PathLike, force: bool = False, kind: str = DIR) -> Path:
    """Refuse, before any work, an output path that would destroy user data or cannot be created.

    ``kind`` is what will be written there: ``"dir"`` or ``"file"``. Raises
    ``EdgeIA3Error`` naming ``out`` when it exists (non-empty, or of the
    other kind) and ``force`` is false, or when its parent cannot be created
    or written. Returns the absolute path that will be written.
    """
    if kind not in (DIR, FILE):
        raise ValueError(f"kind must be 'dir' or 'file', not {kind!r}")
    target = _target(out)
    why = _describe_existing(target, kind)
    if why and not force:
        raise EdgeIA3Error(f"{out} {why}; pass --force to replace it")
    # The temp output is created beside the target, then renamed: the nearest
    # existing ancestor must be a directory we may write in.
    ancestor = target.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EdgeIA3Error(f"cannot create {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise EdgeIA3Error(f"cannot create {out}: permission denied in {ancestor}")
    return target


def _make_parents(parent: Path, out: str | os.PathLike) -> list[Path]:
    """Create ``parent`` and its missing ancestors; returns the ones created (deepest last)."""
    missing = []
    p = parent
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except OSError as e:
        _remove_empty(created)
        raise EdgeIA3Error(f"cannot create {out}: {e.strerror or e} ({e.filename or parent})") from None
    return created


def _remove_empty(created: list[Path]) -> None:
    """Undo _make_parents on failure: remove the directories it made, if still empty."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            break


def _install(tmp: Path, target: Path, out: str | os.PathLike, kind: str, force: bool) -> None:
    """Rename the finished ``tmp`` to ``target``, swapping out what is there only if allowed."""
    try:
        if not os.path.lexists(target) or _reusable(target, kind) or (force and kind == FILE
                                                                       and not target.is_dir()):
            os.replace(tmp, target)  # atomic; replaces a missing path, an empty dir or a file
            return
        if not force:  # it appeared (or filled up) while we were working
            raise EdgeIA3Error(f"{out} {_describe_existing(target, kind) or 'already exists'}; "
                               "pass --force to replace it")
        # A non-empty directory (or another kind of entry) cannot be renamed over:
        # move it aside into a private trash directory, put ours in, then delete it.
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        old = trash / "old"
        try:
            os.replace(target, old)
        except OSError:
            shutil.rmtree(trash, ignore_errors=True)  # still empty
            raise
        try:
            os.replace(tmp, target)
        except OSError as e:
            try:
                os.replace(old, target)  # put the user's back
            except OSError:  # never delete it: say where it is
                raise EdgeIA3Error(f"cannot write {out}: {e.strerror or e}; what was there is now "
                                   f"{old}") from None
            shutil.rmtree(trash, ignore_errors=True)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    except OSError as e:
        raise EdgeIA3Error(f"cannot write {out}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``out``; rename it to ``out`` on success.

    ``out`` may be missing or an empty directory; anything else there is
    refused (``EdgeIA3Error``) unless ``force``, which replaces it only after
    the new directory is complete.
    """
    target = check_out(out, force, DIR)
    created = _make_parents(target.parent, out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        _remove_empty(created)
        raise EdgeIA3Error(f"cannot create {out}: {e.strerror or e}") from None
    ok = False
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        _install(tmp, target, out, DIR, force)
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            _remove_empty(created)


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp file path beside ``out``; rename it to ``out`` on success.

    ``out`` may be missing or an empty file; an existing file with content
    (or a directory) is refused (``EdgeIA3Error``) unless ``force``.
    """
    target = check_out(out, force, FILE)
    created = _make_parents(target.parent, out)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        _remove_empty(created)
        raise EdgeIA3Error(f"cannot create {out}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(name)
    ok = False
    try:
        yield tmp
        _install(tmp, target, out, FILE, force)
        ok = True
    finally:
        tmp.unlink(missing_ok=True)
        if not ok:
            _remove_empty(created)
