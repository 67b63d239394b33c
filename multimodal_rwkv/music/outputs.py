"""Output files of the ``mmrwkv music`` commands: checked before anything is written, written all
together or not at all.

- :func:`check_outputs` refuses, up front, an output that is one of the command's inputs (the same
  file under any spelling, through a link too), two outputs that are one file, an output that is
  a folder, and one whose folder cannot be made (a file is in the way).
- :func:`write_outputs` writes every output to a temporary file beside its target and only then
  moves them all into place, so a command that fails leaves no new or half-written file (nor a
  folder it created).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

from multimodal_rwkv.errors import DataError
from multimodal_rwkv.fileio import fsync_path, keep_mode, make_dirs, remove_dirs


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # a link loop
        return Path(os.path.abspath(p))


def same_file(a, b) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode (hard links too), or, for a file
    that does not exist yet, the same resolved path (``./x``, ``d/../x`` and links spell it)."""
    a, b = Path(a), Path(b)
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return _resolved(a) == _resolved(b)


def _nearest_existing(p: Path) -> Path:
    q = Path(os.path.abspath(p)).parent
    while not os.path.lexists(q) and q != q.parent:
        q = q.parent
    return q


def check_outputs(outputs: Sequence[tuple[str, str | os.PathLike]], inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse (:class:`DataError` naming the file) outputs that would destroy an input or each other,
    or could not be written. ``outputs``: ``(what, path)`` pairs, ``what`` naming the option
    (``--out``, ``--png``, ...) for the message."""
    inputs = [Path(i) for i in inputs if i is not None]
    seen: list[tuple[str, Path]] = []
    for what, path in outputs:
        p = Path(path)
        for i in inputs:
            if same_file(p, i):
                where = "" if str(i) == str(p) else f" ({i})"
                raise DataError(f"{p}: {what} is the command's input{where}; writing it would destroy the input "
                                "(choose another output name)")
        for w2, q in seen:
            if same_file(p, q):
                raise DataError(f"{p}: {what} and {w2} name the same file (give each output its own name)")
        seen.append((what, p))
        if p.is_dir():
            raise DataError(f"{p}: {what} is a folder, not a file name")
        anc = _nearest_existing(p)
        if not anc.is_dir():
            raise DataError(f"{p}: cannot create {what} ({anc} is not a folder)")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise DataError(f"{p}: cannot create {what} (no permission to write in {anc})")


def check_png(what: str, path) -> None:
    """A piano roll is a PNG: refuse another suffix (the file would hold PNG bytes under a name
    that says otherwise)."""
    if Path(path).suffix.lower() != ".png":
        raise DataError(f"{path}: {what} is written as a PNG picture; give a file name ending in .png")


def write_outputs(items: Sequence[tuple[str | os.PathLike, Callable[[Path], object]]]) -> None:
    """Write each ``(path, write)`` — ``write(tmp_path)`` makes the file — to a temporary file beside
    its target, then move them all into place. If any write fails, no output is left (neither a
    temporary file nor a folder this made). An output that is a link is written through the link."""
    made: list[Path] = []
    temps: list[tuple[Path, Path]] = []
    try:
        for path, write in items:
            path = Path(path)
            if path.is_symlink():
                path = _resolved(path)
            made += make_dirs(path.parent)
            tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
            temps.append((tmp, path))
            write(tmp)
            keep_mode(path, tmp)
            fsync_path(tmp)
        for tmp, path in temps:
            os.replace(tmp, path)
            fsync_path(path.parent)
    except BaseException:
        for tmp, _ in temps:
            if os.path.lexists(tmp):
                tmp.unlink()
        remove_dirs(made)
        raise
