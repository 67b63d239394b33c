"""Training engine without a model: recipes, overrides, data readers, token cache, packing, data order."""
import json
import os
import struct

import numpy as np
import pytest

from multimodal_rwkv.errors import ConfigError, DataError
from multimodal_rwkv.training.config import TrainConfig, apply_overrides, load_config, save_config
from multimodal_rwkv.training.data import (
    IGNORE_INDEX, ByteTokenizer, PackedDataset, TokenStream, check_id_range, load_stream, read_binidx, write_binidx,
)
from multimodal_rwkv.training.loop import GlobalOrderSampler, lr_at, plot_losses


# ----------------------------------------------------------------------------------------- config

def test_recipe_yaml_round_trip(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["optim.lr=3e-4", "max_steps=7", "model.config.n_layer=2",
                                          "data.on_bad_record=skip", "optim.betas=[0.8, 0.95]",
                                          "train.bptt_chunk=16", "peft.freeze=['blocks.0.*']"])
    assert cfg.optim.lr == 3e-4 and cfg.max_steps == 7 and cfg.model.config == {"n_layer": 2}
    assert cfg.optim.betas == [0.8, 0.95] and cfg.train.bptt_chunk == 16 and cfg.peft.freeze == ["blocks.0.*"]
    p = tmp_path / "r.yaml"
    save_config(cfg, p)
    assert load_config(p) == cfg
    assert load_config(p, ["train.bptt_chunk=null"]).train.bptt_chunk is None


def test_string_settings_keep_numbers_as_written(tmp_path):
    """Paths that YAML reads as numbers (007, 0x1F, 2024_06_01, 12:30, 1.10) used to become str of
    the number: 7, 31, 20240601, 750, 1.1 -- another folder than the one named."""
    for text in ("2024_06_01", "007", "0755", "12:30", "0x1F", "1.10", "2024-06-01", "2024-06-01 12:30:00"):
        cfg = apply_overrides(TrainConfig(), [f"output_dir={text}", f"data.train_file={text}"])
        assert cfg.output_dir == text and cfg.data.train_file == text
    p = tmp_path / "r.yaml"
    p.write_text("output_dir: 2024_06_01\nmax_steps: 0x10\noptim: {lr: 1.50e-3}\nmodel: {config: {n_layer: 02}}\n")
    cfg = load_config(p)
    assert cfg.output_dir == "2024_06_01" and cfg.max_steps == 16 and cfg.optim.lr == 1.5e-3
    assert type(cfg.max_steps) is int and type(cfg.optim.lr) is float and type(cfg.model.config["n_layer"]) is int
    save_config(cfg, tmp_path / "again.yaml")  # plain numbers: safe_dump writes them
    assert load_config(tmp_path / "again.yaml") == cfg
    # a date too (it was a datetime.date, refused: "expected str or NoneType")
    p.write_text("output_dir: 2024-06-01\ndata: {train_file: 2024-06-01T10:00:00Z}\n")
    cfg = load_config(p)
    assert cfg.output_dir == "2024-06-01" and cfg.data.train_file == "2024-06-01T10:00:00Z"
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=1", "optim.lrr"),
    ("nonsense=1", "nonsense"),
    ("optim.lr.x=1", "optim.lr.x"),
    ("max_steps=abc", "max_steps"),
    ("max_steps=1.5", "max_steps"),
    ("train.l2wrap=3", "train.l2wrap"),
    ("data.format=foo", "data.format"),
    ("optim.lr=fast", "optim.lr"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("no_equals_sign", "KEY=VALUE"),
    # value ranges, checked before anything runs (torch or numpy would raise deep inside, or train wrongly)
    ("seed=-1", "seed"),
    ("optim.eps=-1", "optim.eps"),
    ("optim.betas=[2, 3]", "optim.betas"),
    ("data.num_workers=-1", "data.num_workers"),
    ("peft.lora_dropout=2", "peft.lora_dropout"),
    ("optim.lr_final=-1", "optim.lr_final"),
    ("optim.warmup_steps=-5", "optim.warmup_steps"),
    ("optim.lr=.inf", "optim.lr"),
    ("output_dir=", "output_dir"),
    ("optim={nope: 1}", "optim.nope"),
    ("optim=3", "optim"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        apply_overrides(TrainConfig(), [override])


def test_a_whole_section_override_updates_its_keys():
    cfg = apply_overrides(TrainConfig(), ["optim={lr: 0.5, warmup_steps: 3}"])
    assert cfg.optim.lr == 0.5 and cfg.optim.warmup_steps == 3 and cfg.optim.lr_final == TrainConfig().optim.lr_final


def test_model_config_values_are_type_checked():
    from multimodal_rwkv import RWKVConfig

    for kw, name in ((dict(n_layer="abc"), "n_layer"), (dict(n_layer=2.5), "n_layer"),
                     (dict(tie_word_embeddings="maybe"), "tie_word_embeddings"), (dict(layer_norm_eps="x"), "layer_norm_eps")):
        with pytest.raises(ConfigError, match=name):
            RWKVConfig(**kw)
    assert RWKVConfig(n_layer=2.0).n_layer == 2
    for kw, name in ((dict(layer_norm_eps=-1), "layer_norm_eps"), (dict(head_size_divisor=0), "head_size_divisor")):
        with pytest.raises(ConfigError, match=name):
            RWKVConfig(**kw)
    # in a recipe, as strictly as its other settings, named with model.config (a string "2" was
    # taken as 2, and a bad size's message had no model.config.), before any data or model is read
    from multimodal_rwkv.cli import main
    from multimodal_rwkv.training.task import get_task

    for over, msg in (('model.config.n_layer="2"', r"model.config.n_layer: expected an integer, got '2'"),
                      ("model.config.has_initial_state=1", "model.config.has_initial_state: expected true/false"),
                      ("model.config.n_layer=0", "model.config: n_layer must be positive, got 0"),
                      ("model.config.layer_norm_eps=-1", "model.config: layer_norm_eps must be a positive number"),
                      ("model.config.n_embd=-64", "model.config: n_embd must be positive"),
                      ("model.config.bogus=1", "unknown config key 'model.config.bogus'")):
        cfg = load_config("recipes/lm_tiny.yaml", [over])
        with pytest.raises(ConfigError, match=msg):
            get_task(cfg)
        assert main(["train", "recipes/lm_tiny.yaml", "--set", over, "--print-config"]) == 2
    # values read as the rest of a recipe reads them: YAML's string 1e-5 a number (it was refused),
    # 2.0 the integer 2 (it stayed 2.0 in recipe.yaml)
    cfg = load_config("recipes/lm_tiny.yaml", ["model.config.n_layer=2.0", "model.config.layer_norm_eps=1e-5"])
    get_task(cfg)
    assert cfg.model.config["n_layer"] == 2 and type(cfg.model.config["n_layer"]) is int
    assert cfg.model.config["layer_norm_eps"] == 1e-5


def test_freeze_patterns_match_at_module_boundaries_and_never_silently_nothing():
    from multimodal_rwkv import RWKVConfig, RWKVForCausalLM
    from multimodal_rwkv.training.config import PeftSection
    from multimodal_rwkv.training.peft import select_trainable

    m = RWKVForCausalLM(RWKVConfig(vocab_size=32, n_layer=2, n_embd=64, head_size=32))
    select_trainable(m, PeftSection(freeze=["blocks.0.*", "emb.*"]))
    assert not m.rwkv.emb.weight.requires_grad and not m.rwkv.blocks[0].att.key.weight.requires_grad
    assert m.rwkv.blocks[1].att.key.weight.requires_grad
    with pytest.raises(ConfigError, match="peft.freeze: pattern 'nope.*' matches no parameter"):
        select_trainable(m, PeftSection(freeze=["nope.*"]))


def test_unknown_key_in_recipe_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("max_steps: 3\noptim:\n  lr: 1e-3\n  wd: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "optim.wd" in str(e.value) and str(p) in str(e.value)
    p.write_text("max_steps: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)
    # the reason and its line, not PyYAML's context ("while parsing a block mapping")
    p.write_text("task: lm\nmax_steps: 5\noptim:\n  lr: 1e-3\n lr_final: 1e-4\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: invalid YAML \(expected <block end>.* at line 5, column 2\)$"):
        load_config(p)


def test_a_recipe_that_is_not_utf8_is_named_in_one_line(tmp_path, capsys):
    from multimodal_rwkv.cli import main

    png = tmp_path / "roll.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ConfigError, match=r"roll\.png: not a UTF-8 YAML recipe \(byte 0x89 at line 1"):
        load_config(png)
    latin = tmp_path / "latin.yaml"  # a valid recipe but for one Latin-1 byte in a comment
    latin.write_bytes(b"task: lm\n# caf\xe9\nmax_steps: 3\n")
    with pytest.raises(ConfigError, match=r"latin\.yaml: not a UTF-8 YAML recipe \(byte 0xe9 at line 2"):
        load_config(latin)
    assert main(["train", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a UTF-8 YAML recipe" in err[0]


def test_a_key_given_twice_is_an_error_naming_it_and_its_lines(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("task: lm\noptim:\n  lr: 1e-3\n  eps: 1e-8\n  lr: 2e-3\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: duplicate key 'optim\.lr' at line 5 \(first given at line 3\)"):
        load_config(p)
    p.write_text("max_steps: 3\nseed: 1\nmax_steps: 4\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'max_steps' at line 3 \(first given at line 1\)"):
        load_config(p)
    p.write_text("model:\n  config: {n_layer: 2, n_layer: 3}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'model\.config\.n_layer' at line 2"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"override 'model\.config': duplicate key 'n_layer'"):
        apply_overrides(TrainConfig(), ["model.config={n_layer: 2, n_layer: 3}"])
    # the same key in different mappings, and a key overriding one from a merge (<<), are fine
    from multimodal_rwkv.training.config import _load_yaml

    assert _load_yaml("a: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}\nd: {x: 4}\n") == {
        "a": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}, "d": {"x": 4}}
    p.write_text("optim: &o {lr: 1.0e-3}\nmax_steps: 2\n")
    assert load_config(p).optim.lr == 1e-3


def test_model_config_null_clears_it_for_fine_tuning_a_checkpoint():
    cfg = load_config("recipes/lm_tiny.yaml", ["model.from_pretrained=ckpt/", "model.config=null"])
    assert cfg.model.config == {} and cfg.model.from_pretrained == "ckpt/"
    from multimodal_rwkv.training.lm import LMTask

    both = load_config("recipes/lm_tiny.yaml", ["model.from_pretrained=ckpt/"])
    with pytest.raises(ConfigError, match=r"not both \(.*add --set model\.config=null\)"):
        LMTask(both).build_model()


def test_the_fine_tuning_command_in_the_recipes_readme_resolves(capsys):
    """recipes/README.md shows how to fine-tune a checkpoint with lm_tiny.yaml; that command parses."""
    import re
    import shlex

    from multimodal_rwkv.cli import main

    text = open("recipes/README.md", encoding="utf-8").read()
    cmds = [c for c in re.findall(r"^mmrwkv train recipes/lm_tiny\.yaml .*$", text, re.M) if "from_pretrained" in c]
    assert cmds, "recipes/README.md: no fine-tuning command for lm_tiny.yaml"
    assert main(shlex.split(cmds[0])[1:] + ["--print-config"]) == 0
    out = capsys.readouterr().out
    assert "config: {}" in out and "from_pretrained: runs/lm_tiny/final" in out


def test_yaml_exponent_floats_are_numbers(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optim:\n  lr: 6e-4\n  eps: 1e-18\n")  # YAML 1.1 reads these as strings
    cfg = load_config(p)
    assert cfg.optim.lr == 6e-4 and cfg.optim.eps == 1e-18


def test_shipped_recipe_loads():
    cfg = load_config("recipes/lm_tiny.yaml", ["data.train_file=x.txt"])
    assert cfg.task == "lm" and cfg.model.config["n_layer"] >= 1


def test_lr_schedule_shape():
    cfg = TrainConfig().optim
    cfg.lr, cfg.lr_final, cfg.warmup_steps = 1.0, 0.1, 10
    lrs = [lr_at(s, cfg, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.01) and lrs[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))          # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))          # then decays monotonically
    assert lrs[110] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.55)  # cosine midpoint
    cfg.schedule = "linear"
    assert lr_at(60, cfg, 110) == pytest.approx(0.55) and lr_at(35, cfg, 110) == pytest.approx(1 - 0.9 * 0.25)


def test_lr_schedule_follows_a_time_budget_when_it_is_further_along():
    cfg = TrainConfig().optim
    cfg.lr, cfg.lr_final, cfg.warmup_steps = 1.0, 0.1, 10
    assert lr_at(5, cfg, 110, time_frac=0.9) == lr_at(5, cfg, 110)  # warmup is counted in steps
    assert lr_at(20, cfg, 110, time_frac=0.5) == pytest.approx(0.55)  # time ahead of steps: time wins
    assert lr_at(20, cfg, 110, time_frac=1.5) == pytest.approx(0.1)  # past the budget: lr_final
    assert lr_at(60, cfg, 110, time_frac=0.1) == lr_at(60, cfg, 110)  # steps ahead of time: steps win
    cfg.schedule = "linear"
    assert lr_at(20, cfg, 110, time_frac=0.25) == pytest.approx(1 - 0.9 * 0.25)


# ----------------------------------------------------------------------------------------- binidx

def _write_mmidx_by_hand(prefix, docs, code=8, np_dtype=np.uint16):
    """An independent MMIDIDX writer (struct by struct, as in Megatron's indexed_dataset)."""
    sizes = [len(d) for d in docs]
    ptrs, off = [], 0
    for s in sizes:
        ptrs.append(off)
        off += s * np.dtype(np_dtype).itemsize
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(sizes) + 1))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(sizes)}q", *ptrs))
        f.write(struct.pack(f"<{len(sizes) + 1}q", *range(len(sizes) + 1)))
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, np_dtype).tobytes())


def test_binidx_reader_matches_hand_written_file(tmp_path):
    rng = np.random.default_rng(1)
    docs = [list(rng.integers(1, 60000, size=n)) + [0] for n in (5, 1, 17, 3)]
    _write_mmidx_by_hand(tmp_path / "d", docs)
    for given in ("d", "d.bin", "d.idx"):
        s = read_binidx(tmp_path / given)
        assert np.array_equal(np.asarray(s.ids), np.concatenate(docs))
    # our writer produces byte-identical files
    write_binidx(tmp_path / "e", docs)
    for suf in (".bin", ".idx"):
        assert (tmp_path / f"e{suf}").read_bytes() == (tmp_path / f"d{suf}").read_bytes()


def test_skip_drops_the_bad_documents_of_a_binidx_pair_or_one_npy_file(tmp_path, caplog):
    """data.on_bad_record: skip stopped the run at a binidx pair's (or a single .npy file's) one
    document with an id outside the vocabulary, where a folder's bad shard was skipped."""
    docs = [[5, 6, 7, 0], [8, 400, 9, 0], [10, 11, 0], [-3, 12, 0], [13, 14, 15, 0], [16, 17]]
    good = np.concatenate([docs[0], docs[2], docs[4], docs[5]])
    write_binidx(tmp_path / "d", [d for d in docs if min(d) >= 0], dtype=np.uint16)  # (uint16: no -3)
    np.save(tmp_path / "one.npy", np.concatenate(docs).astype(np.int32))
    _write_mmidx_by_hand(tmp_path / "s", docs, np_dtype=np.int32, code=4)
    for src, fmt, want, n_bad in ((tmp_path / "d", "binidx", np.concatenate([docs[0], docs[2], docs[4], docs[5]]), 1),
                                  (tmp_path / "s", "binidx", good, 2),
                                  (tmp_path / "one.npy", "tokens", good, 2)):
        with pytest.raises(DataError, match="has id (400|-3), outside the model's vocabulary|negative token id -3"):
            st = load_stream(src, fmt, "bytes", tmp_path / "c", "fail", vocab_size=256)
            check_id_range(np.asarray(st.ids), 256, st.source)  # (what the lm task does before training)
        caplog.clear()
        with caplog.at_level("WARNING"):
            st = load_stream(src, fmt, "bytes", tmp_path / "c", "skip", vocab_size=256)
        assert np.array_equal(np.asarray(st.ids), want) and st.skipped == n_bad, src
        assert "document 1 (tokens 4..7): token 5 has id 400" in caplog.text
        again = load_stream(src, fmt, "bytes", tmp_path / "c", "skip", vocab_size=256)  # from the cache
        assert np.array_equal(np.asarray(again.ids), want) and again.skipped == n_bad
        assert load_stream(src, fmt, "bytes", tmp_path / "c", "skip", vocab_size=1000).skipped == (n_bad - 1)
    with pytest.raises(DataError, match="no usable documents"):
        load_stream(tmp_path / "d", "binidx", "bytes", tmp_path / "c", "skip", vocab_size=3)
    # the same file as a shard of a folder: its bad documents skipped, not the whole shard (which
    # left 'no usable token files'); a shard whose every document is bad is one bad record
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "a.npy", np.concatenate(docs).astype(np.int32))
    np.save(tmp_path / "f" / "b.npy", np.asarray([300, 301, 0, 302], np.int32))
    np.save(tmp_path / "f" / "c.npy", np.asarray([20, 21, 0, 22, 400], np.int32))  # its last document bad
    np.save(tmp_path / "f" / "d.npy", np.asarray([23], np.int32))
    st = load_stream(tmp_path / "f", "tokens", "bytes", tmp_path / "c", "skip", vocab_size=256)
    assert np.array_equal(np.asarray(st.ids), np.concatenate([good, [0], [20, 21, 0], [23, 0]]))
    assert st.skipped == 2 + 1 + 1


def test_binidx_suffixes_match_in_any_case(tmp_path):
    """D.BIN + D.IDX (as a case-insensitive file system or an old tool names them): the format was
    not recognised, and with data.format=binidx the reader looked for D.BIN.bin."""
    from multimodal_rwkv.training.data import detect_format

    docs = [[5, 6, 7, 0], [8, 0]]
    _write_mmidx_by_hand(tmp_path / "d", docs)
    for suf in ("bin", "idx"):
        (tmp_path / f"d.{suf}").rename(tmp_path / f"D.{suf.upper()}")
    for given in ("D", "D.BIN", "D.IDX"):
        assert detect_format(tmp_path / given) == "binidx"
        assert np.array_equal(np.asarray(read_binidx(tmp_path / given).ids), np.concatenate(docs))
    (tmp_path / "D.BIN").rename(tmp_path / "D.Bin")  # any mix of cases
    for given in ("D", "D.Bin", "D.IDX", "D.bin"):
        assert detect_format(tmp_path / given) == "binidx"
        assert np.array_equal(np.asarray(read_binidx(tmp_path / given).ids), np.concatenate(docs))
    (tmp_path / "D.IDX").unlink()
    with pytest.raises(DataError, match=r"D\.idx: binidx file not found"):
        read_binidx(tmp_path / "D.Bin")


def test_binidx_validation(tmp_path):
    docs = [[1, 2, 3, 0], [4, 5, 0]]
    _write_mmidx_by_hand(tmp_path / "a", docs)
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "b.idx").write_bytes(b"NOTMAGIC!" + raw[9:])
    (tmp_path / "b.bin").write_bytes((tmp_path / "a.bin").read_bytes())
    with pytest.raises(DataError, match=r"b\.idx.*magic"):
        read_binidx(tmp_path / "b")
    (tmp_path / "c.idx").write_bytes(raw)
    (tmp_path / "c.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:-2])  # one token short
    with pytest.raises(DataError, match=r"c\.bin"):
        read_binidx(tmp_path / "c")
    (tmp_path / "d.idx").write_bytes(raw[:40])
    (tmp_path / "d.bin").write_bytes((tmp_path / "a.bin").read_bytes())
    with pytest.raises(DataError, match="truncated"):
        read_binidx(tmp_path / "d")
    with pytest.raises(DataError, match="not found"):
        read_binidx(tmp_path / "missing")


# ----------------------------------------------------------------------------------------- text

class CountingTokenizer(ByteTokenizer):
    texts = []

    def encode(self, text):
        CountingTokenizer.texts.append(text)
        return super().encode(text)


def _stream(path, tmp_path, fmt="auto", on_bad="fail", tok=None):
    return load_stream(path, fmt, "bytes", tmp_path / "cache", on_bad, tokenizer=tok)


def test_txt_tokenized_once_and_cached(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("héllo world\n" * 3, encoding="utf-8")
    tok = CountingTokenizer()
    CountingTokenizer.texts = []
    s1 = _stream(p, tmp_path, tok=tok)
    assert CountingTokenizer.texts.count("héllo world\n" * 3) == 1
    s2 = _stream(p, tmp_path, tok=tok)
    assert CountingTokenizer.texts.count("héllo world\n" * 3) == 1  # cache hit: no re-tokenization
    assert isinstance(s2.ids, np.memmap)
    expect = [b + 1 for b in ("héllo world\n" * 3).encode("utf-8")] + [0]
    assert np.asarray(s1.ids).tolist() == expect == np.asarray(s2.ids).tolist()
    p.write_text("changed", encoding="utf-8")  # new content -> new key
    assert np.asarray(_stream(p, tmp_path, tok=tok).ids).tolist() == [b + 1 for b in b"changed"] + [0]


def test_a_broken_cache_entry_is_replaced_and_a_byte_order_mark_is_not_text(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"\xef\xbb\xbfhello")  # UTF-8 with a byte-order mark
    want = [b + 1 for b in b"hello"] + [0]
    assert np.asarray(_stream(p, tmp_path).ids).tolist() == want
    (entry,) = [d for d in (tmp_path / "cache").iterdir() if not d.name.startswith(".")]
    with open(entry / "tokens.u32", "r+b") as f:
        f.truncate(4)  # a damaged entry: ignored, re-tokenized, and replaced (not blocking every rerun)
    assert np.asarray(_stream(p, tmp_path).ids).tolist() == want
    assert np.asarray(_stream(p, tmp_path).ids).tolist() == want
    q = tmp_path / "b.jsonl"
    q.write_bytes(b'\xef\xbb\xbf{"text": "hi"}\n')
    assert np.asarray(_stream(q, tmp_path).ids).tolist() == [b + 1 for b in b"hi"] + [0]


def test_a_data_folder_with_a_folder_that_cannot_be_read(tmp_path, monkeypatch, caplog):
    """A sub-folder of mode 000 (for a user who is not root) stopped the run with
    '.../locked/recipe.yaml: Permission denied', a file that does not exist."""
    from pathlib import Path

    from multimodal_rwkv.training.data import folder_files

    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    real_is_file, real_scandir = Path.is_file, os.scandir

    def is_file(self):
        if self.parent.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(Path, "is_file", is_file)
    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level("WARNING"):
        assert folder_files(tmp_path, (".txt",)) == [tmp_path / "a.txt"]
        assert folder_files(tmp_path, (".txt",)) == [tmp_path / "a.txt"]
    assert caplog.text.count("locked: cannot list it (Permission denied): its files are not read") == 1
    # the data folder itself: an error that says so (it was 'cannot tell the data format')
    with pytest.raises(DataError, match="locked: cannot list the folder \\(Permission denied\\)"):
        folder_files(tmp_path / "locked", (".txt",))


def test_a_folder_mixing_text_and_jsonl_is_refused_not_half_read(tmp_path):
    from multimodal_rwkv.training.data import detect_format

    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text('{"text": "x"}\n')
    (d / "sub" / "b.txt").write_text("y")
    with pytest.raises(DataError, match=r"folder mixes jsonl \(.jsonl, .json: e.g. a.jsonl\) and txt "
                                        r"\(.txt, .md, .text: e.g. sub/b.txt\) files"):
        detect_format(d)
    (d / "a.jsonl").unlink()
    assert detect_format(d) == "txt"  # text files below the top level count too
    # a .json file among text files counts as JSON lines: named, so the mix is plain (it said only
    # 'mixes jsonl and txt' of a folder without a .jsonl file)
    (d / "sub" / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"e.g. sub/config.json\)"):
        detect_format(d)


def test_chat_jsonl_masks_everything_but_the_assistant(tmp_path):
    p = tmp_path / "chat.jsonl"
    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo!"},
                          {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"text": "plain"}]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    s = _stream(p, tmp_path)
    ids, tgt = np.asarray(s.ids).astype(np.int64), np.asarray(s.target)
    text = bytes(int(i) - 1 if i else ord("|") for i in ids).decode()
    assert text == ("User: hi\n\nAssistant: yo!\n\nUser: more\n\nAssistant: ok\n\n|"
                    "User: q\n\nAssistant: a\n\n|plain|")
    trained = "".join(ch if t else "." for ch, t in zip(text, tgt))
    expect = ("." * len("User: hi\n\nAssistant:") + " yo!\n\n" + "." * len("User: more\n\nAssistant:") + " ok\n\n|"
              + "." * len("User: q\n\nAssistant:") + " a\n\n|" + "plain|")
    assert trained == expect
    ds = PackedDataset(s, 8)
    x, y = ds.window(0)
    assert np.array_equal(x, ids[:8])
    assert np.array_equal(y, np.where(tgt[1:9] == 1, ids[1:9], IGNORE_INDEX))


def test_bad_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "a"\n{"foo": 1}\n{"text": "fine"}\n')
    with pytest.raises(DataError) as e:
        _stream(p, tmp_path)
    assert f"{p}:3" in str(e.value) and "invalid JSON" in str(e.value)
    assert not list((tmp_path / "cache").iterdir())  # the failed tokenization's temp folder is removed
    s = _stream(p, tmp_path, on_bad="skip")
    assert s.skipped == 2
    assert bytes(int(i) - 1 for i in np.asarray(s.ids) if i).decode() == "okfine"


def test_byte_order_marks_and_error_positions(tmp_path):
    """A BOM shifted a bad byte's line back (UTF-8 errors count from after the BOM), made a BOM-only
    first line of a JSONL a bad record, and a JSONL error's column was that of the line after it."""
    bom = b"\xef\xbb\xbf"
    p = tmp_path / "bom.txt"
    p.write_bytes(bom + b"a\nb\n\xe9t\xe9\n")
    with pytest.raises(DataError, match=r"bom\.txt:3: not valid UTF-8"):
        _stream(p, tmp_path)
    p = tmp_path / "bom.json"
    p.write_bytes(bom + b'[\n{"text": "a"},\n{"text": "\xe9"}]\n')
    with pytest.raises(DataError, match=r"bom\.json:3: not valid UTF-8"):
        _stream(p, tmp_path)
    p = tmp_path / "bomblank.jsonl"
    p.write_bytes(bom + b'\r\n{"text": "a"}\r\n')
    assert bytes(int(i) - 1 for i in np.asarray(_stream(p, tmp_path).ids) if i) == b"a"
    p = tmp_path / "col.jsonl"
    p.write_text('{"text": "ok"}\n{"text":"ok2"\n')
    with pytest.raises(DataError, match=r"col\.jsonl:2: invalid JSON \(Expecting ',' delimiter at column 14\)"):
        _stream(p, tmp_path)
    p.write_text('{"text": "ok"}\n{"text": "cut\n')
    with pytest.raises(DataError, match=r"col\.jsonl:2: invalid JSON \(Unterminated string starting at column 10\)"):
        _stream(p, tmp_path)


def test_empty_assistant_turn_is_the_stop_token_alone():
    """An empty (or blank) assistant turn trained ' \\n\\n' (id 3336), not World's stop token '\\n\\n' (261)."""
    from multimodal_rwkv import WorldTokenizer
    from multimodal_rwkv.training.data import chat_segments

    for empty in ("", "  \n "):
        segs = chat_segments([{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": empty}],
                             "r")
        assert segs[-1] == ("\n\n", True) and WorldTokenizer().encode(segs[-1][0]) == [261]
    segs = chat_segments([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "r")
    assert segs[-1] == (" yo\n\n", True)


def test_empty_and_unreadable_files(tmp_path):
    e1 = tmp_path / "empty.txt"
    e1.write_text("  \n")
    with pytest.raises(DataError, match=r"empty\.txt: empty file"):
        _stream(e1, tmp_path)
    e2 = tmp_path / "empty.jsonl"
    e2.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        _stream(e2, tmp_path)
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(DataError, match=r"latin\.txt:2: not valid UTF-8"):
        _stream(bad, tmp_path)
    with pytest.raises(DataError, match="no such file"):
        _stream(tmp_path / "nope.txt", tmp_path)
    np.save(tmp_path / "f.npy", np.zeros((2, 3), np.int32))
    with pytest.raises(DataError, match=r"f\.npy: expected a 1-D integer"):
        _stream(tmp_path / "f.npy", tmp_path)


def test_an_empty_or_truncated_npy_shard_is_one_bad_file(tmp_path):
    d = tmp_path / "toks"
    d.mkdir()
    np.save(d / "a.npy", np.array([5, 6, 0], np.int32))
    (d / "b.npy").write_bytes(b"")  # numpy: EOFError("No data left in file")
    with pytest.raises(DataError, match=r"b\.npy: empty file .*on_bad_record=skip"):
        _stream(d, tmp_path)
    assert not list((tmp_path / "cache").iterdir())  # no partial cache entry left behind
    s = _stream(d, tmp_path, on_bad="skip")
    assert s.skipped == 1 and np.asarray(s.ids).tolist() == [5, 6, 0]
    raw = (d / "a.npy").read_bytes()
    (d / "b.npy").write_bytes(raw[:40])  # cut inside the header
    with pytest.raises(DataError, match=r"b\.npy: cannot read token array"):
        _stream(d, tmp_path)
    with pytest.raises(DataError, match=r"b\.npy: cannot read token array"):
        _stream(d / "b.npy", tmp_path)


def test_token_folder_concatenates_with_separators(tmp_path):
    d = tmp_path / "toks"
    d.mkdir()
    np.save(d / "a.npy", np.array([5, 6, 0, 7], np.int16))
    np.save(d / "b.npy", np.array([8, 9, 0], np.int64))
    s = _stream(d, tmp_path)
    assert np.asarray(s.ids).tolist() == [5, 6, 0, 7, 0, 8, 9, 0]


@pytest.mark.parametrize("n, L", [(2, 4), (9, 4), (10, 3), (101, 7), (5, 1)])
def test_packing_covers_every_next_token_once(n, L):
    rng = np.random.default_rng(n)
    ids = rng.integers(0, 50, size=n)
    ds = PackedDataset(TokenStream(ids, None, "mem"), L)
    pairs = []
    for i in range(len(ds)):
        x, y = ds.window(i)
        assert len(x) == len(y) == L
        pairs += [(int(a), int(b)) for a, b in zip(x, y) if b != IGNORE_INDEX]
    assert pairs == [(int(ids[t]), int(ids[t + 1])) for t in range(n - 1)]


def test_a_ctx_len_longer_than_the_data_is_cut_to_it_with_a_warning(tmp_path, caplog):
    """The data as one window of all its tokens, not one window of ctx_len mostly padding (same
    loss, none of the padding's memory: a ctx_len of 1e8 used to fail allocating 200 GB)."""
    from types import SimpleNamespace

    from multimodal_rwkv.training.lm import LMTask

    np.save(tmp_path / "t.npy", np.arange(1, 101, dtype=np.int32))
    np.save(tmp_path / "v.npy", np.arange(1, 31, dtype=np.int32))
    cfg = apply_overrides(TrainConfig(), [f"data.train_file={tmp_path / 't.npy'}", "data.ctx_len=100000000",
                                          f"data.valid_file={tmp_path / 'v.npy'}", f"output_dir={tmp_path / 'o'}"])
    with caplog.at_level("INFO"):
        train, valid, _ = LMTask(cfg).build_datasets(SimpleNamespace(config=SimpleNamespace(vocab_size=128)))
    assert len(train) == 1 and train.ctx_len == 99 and len(valid) == 1 and valid.ctx_len == 29
    x, y = train.window(0)
    assert x.tolist() == list(range(1, 100)) and y.tolist() == list(range(2, 101))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "data.ctx_len=100000000 is longer than the whole training data (100 tokens" in warned[0]
    assert "train: 1 window of 99 tokens" in caplog.text
    caplog.clear()  # a window that the data fills exactly: nothing to say
    cfg = apply_overrides(cfg, ["data.ctx_len=99", "data.valid_file=null"])
    train, _, _ = LMTask(cfg).build_datasets(SimpleNamespace(config=SimpleNamespace(vocab_size=128)))
    assert train.ctx_len == 99 and not [r for r in caplog.records if r.levelname == "WARNING"]


def test_global_order_is_independent_of_process_count_and_restarts():
    n, B = 37, 3

    def take(sampler, k):
        it = iter(sampler)
        return [next(it) for _ in range(k)]

    one = take(GlobalOrderSampler(n, 5, True, 0, 2 * B, 1, 1, 0), 2 * B * 10)
    r0 = take(GlobalOrderSampler(n, 5, True, 0, B, 1, 2, 0), B * 10)
    r1 = take(GlobalOrderSampler(n, 5, True, 0, B, 1, 2, 1), B * 10)
    two = []
    for s in range(10):
        two += r0[s * B:(s + 1) * B] + r1[s * B:(s + 1) * B]
    assert one == two
    # each epoch is a permutation
    assert sorted(one[:n]) == list(range(n))
    # grad accumulation 2 x B on one process == batch 2B
    assert take(GlobalOrderSampler(n, 5, True, 0, B, 2, 1, 0), 2 * B * 10) == one
    # a restart at a position continues the same stream
    assert take(GlobalOrderSampler(n, 5, True, 4 * 2 * B, 2 * B, 1, 1, 0), 2 * B * 6) == one[4 * 2 * B:]


def test_loss_png(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": i, "loss": 3.0 / i}) + "\n" for i in range(1, 20)) + '{"step": 20, "lo')
    assert plot_losses(m, tmp_path / "loss.png")
    from PIL import Image

    im = Image.open(tmp_path / "loss.png")
    assert im.format == "PNG" and im.size == (800, 480)
    assert len(im.getcolors(maxcolors=100000)) > 2  # axes and a curve were drawn


@pytest.mark.parametrize("tokenizer", ["world", "bytes"])
def test_long_texts_are_tokenized_in_pieces_with_the_whole_texts_ids(tmp_path, monkeypatch, tokenizer):
    """Pieces of a long document (bounded memory) give exactly the ids of the whole text. They used
    to be cut after a blank line, or at the piece limit without one: a file of single newlines
    (logs, many novels) then had a token split at every cut ('hello' -> 'hell', 'o'), and a blank
    line before indented text split tokens such as '\\n\\n  '."""
    from multimodal_rwkv.training import data as D

    tok = D.get_tokenizer(tokenizer)
    monkeypatch.setattr(D, "TXT_PIECE_CHARS", 300)
    rng = np.random.default_rng(0)
    words = ["hello", "world", "\n", "\n\n", "  ", "\n\n    ", "你好", "世界。", "é", "🙂", "\t", "x" * 40, "\r\n"]
    text = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(3000))
    pieces = list(D.encode_in_pieces(tok, text))
    assert len(pieces) > 10 and sum(pieces, []) == tok.encode(text)
    lines = "hello world!\n" * 100  # no blank line at all
    assert sum(D.encode_in_pieces(tok, lines), []) == tok.encode(lines)
    p = tmp_path / "long.txt"
    p.write_text(lines, encoding="utf-8")
    stream = D.tokenize_to_cache([p], "txt", tok, tmp_path / "cache", "fail")
    assert np.asarray(stream.ids).tolist() == tok.encode(lines) + [0]


def test_windows_check_the_vocabulary():
    ids = np.array([1, 2, 3, 4, 5, 6, 99, 7, 8], np.int32)
    ds = PackedDataset(TokenStream(ids, None, "mem.npy"), 4, vocab_size=50)
    assert ds.window(0)[0].tolist() == [1, 2, 3, 4]
    with pytest.raises(DataError, match=r"mem\.npy: token 6 has id 99"):
        ds.window(1)


def test_a_lone_surrogate_is_a_bad_record_named_not_a_crash(tmp_path):
    """A JSON escape "\\ud800" with no pair decodes to a str no tokenizer can encode: it used to end
    training with a UnicodeEncodeError traceback, even under on_bad_record=skip."""
    p = tmp_path / "sur.jsonl"
    p.write_text('{"text": "hello world"}\n{"text": "bad \\ud800 surrogate"}\n'
                 '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}\n')
    with pytest.raises(DataError, match=r"sur\.jsonl:2: text is not valid Unicode \(lone surrogate \\ud800"):
        _stream(p, tmp_path)
    s = _stream(p, tmp_path, on_bad="skip")
    assert s.skipped == 2 and bytes(int(i) - 1 for i in np.asarray(s.ids) if i).decode() == "hello world"
    p.write_text(p.read_text().splitlines()[2] + "\n")
    with pytest.raises(DataError, match=r"sur\.jsonl:1: turn 1 content is not valid Unicode \(lone surrogate"):
        _stream(p, tmp_path)


def test_text_suffixes_match_in_any_case(tmp_path):
    """B.TXT, c.MD, x.JSONL in a data folder used to be left out without a word."""
    from multimodal_rwkv.training.data import detect_format

    d = tmp_path / "txt"
    d.mkdir()
    for name, text in (("a.txt", "one"), ("B.TXT", "two"), ("c.MD", "three")):
        (d / name).write_text(text)
    assert detect_format(d) == "txt"
    text = bytes(int(i) - 1 if i else ord("|") for i in np.asarray(_stream(d, tmp_path).ids)).decode()
    assert sorted(text.split("|")) == ["", "one", "three", "two"]
    j = tmp_path / "jsonl"
    j.mkdir()
    (j / "a.jsonl").write_text('{"text": "x"}\n')
    (j / "b.JSONL").write_text('{"text": "y"}\n')
    assert detect_format(j) == "jsonl" and detect_format(j / "b.JSONL") == "jsonl"
    assert len(_stream(j, tmp_path)) == 4
    n = tmp_path / "npy"
    n.mkdir()
    np.save(n / "a.npy", np.array([1, 2, 0], np.int32))
    (n / "a.npy").rename(n / "A.NPY")
    assert detect_format(n) == "tokens" and np.asarray(_stream(n, tmp_path).ids).tolist() == [1, 2, 0]


def test_a_json_array_file_is_read_as_records(tmp_path):
    """A pretty-printed .json array used to be read line by line: 'array.json:1: invalid JSON', and
    under skip every line counted as a bad record (one of them even trained on)."""
    p = tmp_path / "array.json"
    p.write_text(json.dumps([{"text": "first"}, {"text": ""}, {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}], indent=2))
    with pytest.raises(DataError, match=r"array\.json\[1\]: 'text' must be a non-empty string"):
        _stream(p, tmp_path)
    s = _stream(p, tmp_path, on_bad="skip")
    assert s.skipped == 1
    assert bytes(int(i) - 1 if i else ord("|") for i in np.asarray(s.ids)).decode() == "first|User: q\n\nAssistant: a\n\n|"
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "a"},\n  {"text": "b"},\n')
    with pytest.raises(DataError, match=r"broken\.json:4: invalid JSON array .*a \.json file holds one JSON array"):
        _stream(broken, tmp_path)
    with pytest.raises(DataError, match=r"no usable documents \(1 bad records skipped\)"):
        _stream(broken, tmp_path, on_bad="skip")


def test_a_file_that_is_not_utf8_is_one_bad_file(tmp_path):
    """A 1-record UTF-16 JSONL file counted as 2 bad records (one per garbled line)."""
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine"}\n')
    for name, data in (("bom.jsonl", '{"text": "a"}\n{"text": "b"}\n'.encode("utf-16")),
                       ("nobom.jsonl", '{"text": "a"}\n'.encode("utf-16-le")),
                       ("arr.json", '[{"text": "a"}]'.encode("utf-16"))):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(DataError, match=rf"{name}: not UTF-8.*save it as UTF-8"):
            _stream(p, tmp_path)
        d = tmp_path / f"dir_{name}"
        d.mkdir()
        (d / name).write_bytes(data)
        (d / "good.jsonl").write_text('{"text": "fine"}\n')
        assert _stream(d, tmp_path, on_bad="skip").skipped == 1
    u16 = tmp_path / "u16.txt"
    u16.write_bytes("some text\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"u16\.txt: not UTF-8 text \(it starts with a UTF-16/32 byte-order mark\)"):
        _stream(u16, tmp_path)
    u16.write_bytes("some text\n".encode("utf-16-le"))  # valid UTF-8 byte by byte: it used to train NULs
    with pytest.raises(DataError, match=r"u16\.txt: not UTF-8 text \(it holds NUL bytes"):
        _stream(u16, tmp_path)


def test_an_override_list_that_is_not_yaml_says_so():
    """'[*.ln_x.weight]': YAML reads the * as an alias, and the error used to be 'expected a list,
    got '[*.ln_x.weight]'' for what was written as a list. A value that only starts with [ is a string."""
    with pytest.raises(ConfigError, match=r"'peft\.trainable': '\[\*\.ln_x\.weight\]' is not valid YAML .*quote"):
        apply_overrides(TrainConfig(), ["peft.trainable=[*.ln_x.weight]"])
    assert apply_overrides(TrainConfig(), ["peft.trainable=['*.ln_x.weight']"]).peft.trainable == ["*.ln_x.weight"]
    assert apply_overrides(TrainConfig(), ["data.train_file=[a].txt"]).data.train_file == "[a].txt"


def test_a_damaged_token_cache_of_npy_files_is_rebuilt(tmp_path):
    """A truncated tokens.u32 of a .npy folder's cache entry crashed every later run (TypeError);
    text sources already rebuilt theirs."""
    from multimodal_rwkv.training.data import read_tokens

    src = tmp_path / "tok"
    src.mkdir()
    np.save(src / "a.npy", np.arange(1, 50, dtype=np.uint16))
    np.save(src / "b.npy", np.arange(5, 30, dtype=np.uint16))
    want = np.array(read_tokens(src, tmp_path / "cache", "fail").ids)
    (entry,) = [d for d in (tmp_path / "cache").iterdir() if not d.name.startswith(".")]
    (entry / "tokens.u32").write_bytes((entry / "tokens.u32").read_bytes()[:40])
    assert np.array_equal(np.array(read_tokens(src, tmp_path / "cache", "fail").ids), want)


def test_override_values_that_yaml_reads_as_text_are_kept_as_given():
    """--set output_dir=$'x\\ny' became 'x y' (YAML folds a line break) and 'runs/a #1' became
    'runs/a' (a YAML comment): a path is kept exactly; numbers, booleans, lists stay YAML."""
    from multimodal_rwkv.training.config import TrainConfig, apply_overrides

    cfg = apply_overrides(TrainConfig(), ["output_dir=x\ny", "data.train_file=runs/a #1", "optim.lr=3e-4",
                                          "progress_bar=false", "peft.lora_targets=[att.key, ffn.key]",
                                          "data.valid_file='quoted'"])
    assert cfg.output_dir == "x\ny" and cfg.data.train_file == "runs/a #1" and cfg.optim.lr == 3e-4
    assert cfg.progress_bar is False and cfg.peft.lora_targets == ["att.key", "ffn.key"]
    assert cfg.data.valid_file == "quoted"
