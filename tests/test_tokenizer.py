"""World tokenizer: published test vectors, agreement with the official TRIE_TOKENIZER and with the
slow greedy twin on random data, decoding/streaming semantics, and every vocabulary-file error."""
from __future__ import annotations

import importlib.util
import os
import random

import numpy as np
import pytest

from multimodal_rwkv.errors import DataError
from multimodal_rwkv.model import tokenizer as tkmod
from multimodal_rwkv.model.tokenizer import StreamDecoder, WorldTokenizer, greedy_reference

# From the reference notes (computed with the official pip TRIE_TOKENIZER; the first two also match
# rwkv_v6_demo.py and the rwkv-tokenizer README).
VECTORS = {
    "The Eiffel tower is in the city of": [6699, 304, 25740, 109, 39990, 4600, 4596, 22590, 30449, 4706],
    "Today is a beautiful day. 今天是美好的一天。": [
        33520, 4600, 332, 59219, 21509, 47, 33, 10381, 11639, 13091, 15597, 11685, 14734, 10250, 11639, 10080,
    ],
    "Hello world": [33155, 40213],
    "\n\nUser: hi\n\nAssistant:": [261, 24281, 59, 4571, 261, 5585, 41693, 59],
    "你好，世界": [10464, 11685, 19137, 10267, 14610],
    "1234567 + 89 = ?": [632, 654, 676, 56, 278, 3562, 296, 298],
}

HAVE_RWKV = importlib.util.find_spec("rwkv") is not None
needs_rwkv = pytest.mark.skipif(not HAVE_RWKV, reason="official rwkv package not installed")


@pytest.fixture(scope="module")
def tok():
    if not HAVE_RWKV:
        pytest.skip("official rwkv package not installed")
    return WorldTokenizer()


@pytest.fixture(scope="module")
def official(tok):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # does not import rwkv.model

    return TRIE_TOKENIZER(tok.vocab_file)


# ---------------------------------------------------------------- random text generators

_RANGES = [
    (0x20, 0x7E),  # printable ASCII
    (0x00, 0x1F),  # control characters
    (0x80, 0x24F),  # Latin-1 supplement, Latin extended
    (0x370, 0x4FF),  # Greek, Cyrillic
    (0x3000, 0x303F),  # CJK punctuation
    (0x4E00, 0x9FFF),  # CJK ideographs
    (0xAC00, 0xD7A3),  # Hangul
    (0xFF00, 0xFFEF),  # full-width forms
    (0x1F300, 0x1FAFF),  # emoji
    (0x10000, 0x10FFFF),  # anything astral
]
_WORDS = ["the", " the", "of", " and", "Hello", " world", "\n\n", "User:", " Assistant:", "今天", "一天",
          "是", "的", "，", "。", "  ", "\t", "http://", "1234567", " = ", "😀", "\r\n"]


def random_text(rng: random.Random, max_len: int = 120) -> str:
    parts = []
    for _ in range(rng.randint(0, max_len)):
        r = rng.random()
        if r < 0.35:
            parts.append(rng.choice(_WORDS))
        elif r < 0.45:
            parts.append(" " * rng.randint(1, 140))  # runs around the 128-space token
        else:
            lo, hi = rng.choice(_RANGES)
            cp = rng.randint(lo, hi)
            if 0xD800 <= cp <= 0xDFFF:  # lone surrogates cannot be UTF-8 encoded
                cp = 0xFFFD
            parts.append(chr(cp))
    return "".join(parts)


# ---------------------------------------------------------------- exact ids


@needs_rwkv
@pytest.mark.parametrize("text", list(VECTORS))
def test_published_vectors(tok, text):
    assert tok.encode(text) == VECTORS[text]
    assert tok.decode(VECTORS[text]) == text


@needs_rwkv
def test_vectors_hold_for_the_official_tokenizer_too(official):
    # guards the vectors themselves: they must be what the official package produces
    for text, ids in VECTORS.items():
        assert official.encode(text) == ids


@needs_rwkv
def test_random_unicode_matches_official_and_round_trips(tok, official):
    rng = random.Random(1234)
    texts = [random_text(rng) for _ in range(400)] + ["", " ", "\x00", " " * 129, "a" * 1000]
    for text in texts:
        ids = tok.encode(text)
        assert ids == official.encode(text), repr(text)
        assert tok.decode(ids) == text
        assert tok.decode(ids, errors="strict") == text


@needs_rwkv
def test_cjk_run_path_matches_byte_matcher(tok, monkeypatch):
    # encode() maps runs of CJK characters one by one; encode_bytes() is the byte matcher alone
    assert tok._vocab.run_regex is not None and "中" in tok._vocab.char_to_id
    rng = random.Random(11)
    monkeypatch.setattr(tok, "_PIECE_CACHE_MAX_ENTRIES", 8)  # exercise cache eviction too
    pool = ["中", "国", "，", "。", " ", "a", "\n", "😀", "é", "Ω", "ק", "\u0250", "\ue000", "\U00050000", "“"]
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(0, 60)):
            r = rng.random()
            if r < 0.5:
                parts.append(chr(rng.randint(0x4000, 0x9FFF)))  # many are not tokens: byte fallback
            else:
                parts.append(rng.choice(pool + _WORDS))
        text = "".join(parts)
        ids = tok.encode(text)
        assert ids == tok.encode_bytes(text.encode()), repr(text)
        assert tok.decode(ids) == text


@needs_rwkv
def test_random_bytes_match_slow_twin(tok):
    rng = random.Random(99)
    vocab = tok._vocab
    for n in [0, 1, 2, 3, 7, 64, 129, 500]:
        for _ in range(6):
            data = bytes(rng.randrange(256) for _ in range(n))
            assert tok.encode_bytes(data) == greedy_reference(data, vocab.token_to_id, vocab.max_len)
            assert tok.decode_bytes(tok.encode_bytes(data)) == data
    text = "".join(random_text(rng) for _ in range(30)).encode()
    assert tok.encode_bytes(text) == greedy_reference(text, vocab.token_to_id, vocab.max_len)


@needs_rwkv
def test_block_seams_do_not_change_ids(tok, monkeypatch):
    rng = random.Random(5)
    text = "".join(random_text(rng, 300) for _ in range(40))
    data = text.encode()
    whole = tok._encode_matcher(data)
    assert whole == greedy_reference(data, tok._vocab.token_to_id, tok._vocab.max_len)
    monkeypatch.setattr(tok, "_BLOCK", 1)  # blocks of 4 * 128 bytes: many seams, inside space runs too
    assert len(data) > 20 * 4 * tok._vocab.max_len
    assert tok._encode_matcher(data) == whole  # matcher seams (max_len look-ahead rule)
    assert tok.encode_bytes(data) == whole  # cuts at always-boundary spaces
    assert tok.encode(text) == whole
    no_spaces = data.replace(b" ", b"_")  # no space to cut at: one long chunk through the matcher
    assert tok.encode_bytes(no_spaces) == greedy_reference(no_spaces, tok._vocab.token_to_id, tok._vocab.max_len)


@needs_rwkv
def test_space_chunks_and_cache_match_matcher(tok, monkeypatch):
    assert tok._vocab.chunk_regex is not None
    monkeypatch.setattr(tok, "_CHUNK_CACHE_MAX_ENTRIES", 16)  # exercise eviction
    rng = random.Random(8)
    pieces = [" ", "  ", "\t", "\n", "\n\n", "a", "the", " the", "Hello", ".", "中", "é", "x" * 40, "\r"]
    for _ in range(400):
        data = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 50))).encode()
        assert tok.encode_bytes(data) == tok._encode_matcher(data), data
    for _ in range(50):
        data = bytes(rng.choice(b" \t\nab\xe4\xb8\xad.") for _ in range(rng.randint(0, 300)))
        assert tok.encode_bytes(data) == greedy_reference(data, tok._vocab.token_to_id, tok._vocab.max_len)


@needs_rwkv
def test_pickle_round_trip(tok):
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    assert clone.vocab_file == tok.vocab_file and clone.vocab_size == tok.vocab_size
    assert clone.encode("你好，世界") == VECTORS["你好，世界"]


@needs_rwkv
def test_direct_regex_is_used_and_batch(tok):
    assert tok._vocab.regex_kind == "direct"  # the fast build did not silently fall back
    texts = ["Hello world", "", "你好，世界"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts


# ---------------------------------------------------------------- synthetic vocabularies


def write_vocab(path, tokens, start=1, crlf=False):
    nl = "\r\n" if crlf else "\n"
    with open(path, "w", encoding="utf-8", newline="") as f:
        for i, t in enumerate(tokens, start):
            lit = repr(t.decode("utf-8")) if _is_utf8(t) else repr(t)
            f.write(f"{i} {lit} {len(t)}{nl}")
    return str(path)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def synthetic_tokens(rng: random.Random, n_extra: int = 600) -> list[bytes]:
    """All single bytes plus random tokens over a small alphabet: deep chains, shared prefixes and
    prefixes that are not tokens, so the matcher must backtrack."""
    toks = [bytes([b]) for b in range(256)]
    seen = set(toks)
    alphabet = b"ab \xe4\xb8\x80"
    while len(toks) < 256 + n_extra:
        t = bytes(rng.choice(alphabet) for _ in range(rng.randint(2, 12)))
        if t not in seen:
            seen.add(t)
            toks.append(t)
    toks.sort(key=len)
    return toks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direct_and_text_regex_match_slow_twin_on_synthetic_vocab(tmp_path, seed):
    rng = random.Random(seed)
    path = write_vocab(tmp_path / "v.txt", synthetic_tokens(rng))
    table = tkmod.parse_vocab_file(path)
    direct = tkmod._Vocab(path, table)
    text_rx = tkmod._Vocab(path, table, force_text_regex=True)
    assert direct.regex_kind == "direct" and text_rx.regex_kind == "text"
    alphabet = b"ab \xe4\xb8\x80\xffz"
    for n in [0, 1, 2, 5, 13, 100, 777]:
        data = bytes(rng.choice(alphabet) for _ in range(n))
        want = greedy_reference(data, table_inv(table), direct.max_len)
        for v in (direct, text_rx):
            assert [v.token_to_id[m] for m in v.regex.findall(data)] == want


def table_inv(table):
    return {t: i for i, t in table.items()}


def test_char_runs_on_synthetic_vocab(tmp_path):
    # lead bytes 0xE4/0xE5/0xC3 never occur inside a token here, so they are boundary bytes;
    # 国 is a token that "国x" extends (not a leaf), 文 is not a token, é is a 2-byte leaf
    extra = ["中", "国", "国x", "é", "ab", "a b"]
    toks = [bytes([b]) for b in range(256)] + [t.encode() for t in dict.fromkeys(extra) if len(t.encode()) > 1]
    path = write_vocab(tmp_path / "v.txt", toks)
    tok = WorldTokenizer(path)
    assert tok._vocab.run_regex is not None
    assert set(tok._vocab.char_to_id) == {"中", "é"}
    vocab = tok._vocab
    rng = random.Random(4)
    alphabet = ["中", "国", "x", "a", "b", " ", "文", "é", "国x", "中国"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        want = greedy_reference(text.encode(), vocab.token_to_id, vocab.max_len)
        assert tok.encode(text) == want, repr(text)
    assert tok.encode("中国x") == [tok.token_to_id("中"), tok.token_to_id("国x")]


@pytest.mark.parametrize(
    "inner_space_tokens",
    [
        [],
        [b"a b", b"b  ", b"\n "],
        [b"x" + bytes([c]) + b" " for c in range(32, 127)],
        [bytes([c]) + b" " for c in range(256)],  # any byte may precede a space: no cutting at all
    ],
)
def test_space_chunks_on_synthetic_vocab(tmp_path, inner_space_tokens):
    # which bytes may precede a space inside a token decides where pieces can be cut
    extra = [b"ab", b" a", b" b", b"  ", b" ab", b"ba "] + inner_space_tokens
    toks = [bytes([b]) for b in range(256)] + list(dict.fromkeys(extra))
    tok = WorldTokenizer(write_vocab(tmp_path / "v.txt", toks))
    vocab = tok._vocab
    assert (vocab.chunk_regex is None) == (len(inner_space_tokens) == 256)
    rng = random.Random(len(inner_space_tokens))
    for _ in range(400):
        data = bytes(rng.choice(b"ab x\n\t") for _ in range(rng.randint(0, 120)))
        assert tok.encode_bytes(data) == greedy_reference(data, vocab.token_to_id, vocab.max_len), data


@pytest.mark.skipif(tkmod.sys.version_info < (3, 11), reason="possessive quantifiers need Python 3.11")
def test_greedy_and_possessive_chunk_patterns_agree():
    rng = random.Random(12)
    for cls in (None, b"\\t\\n ", b"a\\n "):
        greedy = tkmod.re.compile(tkmod._chunk_pattern(cls, possessive=False))
        possessive = tkmod.re.compile(tkmod._chunk_pattern(cls, possessive=True))
        assert greedy.pattern != possessive.pattern
        for _ in range(300):
            data = bytes(rng.choice(b"  \t\nab.") for _ in range(rng.randint(0, 80)))
            pieces = greedy.findall(data)
            assert b"".join(pieces) == data and possessive.findall(data) == pieces


def test_synthetic_vocab_tokenizer_api(tmp_path):
    toks = synthetic_tokens(random.Random(3), 100)
    path = write_vocab(tmp_path / "v.txt", toks, crlf=True)  # CRLF like the RWKV-LM copy
    tok = WorldTokenizer(path)
    assert tok.vocab_size == 384 and len(tok) == 384  # 356 + 1 rounded up to 64
    assert tok.eos_token_id == 0
    assert tok.id_to_bytes(0) == b"" and tok.id_to_bytes(383) == b""  # eos, reserved
    assert tok.id_to_bytes(1) == b"\x00" and tok.token_to_id(b"\x00") == 1
    assert tok.token_to_id(toks[-1]) == len(toks)
    with pytest.raises(KeyError):
        tok.token_to_id(b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    assert WorldTokenizer(path, vocab_size=1000).vocab_size == 1000
    with pytest.raises(ValueError):
        WorldTokenizer(path, vocab_size=10)


# ---------------------------------------------------------------- decoding


@needs_rwkv
def test_decode_replaces_invalid_bytes_locally(tok):
    a, ff, b = tok.token_to_id("a"), tok.token_to_id(b"\xff"), tok.token_to_id("b")
    assert tok.decode([a, ff, b]) == "a\ufffdb"
    half = tok.encode("中")  # one token; split its bytes into single-byte tokens instead
    bytes_ids = [tok.token_to_id(bytes([x])) for x in "中".encode()]
    assert half != bytes_ids and tok.decode(bytes_ids) == "中"
    assert tok.decode([a] + bytes_ids[:2] + [b]) == "a\ufffdb"
    with pytest.raises(UnicodeDecodeError):
        tok.decode([a, ff, b], errors="strict")
    assert tok.decode([a, ff, b], errors="ignore") == "ab"
    with pytest.raises(ValueError, match="nonsense"):
        tok.decode([a], errors="nonsense")


@needs_rwkv
def test_decode_special_and_out_of_range_ids(tok):
    hello = tok.encode("Hello world")
    assert tok.decode([0] + hello + [0]) == "Hello world"
    assert tok.decode([]) == ""
    assert tok.decode([65535]) == ""  # reserved
    for bad in (65536, -1, 10**9):
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode(hello + [bad])
        with pytest.raises(ValueError, match=str(bad)):
            tok.id_to_bytes(bad)
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array(hello)) == "Hello world"


@needs_rwkv
def test_stream_decoder_equals_decode(tok):
    rng = random.Random(7)
    partial = [tok.token_to_id(bytes([x])) for x in range(0x80, 0x100)]
    for _ in range(200):
        ids = tok.encode(random_text(rng, 40))
        if rng.random() < 0.5:  # sprinkle in single bytes that are not valid UTF-8 on their own
            for _ in range(rng.randint(1, 4)):
                ids.insert(rng.randint(0, len(ids)), rng.choice(partial))
        for errors in ("replace", "ignore"):
            dec = tok.stream_decoder(errors)
            out = "".join(dec.push(i) for i in ids) + dec.flush()
            assert out == tok.decode(ids, errors=errors)


@needs_rwkv
def test_stream_decoder_holds_back_split_characters(tok):
    ids = [tok.token_to_id(bytes([x])) for x in "中a".encode()]
    dec = StreamDecoder(tok)
    assert dec.push(ids[0]) == "" and dec.push(ids[1]) == ""
    assert dec.pending_bytes == "中".encode()[:2]
    assert dec.push(ids[2]) == "中"
    assert dec.push(ids[3]) == "a"
    assert dec.push(ids[0]) == ""
    assert dec.flush() == "\ufffd"  # a dangling lead byte at the end
    assert dec.push_many(tok.encode("你好")) == "你好"
    strict = StreamDecoder(tok, errors="strict")
    strict.push(ids[0])
    with pytest.raises(UnicodeDecodeError):
        strict.flush()
    assert strict.pending_bytes == b"" and strict.push(ids[3]) == "a"  # reset even though it raised


# ---------------------------------------------------------------- vocabulary file errors

GOOD = [f"{b + 1} {repr(bytes([b]).decode('latin-1')) if b < 128 else repr(bytes([b]))} 1" for b in range(256)]


def _write_lines(tmp_path, lines, name="vocab.txt"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("257 'ab' 3", "byte length column says 3"),
        ("257 'ab'", "expected '<id> <python literal> <byte length>'"),
        ("257 __import__('os').system('echo pwned') 5", "not a Python str/bytes literal"),
        ("257 ['a'] 1", "is a list"),
        ("257 'a', 'b' 2", "is a tuple"),
        ("x 'ab' 2", "must be integers"),
        ("256 'ab' 2", "duplicate id 256"),
        ("258 'a' 1", "duplicates id 98"),
        ("0 'ab' 2", "id 0 is invalid"),
        ("257 '' 0", "empty token"),
        ("257 'ab 2", "not a Python str/bytes literal"),
        ("257 '\\ud800' 3", "holds an unpaired surrogate"),
        (f"257 {'=' * 1025!r} 1025", "a token of 1025 bytes, longer than the 1024"),
    ],
)
def test_bad_vocab_lines_raise_data_error_naming_file_and_line(tmp_path, extra, message):
    path = _write_lines(tmp_path, GOOD + ["257 'xy' 2", extra])
    with pytest.raises(DataError) as ei:
        tkmod.parse_vocab_file(path)
    msg = str(ei.value)
    assert f"{path}:258:" in msg and message in msg, msg


def test_vocab_lacking_single_bytes_is_rejected(tmp_path):
    path = _write_lines(tmp_path, GOOD[:100] + GOOD[101:])
    with pytest.raises(DataError, match="0x64"):
        WorldTokenizer(path)


def test_vocab_file_unreadable_or_empty(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        WorldTokenizer(tmp_path / "missing.txt")
    empty = _write_lines(tmp_path, [""], "empty.txt")
    with pytest.raises(DataError, match="no entries"):
        tkmod.parse_vocab_file(empty)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"1 '\xe9' 1\n")
    with pytest.raises(DataError, match=r"latin1.txt:1: .*not valid UTF-8"):
        tkmod.parse_vocab_file(str(bad))


def test_bulk_parse_cannot_be_misaligned(tmp_path):
    # a literal split over two lines must not be accepted by the one-shot parser
    lines = GOOD + ["257 ('a' 1", "258 'b') 1"]
    with pytest.raises(DataError, match=":257:"):
        tkmod.parse_vocab_file(_write_lines(tmp_path, lines))


def test_missing_official_package_gives_clear_error(monkeypatch):
    monkeypatch.setattr(tkmod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install rwkv"):
        WorldTokenizer()


def test_vocab_cache_reuses_and_notices_changes(tmp_path):
    path = _write_lines(tmp_path, GOOD + ["257 'ab' 2"])
    a, b = WorldTokenizer(path), WorldTokenizer(path)
    assert a._vocab is b._vocab
    assert a.encode("ab") == [257]
    _write_lines(tmp_path, GOOD + ["257 'abc' 3"])
    os.utime(path, ns=(1, 1))  # make sure the mtime changes even on coarse clocks
    c = WorldTokenizer(path)
    assert c._vocab is not a._vocab and c.encode("abc") == [257]


def test_decode_accepts_a_single_id_like_transformers():
    from multimodal_rwkv import WorldTokenizer

    tok = WorldTokenizer()
    assert tok.decode(33155) == tok.decode([33155]) == "Hello"


def test_call_is_transformers_style_with_left_padding(tok):
    torch = pytest.importorskip("torch")
    assert tok("Hello world") == {"input_ids": tok.encode("Hello world"), "attention_mask": [1, 1]}
    long, short = tok.encode("Hello world, a longer one"), tok.encode("Hi")
    b = tok(["Hello world, a longer one", "Hi"], padding=True, return_tensors="pt")
    n = len(long)
    assert b["input_ids"].tolist() == [long, [0] * (n - len(short)) + short]
    assert b["attention_mask"].tolist() == [[1] * n, [0] * (n - len(short)) + [1] * len(short)]
    assert tok(["a", "bb"])["input_ids"] == [tok.encode("a"), tok.encode("bb")]  # lists, unpadded
    assert tok("x", return_tensors="pt")["input_ids"].shape == (1, len(tok.encode("x")))
    with pytest.raises(ValueError, match="padding=True"):
        tok(["Hello world, a longer one", "Hi"], return_tensors="pt")
    with pytest.raises(ValueError, match="only 'pt'"):
        tok("x", return_tensors="np")
    # transformers' callers pass add_special_tokens (a TypeError before); there are none to add
    assert tok("Hello world", add_special_tokens=False) == tok("Hello world", add_special_tokens=True) == tok("Hello world")
    with pytest.raises(TypeError, match="add_special_tokens must be True or False"):
        tok("x", add_special_tokens="no")


def test_empty_batch_and_non_bytes_input():
    from multimodal_rwkv import WorldTokenizer

    tok = WorldTokenizer()
    out = tok([], padding=True, return_tensors="pt")
    assert out["input_ids"].shape == (0, 0) and out["attention_mask"].shape == (0, 0)
    with pytest.raises(TypeError, match="bytes-like"):
        tok.encode_bytes(5)  # bytes(5) would be five NUL bytes
    assert tok.encode_bytes(bytearray(b"hi")) == tok.encode_bytes(b"hi") == tok.encode("hi")


def test_decode_refuses_ids_that_are_not_integers():
    import numpy as np
    import torch

    from multimodal_rwkv import WorldTokenizer

    tok = WorldTokenizer()
    assert tok.decode(torch.tensor([33155])) == tok.decode([33155]) == "Hello"
    for bad in ([True, 33155], [1.5], [[1, 2]], [torch.tensor(1.0)], [torch.tensor(True)], [np.bool_(True)]):
        with pytest.raises(TypeError, match="token ids must be integers"):
            tok.decode(bad)
    for bad in (b"ab", "ab", {5, 3}):  # bytes are not ids; a set has no order
        with pytest.raises(TypeError, match="token ids must be a sequence of integers"):
            tok.decode(bad)
    with pytest.raises(TypeError, match="errors must be the name of a decode error handler"):
        tok.decode([33155], True)  # transformers' skip_special_tokens is a keyword here
    with pytest.raises(TypeError, match="encode_batch takes a list of texts"):
        tok.encode_batch("hi!")
    # integers of other types are ids (a list of numpy or 0-d tensor ints, as iterating an array gives)
    assert tok.decode(list(np.array([33155]))) == tok.decode([torch.tensor(33155)]) == "Hello"
    # transformers' decode options are taken (TextStreamer(tok, skip_special_tokens=True) passes them)
    assert tok.decode([33155, 0], skip_special_tokens=True, clean_up_tokenization_spaces=False) == "Hello"


@needs_rwkv
def test_stream_decoder_push_takes_exactly_the_ids_decode_takes(tok):
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    for good in (33155, np.int64(33155), torch.tensor(33155)):
        assert tok.stream_decoder().push(good) == tok.decode([good]) == "Hello"
    for bad in (1.7, True, "5", 33155.9, np.float64(5.0), torch.tensor(5.0)):
        with pytest.raises(TypeError) as want:
            tok.decode([bad])
        with pytest.raises(TypeError) as got:
            tok.stream_decoder().push(bad)
        assert str(got.value) == str(want.value) and "token ids must be integers" in str(got.value)
    for bad in (-1, 65536):
        with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
            tok.stream_decoder().push(bad)


@needs_rwkv
def test_decode_refuses_encode_only_error_handlers(tok):
    part = tok.encode_bytes(b"a\xf0\x9f")  # an incomplete 4-byte character at the end
    for handler in ("xmlcharrefreplace", "namereplace"):
        with pytest.raises(ValueError, match=f"unknown decode error handler '{handler}'"):
            tok.decode(tok.encode("ok"), errors=handler)  # refused up front, not only on bad bytes
        with pytest.raises(ValueError, match="unknown decode error handler"):
            tok.stream_decoder(handler)
    assert tok.decode(part, errors="backslashreplace") == "a\\xf0\\x9f"
    assert tok.decode(part, errors="surrogateescape") == "a\udcf0\udc9f"
    with pytest.raises(UnicodeDecodeError):
        tok.decode(part, errors="surrogatepass")  # a decode handler (for surrogates only): strict here


@pytest.mark.parametrize("big", [99999999999, 100000000, 2**20 + 1])
def test_vocab_ids_far_beyond_the_entries_raise_data_error(tmp_path, big):
    # a huge id used to raise a bare MemoryError or silently build a decode table of that many rows
    path = _write_lines(tmp_path, GOOD + ["257 'xy' 2", f"{big} 'ab' 2"])
    with pytest.raises(DataError, match=f"{path}:258: id {big} is too large"):
        tkmod.parse_vocab_file(path)


def test_sparse_vocab_ids_within_bounds_still_load(tmp_path):
    path = _write_lines(tmp_path, GOOD + [f"{2**20} 'ab' 2"])
    tok = WorldTokenizer(path)
    assert tok.encode("ab") == [2**20] and tok.vocab_size == 2**20 + 64
    # dense vocabularies of any real size (the World one: ids up to 65,529; custom ones of millions)
    for n in (65529, 3_000_000, 50_000_000):
        assert tkmod._max_vocab_id(n) >= 4 * n
    assert tkmod._max_vocab_id(10**9) == 2**31 - 1


@needs_rwkv
def test_call_padding_takes_transformers_values(tok):
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="text_pair: the World tokenizer takes one text per row"):
        tok("a", "b")  # transformers' text_pair place (it was read as padding='b')
    assert tok("a", padding=True) == tok("a")
    texts = ["a", "bb cc"]
    a, b = tok.encode("a"), tok.encode("bb cc")
    assert len(a) < len(b)
    unpadded = {"input_ids": [a, b], "attention_mask": [[1] * len(a), [1] * len(b)]}
    padded = {"input_ids": [[0] * (len(b) - len(a)) + a, b],
              "attention_mask": [[0] * (len(b) - len(a)) + [1] * len(a), [1] * len(b)]}
    for no in (False, "do_not_pad"):
        assert tok(texts, padding=no) == unpadded  # lists of lists, as transformers returns
        with pytest.raises(ValueError, match="different token lengths"):
            tok(texts, padding=no, return_tensors="pt")
    for yes in (True, "longest"):
        assert tok(texts, padding=yes) == padded
    out = tok(texts, padding="max_length", max_length=4, return_tensors="pt")
    assert out["input_ids"].tolist() == [[0] * (4 - len(a)) + a, [0] * (4 - len(b)) + b]
    assert out["attention_mask"].dtype == torch.long and out["attention_mask"].sum().item() == len(a) + len(b)
    assert tok("a", padding="max_length", max_length=3)["input_ids"] == [0, 0] + a
    assert tok("a", padding="max_length", max_length=np.int64(3))["input_ids"] == [0, 0] + a  # numpy ints too
    with pytest.raises(ValueError, match="max_length"):
        tok(texts, padding="max_length")
    with pytest.raises(ValueError, match="max_length=1"):
        tok(texts, padding="max_length", max_length=1)
    # max_length without padding is a limit too (transformers would cut silently): refused, or cut
    with pytest.raises(ValueError, match="more than max_length=1 \\(pass truncation=True"):
        tok(texts, max_length=1)
    assert tok(texts, max_length=2, truncation=True)["input_ids"] == [a[:2], b[:2]]
    assert tok(texts, padding=True, max_length=2, truncation=True)["input_ids"] == [[0] * (2 - len(a[:2])) + a[:2],
                                                                                      b[:2]]
    for cut in (True, "longest_first", "only_first"):
        assert tok(texts, max_length=2, truncation=cut)["input_ids"] == [a[:2], b[:2]]
        assert tok(texts, padding=True, truncation=cut) == padded  # no max_length: nothing to cut at
    assert tok(texts, padding=True, truncation="do_not_truncate") == padded
    assert tok(texts, padding=True, truncation=None) == padded  # transformers' default: no max_length, no cut
    assert len(b) > 1 and tok(texts, max_length=1, truncation=None)["input_ids"] == [a[:1], b[:1]]  # ... with one, a cut
    with pytest.raises(ValueError, match="truncation='only_second'"):
        tok(texts, truncation="only_second")
    for bad in ("yes", "left", 1, None):
        with pytest.raises(ValueError, match="padding="):
            tok(texts, padding=bad)
    try:
        from transformers.utils import PaddingStrategy
    except ImportError:
        return
    assert tok(texts, padding=PaddingStrategy.DO_NOT_PAD) == unpadded
    assert tok(texts, padding=PaddingStrategy.LONGEST) == padded


def test_vocab_size_must_be_an_integer(tmp_path):
    np = pytest.importorskip("numpy")
    path = _write_lines(tmp_path, GOOD)
    for bad in (65536.5, 512.0, True, "512"):
        with pytest.raises(TypeError, match="vocab_size must be an integer"):
            WorldTokenizer(path, vocab_size=bad)
    tok = WorldTokenizer(path, vocab_size=np.int64(512))
    assert tok.vocab_size == 512 and type(tok.vocab_size) is int


def test_a_long_custom_token_builds_the_text_pattern(tmp_path):
    """A 1000-byte token made the text-pattern fallback recurse past Python's limit (RecursionError)."""
    path = _write_lines(tmp_path, GOOD + [f"300 {'=' * 1000!r} 1000"])
    tok = WorldTokenizer(path)
    assert tok.encode("=" * 1003) == [300, 62, 62, 62]
    rx = tkmod._Vocab._compile_text(tkmod._build_trie(tok.get_vocab()))
    data = b"ab" + b"=" * 2001
    assert [tok.get_vocab()[m] for m in rx.findall(data)] == tkmod.greedy_reference(data, tok.get_vocab(), 1000)


def test_stop_strings_holding_the_replacement_character_wait_for_whole_characters(tok):
    """A character arriving as several byte tokens decodes as U+FFFD until it is complete: a stop
    string holding U+FFFD fired on it (generate stopped at 'a' + half of '中'; the streamer printed
    less than the --no-stream text)."""
    import io

    torch = pytest.importorskip("torch")
    from multimodal_rwkv.model.generation import StopAwareStreamer, StopStringsCriteria, trim_at_stop

    byte = [tok.token_to_id(bytes([b])) for b in range(256)]
    zhong = [byte[b] for b in "中".encode()]
    crit = StopStringsCriteria(tok, ["\ufffd"], prompt_len=0)
    a = tok.encode("a")
    for n in range(1, 3):  # half a character: no stop
        assert not crit(torch.tensor([a + zhong[:n]]), None)[0]
    assert not crit(torch.tensor([a + zhong + tok.encode("bcd")]), None)[0]
    assert crit(torch.tensor([a + [byte[0xFF]] + tok.encode("b")]), None)[0]  # a real U+FFFD in the text
    # tokens that decode to nothing (the reserved ids) inside a stop: it was missed (a window of tokens)
    ab = StopStringsCriteria(tok, ["ab"], prompt_len=0)
    assert ab(torch.tensor([a + [65531] * 12 + tok.encode("b")]), None)[0]
    end = StopStringsCriteria(tok, ["END\n"], prompt_len=0)  # ... also when the last token is long
    assert end(torch.tensor([tok.encode("xEND") + [65530] * 11 + [tok.token_to_id("\n" + " " * 51)]]), None)[0]
    for ids in (a + zhong + tok.encode("bcd"), a + [byte[0xC3], byte[0xA9]], a + [byte[0xFF]] + tok.encode("xy")):
        out = io.StringIO()
        s = StopAwareStreamer(tok, ["\ufffd"], file=out)
        s.put(torch.tensor([[1]]))  # the prompt
        for i in ids:
            s.put(torch.tensor([i]))
        s.end()
        assert out.getvalue() == trim_at_stop(tok.decode(ids), ["\ufffd"])


def test_token_to_id_refuses_an_integer_and_encode_errors_point_into_the_text(tok):
    with pytest.raises(TypeError, match="token_to_id takes a token"):
        tok.token_to_id(3)  # bytes(3) is three NULs: a confusing KeyError, and 1 gave id 1
    with pytest.raises(TypeError):
        tok.token_to_id(True)
    for text, at in (("abc中文\ud800xyz", 5), ("中" * 5 + "\ud83d" + "文", 5)):
        with pytest.raises(UnicodeEncodeError) as e:
            tok.encode(text)
        assert e.value.start == at and e.value.object == text
