"""Crash-safe file writing shared by checkpoints, training state, caches, model export and the
commands' outputs.

A reader never sees a half-written file: data goes to a temporary name in the same folder, is
fsynced, renamed over the target, and the folder entry is fsynced too.

A command's outputs (answers, MIDI files, pictures) go through two steps:

- :func:`check_outputs` refuses, up front, an output that is one of the command's inputs (the same
  file under any spelling, through a link too, or a file of an input folder such as a model's
  weights), two outputs that are one file, an output that is a folder, and one whose folder cannot
  be made (a file is in the way).
- :func:`write_outputs` writes every output to a temporary file beside its target and only then
  moves them all into place, so a command that fails leaves no new or half-written file (nor a
  folder it created).
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import numpy as np

from multimodal_rwkv.errors import DataError

logger = logging.getLogger(__name__)


def is_utf8_path(path) -> bool:
    """Whether ``path`` can be given to torch's, safetensors' and transformers' file readers, which
    encode it as UTF-8 (a name with bytes that are not UTF-8 reaches Python as surrogates)."""
    try:
        os.fspath(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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


def make_dirs(folder) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first (:func:`remove_dirs`
    undoes it). The path is taken as written: for ``a/../b`` the system makes ``a/`` too (it
    resolves ``a/..`` through it), and ``a/..`` is no folder of its own."""
    folder = Path(folder).absolute()
    missing = [d for d in (folder, *folder.parents) if d.name not in ("..", ".") and not os.path.lexists(d)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except BaseException:  # a name too long, a full disk: the outer folders it made go again
        remove_dirs([d for d in reversed(missing) if os.path.isdir(d)])  # (isdir: False for a name too long)
        raise
    return [d for d in reversed(missing) if d.is_dir()]


def listed_files(folder, suffixes: Sequence[str], prune: Callable[[Path], bool] | None = None,
                 on_unlistable: Callable[[OSError], None] | None = None) -> list[Path]:
    """The files of ``folder`` and its subfolders named with one of ``suffixes`` (any case), sorted.

    Linked subfolders are followed, each real folder once (a link loop ends); hidden files and
    folders (``.git``, editors' copies, ``._x.mid``) are left out, and so are the subfolders
    ``prune(path)`` is true of. A broken link or a link loop named like such a file is listed
    (reading it says why it cannot be read); a FIFO or a socket is not. A folder that cannot be
    listed (no permission) goes to ``on_unlistable(error)``, for the caller to report (os.walk
    passes over it in silence)."""
    out, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True, onerror=on_unlistable):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (prune and prune(Path(root) / d)))
        for name in names:
            x = Path(root) / name
            if (not name.startswith(".") and x.suffix.lower() in suffixes
                    and (x.is_file() or (x.is_symlink() and not x.exists()))):
                out.append(x)
    return sorted(out)


def save_folder(path) -> Path:
    """``path`` as a folder to save a model into, made where missing; FileExistsError when it is a
    file (mkdir said only "File exists"; transformers' own save_pretrained logged and returned)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(errno.EEXIST, "a file, not a folder (save_pretrained writes a folder)", str(out))
    out.mkdir(parents=True, exist_ok=True)
    return out


def remove_tree(path) -> None:
    """Remove ``path``: a link itself (never what it points to), or a folder with its contents, or
    a file; nothing if absent. (``shutil.rmtree(ignore_errors=True)`` did nothing on a link and
    said nothing, so a renamed-away link stayed and blocked the next run.)"""
    import shutil

    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def move_aside(path) -> Path:
    """Rename ``path`` (a folder, file or link) to a hidden ``.old-NAME`` beside it, in one step (a
    kill leaves it whole under one name or the other), and return that name. An earlier
    ``.old-NAME`` that cannot be removed (no permission) does not block this: the next free
    ``.old-NAME-K`` is taken."""
    path = Path(path)
    old = path.with_name(f".old-{path.name}")
    remove_tree(old)
    k = 1
    while old.exists() or old.is_symlink():
        old = path.with_name(f".old-{path.name}-{k}")
        k += 1
    os.rename(path, old)
    return old


def remove_aside(old) -> None:
    """Remove what :func:`move_aside` set aside; one that cannot be removed is left with a warning."""
    remove_tree(old)
    if os.path.lexists(old):
        logger.warning("could not remove %s (replaced); remove it by hand", old)


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends (their handlers run
    then, in order): a step that must finish once begun. Outside the main thread (where handlers
    cannot be set) the block runs as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda n, _frame: caught.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for n in caught:
            h = old[n]
            if callable(h):
                h(n, None)
            elif h == signal.SIG_DFL:  # the default action (ends the process), now that the step is done
                os.kill(os.getpid(), n)


def swap_in(new, path) -> None:
    """Put ``new`` (a complete folder or file) in the place of ``path`` (a folder, file or link, or
    nothing there): the old one is set aside first (:func:`move_aside`) and removed only once the
    new one is in place, so a kill at any moment leaves one of the two whole. Ctrl-C or SIGTERM
    from the moment the old one is set aside take effect once it is removed (they stopped the
    removal of a large old folder halfway, leaving its rest hidden beside the new one)."""
    path = Path(path)
    with signals_deferred():
        aside = move_aside(path) if os.path.lexists(path) else None
        os.rename(new, path)
        if aside is not None:
            remove_aside(aside)


def discard_tree(path) -> None:
    """Take ``path`` away for good: :func:`move_aside`, then :func:`remove_aside`."""
    remove_aside(move_aside(path))


def remove_dirs(made) -> None:
    """Remove the folders :func:`make_dirs` created (innermost first), where still empty."""
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            pass


def temp_name(path, pid: int | None = None) -> Path:
    """A temporary name beside ``path`` for this process (``.tmp-NAME-PID``), shortened with a hash
    of the name where that would pass the 255-byte limit of a file name."""
    import hashlib

    path = Path(path)
    pid = os.getpid() if pid is None else pid
    name = f".tmp-{path.name}-{pid}"
    if len(os.fsencode(name)) > 255:  # (fsencode: a name with undecodable bytes is surrogate-escaped)
        name = f".tmp-{hashlib.sha1(os.fsencode(path.name)).hexdigest()[:16]}-{pid}"
    return path.with_name(name)


def remove_dead_temps(path) -> None:
    """Remove the temporary files of ``path`` (:func:`temp_name`) that writers killed with SIGKILL
    left behind (they would stay beside the output for good): those whose process is gone and
    that no writer holds locked (:func:`write_outputs` locks its own while it writes; a pid alone
    says nothing about a writer in another PID namespace or on another host)."""
    import fcntl
    import glob
    import hashlib

    path = Path(path)
    heads = {f".tmp-{path.name}-", f".tmp-{hashlib.sha1(os.fsencode(path.name)).hexdigest()[:16]}-"}
    for head in heads:
        try:
            found = list(path.parent.glob(glob.escape(head) + "*"))
        except OSError:
            return
        for p in found:
            pid = p.name[len(head):]
            if not pid.isdigit() or int(pid) == os.getpid() or not p.is_file():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # running (or not ours to signal): kept
            except ProcessLookupError:
                pass
            except OSError:
                continue
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live writer elsewhere: kept
                p.unlink(missing_ok=True)
            except OSError:
                pass
            finally:
                os.close(fd)


@contextlib.contextmanager
def naming_target(path):
    """A copy or move into ``path`` that fills the disk names ``path``: Python's copy reports the
    source file (intact) as the one that failed."""
    import errno

    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


@contextlib.contextmanager
def naming_write_errors(path):
    """An OSError while writing ``path`` names it. numpy's ``tofile``/``save`` report a short write
    as "N requested and M written" with neither errno nor file: that says the disk may be full."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        why = e.strerror or str(e)
        if e.errno is None and "requested and" in why:
            why = f"could not write all of it ({why} items; is the disk full?)"
        raise OSError(e.errno, why, str(path)) from None


def write_array(fh, arr) -> None:
    """Write ``arr``'s bytes (C order) through the Python file object ``fh``.

    Not ``arr.tofile(fh)`` nor ``np.save``: on a real file numpy writes through a stdio handle of its
    own and ignores the error when that handle is closed, so a disk that fills during the last
    partial block loses the tail silently. Python's file object raises (at the write or the close)."""
    fh.write(memoryview(np.ascontiguousarray(arr)).cast("B"))


def save_npy(path, arr) -> None:
    """``np.save(path, arr)`` (no pickles) that raises when the disk fills: see :func:`write_array`."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    with open(path, "wb") as fh:
        fh.write(buf.getbuffer())


def load_token_npy(path, mmap: bool = True, allow_empty: bool = False) -> np.ndarray:
    """A ``.npy`` file holding a 1-D integer token array (memmapped with ``mmap``; never pickles).
    Anything else -- no NumPy header (numpy's own message then talks of unpickling), an empty or
    truncated file, another dtype or shape, no tokens (unless ``allow_empty``) -- is a
    :class:`DataError` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if not magic:
            raise DataError(f"{path}: empty file (not a .npy token array)")
        if magic != b"\x93NUMPY":
            raise DataError(f"{path}: not a .npy file (no NumPy header)")
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except EOFError as e:  # a header cut short
        raise DataError(f"{path}: cannot read token array (truncated .npy file: {e})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read token array ({e})") from None
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{path}: expected a 1-D integer token array, got {a.dtype} with shape {a.shape}")
    if a.shape[0] == 0 and not allow_empty:
        raise DataError(f"{path}: empty token array")
    return a


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` to produce the file, then move it into place atomically.

    A new file gets the usual mode for a new file (umask applied): some writers, safetensors'
    ``save_file`` among them, create their files 0600, and a saved model is meant to be shared. A
    file replaced keeps its mode (a model made private stays private when converted again). A
    ``path`` that is a folder, or in a folder that does not exist, is an OSError naming it (not
    the temporary file's name, nor the writer's own error type)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder to write into", str(path.parent))
    tmp = temp_name(path)
    try:
        with naming_write_errors(path):  # a full disk names the file (the writers' own errors may not)
            write(tmp)
            fsync_path(tmp)
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)


@contextlib.contextmanager
def folder_lock(folder, name: str, what: str):
    """Hold an exclusive lock on the file ``folder/name`` for the block (removed at its end): a
    second ``what`` on the same folder is a DataError saying it is in use, not a run that deletes
    the first one's work. The OS drops the lock when the process dies, however it dies (the file
    then stays, and the next run takes it over)."""
    import fcntl

    path = Path(folder) / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:  # a lock file removed by the run that held it, after this opened it: not the lock any more
            held = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            held = False
        if not held:
            raise OSError
    except OSError:
        os.close(fd)
        raise DataError(f"{folder}: in use by another {what}; wait for it to finish or use another folder") from None
    try:
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        os.close(fd)


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors' ``save_file`` through :func:`atomic_write`; its own error for a failed write (a
    full disk) is an OSError naming ``path``."""
    from safetensors.torch import save_file

    def write(tmp) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors' own error type for a failed write
            raise OSError(f"cannot write ({' '.join(str(e).split())[:160]})") from None  # (named by atomic_write)

    atomic_write(path, write)


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


PathLike = Union[str, os.PathLike]


def _input_clash(p: Path, what: str, inputs: list[tuple[str, Path]]) -> str | None:
    for what_in, i in inputs:
        if i.is_dir():  # a folder input (a model folder) stands for the files in it
            if os.path.lexists(p) and any(f.is_file() and same_file(p, f) for f in i.iterdir()):
                return f"{p}: {what} is a file of {i} (the {what_in})"
        elif same_file(p, i):
            where = "" if str(i) == str(p) else f" ({i})"
            return f"{p}: {what} is the {what_in}{where}"
    return None


def check_outputs(outputs: Sequence[tuple[str, PathLike]],
                  inputs: Iterable[PathLike | tuple[str, PathLike] | None] = ()) -> None:
    """Refuse (:class:`DataError` naming the file) outputs that would destroy an input or each other,
    or could not be written. ``outputs``: ``(what, path)`` pairs, ``what`` naming the option
    (``--out``, ``--png``, ...) for the message. ``inputs``: paths, or ``(what, path)`` pairs naming
    them (``"--questions file"``, ``"--model"``); a folder stands for the files in it; ``None`` and
    ``""`` are skipped."""
    named: list[tuple[str, Path]] = []
    for i in inputs:
        what_in, path = i if isinstance(i, tuple) else ("command's input", i)
        if path is not None and str(path) != "":
            named.append((what_in, Path(path)))
    seen: list[tuple[str, Path]] = []
    for what, path in outputs:
        p = Path(path)
        clash = _input_clash(p, what, named)
        if clash:
            raise DataError(clash + "; writing it would destroy that input (choose another output name)")
        for w2, q in seen:
            if same_file(p, q):
                raise DataError(f"{p}: {what} and {w2} name the same file (give each output its own name)")
        seen.append((what, p))
        if p.is_dir():
            raise DataError(f"{p}: {what} is a folder, not a file name")
        if p.exists() and not p.is_file():  # written by replacing it: the device or FIFO would be lost
            raise DataError(f"{p}: {what} is not a regular file (a device, a FIFO or a socket); give a file name")
        anc = _nearest_existing(p)
        if not anc.is_dir():
            raise DataError(f"{p}: cannot create {what} ({anc} is not a folder)")
        if not os.access(anc, os.W_OK | os.X_OK):
            if _read_only(anc):
                raise DataError(f"{p}: cannot create {what} ({anc} is on a read-only file system)")
            raise DataError(f"{p}: cannot create {what} (no permission to write in {anc})")


def _read_only(folder: Path) -> bool:
    """Whether ``folder`` lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def write_outputs(items: Sequence[tuple[PathLike, Callable[[Path], object]]]) -> None:
    """Write each ``(path, write)`` — ``write(tmp_path)`` makes the file — to a temporary file beside
    its target, then move them all into place. If any write fails (or is interrupted), no output is
    left (neither a temporary file nor a folder this made). An output that is a link is written
    through the link. A file replaced keeps its permissions (:func:`keep_mode`)."""
    import fcntl

    made: list[Path] = []
    temps: list[tuple[Path, Path]] = []
    locks: list[int] = []
    try:
        for path, write in items:
            path = Path(path)
            if path.is_symlink():
                path = _resolved(path)
            made += make_dirs(path.parent)
            remove_dead_temps(path)
            tmp = temp_name(path)  # not OUT.tmp, which may be someone's file
            temps.append((tmp, path))
            locks.append(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o666))  # (umask applied) held while written: see
            fcntl.flock(locks[-1], fcntl.LOCK_EX)  # remove_dead_temps (the writer reopens the same file)
            with naming_write_errors(path):  # a full disk names the output (PIL's, numpy's errors do not)
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
    finally:
        for fd in locks:
            os.close(fd)
