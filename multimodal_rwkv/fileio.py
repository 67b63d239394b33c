"""Crash-safe file writing shared by checkpoints, training state, caches and model export.

A reader never sees a half-written file: data goes to a temporary name in the same folder, is
fsynced, renamed over the target, and the folder entry is fsynced too.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


def fsync_path(p) -> None:
    """fsync a file or a folder (best effort: some filesystems refuse folders)."""
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """fsync every file and folder under ``root`` (and ``root`` itself)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _new_file_mode()  # read once at import: os.umask is process-wide, not thread-safe


def ensure_parent(path) -> Path:
    """Create the folder an output file goes into (like ``mkdir -p``); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def make_dirs(folder) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first (:func:`remove_dirs`
    undoes it). The path is taken as written: for ``a/../b`` the system makes ``a/`` too (it
    resolves ``a/..`` through it), and ``a/..`` is no folder of its own."""
    folder = Path(folder).absolute()
    missing = [d for d in (folder, *folder.parents) if d.name not in ("..", ".") and not os.path.lexists(d)]
    folder.mkdir(parents=True, exist_ok=True)
    return [d for d in reversed(missing) if d.is_dir()]


def remove_dirs(made) -> None:
    """Remove the folders :func:`make_dirs` created (innermost first), where still empty."""
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            pass


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` to produce the file, then move it into place atomically.

    The file gets the usual mode for a new file (umask applied): some writers, safetensors'
    ``save_file`` among them, create their files 0600, and a saved model is meant to be shared."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def keep_mode(path, tmp) -> None:
    """Give ``tmp``, about to replace ``path``, the permissions ``path`` has (a file made private
    stays private when a rerun replaces it); a new file keeps what the umask gave it."""
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
    except FileNotFoundError:
        pass
