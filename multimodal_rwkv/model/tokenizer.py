"""RWKV World tokenizer: greedy longest match over UTF-8 bytes.

The vocabulary is ``rwkv_vocab_v20230424.txt`` (65,529 entries, ids 1..65529; id 0 is end of text and
is not in the file; the embedding/head size is 65,536). Each line is ``<id> <python literal> <byte
length>``, the literal being a ``str`` (stored as its UTF-8 bytes) or a ``bytes`` literal. We parse
literals with :mod:`ast` (never ``eval``) and check the byte-length column.

Encoding takes, at each position, the longest vocabulary entry that is a prefix of the remaining
bytes; every single byte is a token, so this always progresses. It is the algorithm of the official
``rwkv.rwkv_tokenizer.TRIE_TOKENIZER`` and gives the same ids.

Why it is fast (pure Python, no extension module):

1. The byte matcher. The vocabulary trie is compiled into one regular expression whose
   alternations branch on the next byte (``a(?:b(?:c|)|d)``: the alternatives of a node that is
   itself a token end with an empty one, "stop here"). Python's ``re`` engine then does the greedy
   longest match per token in C, and ``findall`` returns the matched byte strings, which a dict maps
   to ids. The regex is built directly as the parse tree ``re`` would produce (skipping its slow
   pure-Python pattern parser); if those internals are missing or fail a self-check, the same
   pattern is compiled from its text form instead.
2. Boundaries proven from the vocabulary. Where no token can cross a position, greedy matching
   starts a token there and both sides are tokenized independently. Two such cases are derived
   from the file at load time: before a byte that never occurs inside a token (the CJK lead bytes
   0xE4-0xE9 for the World vocabulary: runs of ideographs map character by character through a
   dict), and before a space whose preceding byte never precedes a space inside a token
   (English " word" pieces, whose ids are cached).

:func:`greedy_reference` is the slow, obviously-correct twin that tests compare against, together
with the official package's ``TRIE_TOKENIZER``.
"""
from __future__ import annotations

import ast
import codecs
import gc
import importlib.util
import logging
import os
import re
import sys
import threading
import time
from typing import Iterable, Sequence

from multimodal_rwkv.argtypes import integer_number
from multimodal_rwkv.errors import DataError

logger = logging.getLogger(__name__)

VOCAB_FILENAME = "rwkv_vocab_v20230424.txt"
EOS_TOKEN_ID = 0

__all__ = ["WorldTokenizer", "StreamDecoder", "greedy_reference", "default_vocab_file", "VOCAB_FILENAME"]


# --------------------------------------------------------------------------------------------
# Locating and parsing the vocabulary file
# --------------------------------------------------------------------------------------------


MAX_TOKEN_BYTES = 1024  # the longest token a vocabulary file may hold (the World vocabulary's: 128)


def default_vocab_file() -> str:
    """Path of ``rwkv_vocab_v20230424.txt`` inside the installed official ``rwkv`` package.

    Uses :func:`importlib.util.find_spec`, which locates the package without importing it (so no
    ``RWKV_*`` environment variable is read). Raises :class:`DataError` if the package or file is
    missing.
    """
    try:
        spec = importlib.util.find_spec("rwkv")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, VOCAB_FILENAME)
        if os.path.isfile(path):
            return path
    if not locations:
        raise DataError(
            f"World vocabulary: no vocab_file given and the official 'rwkv' package is not installed "
            f"(pip install rwkv, or pass the path of {VOCAB_FILENAME})"
        )
    raise DataError(
        f"World vocabulary: {VOCAB_FILENAME} not found in the installed 'rwkv' package at "
        f"{locations[0]} (pass vocab_file explicitly)"
    )


def _split_line(path: str, lineno: int, line: str) -> tuple[int, str, int]:
    first = line.find(" ")
    last = line.rfind(" ")
    if first <= 0 or last <= first + 1:
        raise DataError(f"{path}:{lineno}: expected '<id> <python literal> <byte length>', got {line[:80]!r}")
    try:
        idx = int(line[:first])
        nbytes = int(line[last + 1:])
    except ValueError:
        raise DataError(
            f"{path}:{lineno}: id and byte length must be integers in '<id> <literal> <length>', "
            f"got {line[:80]!r}"
        ) from None
    return idx, line[first + 1:last], nbytes


def _literals_bulk(literals: list[str]) -> list | None:
    """Parse all literals with one ``ast.parse`` call (fast); ``None`` if anything looks off.

    Each literal sits on its own line of a list display, so checking that element ``i`` is a
    str/bytes constant starting and ending on line ``i + 2`` proves line-to-element alignment
    (a line cannot contribute zero or two elements without failing these checks).
    """
    src = "[\n" + ",\n".join(literals) + "\n]"
    try:
        tree = ast.parse(src, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    body = tree.body
    if not isinstance(body, ast.List) or len(body.elts) != len(literals):
        return None
    out = []
    for i, node in enumerate(body.elts):
        if (
            not isinstance(node, ast.Constant)
            or not isinstance(node.value, (str, bytes))
            or node.lineno != i + 2
            or node.end_lineno != i + 2
        ):
            return None
        out.append(node.value)
    return out


def _literal_one(path: str, lineno: int, lit: str):
    try:
        value = ast.literal_eval(lit)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError) as e:
        raise DataError(
            f"{path}:{lineno}: token is not a Python str/bytes literal ({type(e).__name__}): {lit[:80]!r}"
        ) from None
    if not isinstance(value, (str, bytes)):
        raise DataError(
            f"{path}:{lineno}: token literal is a {type(value).__name__}, expected str or bytes: {lit[:80]!r}"
        )
    return value


def _max_vocab_id(n_entries: int) -> int:
    """Largest id a vocabulary of ``n_entries`` lines may use: ids index a dense id -> bytes table
    (and the embedding), so they may be sparse but not absurdly so. At least 2**20 (any real RWKV
    vocabulary: the World one has ids up to 65,529), at least 4 x the entries, always < 2**31."""
    return min(2**31 - 1, max(2**20, 4 * n_entries))


def parse_vocab_file(path: str) -> dict[int, bytes]:
    """Read a World vocabulary file into ``{id: token bytes}``.

    Checks: the line format, the byte-length column, ids are unique and >= 1 (0 is end of text) and
    not far beyond the number of entries (see :func:`_max_vocab_id`), byte strings are unique and
    non-empty, and all 256 single bytes are present (so greedy matching always progresses). Blank
    lines are ignored; CRLF endings are accepted. Any problem raises :class:`DataError` naming the
    file and line.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read World vocabulary ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{lineno}: World vocabulary is not valid UTF-8 ({e.reason})") from None

    linenos: list[int] = []
    ids: list[int] = []
    literals: list[str] = []
    lengths: list[int] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line.strip():
            continue
        idx, lit, nbytes = _split_line(path, lineno, line)
        linenos.append(lineno)
        ids.append(idx)
        literals.append(lit)
        lengths.append(nbytes)
    if not ids:
        raise DataError(f"{path}: World vocabulary file has no entries")

    values = _literals_bulk(literals)
    if values is None:  # find the offending line (and its reason) the slow way
        values = [_literal_one(path, ln, lit) for ln, lit in zip(linenos, literals)]

    max_id = _max_vocab_id(len(ids))
    table: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    for lineno, idx, value, nbytes in zip(linenos, ids, values, lengths):
        try:
            tok = value.encode("utf-8") if isinstance(value, str) else value
        except UnicodeEncodeError:
            raise DataError(f"{path}:{lineno}: token {value!r} holds an unpaired surrogate, which is not UTF-8 text "
                            "(write a byte sequence as a bytes literal, b'...')") from None
        if len(tok) > MAX_TOKEN_BYTES:
            raise DataError(f"{path}:{lineno}: a token of {len(tok)} bytes, longer than the {MAX_TOKEN_BYTES} this "
                            "tokenizer takes (the World vocabulary's longest is 128)")
        if len(tok) != nbytes:
            raise DataError(f"{path}:{lineno}: byte length column says {nbytes} but the token has {len(tok)} bytes")
        if not tok:
            raise DataError(f"{path}:{lineno}: empty token")
        if idx < 1:
            raise DataError(f"{path}:{lineno}: id {idx} is invalid (ids start at 1; 0 is end of text)")
        if idx > max_id:
            raise DataError(
                f"{path}:{lineno}: id {idx} is too large for a vocabulary of {len(ids)} entries (ids must be "
                f"<= {max_id}: the id -> bytes table has a row per id up to the largest)"
            )
        if idx in table:
            raise DataError(f"{path}:{lineno}: duplicate id {idx}")
        if tok in seen:
            raise DataError(f"{path}:{lineno}: token {tok!r} duplicates id {seen[tok]}")
        table[idx] = tok
        seen[tok] = idx
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise DataError(
            f"{path}: World vocabulary lacks single-byte tokens for {len(missing)} byte values "
            f"(first: 0x{missing[0]:02x}); greedy byte matching needs all 256"
        )
    return table


# --------------------------------------------------------------------------------------------
# The greedy matcher: a trie compiled into one regular expression
# --------------------------------------------------------------------------------------------

_TERM = -1  # trie-node key marking "the path to here is a token"
_SIZE = -2  # trie-node key holding the number of tokens in the subtree


def _build_trie(tokens: Iterable[bytes]) -> dict:
    """Nested dicts keyed by byte; ``node[_TERM]`` marks a token end, ``node[_SIZE]`` counts the
    tokens below (and at) the node."""
    root: dict = {_SIZE: 0}
    for tok in tokens:
        node = root
        for c in tok:
            nxt = node.get(c)
            if nxt is None:
                nxt = node[c] = {_SIZE: 1}
            else:
                nxt[_SIZE] += 1
            node = nxt
        node[_TERM] = True
    return root


def _children(node: dict) -> tuple[list[int], list]:
    """``(leaves, branches)``: the child bytes that end a token with nothing below them, and the
    other children as ``(byte, node)`` sorted by subtree size, largest first."""
    leaves, branches = [], []
    for c, child in node.items():
        if c < 0:
            continue
        if len(child) == 2 and _TERM in child:  # {_SIZE, _TERM}: a leaf
            leaves.append(c)
        else:
            branches.append((c, child))
    leaves.sort()
    branches.sort(key=lambda kc: (-kc[1][_SIZE], kc[0]))
    return leaves, branches


# Siblings start with distinct bytes, so at most one alternative can match and their order never
# changes the result; it only sets how many are tried. Leaf children collapse into one byte class
# (what `re` itself does for `a|b|c`), tried first since it is a single bitmap test; the others
# follow, most populous subtree first.


def _pattern_text(root: dict) -> bytes:
    """The trie as regex source (the portable fallback and the documented form):
    ``[leaf bytes]|x(?:...)|y(?:...|)|...``, where ``|)`` ends the alternatives of a node that is
    itself a token (stop there if no longer token matches)."""

    def alts(node: dict, optional: bool) -> bytes:
        leaves, branches = _children(node)
        parts = []
        if len(leaves) == 1:
            parts.append(re.escape(bytes(leaves)))
        elif leaves:
            parts.append(b"[" + b"".join(re.escape(bytes([c])) for c in leaves) + b"]")
        for c, child in branches:
            parts.append(re.escape(bytes([c])) + alts(child, _TERM in child))
        if optional:
            parts.append(b"")
        return parts[0] if len(parts) == 1 else b"(?:" + b"|".join(parts) + b")"

    return alts(root, False)


def _re_internals():
    if sys.version_info >= (3, 11):
        from re import _compiler, _constants, _parser  # type: ignore[attr-defined]
    else:  # pragma: no cover - Python 3.10
        import sre_compile as _compiler
        import sre_constants as _constants
        import sre_parse as _parser
    return _parser, _compiler, _constants


def _compile_direct(root: dict):
    """Build the parse tree ``re`` would build for :func:`_pattern_text` and compile it."""
    _parser, _compiler, _constants = _re_internals()
    state = _parser.State()
    SubPattern = _parser.SubPattern
    LITERAL, BRANCH, IN = _constants.LITERAL, _constants.BRANCH, _constants.IN

    def items(node: dict, optional: bool = False) -> list:
        # optional: the node is itself a token, so "stop here" (an empty alternative, tried last)
        leaves, branches = _children(node)
        alternatives = []
        if len(leaves) == 1:
            alternatives.append([(LITERAL, leaves[0])])
        elif leaves:
            alternatives.append([(IN, [(LITERAL, c) for c in leaves])])
        for c, child in branches:
            alternatives.append([(LITERAL, c)] + items(child, _TERM in child))
        if optional:
            alternatives.append([])
        if len(alternatives) == 1:
            return alternatives[0]
        return [(BRANCH, (None, [SubPattern(state, a) for a in alternatives]))]

    return _compiler.compile(SubPattern(state, items(root)), 0)


def greedy_reference(data: bytes, token_to_id: dict[bytes, int], max_len: int) -> list[int]:
    """Slow, obviously-correct greedy longest match: at each position try every length, longest
    first. ``data``: UTF-8 bytes; returns ids. O(len(data) * max_len) dict look-ups."""
    out = []
    i, n = 0, len(data)
    while i < n:
        for length in range(min(max_len, n - i), 0, -1):
            tid = token_to_id.get(data[i:i + length])
            if tid is not None:
                out.append(tid)
                i += length
                break
        else:
            raise ValueError(f"byte 0x{data[i]:02x} at offset {i} has no token")
    return out


class _Vocab:
    """Parsed vocabulary + compiled matcher, shared by all tokenizers of one file."""

    def __init__(self, path: str, table: dict[int, bytes], force_text_regex: bool = False):
        self.path = path
        self.max_id = max(table)
        self.id_to_bytes: list[bytes] = [b""] * (self.max_id + 1)
        for idx, tok in table.items():
            self.id_to_bytes[idx] = tok
        self.token_to_id: dict[bytes, int] = {tok: idx for idx, tok in table.items()}
        self.max_len = max(len(t) for t in self.token_to_id)
        root = _build_trie(self.token_to_id)
        self.regex = None
        self.regex_kind = "text"
        if not force_text_regex:
            try:
                rx = _compile_direct(root)
                if self._self_check(rx):
                    self.regex, self.regex_kind = rx, "direct"
                else:
                    logger.warning("World tokenizer: direct regex build failed its self-check; using text pattern")
            except Exception as e:  # internals of `re` differ on this Python: use the public API
                logger.info("World tokenizer: direct regex build unavailable (%s); using text pattern", e)
        if self.regex is None:
            self.regex = self._compile_text(root)
        self.char_to_id, self.run_regex = self._single_char_runs(root)
        # ids of short text pieces that lie between token boundaries (exact: their tokenization
        # does not depend on the surrounding text); cleared when full
        self.piece_cache: dict[str, tuple[int, ...]] = {}
        self.chunk_regex, self.split_regex = self._space_chunks()
        self.chunk_cache: dict[bytes, tuple[int, ...]] = {}

    def _space_chunks(self):
        """Regexes that cut bytes at spaces that are always token boundaries.

        Let P be the bytes that some token has directly before a space (for the World vocabulary:
        tab, newline and space). A space preceded by a byte outside P cannot be inside any token,
        so greedy matching starts a token there and the text on both sides is tokenized
        independently. ``chunk_regex`` finds the pieces between such spaces (" word", "\n\n  Hi",
        ...), which repeat a lot in prose, so their ids are cached. ``split_regex`` finds one such
        space (the cut is after the match's first byte), to cut long inputs into blocks.
        Returns ``(None, None)`` if every byte can precede a space inside a token.
        """
        before_space = set()
        for tok in self.token_to_id:
            i = tok.find(b" ", 1)
            while i != -1:
                before_space.add(tok[i - 1])
                i = tok.find(b" ", i + 1)
        if len(before_space) == 256:
            return None, None
        if not before_space:
            return re.compile(_chunk_pattern(None)), re.compile(rb"(?s:.) ")
        cls = b"".join(re.escape(bytes([c])) for c in sorted(before_space))
        return re.compile(_chunk_pattern(cls)), re.compile(rb"[^" + cls + rb"] ")

    def _single_char_runs(self, root: dict):
        """The characters whose boundaries are always token boundaries, and the leaf tokens among them.

        Call a byte a *boundary byte* if it never occurs after the first position of any token: no
        token can cross the position just before it, so greedy matching always starts a token
        there, and the text on either side of that position is tokenized independently. For the
        World vocabulary the UTF-8 lead bytes 0xE4-0xE9 (U+4000-U+9FFF: CJK ideographs) are
        boundary bytes, and every CJK ideograph in the vocabulary is a token that no longer token
        extends. So in a run of characters with boundary lead bytes, each character is tokenized on
        its own: by a dict look-up if it is a token, by the byte matcher otherwise. Only the last
        character of a run needs care: unless it is a *leaf* token (nothing longer starts with it)
        a token could continue past it, so it goes to the byte matcher with the text that follows.

        Returns ``(leaf_char_to_id, run_regex)``; ``run_regex`` (over ``str``) matches maximal runs of
        characters whose UTF-8 lead byte is a boundary byte, or is ``None`` if there are none.
        """
        inner = set()
        for tok in self.token_to_id:
            inner.update(tok[1:])
        boundary = [b for b in range(0xC2, 0xF5) if b not in inner]  # multi-byte lead bytes only
        if not boundary:
            return {}, None
        spans = []
        for lead in boundary:  # code points whose UTF-8 starts with `lead`
            if lead < 0xE0:
                lo, hi = (lead & 0x1F) << 6, ((lead & 0x1F) << 6) | 0x3F
            elif lead < 0xF0:
                lo, hi = max((lead & 0x0F) << 12, 0x800), ((lead & 0x0F) << 12) | 0xFFF
            else:
                lo, hi = max((lead & 0x07) << 18, 0x10000), min(((lead & 0x07) << 18) | 0x3FFFF, 0x10FFFF)
            if spans and spans[-1][1] + 1 == lo:
                spans[-1][1] = hi
            else:
                spans.append([lo, hi])
        charset = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in spans)
        run_regex = re.compile(f"[{charset}]+")
        leaf_char_to_id: dict[str, int] = {}
        for tok, idx in self.token_to_id.items():
            if tok[0] in inner or not 2 <= len(tok) <= 4:
                continue
            try:
                ch = tok.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(ch) != 1:
                continue
            node = root
            for c in tok:
                node = node[c]
            if len(node) == 2:  # {_SIZE, _TERM}: nothing longer starts with it
                leaf_char_to_id[ch] = idx
        return leaf_char_to_id, run_regex

    @staticmethod
    def _compile_text(root: dict):
        old = sys.getrecursionlimit()
        # the pattern's builder and re's parser recurse per nesting level: a byte of the longest token
        sys.setrecursionlimit(max(old, 20 * MAX_TOKEN_BYTES))
        try:
            return re.compile(_pattern_text(root))
        finally:
            sys.setrecursionlimit(old)

    def _self_check(self, rx) -> bool:
        probe = bytes(range(256)) + "The Eiffel tower, 今天是美好的一天。\n\n  x 🙂".encode() + b" " * 200
        got = [self.token_to_id[m] for m in rx.findall(probe)]
        return got == greedy_reference(probe, self.token_to_id, self.max_len)


def _chunk_pattern(before_space_class: bytes | None, possessive: bool | None = None) -> bytes:
    """Regex for the pieces between always-boundary spaces (see ``_Vocab._space_chunks``).

    The longest piece is always a match, so greedy and possessive quantifiers find the same
    pieces; possessive ones (Python >= 3.11) skip the backtracking bookkeeping (~10% faster).
    """
    if possessive is None:
        possessive = sys.version_info >= (3, 11)
    star = b"*+" if possessive else b"*"
    if before_space_class is None:
        return rb"(?s:.[^ ]" + star + b")"
    return (rb"(?s:.[^ ]" + star + rb"(?:(?<=[" + before_space_class + rb"]) +[^ ]" + star + b")" + star
            + b")")


_CACHE: dict[tuple, _Vocab] = {}
_CACHE_LOCK = threading.Lock()


def _load_vocab(path: str) -> _Vocab:
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read World vocabulary ({e.strerror or e})") from None
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    with _CACHE_LOCK:
        vocab = _CACHE.get(key)
        if vocab is None:
            t0 = time.perf_counter()
            gc_was_enabled = gc.isenabled()
            gc.disable()  # ~1e6 small containers: generational GC passes would triple the load time
            try:
                vocab = _Vocab(path, parse_vocab_file(path))
            finally:
                if gc_was_enabled:
                    gc.enable()
            _CACHE[key] = vocab
            logger.debug("loaded World vocabulary %s (%d tokens) in %.2fs", path, len(vocab.token_to_id),
                         time.perf_counter() - t0)
        return vocab


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _as_id(i) -> int:
    """A token id given as another integer type (numpy, a 0-d tensor); bool (also a bool tensor or
    numpy bool), float or row: TypeError."""
    n = integer_number(i)
    if n is None:
        raise TypeError(f"token ids must be integers, got {i!r} ({type(i).__name__})")
    return n


class WorldTokenizer:
    """The RWKV World tokenizer (greedy longest match over UTF-8 bytes).

    Args:
        vocab_file: path of a World vocabulary file; default: ``rwkv_vocab_v20230424.txt`` from the
            installed official ``rwkv`` package (:class:`DataError` if neither).
        vocab_size: embedding size the ids index into; default: largest id + 1 rounded up to a
            multiple of 64 (65,536 for the official file). Ids in ``[largest id + 1, vocab_size)``
            are reserved and decode to nothing.

    Id 0 (:attr:`eos_token_id`) is end of text / document separator: it is never produced by
    :meth:`encode` and decodes to ``""``. Parsed vocabularies are cached per file (path, mtime,
    size) in this process, so a second tokenizer costs nothing. Instances may be shared between
    threads; the per-vocabulary caches of piece ids are bounded (about 2 x 65,536 short entries).

    Example::

        tok = WorldTokenizer()
        tok.encode("Hello world")            # [33155, 40213]
        tok.decode([33155, 40213])           # 'Hello world'
        stream = tok.stream_decoder()        # for generation: text as soon as it is complete
        "".join(stream.push(i) for i in tok.encode("你好")) + stream.flush()   # '你好'
    """

    def __init__(self, vocab_file: str | os.PathLike | None = None, vocab_size: int | None = None):
        path = os.fspath(vocab_file) if vocab_file is not None else default_vocab_file()
        self._vocab = _load_vocab(path)
        self.vocab_file = path
        min_size = self._vocab.max_id + 1
        if vocab_size is None:
            vocab_size = -(-min_size // 64) * 64
        else:  # an int or numpy integer; 65536.5, True, "65536" are refused
            try:
                vocab_size = _as_id(vocab_size)
            except TypeError:
                raise TypeError(
                    f"vocab_size must be an integer, got {vocab_size!r} ({type(vocab_size).__name__})"
                ) from None
        if vocab_size < min_size:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the largest id + 1 ({min_size}) in {path}")
        self._vocab_size = vocab_size
        # id -> bytes for every valid id (reserved ones map to b"")
        self._decode_table: list[bytes] = self._vocab.id_to_bytes + [b""] * (self._vocab_size - min_size)
        self._findall = self._vocab.regex.findall
        self._lookup = self._vocab.token_to_id.__getitem__

    # -- sizes and special ids ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids (embedding rows): 65,536 for the official vocabulary."""
        return self._vocab_size

    @property
    def eos_token_id(self) -> int:
        """End of text / document separator (0)."""
        return EOS_TOKEN_ID

    @property
    def max_token_bytes(self) -> int:
        """Bytes in the longest token: greedy matching decides the token that starts at a byte from
        the next ``max_token_bytes`` bytes alone."""
        return self._vocab.max_len

    def __len__(self) -> int:
        return self._vocab_size

    def __repr__(self) -> str:
        return f"WorldTokenizer(vocab_file={self.vocab_file!r}, vocab_size={self._vocab_size})"

    def __reduce__(self):
        # pickles as (path, vocab_size): a worker process re-reads the file (its compiled matcher
        # cannot be pickled)
        return (type(self), (self.vocab_file, self._vocab_size))

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (``str``; lone surrogates raise ``UnicodeEncodeError``).

        Returns a list of ints in ``[1, largest id]``; no end-of-text id is added.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes str, got {type(text).__name__} (use encode_bytes for bytes)")
        vocab = self._vocab
        if vocab.run_regex is None or text.isascii():
            return self.encode_bytes(text.encode("utf-8"))
        try:
            return self._encode_runs(text)
        except UnicodeEncodeError:  # a lone surrogate, found in a piece: the error at its place in text
            text.encode("utf-8")
            raise

    def _encode_runs(self, text: str) -> list[int]:
        """:meth:`encode` of a non-ASCII text, with the fast path for runs of single-character tokens."""
        vocab = self._vocab
        # Runs of characters with boundary lead bytes (CJK; see _Vocab._single_char_runs) are
        # tokenized character by character; the pieces between them by the byte matcher.
        out: list[int] = []
        char_ids = vocab.char_to_id
        char_id = char_ids.__getitem__
        piece = self._encode_piece
        pos = 0
        for m in vocab.run_regex.finditer(text):
            start, end = m.span()
            run = m.group()
            if run[-1] not in char_ids:  # a token might continue past it: leave it to what follows
                end -= 1
                run = run[:-1]
                if not run:
                    continue
            if start > pos:
                out += piece(text[pos:start])
            n0 = len(out)
            try:
                out += map(char_id, run)
            except KeyError:  # a character that is not a leaf token: its own bytes, matched alone
                del out[n0:]
                for ch in run:
                    tid = char_ids.get(ch)
                    if tid is None:
                        out += piece(ch)
                    else:
                        out.append(tid)
            pos = end
        if pos < len(text):
            out += piece(text[pos:])
        return out

    _PIECE_CACHE_MAX_CHARS = 16
    _PIECE_CACHE_MAX_ENTRIES = 1 << 16

    def _encode_piece(self, piece: str):
        """Ids of a piece of text that starts and ends at token boundaries (cached if short)."""
        if len(piece) > self._PIECE_CACHE_MAX_CHARS:
            return self.encode_bytes(piece.encode("utf-8"))
        cache = self._vocab.piece_cache
        ids = cache.get(piece)
        if ids is None:
            ids = tuple(self.encode_bytes(piece.encode("utf-8")))
            if len(cache) >= self._PIECE_CACHE_MAX_ENTRIES:
                cache.clear()
            cache[piece] = ids
        return ids

    _BLOCK = 1 << 20
    _CHUNK_CACHE_MAX_BYTES = 32
    _CHUNK_CACHE_MAX_ENTRIES = 1 << 16

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes (any bytes, not necessarily valid UTF-8): a list of ints in
        ``[1, largest id]``, the same greedy longest match as :meth:`encode`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):  # bytes(5) would be five NUL bytes
            raise TypeError(f"encode_bytes takes bytes-like data, got {type(data).__name__}")
        data = bytes(data)
        vocab = self._vocab
        n = len(data)
        if vocab.chunk_regex is None or n < 16:
            return self._encode_matcher(data)
        block = max(self._BLOCK, 4 * vocab.max_len)
        if n <= block:
            return self._encode_chunks(data, 0, n)
        out: list[int] = []
        pos = 0
        while pos < n:  # blocks cut at always-boundary spaces (bounded memory for long inputs)
            m = vocab.split_regex.search(data, pos + block) if n - pos > block else None
            end = m.start() + 1 if m else n
            out += self._encode_chunks(data, pos, end)
            pos = end
        return out

    def _encode_chunks(self, data: bytes, pos: int, end: int) -> list[int]:
        """Ids of ``data[pos:end]`` (both ends at token boundaries), piece by piece between
        always-boundary spaces, with a cache for short pieces."""
        out: list[int] = []
        cache = self._vocab.chunk_cache
        get = cache.get
        findall, lookup = self._findall, self._lookup
        for chunk in self._vocab.chunk_regex.findall(data, pos, end):
            ids = get(chunk)
            if ids is None:
                if len(chunk) > self._CHUNK_CACHE_MAX_BYTES:
                    out += self._encode_matcher(chunk)
                    continue
                ids = tuple(map(lookup, findall(chunk)))
                if len(cache) >= self._CHUNK_CACHE_MAX_ENTRIES:
                    cache.clear()
                cache[chunk] = ids
            out += ids
        return out

    def _encode_matcher(self, data: bytes) -> list[int]:
        """Ids of ``data`` from the byte matcher alone (no chunking, no cache)."""
        n = len(data)
        findall, lookup = self._findall, self._lookup
        max_len = self._vocab.max_len
        block = max(self._BLOCK, 4 * max_len)
        if n <= block:
            return list(map(lookup, findall(data)))
        # Long inputs in blocks (bounded memory for the list of matched byte strings). The token
        # starting at offset i depends only on data[i:i+max_len], so every match that starts at
        # least max_len bytes before the block end is final; the rest are redone with the next block.
        out: list[int] = []
        pos = 0
        while pos < n:
            end = min(n, pos + block)
            matches = findall(data, pos, end)
            if end < n:
                cur = end
                while matches:
                    start = cur - len(matches[-1])
                    if start + max_len <= end:
                        break
                    matches.pop()
                    cur = start
                pos = cur
            else:
                pos = n
            out.extend(map(lookup, matches))
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for each text of a list (a single string is a TypeError, not a list of
        its characters)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode_batch takes a list of texts; for one text use encode (or [text])")
        return [self.encode(t) for t in texts]

    def __call__(self, text: str | Sequence[str], text_pair=None, padding: bool | str = False,
                 return_tensors: str | None = None, max_length: int | None = None, truncation: bool | str = False,
                 add_special_tokens: bool = True) -> dict:
        """transformers-style: ``{"input_ids", "attention_mask"}`` for a text or a list of texts
        (``text_pair``, transformers' second argument, is refused: there are no pair encodings).

        ``add_special_tokens`` is accepted for transformers' callers and changes nothing: the World
        tokenizer adds no special tokens (no BOS/EOS around a text).

        ``padding`` takes transformers' values: ``False`` / ``"do_not_pad"`` (default) leaves the
        rows as they are; ``True`` / ``"longest"`` pads a list to its longest row; ``"max_length"``
        pads every row to ``max_length`` (required). Padding is on the **left** with id 0 (mask 0),
        the side the model's batched prompts use
        (``model.generate(**tok(texts, padding=True, return_tensors="pt"))``).
        ``max_length``: no row may be longer; a longer one is a ``ValueError``, or with
        ``truncation=True`` (or transformers' ``"longest_first"`` / ``"only_first"``) keeps its first
        ``max_length`` tokens (transformers' default side); ``truncation=None`` (transformers'
        default) cuts when ``max_length`` is given. Without ``max_length`` there is no
        limit to cut at (the model has no maximum length), so truncation changes nothing.
        Without ``return_tensors`` a list gives lists of lists; ``return_tensors="pt"`` gives
        ``[B, T]`` tensors (a single text: ``[1, T]``), and rows of different lengths are a ``ValueError``."""
        if text_pair is not None:  # transformers' second argument (padding is a keyword, as there)
            raise ValueError("text_pair: the World tokenizer takes one text per row (or a list of texts); "
                             "join a pair into one text")
        if not isinstance(add_special_tokens, bool):
            raise TypeError(f"add_special_tokens must be True or False, got {add_special_tokens!r}")
        limit = None if max_length is None else integer_number(max_length)
        if max_length is not None and (limit is None or limit < 0):
            raise ValueError(f"max_length must be an int >= 0, got {max_length!r}")
        strategy = getattr(truncation, "value", truncation)  # transformers' TruncationStrategy enum too
        if strategy is None:  # transformers' default: cut at max_length when one is given
            strategy = limit is not None
        if strategy in (True, "longest_first", "only_first"):
            truncation = True
        elif strategy in (False, "do_not_truncate"):
            truncation = False
        else:
            raise ValueError(f"truncation={truncation!r}: use False/'do_not_truncate', None, or True/'longest_first'/"
                             "'only_first' (one sequence per row)")
        if padding is False or (isinstance(padding, str) and padding == "do_not_pad"):
            width = None
        elif padding is True or (isinstance(padding, str) and padding == "longest"):
            width = -1  # the longest row
        elif isinstance(padding, str) and padding == "max_length":
            if limit is None:
                raise ValueError(f"padding='max_length' needs max_length=<int >= 0>, got {max_length!r}")
            width = limit
        else:
            raise ValueError(f"padding={padding!r}: use False/'do_not_pad', True/'longest' or 'max_length'")
        single = isinstance(text, str)
        ids = self.encode_batch([text] if single else list(text))
        if limit is not None:
            if truncation:
                ids = [x[:limit] for x in ids]
            else:
                n = max(map(len, ids), default=0)
                if n > limit:
                    raise ValueError(f"a text has {n} tokens, more than max_length={limit} (pass truncation=True "
                                     "to keep the first max_length)")
        if width is not None:
            n = max(map(len, ids), default=0)
            if width >= 0:
                n = width
            mask = [[0] * (n - len(x)) + [1] * len(x) for x in ids]
            ids = [[0] * (n - len(x)) + x for x in ids]
        else:
            mask = [[1] * len(x) for x in ids]
        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError("texts of different token lengths: pass padding=True for tensors")
            import torch

            width = len(ids[0]) if ids else 0  # an empty batch: [0, 0]
            return {"input_ids": torch.tensor(ids, dtype=torch.long).reshape(len(ids), width),
                    "attention_mask": torch.tensor(mask, dtype=torch.long).reshape(len(ids), width)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' or None")
        return {"input_ids": ids[0], "attention_mask": mask[0]} if single else {"input_ids": ids, "attention_mask": mask}

    # -- decoding -------------------------------------------------------------------------------
    def _check_ids(self, ids) -> list:
        if type(ids) is not list:
            if isinstance(ids, (str, bytes, bytearray, memoryview, set, frozenset, dict)):
                raise TypeError(f"token ids must be a sequence of integers, got a {type(ids).__name__}"
                                + (" (unordered)" if isinstance(ids, (set, frozenset, dict)) else ""))
            if hasattr(ids, "tolist"):  # torch / numpy
                ids = ids.tolist()
            if isinstance(ids, int):  # transformers' convention: decode(7) == decode([7])
                return self._check_ids([ids])
            ids = list(ids)
        if ids:
            kinds = set(map(type, ids))  # C speed; bool is an int subclass, a float or a row is not an id
            if not kinds <= {int}:
                ids = [i if type(i) is int else _as_id(i) for i in ids]  # numpy / 0-d tensor integers
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= self._vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is out of range [0, {self._vocab_size})")
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated bytes of ``ids`` (id 0 and reserved ids contribute nothing).

        Raises ``ValueError`` naming the id if one is outside ``[0, vocab_size)``.
        """
        table = self._decode_table
        return b"".join(map(table.__getitem__, self._check_ids(ids)))

    def decode(self, ids: Iterable[int], errors: str = "replace", skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of ``ids``.

        ``errors="replace"`` (default): each byte run that is not valid UTF-8 becomes U+FFFD where
        it occurs; the rest of the text is intact. ``errors="strict"`` raises ``UnicodeDecodeError``.
        Other Python codec error handlers that can handle decoding errors also work (``"ignore"``,
        ``"backslashreplace"``, ``"surrogateescape"``, or one registered with
        :func:`codecs.register_error`); encode-only ones (``"xmlcharrefreplace"``, ``"namereplace"``)
        and unknown names raise ``ValueError``. Id 0 (end of text) decodes to ``""``.
        ``skip_special_tokens`` and ``clean_up_tokenization_spaces`` are taken for ``transformers``'
        callers (``TextStreamer(tok, skip_special_tokens=True)``) and change nothing: the only
        special token, 0, decodes to ``""`` anyway, and the text is never re-spaced.
        """
        _check_errors(errors)
        return self.decode_bytes(ids).decode("utf-8", errors)

    def decode_batch(self, batch: Iterable[Iterable[int]], errors: str = "replace") -> list[str]:
        """:meth:`decode` for each row."""
        return [self.decode(ids, errors) for ids in batch]

    def stream_decoder(self, errors: str = "replace") -> "StreamDecoder":
        """A :class:`StreamDecoder` for incremental decoding during generation."""
        return StreamDecoder(self, errors)

    # -- single tokens ----------------------------------------------------------------------------
    def id_to_bytes(self, token_id: int) -> bytes:
        """Bytes of one id (``b""`` for 0 and reserved ids); ``ValueError`` if out of range,
        ``TypeError`` if not an integer (the same ids as :meth:`decode` takes)."""
        if type(token_id) is not int:
            token_id = _as_id(token_id)  # numpy / 0-d tensor integers; bool, float, str: TypeError
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} is out of range [0, {self._vocab_size})")
        return self._decode_table[token_id]

    def token_to_id(self, token: str | bytes) -> int:
        """Id of one vocabulary entry (``str`` is taken as its UTF-8 bytes); ``KeyError`` if absent."""
        if not isinstance(token, (str, bytes, bytearray, memoryview)):  # bytes(3) would be three NULs
            raise TypeError(f"token_to_id takes a token (str or bytes), got {type(token).__name__} {token!r}")
        key = token.encode("utf-8") if isinstance(token, str) else bytes(token)
        try:
            return self._vocab.token_to_id[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a token of {self.vocab_file}") from None

    def get_vocab(self) -> dict[bytes, int]:
        """A copy of the ``{token bytes: id}`` mapping."""
        return dict(self._vocab.token_to_id)


def _check_errors(errors: str) -> None:
    if not isinstance(errors, str):
        raise TypeError(f"errors must be the name of a decode error handler ('replace', 'strict', ...), got "
                        f"{errors!r} (transformers' second positional argument, skip_special_tokens, is a keyword "
                        "argument here)")
    try:
        codecs.lookup_error(errors)
    except LookupError:
        raise ValueError(f"unknown decode error handler {errors!r} (use 'replace' or 'strict')") from None
    try:  # encode-only handlers (xmlcharrefreplace, namereplace) fail only once a byte is invalid
        b"\xff".decode("utf-8", errors)
    except UnicodeDecodeError:  # strict, surrogatepass
        pass
    except TypeError:
        raise ValueError(
            f"unknown decode error handler {errors!r}: it handles encoding errors only (use 'replace' or 'strict')"
        ) from None


class StreamDecoder:
    """Incremental decoding for streaming generation.

    ``push(id)`` returns the text that became complete with this token; a UTF-8 sequence split
    across tokens is held back until its last byte arrives. ``flush()`` returns what is left (with
    ``errors="replace"`` an incomplete tail becomes U+FFFD; with ``"strict"`` it raises). For any id
    sequence, ``"".join(push(i) for i in ids) + flush()`` equals ``tokenizer.decode(ids, errors)``.
    """

    def __init__(self, tokenizer: WorldTokenizer, errors: str = "replace"):
        _check_errors(errors)
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors)

    def push(self, token_id: int) -> str:
        """Add one id; returns the newly completed text (possibly ``""``). Takes the ids
        :meth:`WorldTokenizer.decode` takes (and raises the same errors for the others)."""
        return self._dec.decode(self._tok.id_to_bytes(token_id))

    def push_many(self, ids: Iterable[int]) -> str:
        """Add several ids; returns the newly completed text."""
        return self._dec.decode(self._tok.decode_bytes(ids))

    @property
    def pending_bytes(self) -> bytes:
        """Bytes held back because they may start a multi-byte character."""
        return self._dec.getstate()[0]

    def flush(self) -> str:
        """End of stream: returns the held-back tail (U+FFFD under ``errors="replace"``) and resets,
        also when it raises (``errors="strict"`` and an incomplete tail)."""
        try:
            return self._dec.decode(b"", final=True)
        finally:
            self._dec.reset()

    def reset(self) -> None:
        """Drop held-back bytes and start over."""
        self._dec.reset()
