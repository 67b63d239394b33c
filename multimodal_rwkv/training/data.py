"""Text and token data for LM training: readers, an on-disk token cache, and ctx_len packing.

Sources (``data.format``; ``auto`` picks by suffix):

- ``txt``: each file is one document.
- ``jsonl``: one JSON object per line: ``{"text": ...}`` (all tokens trained) or a chat record
  ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}`` /
  ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`` where only the assistant's
  tokens are targets (every other position gets label -100). A ``.json`` file may instead hold one
  JSON array of such objects (records named ``file[index]``).
- ``binidx``: RWKV-LM / Megatron ``MMIDIDX`` token files (``X.bin`` + ``X.idx``), read as one stream
  (under ``on_bad_record: skip``, a sequence holding an id outside the vocabulary is skipped).
- ``tokens``: a ``.npy`` 1-D integer array (documents separated by id 0) or a folder of them.

Suffixes match in any case (``B.TXT``, ``x.JSONL``). Text must be UTF-8: a file in another
encoding (UTF-16, ...) is one bad file, a text with a lone surrogate escape (``"\\ud800"``) a bad record.

Documents are concatenated with separator id 0 after each document and cut into windows of
``ctx_len + 1`` tokens with stride ``ctx_len`` (input = window[:-1], target = window[1:]).
Tokenized text is cached on disk (raw ``uint32``/``uint8`` files opened with ``np.memmap``), keyed by
the file's content hash and the tokenizer, so restarting a run does not re-tokenize.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from multimodal_rwkv.errors import DataError
from multimodal_rwkv.fileio import fsync_path, listed_files, load_token_npy, naming_write_errors, write_array

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SEPARATOR = 0
# 2: a byte-order mark at the start of a file is dropped; 3: a .json file may be an array; 4: long
# documents tokenized in exact pieces, an empty assistant turn is "\n\n", a BOM-only first JSONL line blank
CACHE_VERSION = 4

# --------------------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``id = byte + 1`` (the World tokenizer's single-byte ids); vocab 257."""

    name = "bytes"
    vocab_size = 257
    max_token_bytes = 1

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def id_to_bytes(self, token_id: int) -> bytes:
        return bytes([token_id - 1]) if 1 <= token_id <= 256 else b""

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - 1 for i in ids if 1 <= i <= 256).decode("utf-8", errors="replace")


def get_tokenizer(name: str):
    """``"world"`` -> the World tokenizer (vocab 65536), ``"bytes"`` -> :class:`ByteTokenizer`."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "world":
        from multimodal_rwkv.model.tokenizer import WorldTokenizer

        return WorldTokenizer()
    raise DataError(f"unknown tokenizer {name!r}; expected 'world' or 'bytes'")


def tokenizer_key(tok) -> str:
    """A short fingerprint of a tokenizer (class + its output on a probe string)."""
    probe = "Hello world 1234567 \n\nUser: hi\n\nAssistant: 你好，世界 éß\t\t"
    h = hashlib.sha256()
    h.update(f"{type(tok).__module__}.{type(tok).__qualname__}".encode())
    h.update(json.dumps(list(tok.encode(probe))).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------- records


@dataclass
class BadRecords:
    """Counts records skipped under ``on_bad_record: skip`` (and keeps the first few reasons)."""

    count: int = 0
    examples: list = None

    def add(self, msg: str):
        self.count += 1
        if self.examples is None:
            self.examples = []
        if len(self.examples) < 5:
            self.examples.append(msg)
        logger.warning("skipping bad record: %s", msg)


def _handle_bad(msg: str, on_bad: str, bad: BadRecords):
    if on_bad == "skip":
        bad.add(msg)
    else:
        raise DataError(msg + " (set data.on_bad_record=skip to skip bad records)")


def lone_surrogate(s: str) -> Optional[int]:
    """Index of the first unpaired surrogate in ``s`` (a JSON ``\\ud800`` escape, or what bytes that are
    not UTF-8 become on a command line), None when ``s`` is real text that can be encoded as UTF-8."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _check_unicode(s: str, where: str, what: str) -> None:
    """DataError if ``s`` holds a lone surrogate: no UTF-8, no tokens."""
    i = lone_surrogate(s)
    if i is not None:
        raise DataError(f"{where}: {what} is not valid Unicode (lone surrogate \\u{ord(s[i]):04x} at "
                        f"character {i})")


def _not_utf8(head: bytes) -> Optional[str]:
    """Why a file starting with ``head`` is plainly not UTF-8 text (a UTF-16/32 byte-order mark, NUL bytes)."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "not UTF-8 text (it starts with a UTF-16/32 byte-order mark); save it as UTF-8"
    if head.count(b"\x00") > len(head) // 4:  # UTF-16/32 text: every 2nd or 4th byte of ASCII is 0
        return "not UTF-8 text (it holds NUL bytes: UTF-16/32 or binary); save it as UTF-8"
    return None


_ROLE = {"user": "User", "human": "User", "assistant": "Assistant", "gpt": "Assistant", "bot": "Assistant",
         "system": "System"}


def chat_segments(turns, where: str) -> list[tuple[str, bool]]:
    """Render chat turns in RWKV's World chat format -> [(text, is_target)].

    ``User: ...\\n\\nAssistant: ...\\n\\n``. The role prefix is never a target; the assistant's
    `` <content>\\n\\n`` is.
    """
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: chat record needs a non-empty list of turns")
    segs = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{where}: turn {j} is not an object")
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if role not in _ROLE:
            raise DataError(f"{where}: turn {j} has unknown role {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {j} has no string content")
        _check_unicode(content, where, f"turn {j} content")
        name = _ROLE[role]
        content = content.strip().replace("\r\n", "\n")
        while "\n\n" in content:  # "\n\n" ends a turn in the World chat format
            content = content.replace("\n\n", "\n")
        segs.append((f"{name}:", False))
        # an empty turn is the end of turn alone ("\n\n", World's stop token; not " \n\n")
        segs.append(((f" {content}" if content else "") + "\n\n", name == "Assistant"))
    if not any(t for _, t in segs):
        raise DataError(f"{where}: chat record has no assistant turn")
    return segs


TXT_PIECE_CHARS = 1 << 20  # long texts are tokenized in pieces of about 1M characters


def encode_in_pieces(tokenizer, text: str) -> Iterator[list[int]]:
    """``tokenizer.encode(text)`` as consecutive lists, one per piece of about TXT_PIECE_CHARS
    characters (bounded memory for long documents); the lists joined equal the whole text's ids.

    Greedy longest match decides the token starting at a byte from the next ``max_token_bytes``
    bytes alone, so a piece's tokens that start at least that far before its end are final; the
    next piece starts where the first of the others starts (a token boundary of the whole text)."""
    start, n = 0, len(text)
    while n - start > TXT_PIECE_CHARS:
        piece = text[start:start + TXT_PIECE_CHARS]
        ids = tokenizer.encode(piece)
        data = piece.encode("utf-8")
        last_start = len(data) - tokenizer.max_token_bytes
        keep = end = pos = 0
        for i, t in enumerate(ids):
            if pos > last_start:
                break
            pos += len(tokenizer.id_to_bytes(t))
            if pos == len(data) or data[pos] & 0xC0 != 0x80:  # the next piece starts on a character
                keep, end = i + 1, pos
        if keep == 0:  # (pieces are far longer than a token: only for a tiny TXT_PIECE_CHARS)
            break
        yield ids[:keep]
        start += len(data[:end].decode("utf-8"))
    yield tokenizer.encode(text[start:])


def iter_text_documents(path: Path, fmt: str, on_bad: str, bad: BadRecords) -> Iterator[list[tuple[str, bool]]]:
    """Yield documents as [(text, is_target)] segments from a .txt, .jsonl or .json file."""
    if fmt == "txt":
        try:
            raw = path.read_bytes()
        except OSError as e:
            _handle_bad(f"{path}: cannot read ({e.strerror or e})", on_bad, bad)
            return
        why = _not_utf8(raw[:4096])  # UTF-16 without a byte-order mark decodes as UTF-8, NULs and all
        if why:
            _handle_bad(f"{path}: {why}", on_bad, bad)
            return
        try:
            text = raw.decode("utf-8-sig")  # a leading byte-order mark is not text
        except UnicodeDecodeError as e:
            _handle_bad(f"{path}:{_error_line(raw, e)}: not valid UTF-8 ({e.reason})", on_bad, bad)
            return
        del raw
        if not text.strip():
            _handle_bad(f"{path}: empty file", on_bad, bad)
            return
        yield [(text, True)]
        return
    try:
        fh = open(path, "rb")
    except OSError as e:
        _handle_bad(f"{path}: cannot read ({e.strerror or e})", on_bad, bad)
        return
    with fh:
        head = fh.read(4096)
        why = _not_utf8(head)
        if why:  # one bad file, not one bad record per line
            _handle_bad(f"{path}: {why}", on_bad, bad)
            return
        if path.suffix.lower() != ".jsonl" and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            fh.seek(0)
            yield from _json_array_documents(path, fh.read(), on_bad, bad)
            return
        fh.seek(0)
        any_line = False
        for lineno, line in enumerate(fh, 1):  # JSONL, streamed line by line
            if lineno == 1 and line.startswith(_BOM):  # a byte-order mark is not JSON
                line = line[len(_BOM):]
            if not line.strip():
                continue
            any_line = True
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line.decode("utf-8").rstrip("\r\n"))  # (an error's column is on this line)
            except UnicodeDecodeError as e:
                _handle_bad(f"{where}: not valid UTF-8 ({e.reason})", on_bad, bad)
                continue
            except json.JSONDecodeError as e:
                _handle_bad(f"{where}: invalid JSON ({_json_error(e)})", on_bad, bad)
                continue
            try:
                doc = _record_document(rec, where)
            except DataError as e:
                _handle_bad(str(e), on_bad, bad)
                continue
            yield doc
    if not any_line:
        _handle_bad(f"{path}: empty file", on_bad, bad)


_BOM = b"\xef\xbb\xbf"


def _json_error(e: json.JSONDecodeError) -> str:
    """"Expecting value at column 3" (json's own messages may end in "at": "... starting at")."""
    return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"


def _error_line(raw: bytes, e: UnicodeDecodeError) -> int:
    """The line of ``raw`` holding the bad byte of ``raw.decode("utf-8-sig")`` (``e.start`` counts
    from after a byte-order mark)."""
    return raw[: e.start + (len(_BOM) if raw.startswith(_BOM) else 0)].count(b"\n") + 1


def _json_array_documents(path: Path, raw: bytes, on_bad: str, bad: BadRecords):
    """The records of a ``.json`` file holding one JSON array; a file that does not parse is one bad file."""
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        _handle_bad(f"{path}:{_error_line(raw, e)}: not valid UTF-8 ({e.reason})", on_bad, bad)
        return
    except json.JSONDecodeError as e:
        _handle_bad(f"{path}:{e.lineno}: invalid JSON array ({_json_error(e)}); a .json file holds "
                    "one JSON array of records, a .jsonl file one record per line", on_bad, bad)
        return
    if not data:
        _handle_bad(f"{path}: empty JSON array", on_bad, bad)
    for i, rec in enumerate(data):
        try:
            doc = _record_document(rec, f"{path}[{i}]")
        except DataError as e:
            _handle_bad(str(e), on_bad, bad)
            continue
        yield doc


def _record_document(rec, where: str) -> list[tuple[str, bool]]:
    """One JSON record (``text`` or chat) -> [(text, is_target)]; DataError naming ``where`` if bad."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        _check_unicode(rec["text"], where, "text")
        return [(rec["text"], True)]
    if "messages" in rec or "conversations" in rec:
        return chat_segments(rec.get("messages", rec.get("conversations")), where)
    raise DataError(f"{where}: expected a 'text', 'messages' or 'conversations' key, got {sorted(rec)}")


# --------------------------------------------------------------------------------------- token streams


class TokenStream:
    """A flat token stream ``ids`` (1-D ints) with an optional ``target`` mask (1 = train on
    predicting this token; None = all). ``source`` names the files (for messages)."""

    def __init__(self, ids: np.ndarray, target: Optional[np.ndarray], source: str, skipped: int = 0,
                 doc_ends: Optional[np.ndarray] = None):
        if ids.ndim != 1:
            raise DataError(f"{source}: token array must be 1-D, got shape {ids.shape}")
        self.ids, self.target, self.source, self.skipped = ids, target, source, skipped
        self.doc_ends = doc_ends  # where each document ends (binidx sequences); None: at separators

    def __len__(self):
        return int(self.ids.shape[0])


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_temp(cache_dir: Path, key: str) -> Path:
    """A fresh temp folder ``.tmp-KEY-HOST-PID`` for a cache entry being written. Temp folders that
    processes of this host left when they were killed (their pid is gone) are removed first, so a
    killed tokenization does not leave its partial shards behind for good. Those of live processes,
    and of other hosts sharing the folder, are left alone."""
    host = socket.gethostname().replace("-", "_")
    for p in cache_dir.glob(f".tmp-*-{host}-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours, or a live process of another user
    tmp = cache_dir / f".tmp-{key}-{host}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _open_cache(d: Path) -> Optional[tuple[np.ndarray, Optional[np.ndarray], dict]]:
    meta_p = d / "meta.json"
    if not meta_p.is_file():
        return None
    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
        n = int(meta["n_tokens"])
        ids = np.memmap(d / "tokens.u32", dtype=np.uint32, mode="r", shape=(n,)) if n else np.zeros(0, np.uint32)
        tgt = None
        if meta.get("has_mask"):
            tgt = np.memmap(d / "target.u8", dtype=np.uint8, mode="r", shape=(n,))
        return ids, tgt, meta
    except (OSError, ValueError, KeyError) as e:
        logger.warning("ignoring broken token cache %s (%s)", d, e)
        return None


def _install_cache(tmp: Path, final: Path):
    """Move a finished entry ``tmp`` into place as ``final`` (a broken entry there, ignored when it
    was looked up, is replaced) and open it: ``(ids, targets, meta)``."""
    fsync_path(tmp)
    if final.exists() and _open_cache(final) is None:
        broken = final.parent / f".broken-{final.name}-{os.getpid()}"
        try:
            os.rename(final, broken)
        except OSError:
            pass
        shutil.rmtree(broken, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_path(final.parent)
    hit = _open_cache(final)
    if hit is None:
        raise DataError(f"{final}: token cache could not be written")
    return hit


def tokenize_to_cache(files: list[Path], fmt: str, tokenizer, cache_dir: Path, on_bad: str) -> TokenStream:
    """Tokenize .txt/.jsonl ``files`` once into ``cache_dir/<key>/`` and return a memmapped stream.

    The key hashes every file's content, the format, the tokenizer fingerprint and ``on_bad``.
    A finished cache entry is a folder renamed into place, so a killed run never leaves a partial one.
    """
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{fmt}|{tokenizer_key(tokenizer)}|{on_bad}".encode())
    for f in files:
        try:
            h.update(_file_sha(f).encode())
        except OSError as e:
            if on_bad == "skip":
                h.update(f"unreadable:{f}".encode())
            else:
                raise DataError(f"{f}: cannot read ({e.strerror or e})") from None
    key = h.hexdigest()[:24]
    final = Path(cache_dir) / key
    source = ", ".join(str(f) for f in files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
    hit = _open_cache(final)
    if hit is not None:
        ids, tgt, meta = hit
        logger.info("token cache hit %s (%d tokens)", final, len(ids))
        return TokenStream(ids, tgt, source, int(meta.get("skipped", 0)))

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = _cache_temp(cache_dir, key)
    bad = BadRecords()
    n_tokens = 0
    n_docs = 0
    any_masked = False
    try:
        with naming_write_errors(tmp / "tokens.u32"), open(tmp / "tokens.u32", "wb") as ft, \
                open(tmp / "target.u8", "wb") as fm:
            for f in files:
                for doc in iter_text_documents(f, fmt, on_bad, bad):
                    # the separator after a document is a target when the document's last segment is
                    segs = ((ids, t) for text, t in doc for ids in encode_in_pieces(tokenizer, text))
                    for ids, is_target in itertools.chain(segs, [([SEPARATOR], doc[-1][1])]):
                        arr = np.asarray(ids, dtype=np.int64)
                        if len(arr) and (arr.min() < 0 or arr.max() >= 2**32):
                            raise DataError(f"{f}: tokenizer produced ids outside uint32")
                        write_array(ft, arr.astype(np.uint32))
                        write_array(fm, np.full(len(arr), int(is_target), np.uint8))
                        any_masked |= not is_target
                        n_tokens += len(arr)
                    n_docs += 1
            for fh in (ft, fm):
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:  # a bad record (data.on_bad_record=fail), ^C: no partial entry left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if n_docs == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{source}: no usable documents ({bad.count} bad records skipped)")
    if not any_masked:
        os.remove(tmp / "target.u8")
    meta = {"n_tokens": n_tokens, "n_docs": n_docs, "skipped": bad.count, "has_mask": any_masked,
            "files": [str(f) for f in files], "format": fmt, "version": CACHE_VERSION}
    with naming_write_errors(tmp / "meta.json"), open(tmp / "meta.json", "w") as fh:
        json.dump(meta, fh)
        fh.flush()
        os.fsync(fh.fileno())
    ids, tgt, meta = _install_cache(tmp, final)
    logger.info("tokenized %s: %d documents, %d tokens, %d bad records skipped", source, n_docs, n_tokens, bad.count)
    return TokenStream(ids, tgt, source, int(meta.get("skipped", 0)))


# --------------------------------------------------------------------------------------- binidx

_MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
_MMIDIDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                   7: np.float32, 8: np.uint16}


def binidx_files(path: str | Path) -> tuple[Path, Path, Path]:
    """``X``, ``X.bin`` or ``X.idx`` (suffixes in any case) -> ``(X, X.bin, X.idx)``, each file in
    the case it exists in (``X.BIN``/``X.IDX`` too); lower case when it does not exist."""
    p = Path(path)
    prefix = p.with_suffix("") if p.suffix.lower() in (".bin", ".idx") else p

    def find(ext: str) -> Path:
        if p.suffix.lower() == ext and p.is_file():  # the file given
            return p
        for n in (Path(str(prefix) + ext), Path(str(prefix) + ext.upper())):
            if n.is_file():
                return n
        try:  # another mix of cases (X.Bin): look in the folder
            return next(q for q in prefix.parent.iterdir() if q.name.lower() == prefix.name.lower() + ext
                        and q.name.startswith(prefix.name) and q.is_file())
        except (OSError, StopIteration):
            return Path(str(prefix) + ext)

    return prefix, find(".bin"), find(".idx")


def read_binidx(path: str | Path) -> TokenStream:
    """Read a Megatron ``MMIDIDX`` pair (RWKV-LM's binidx): validate the ``.idx`` header and the
    pointers against the ``.bin`` size; return the whole ``.bin`` as one memmapped token stream.

    ``.idx`` layout (little-endian): magic ``MMIDIDX\\0\\0`` (9 bytes), version u64 (=1), dtype code
    u8, n_sequences u64, n_docs u64, sizes int32[n_sequences], pointers int64[n_sequences]
    (byte offsets into ``.bin``), doc_idx int64[n_docs].
    """
    prefix, bin_p, idx_p = binidx_files(path)
    for p in (idx_p, bin_p):
        if not p.is_file():
            raise DataError(f"{p}: binidx file not found (need both {prefix}.bin and {prefix}.idx)")
    try:
        with open(idx_p, "rb") as f:
            head = f.read(9 + 8 + 1 + 8 + 8)
    except OSError as e:
        raise DataError(f"{idx_p}: cannot read ({e.strerror or e})") from None
    if head[:9] != _MMIDIDX_MAGIC[:len(head)] or (len(head) >= 9 and head[:9] != _MMIDIDX_MAGIC):
        raise DataError(f"{idx_p}: not an MMIDIDX index (bad magic header)")
    if len(head) < 34:
        raise DataError(f"{idx_p}: truncated index header ({len(head)} of 34 bytes)")
    (version,) = struct.unpack("<Q", head[9:17])
    (code,) = struct.unpack("<B", head[17:18])
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    if version != 1:
        raise DataError(f"{idx_p}: unsupported MMIDIDX version {version} (expected 1)")
    if code not in _MMIDIDX_DTYPES or code in (6, 7):
        raise DataError(f"{idx_p}: unsupported token dtype code {code}")
    dtype = np.dtype(_MMIDIDX_DTYPES[code])
    idx_size = idx_p.stat().st_size
    need = 34 + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if idx_size < need:
        raise DataError(f"{idx_p}: truncated index ({idx_size} bytes, header promises {need})")
    sizes = np.memmap(idx_p, dtype=np.int32, mode="r", offset=34, shape=(n_seq,)) if n_seq else np.zeros(0, np.int32)
    pointers = (np.memmap(idx_p, dtype=np.int64, mode="r", offset=34 + 4 * n_seq, shape=(n_seq,))
                if n_seq else np.zeros(0, np.int64))
    bin_size = bin_p.stat().st_size
    if bin_size % dtype.itemsize:
        raise DataError(f"{bin_p}: size {bin_size} is not a multiple of the token size {dtype.itemsize}")
    if n_seq == 0 or bin_size == 0:
        raise DataError(f"{prefix}: empty binidx dataset")
    if (sizes < 0).any():
        raise DataError(f"{idx_p}: negative sequence size")
    expect = np.concatenate([[0], np.cumsum(sizes.astype(np.int64) * dtype.itemsize)[:-1]])
    if not np.array_equal(np.asarray(pointers), expect):
        bad = int(np.nonzero(np.asarray(pointers) != expect)[0][0])
        raise DataError(f"{idx_p}: sequence {bad} pointer {int(pointers[bad])} does not follow the sizes (expected {int(expect[bad])})")
    total = int(sizes.astype(np.int64).sum())
    if total * dtype.itemsize != bin_size:
        raise DataError(f"{bin_p}: holds {bin_size // dtype.itemsize} tokens but the index describes {total}")
    ids = np.memmap(bin_p, dtype=dtype, mode="r", shape=(total,))
    return TokenStream(ids, None, str(bin_p), doc_ends=np.cumsum(sizes.astype(np.int64)))


class BadDocuments:
    """The documents of a token array that hold an id outside ``[0, vocab_size)``: ``docs``
    (indices), with each one's span ``starts[d]..ends[d]`` and first bad token ``first_bad``.
    Documents are ``ends`` (binidx's sequences), or the runs that end with separator 0."""

    def __init__(self, ids: np.ndarray, vocab_size: int, ends: Optional[np.ndarray] = None):
        n = len(ids)
        if ends is None:
            ends = np.flatnonzero(np.asarray(ids) == SEPARATOR) + 1
            if not len(ends) or ends[-1] != n:
                ends = np.append(ends, n)
        self.ids, self.vocab_size, self.ends = ids, vocab_size, ends
        self.starts = np.concatenate([[0], ends[:-1]])
        out_of_range = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        self.docs = np.unique(np.searchsorted(ends, out_of_range, side="right"))
        self.first_bad = out_of_range[np.searchsorted(out_of_range, self.starts[self.docs])]

    @property
    def all_bad(self) -> bool:
        return len(self.docs) == len(self.ends)

    def log(self, source: str, limit: int = 10) -> None:
        """One "skipping bad record" line per document (the first ``limit``), then a count."""
        for k, (d, i) in enumerate(zip(self.docs.tolist()[:limit], self.first_bad.tolist())):
            logger.warning("skipping bad record: %s: document %d (tokens %d..%d): token %d has id %d, outside the "
                           "model's vocabulary [0, %d)", source, d, self.starts[d], self.ends[d] - 1, i,
                           int(self.ids[i]), self.vocab_size)
        if len(self.docs) > limit:
            logger.warning("skipping bad record: %s: %d more documents with ids outside [0, %d)", source,
                           len(self.docs) - limit, self.vocab_size)

    def write_kept(self, ft) -> int:
        """Write the other documents' tokens (uint32) to ``ft``, a piece at a time; their count."""
        n, at, kept = len(self.ids), 0, 0
        for d in self.docs.tolist() + [len(self.ends)]:
            stop = self.starts[d] if d < len(self.ends) else n
            for a in range(at, stop, 1 << 24):
                write_array(ft, np.asarray(self.ids[a:min(stop, a + (1 << 24))], dtype=np.uint32))
            kept += stop - at
            at = self.ends[d] if d < len(self.ends) else n
        return int(kept)


def drop_bad_documents(stream: TokenStream, vocab_size: int, cache_dir: Path, files: Sequence[Path]) -> TokenStream:
    """``data.on_bad_record: skip`` for a source read as one stream (a binidx pair, one ``.npy``
    file): the documents that hold an id outside ``[0, vocab_size)`` are skipped, each counted
    and (the first ten) logged, and the others written once to the cache (keyed by the content of
    ``files``); the files are left as they are. A stream whose ids all fit comes back as it is.
    Documents are binidx's sequences, or in a ``.npy`` file the runs that end with separator 0
    (:class:`BadDocuments`)."""
    ids = stream.ids
    if not len(ids) or (int(np.min(ids)) >= 0 and int(np.max(ids)) < vocab_size):
        return stream
    h = hashlib.sha256(f"dropbad-v{CACHE_VERSION}|{vocab_size}".encode())
    for f in files:
        h.update(_file_sha(f).encode())
    final = Path(cache_dir) / h.hexdigest()[:24]
    hit = _open_cache(final)
    if hit is None:
        bad = BadDocuments(ids, vocab_size, stream.doc_ends)
        bad.log(stream.source)
        if bad.all_bad:
            i = int(bad.first_bad[0])
            raise DataError(f"{stream.source}: no usable documents (all {len(bad.docs)} hold ids outside the "
                            f"model's vocabulary [0, {vocab_size}); e.g. token {i} has id {int(ids[i])})")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = _cache_temp(Path(cache_dir), final.name)
        try:
            with naming_write_errors(tmp / "tokens.u32"), open(tmp / "tokens.u32", "wb") as ft:
                kept = bad.write_kept(ft)
                ft.flush()
                os.fsync(ft.fileno())
            with naming_write_errors(tmp / "meta.json"), open(tmp / "meta.json", "w") as fh:
                json.dump({"n_tokens": kept, "skipped": len(bad.docs), "has_mask": False,
                           "version": CACHE_VERSION}, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:  # ^C, a full disk: no partial entry left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        hit = _install_cache(tmp, final)
    kept_ids, _, meta = hit
    skipped = int(meta.get("skipped", 0))
    logger.warning("%s: skipped %d document(s) holding ids outside the model's vocabulary [0, %d)",
                   stream.source, skipped, vocab_size)
    return TokenStream(kept_ids, None, stream.source, skipped)


def write_binidx(prefix: str | Path, docs: Iterable[Iterable[int]], dtype=np.uint16) -> None:
    """Write documents as an MMIDIDX pair ``prefix.bin``/``prefix.idx`` (one sequence per document)."""
    code = {np.dtype(v): k for k, v in _MMIDIDX_DTYPES.items()}[np.dtype(dtype)]
    sizes, chunks = [], []
    for d in docs:
        a = np.asarray(list(d), dtype=dtype)
        sizes.append(len(a))
        chunks.append(a)
    sizes_a = np.asarray(sizes, dtype=np.int32)
    ptr = np.concatenate([[0], np.cumsum(sizes_a.astype(np.int64) * np.dtype(dtype).itemsize)[:-1]]).astype(np.int64)
    doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
    with open(str(prefix) + ".bin", "wb") as f:
        for a in chunks:
            f.write(a.tobytes())
    with open(str(prefix) + ".idx", "wb") as f:
        f.write(_MMIDIDX_MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<QQ", len(sizes), len(doc_idx)))
        f.write(sizes_a.tobytes())
        f.write(ptr.tobytes())
        f.write(doc_idx.tobytes())


# --------------------------------------------------------------------------------------- .npy tokens


def read_tokens(path: str | Path, cache_dir: Path, on_bad: str, vocab_size: Optional[int] = None) -> TokenStream:
    """A ``.npy`` token file (memmapped as is) or a folder of them (concatenated once into the cache,
    with a separator 0 added after any file that does not end with one; hidden files, such as an
    interrupted prepare's ``.new-`` copies, are left out). ``vocab_size``: a folder's shard holding
    an id outside ``[0, vocab_size)`` is a bad record (``on_bad``)."""
    p = Path(path)
    if p.is_file():
        a = load_token_npy(p)
        if int(a.min()) < 0 and not (on_bad == "skip" and vocab_size is not None):  # (skip: see load_stream)
            raise DataError(f"{p}: negative token id {int(a.min())}")
        return TokenStream(a, None, str(p))
    if not p.is_dir():
        raise DataError(f"{p}: no such file or folder")
    # shards are read from the folder itself (a prepared dataset's root holds train/, valid/, test/);
    # folder_files leaves out FIFOs and folders named x.npy
    found = folder_files(p, (".npy",))
    files = [x for x in found if x.parent == p]
    nested = [x for x in found if x.parent != p]
    if not files:
        hint = f" ({len(nested)} lie in subfolders, e.g. {nested[0]}: give the folder of the shards)" if nested else ""
        raise DataError(f"{p}: folder holds no .npy token files{hint}")
    if nested:
        logger.warning("%s: %d .npy file(s) in its subfolders are not read (shards are read from the folder "
                       "itself), e.g. %s", p, len(nested), nested[0])
    bad = BadRecords()
    h = hashlib.sha256(f"tokens-v{CACHE_VERSION}|{on_bad}|{vocab_size}".encode())
    for f in files:
        h.update(f.name.encode())
        try:
            h.update(_file_sha(f).encode())
        except OSError:  # a broken link, a link loop: reported or skipped below, as a bad record
            h.update(b"unreadable")
    final = Path(cache_dir) / h.hexdigest()[:24]
    hit = _open_cache(final)
    if hit is not None:
        ids, _, meta = hit
        return TokenStream(ids, None, str(p), int(meta.get("skipped", 0)))
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = _cache_temp(Path(cache_dir), final.name)
    n = 0
    try:
        with naming_write_errors(tmp / "tokens.u32"), open(tmp / "tokens.u32", "wb") as ft:
            for f in files:
                try:
                    a = load_token_npy(f)
                    docs = None
                    if vocab_size is not None and on_bad == "skip" and (int(a.min()) < 0 or int(a.max()) >= vocab_size):
                        docs = BadDocuments(a, vocab_size)  # its documents with such ids skipped, as a file's
                        if docs.all_bad:  # (another tokenizer's shard, most likely): one bad record
                            i = int(docs.first_bad[0])
                            raise DataError(f"{f}: every document holds ids outside the model's vocabulary "
                                            f"[0, {vocab_size}) (e.g. token {i} has id {int(a[i])})")
                    elif vocab_size is not None:
                        check_id_range(a, vocab_size, str(f))
                    elif int(a.min()) < 0 or int(a.max()) >= 2**32:
                        raise DataError(f"{f}: token ids outside [0, 2**32)")
                except DataError as e:
                    _handle_bad(str(e), on_bad, bad)
                    continue
                if docs is not None:
                    docs.log(str(f))
                    bad.count += len(docs.docs)
                    k = docs.write_kept(ft)
                    last = a[docs.starts[docs.docs[-1]] - 1] if docs.docs[-1] == len(docs.ends) - 1 else a[-1]
                else:
                    a = np.asarray(a, dtype=np.uint32)
                    write_array(ft, a)
                    k, last = len(a), a[-1]
                n += k
                if k and last != SEPARATOR:
                    write_array(ft, np.asarray([SEPARATOR], np.uint32))
                    n += 1
            ft.flush()
            os.fsync(ft.fileno())
    except BaseException:  # a bad file (data.on_bad_record=fail), ^C: no partial entry left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{p}: no usable token files ({bad.count} skipped)")
    with naming_write_errors(tmp / "meta.json"), open(tmp / "meta.json", "w") as fh:
        json.dump({"n_tokens": n, "skipped": bad.count, "has_mask": False, "version": CACHE_VERSION}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    ids, _, meta = _install_cache(tmp, final)
    return TokenStream(ids, None, str(p), int(meta.get("skipped", 0)))


# --------------------------------------------------------------------------------------- dispatch


TEXT_SUFFIXES = {"txt": (".txt", ".md", ".text"), "jsonl": (".jsonl", ".json")}  # matched in any case


def _outside(x: Path, skip: Sequence[Path]) -> bool:
    """Whether ``x`` lies outside every folder of ``skip`` (resolved; a link loop resolves to itself)."""
    if not skip:
        return True
    rx = Path(os.path.realpath(x))  # (Path.resolve raises on a link loop)
    return not any(rx == s or s in rx.parents for s in skip)


def _is_training_run(folder: Path) -> bool:
    """Whether ``folder`` is a training run's output_dir: its ``recipe.yaml`` beside what a run
    writes (checkpoints, final/, metrics.jsonl). A folder that cannot be searched is not one (the
    walk then says it cannot list it): its recipe.yaml was named as the unreadable file."""
    try:
        return (folder / "recipe.yaml").is_file() and any(
            (folder / n).exists() for n in ("checkpoints", "final", "metrics.jsonl"))
    except OSError:
        return False


def folder_files(folder: Path, suffixes: Sequence[str], skip: Sequence[Path] = ()) -> list[Path]:
    """The data files of ``folder`` and its subfolders (see :func:`~multimodal_rwkv.fileio.listed_files`:
    suffix in ``suffixes``, hidden ones left out, broken links listed), without what lies under a
    folder of ``skip`` or in a training run's output folder (this run's, or another's kept beside
    the data: its metrics, configs and checkpoints are not data). A folder that cannot be listed is
    a warning."""
    def run(d: Path) -> bool:
        if _is_training_run(d):
            logger.info("%s: the output of a training run (recipe.yaml and its checkpoints): its files are not data", d)
            return True
        return False

    def unlistable(e: OSError) -> None:
        if os.path.realpath(e.filename) == os.path.realpath(folder):  # the data folder itself: nothing to read
            raise DataError(f"{folder}: cannot list the folder ({e.strerror or e})")
        if e.filename not in _UNLISTABLE_SAID:  # (a run lists its folder several times)
            _UNLISTABLE_SAID.add(e.filename)
            logger.warning("%s: cannot list it (%s): its files are not read", e.filename, e.strerror or e)

    return [x for x in listed_files(folder, suffixes, prune=run, on_unlistable=unlistable) if _outside(x, skip)]


_UNLISTABLE_SAID: set = set()


def _skip_folders(skip) -> list[Path]:
    return [Path(s).resolve() for s in skip if s]


def detect_format(path: str | Path, skip: Sequence[str | Path] = ()) -> str:
    """Guess ``txt | jsonl | binidx | tokens`` from a path's suffix (a folder: from its files, those
    under the folders of ``skip`` -- the run's output_dir -- left out)."""
    p = Path(path)
    skip = _skip_folders(skip)
    suffix = p.suffix.lower()
    if suffix in (".bin", ".idx") or all(f.is_file() for f in binidx_files(p)[1:]):
        return "binidx"
    if p.is_dir():  # the kinds of file the readers take from it (.npy at the top, text anywhere below)
        kinds: dict[str, Path] = {}  # kind -> its first file
        for x in folder_files(p, TEXT_SUFFIXES["txt"] + TEXT_SUFFIXES["jsonl"] + (".npy",), skip):
            suffix = x.suffix.lower()
            kinds.setdefault("tokens" if suffix == ".npy" else "jsonl" if suffix in TEXT_SUFFIXES["jsonl"]
                             else "txt", x)
        if len(kinds) > 1:  # reading one kind would drop the others silently
            mix = " and ".join(f"{k} ({', '.join(TEXT_SUFFIXES.get(k, ('.npy',)))}: e.g. {kinds[k].relative_to(p)})"
                               for k in sorted(kinds))
            raise DataError(f"{p}: folder mixes {mix} files; give one kind per folder or set data.format")
        if not kinds:
            raise DataError(f"{p}: cannot tell the data format from the files in this folder; set data.format")
        return next(iter(kinds))
    if suffix == ".npy":
        return "tokens"
    if suffix in TEXT_SUFFIXES["jsonl"]:
        return "jsonl"
    if suffix in TEXT_SUFFIXES["txt"] + ("",):
        return "txt"
    raise DataError(f"{p}: cannot tell the data format from the suffix {p.suffix!r}; set data.format")


def load_stream(path: str | Path, fmt: str, tokenizer_name: str, cache_dir: Path, on_bad: str,
                tokenizer=None, skip: Sequence[str | Path] = (), vocab_size: Optional[int] = None) -> TokenStream:
    """Open any supported source as a :class:`TokenStream` (tokenizing text through the cache). A
    folder's files under the folders of ``skip`` (the run's own output_dir, when it lies inside the
    data folder) are not data. With ``vocab_size``, each ``.npy`` shard of a folder is checked
    against it as it is read: a shard with an id outside is a bad record (named, or skipped and
    counted), not an error about the joined stream; in a source read as one stream (a binidx pair,
    one ``.npy`` file) under ``on_bad`` skip, each document holding such an id is skipped and
    counted (:func:`drop_bad_documents`)."""
    p = Path(path)
    skip = _skip_folders(skip)
    if fmt == "auto":
        fmt = detect_format(p, skip)
    if fmt == "binidx" or (fmt == "tokens" and p.is_file()):  # one stream: bad documents dropped from a copy
        stream = read_binidx(p) if fmt == "binidx" else read_tokens(p, cache_dir, on_bad, vocab_size)
        if on_bad == "skip" and vocab_size is not None:
            stream = drop_bad_documents(stream, vocab_size, cache_dir,
                                        binidx_files(p)[1:] if fmt == "binidx" else [p])
        return stream
    if fmt == "tokens":
        return read_tokens(p, cache_dir, on_bad, vocab_size)
    if fmt in ("txt", "jsonl"):
        if p.is_dir():
            # a broken link is an unreadable file (reported, or skipped and counted), not nothing
            files = folder_files(p, TEXT_SUFFIXES[fmt], skip)
            if not files:
                raise DataError(f"{p}: folder holds no {fmt} files")
        elif p.is_file():
            files = [p]
        else:
            raise DataError(f"{p}: no such file or folder")
        tok = tokenizer if tokenizer is not None else get_tokenizer(tokenizer_name)
        return tokenize_to_cache(files, fmt, tok, cache_dir, on_bad)
    raise DataError(f"{p}: format {fmt!r} is not a text/token format (the lm task reads txt, jsonl, binidx, tokens)")


# --------------------------------------------------------------------------------------- packing


def check_id_range(ids: np.ndarray, vocab_size: int, source: str, offset: int = 0) -> None:
    """DataError naming ``source`` and the first token (position ``offset + i``) whose id is outside
    ``[0, vocab_size)`` (binidx files may hold signed ids)."""
    if not len(ids):
        return
    lo, hi = int(np.min(ids)), int(np.max(ids))
    if lo >= 0 and hi < vocab_size:
        return
    i = int(np.argmax((ids < 0) | (ids >= vocab_size)))
    raise DataError(f"{source}: token {offset + i} has id {int(ids[i])}, outside the model's vocabulary "
                    f"[0, {vocab_size})")


class PackedDataset:
    """Windows of ``ctx_len + 1`` tokens with stride ``ctx_len`` over a :class:`TokenStream`.

    Item ``i`` -> ``{"input_ids": LongTensor[ctx_len], "targets": LongTensor[ctx_len]}`` where
    ``targets[t]`` is the token after ``input_ids[t]`` or -100 (masked / padding). The last
    window is padded (input 0, target -100) so no token is dropped.
    """

    def __init__(self, stream: TokenStream, ctx_len: int, vocab_size: Optional[int] = None):
        self.stream, self.ctx_len, self.vocab_size = stream, int(ctx_len), vocab_size
        n = len(stream)
        if n < 2:
            raise DataError(f"{stream.source}: needs at least 2 tokens, has {n}")
        self.n = -(-(n - 1) // self.ctx_len)

    def __len__(self) -> int:
        return self.n

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, targets)`` as int64 numpy arrays of length ``ctx_len``."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        L = self.ctx_len
        s = i * L
        w = np.array(self.stream.ids[s: s + L + 1], dtype=np.int64)  # a copy: the memmap is read-only
        if self.vocab_size is not None:
            check_id_range(w, self.vocab_size, self.stream.source, offset=s)
        tg = w[1:].copy()
        if self.stream.target is not None:
            m = np.asarray(self.stream.target[s + 1: s + L + 1])
            tg[m == 0] = IGNORE_INDEX
        x = w[:-1]
        if len(x) < L:
            pad = L - len(x)
            x = np.concatenate([x, np.zeros(pad, np.int64)])
            tg = np.concatenate([tg, np.full(pad, IGNORE_INDEX, np.int64)])
        return x, tg

    def __getitem__(self, i: int) -> dict:
        import torch

        x, tg = self.window(int(i))
        return {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(tg)}


def collate_lm(items: list[dict]) -> dict:
    """Stack ``PackedDataset`` items -> ``{"input_ids": [B,L], "targets": [B,L]}``."""
    import torch

    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
