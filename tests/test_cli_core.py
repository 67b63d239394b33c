"""Core CLI commands: generate, convert, info, env; exit codes and one-line errors."""
import subprocess
import sys

import pytest
import torch


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(*args):
    """Run the CLI in-process (fast); SystemExit from argparse becomes the return code."""
    import contextlib
    import io

    from multimodal_rwkv.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    return Result(rc, out.getvalue(), err.getvalue())


def run_subprocess(*args):
    return subprocess.run([sys.executable, "-m", "multimodal_rwkv", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def world_pth(tmp_path_factory):
    from multimodal_rwkv.model.random_checkpoint import make_blink_checkpoint

    return make_blink_checkpoint(tmp_path_factory.mktemp("m") / "w.pth", n_layer=2, n_embd=64, head_size=32,
                                 vocab_size=65536)


def test_info_convert_generate(world_pth, tmp_path):
    r = run("info", world_pth)
    assert r.returncode == 0, r.stderr
    assert "x060" in r.stdout and "n_layer:       2" in r.stdout and "mix 32, decay 64" in r.stdout
    r = run("convert", world_pth, str(tmp_path / "conv"))
    assert r.returncode == 0, r.stderr
    from multimodal_rwkv import RWKVForCausalLM

    a = RWKVForCausalLM.from_pretrained(world_pth)
    b = RWKVForCausalLM.from_pretrained(tmp_path / "conv")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    r = run("generate", "--model", str(tmp_path / "conv"), "--prompt", "Hello world", "--temperature", "0",
            "--max-new-tokens", "6", "--no-stream")
    assert r.returncode == 0, r.stderr
    # greedy CLI output == greedy API output
    from multimodal_rwkv import WorldTokenizer

    tok = WorldTokenizer()
    ids = tok.encode("Hello world")
    out = a.generate(torch.tensor([ids]), max_new_tokens=6)
    new = out[0, len(ids):].tolist()
    if 0 in new:
        new = new[: new.index(0)]
    assert r.stdout.rstrip("\n") == tok.decode(new)


def test_generate_streams_and_seed_is_reproducible(world_pth):
    args = ("generate", "--model", world_pth, "--prompt", "Once", "--max-new-tokens", "8", "--seed", "3")
    a, b = run_subprocess(*args), run(*args)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_negative_numbers_in_exponent_form_are_values_not_options():
    """argparse read '--presence-penalty -1e3' as a missing value (its pattern knows -1 and -1.5 only)."""
    from multimodal_rwkv.cli import build_parser

    p = build_parser()
    for text, want in (("-1e3", -1000.0), ("-2.5E-1", -0.25), ("-.5e1", -5.0), ("-1", -1.0)):
        a = p.parse_args(["generate", "--model", "m", "--prompt", "x", "--presence-penalty", text])
        assert a.presence_penalty == want
    a = p.parse_args(["generate", "--model", "m", "--prompt=-x", "--frequency-penalty", "-3e-2"])
    assert a.prompt == "-x" and a.frequency_penalty == -0.03
    with pytest.raises(SystemExit) as e:  # a non-finite penalty is still refused, as a value
        p.parse_args(["generate", "--model", "m", "--prompt", "x", "--presence-penalty", "-inf"])
    assert e.value.code == 2


def test_generate_decodes_as_its_options_say_whatever_the_folders_generation_config(world_pth, tmp_path):
    """A folder's generation_config.json with do_sample made --temperature 0 sample, one with
    num_beams 2 crashed the streamer (a traceback), other decoding modes (penalty_alpha: contrastive
    search) were tracebacks too and filters (min_p) changed the samples; its stop strings stopped
    the text without cutting it (--stop cut it)."""
    from multimodal_rwkv import RWKVForCausalLM

    args = ("--prompt", "Hello world, this is", "--max-new-tokens", "12", "--temperature", "0")
    greedy = run("generate", "--model", world_pth, *args, "--no-stream")
    assert greedy.returncode == 0 and greedy.stdout.strip()
    m = RWKVForCausalLM.from_pretrained(world_pth)
    m.generation_config.do_sample, m.generation_config.temperature, m.generation_config.num_beams = True, 1.5, 2
    m.generation_config.min_p, m.generation_config.penalty_alpha, m.generation_config.top_k = 0.5, 0.6, 4
    m.save_pretrained(tmp_path / "gc")
    for stream in ((), ("--no-stream",)):
        r = run("generate", "--model", tmp_path / "gc", *args, *stream)
        assert r.returncode == 0 and r.stdout == greedy.stdout, r.stderr
    text = greedy.stdout.rstrip("\n")
    stop = text[3:6]
    m.generation_config = type(m.generation_config)(stop_strings=[stop])
    m.save_pretrained(tmp_path / "stop")
    for stream in ((), ("--no-stream",)):
        r = run("generate", "--model", tmp_path / "stop", *args, *stream)
        assert r.returncode == 0 and r.stdout.rstrip("\n") == text[:text.index(stop)], r.stderr
    r = run("generate", "--model", world_pth, *args, "--stop", "")
    assert r.returncode == 2 and "--stop: an empty stop string" in r.stderr


@pytest.mark.parametrize("argv,needle", [
    (("generate", "--model", "/nonexistent/x.pth", "--prompt", "hi"), "/nonexistent/x.pth"),
    (("info", "/nonexistent/y.pth"), "/nonexistent/y.pth"),
    (("generate", "--prompt", "hi"), "--model"),
    (("no-such-command",), "invalid choice"),
])
def test_bad_input_exit_2_one_line(argv, needle):
    r = run(*argv)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert needle in lines[-1] and "Traceback" not in r.stderr


def test_generate_refuses_small_vocab_model(tmp_path):
    from multimodal_rwkv.model.random_checkpoint import make_blink_checkpoint

    p = make_blink_checkpoint(tmp_path / "small.pth", n_layer=1, n_embd=64, head_size=32, vocab_size=300)
    r = run("generate", "--model", p, "--prompt", "hi")
    assert r.returncode == 2 and "small.pth" in r.stderr and "vocab_size 300" in r.stderr


def test_env_and_help():
    r = run("env")
    assert r.returncode == 0 and "torch" in r.stdout and "cpu kernels   C++ WKV-6 and few-rows decode products: " in r.stdout
    assert "cpu linears   fp32, more than 16 rows: " in r.stdout
    r = run_subprocess("--help")
    assert r.returncode == 0 and "generate" in r.stdout


def test_import_is_fast():
    code = "import time; t=time.perf_counter(); import multimodal_rwkv; print(time.perf_counter()-t)"
    best = min(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
               for _ in range(2))
    assert best < 3.0


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "m", "--prompt", "hi", "--top-p", "2"], "argument --top-p: must be in (0, 1], got 2"),
    (["generate", "--model", "m", "--prompt", "hi", "--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["generate", "--model", "m", "--prompt", "hi", "--top-k", "-1"], "argument --top-k: must be an integer >= 0"),
    (["generate", "--model", "m", "--prompt", "hi", "--temperature", "-1"], "argument --temperature: must be >= 0"),
    (["generate", "--model", "m", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1"),
    (["generate", "--model", "m", "--prompt", "hi", "--max-new-tokens", "x"], "--max-new-tokens: not an integer: 'x'"),
    (["generate", "--model", "m", "--prompt", "hi", "--presence-penalty", "nan"], "must be a finite number, got nan"),
    (["vqa", "--model", "m", "--image", "i.png", "--question", "q", "--top-k", "-2"], "--top-k: must be an integer >= 0"),
    (["eval-vqa", "--model", "m", "--questions", "q", "--output", "o", "--batch-size", "0"], "--batch-size: must be"),
    (["vision-synth", "--out", "o", "--questions-per-image", "0"], "--questions-per-image: must be an integer >= 1"),
    (["music", "generate", "--model", "m", "--out", "o.mid", "--seconds", "-3"], "argument --seconds: must be > 0"),
    (["music", "generate", "--model", "m", "--out", "o.mid", "--seconds", "inf"], "must be a finite number, got inf"),
    (["music", "generate", "--model", "m", "--out", "o.mid", "--max-tokens", "0"], "--max-tokens: must be an integer >= 1"),
])
def test_numeric_options_are_checked_before_any_work(args, message):
    """Out-of-range sampling / size options: argparse's one-line error and exit 2, before a model is read
    (the model paths here do not exist, so reaching the command would give another error)."""
    r = run(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) < 200



@pytest.mark.parametrize("args, message", [
    (["music", "tokenize", ""], "argument paths: an empty path"),
    (["music", "tokenize", "x.mid", "--out", ""], "argument --out: an empty path"),
    (["music", "tokenize", "x.mid", "--out", " "], "argument --out: an empty path"),
    (["music", "tokenize", "x.mid", "--out", "sub/"], "argument --out: 'sub/' names a folder; give a file name"),
    (["music", "tokenize", "x.mid", "--out", "."], "argument --out: '.' names a folder; give a file name"),
    (["music", "tokenize", "x.mid", "--out", "sub/.."], "names a folder; give a file name"),
    (["music", "tokenize", "x.mid", "--out", "sub/ "], "names a folder; give a file name"),
    (["music", "tokenize", "x.mid", "--tokenizer-config", ""], "argument --tokenizer-config: an empty path"),
    (["music", "prepare", "--midi-dir", "", "--out", "o"], "argument --midi-dir: an empty path"),
    (["music", "generate", "--model", "m", "--out", "o.mid", "--png", ""], "argument --png: an empty path"),
    (["music", "roll", "x.mid", "--out", ""], "argument --out: an empty path"),
    (["music", "abc2midi", "", "--out", "o.mid"], "argument abc: an empty path"),
    (["demo", "--out", ""], "argument --out: an empty path"),
    (["demo", "--image", " "], "argument --image: an empty path"),
    (["vision-synth", "--out", " "], "argument --out: an empty path"),
    (["eval-vqa", "--model", "m", "--questions", "q", "--output", "o", "--image-folder", ""],
     "argument --image-folder: an empty path"),
    (["vqa", "--model", "m", "--image", "", "--question", "q"], "argument --image: an empty path"),
])
def test_empty_paths_are_refused_by_every_command(args, message, tmp_path, monkeypatch):
    """Only generate/convert/info refused an empty path: music tokenize '' read the whole current
    folder tree, --out '' wrote nothing with exit 0, demo --out '' drew into the current folder,
    eval-vqa --image-folder '' meant the questions' folder, vision-synth --out ' ' made a folder ' '."""
    monkeypatch.chdir(tmp_path)  # (where a regression would write)
    r = run(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_sampling_api_rejects_bad_values():
    from multimodal_rwkv.music.generate import generate_music, sample_next
    from multimodal_rwkv.vision.synthetic import generate_dataset

    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        sample_next(torch.zeros(8), 1.0, top_k=-3)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        sample_next(torch.zeros(8), float("nan"))
    with pytest.raises(ValueError, match="seconds must be > 0"):
        generate_music(None, None, seconds=0)
    with pytest.raises(ValueError, match="questions_per_image >= 1"):
        generate_dataset("/nonexistent/x", n_train=1, n_test=0, questions_per_image=0)


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path):
    from PIL import Image

    (tmp_path / "config.json").write_text('{"model_type": "rwkv6"}')
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    r = run("info", tmp_path / "config.json")
    assert r.returncode == 2 and "config.json: a JSON file, not a checkpoint (for a model folder, give the folder)" in r.stderr
    r = run("info", tmp_path / "a.png")
    assert r.returncode == 2 and "a.png: not a PyTorch checkpoint (neither a zip nor a pickle file)" in r.stderr
    (tmp_path / "t.txt").write_text("hello\n")
    r = run("info", tmp_path / "t.txt")
    assert r.returncode == 2 and "t.txt: not a PyTorch checkpoint (neither a zip nor a pickle file)" in r.stderr
    import pickle

    (tmp_path / "p.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    r = run("info", tmp_path / "p.pkl")
    assert r.returncode == 2 and "p.pkl: a pickle file that is not a PyTorch checkpoint" in r.stderr
    r = run("info", "/dev/null")
    assert r.returncode == 2 and "/dev/null: not a regular file" in r.stderr
    for argv in (("info", ""), ("convert", tmp_path / "a.png", "")):
        r = run(*argv)
        assert r.returncode == 2 and "an empty path" in r.stderr


def test_a_model_safetensors_given_alone_loads(world_pth, tmp_path):
    from multimodal_rwkv import RWKVForCausalLM

    m = RWKVForCausalLM.from_pretrained(world_pth)
    m.save_pretrained(tmp_path / "ours")
    alone = RWKVForCausalLM.from_pretrained(tmp_path / "ours" / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), alone.state_dict().values()))
    r = run("info", tmp_path / "ours" / "model.safetensors")
    assert r.returncode == 0 and "x060" in r.stdout


def test_a_visualrwkv_folder_is_named_as_such():
    from pathlib import Path

    import multimodal_rwkv

    vis = Path(multimodal_rwkv.__file__).parent / "assets" / "visualrwkv_synthetic"
    for cmd in (["info", vis], ["generate", "--model", vis, "--prompt", "hi"]):
        r = run(*cmd)
        assert r.returncode == 2 and "a VisualRWKV model (vision + language); use it with mmrwkv vqa" in r.stderr


def test_prompt_and_stop_escapes_keep_unicode(world_pth, monkeypatch):
    """\\n, \\t, \\r and \\\\ are unescaped; any other backslash and all non-ASCII text reach the
    model as typed (a codec-based unescape garbled UTF-8 and died on '\\x')."""
    from multimodal_rwkv.argtypes import unescape
    from multimodal_rwkv.model import generation, tokenizer

    assert unescape("Héllo 世界\\nnext\\tx") == "Héllo 世界\nnext\tx"
    assert unescape("C:\\xyz\\\\n\\q") == "C:\\xyz\\n\\q"
    seen = {}
    encode, criteria = tokenizer.WorldTokenizer.encode, generation.StopStringsCriteria.__init__

    def spy_encode(self, text, *a, **k):
        seen.setdefault("prompt", text)
        return encode(self, text, *a, **k)

    def spy_criteria(self, tok, stops, prompt_len, **kw):
        seen["stops"] = stops
        criteria(self, tok, stops, prompt_len, **kw)

    monkeypatch.setattr(tokenizer.WorldTokenizer, "encode", spy_encode)
    monkeypatch.setattr(generation.StopStringsCriteria, "__init__", spy_criteria)
    r = run("generate", "--model", world_pth, "--prompt", "Héllo 世界\\nC:\\xyz", "--stop", "。", "--stop", "\\x",
            "--max-new-tokens", "2", "--temperature", "0", "--no-stream")
    assert r.returncode == 0, r.stderr
    assert seen == {"prompt": "Héllo 世界\nC:\\xyz", "stops": ["。", "\\x"]}


def test_text_that_is_not_utf8_and_unknown_devices_exit_2(world_pth):
    r = subprocess.run([sys.executable, "-m", "multimodal_rwkv", "generate", "--model", world_pth, "--prompt", "-"],
                       input=b"a\xff\xfeb", capture_output=True, timeout=300)
    assert r.returncode == 2 and b"standard input is not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr
    r = run("generate", "--model", world_pth, "--prompt", "a\udcffb")  # how argv bytes that are not UTF-8 arrive
    assert r.returncode == 2 and "--prompt is not valid UTF-8" in r.stderr
    r = run("generate", "--model", world_pth, "--prompt", "hi", "--device", "foo")
    assert r.returncode == 2 and "not a device: 'foo'" in r.stderr
    if not torch.cuda.is_available():
        r = run("generate", "--model", world_pth, "--prompt", "hi", "--device", "cuda")
        assert r.returncode == 2 and "no CUDA GPU" in r.stderr


def test_a_vocabulary_wider_than_the_tokenizer_never_yields_undecodable_ids(tmp_path):
    """A model whose vocabulary is padded past the World tokenizer's 65536 ids: generation with the
    tokenizer never picks an id it cannot decode (the head here favours exactly those ids)."""
    from multimodal_rwkv import RWKVForCausalLM, WorldTokenizer
    from multimodal_rwkv.model.random_checkpoint import blink_state_dict

    sd = blink_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=65600)
    sd["head.weight"][65536:] *= 100
    torch.save(sd, tmp_path / "wide.pth")
    m = RWKVForCausalLM.from_pretrained(tmp_path / "wide.pth")
    ids = torch.tensor([WorldTokenizer().encode("Hello")])
    assert int(m(ids).logits[0, -1].argmax()) >= 65536  # unconstrained, it would pick one
    out = m.generate(ids, max_new_tokens=4, tokenizer=WorldTokenizer())
    assert int(out[0, ids.shape[1]:].max()) < 65536
    r = run("generate", "--model", tmp_path / "wide.pth", "--prompt", "Hello", "--temperature", "0",
            "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr


def test_a_closed_output_pipe_ends_quietly(world_pth):
    """``mmrwkv info FILE | head -1``: the reader going away is not bad input (it used to exit 2
    with "error: Broken pipe")."""
    p = subprocess.Popen([sys.executable, "-m", "multimodal_rwkv", "info", str(world_pth)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # closed before the command writes anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0 and "Broken pipe" not in err and "Traceback" not in err


def test_an_error_raised_in_a_dataloader_worker_is_one_line():
    """torch re-wraps a worker's exception with the worker's whole traceback; the CLI prints the
    original message alone."""
    from torch.utils.data import DataLoader, Dataset

    from multimodal_rwkv.cli import _one_line
    from multimodal_rwkv.errors import DataError

    class Bad(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DataError("f.bin: token 7 has id -5, outside the model's vocabulary [0, 256)")

    with pytest.raises(DataError) as e:
        next(iter(DataLoader(Bad(), num_workers=1)))
    assert "Original Traceback" in str(e.value)
    assert _one_line(e.value) == "f.bin: token 7 has id -5, outside the model's vocabulary [0, 256)"
    assert _one_line(DataError("plain: message")) == "plain: message"


def test_generate_uses_the_tokenizer_the_model_was_trained_with(world_pth, tmp_path):
    """A model of `mmrwkv train ... data.tokenizer=bytes` (training_info.json says "bytes") is prompted and
    decoded with the byte tokenizer it learnt, not the World one; a tokenizer generate does not know is
    refused, naming the file."""
    import json

    from multimodal_rwkv import RWKVForCausalLM
    from multimodal_rwkv.model.random_checkpoint import make_blink_checkpoint
    from multimodal_rwkv.training.data import ByteTokenizer

    tok = ByteTokenizer()
    small = make_blink_checkpoint(tmp_path / "b.pth", n_layer=1, n_embd=64, head_size=32, vocab_size=257)
    for src, name in ((world_pth, "world_vocab"), (small, "byte_vocab")):  # train's vocab, or 257 (was refused)
        m = RWKVForCausalLM.from_pretrained(src)
        m.save_pretrained(tmp_path / name)
        (tmp_path / name / "training_info.json").write_text(json.dumps({"task": "lm", "tokenizer": "bytes"}))
        ids = tok.encode("Hi é")
        out = m.generate(torch.tensor([ids]), max_new_tokens=6, tokenizer=tok)[0, len(ids):].tolist()
        want = tok.decode(out[: out.index(0)] if 0 in out else out)
        # a converted copy keeps the record of its tokenizer (convert dropped training_info.json)
        for _ in range(2):  # twice: over its own output, training_info.json included
            r = run("convert", tmp_path / name, tmp_path / f"{name}_bf16", "--dtype", "bf16")
            assert r.returncode == 0, r.stderr
        for model in (tmp_path / name, tmp_path / name / "model.safetensors", tmp_path / f"{name}_bf16"):
            r = run("generate", "--model", model, "--prompt", "Hi é", "--temperature", "0", "--max-new-tokens", "6",
                    "--no-stream")
            assert r.returncode == 0, r.stderr
            if "bf16" not in str(model):
                assert r.stdout[:-1] == want, (name, r.stdout, want)
    info = tmp_path / "world_vocab" / "training_info.json"
    info.write_text(json.dumps({"task": "lm", "tokenizer": "sentencepiece"}))
    r = run("generate", "--model", tmp_path / "world_vocab", "--prompt", "Hi")
    assert r.returncode == 2 and f"{info}: the model was trained with tokenizer 'sentencepiece'" in r.stderr
    info.write_text("{oops")
    r = run("generate", "--model", tmp_path / "world_vocab", "--prompt", "Hi")
    assert r.returncode == 2 and f"{info}: unreadable training info" in r.stderr and "Traceback" not in r.stderr


def test_convert_never_overwrites_what_it_did_not_write(world_pth, tmp_path):
    """OUT_DIR holding a VisualRWKV, other files, or SRC itself is refused before anything is written;
    a new or empty folder, or one holding a model convert wrote, is written."""
    import shutil
    from pathlib import Path

    import multimodal_rwkv

    def snapshot(d):
        return {p.name: p.read_bytes() for p in d.iterdir()}

    vis = tmp_path / "vis"
    shutil.copytree(Path(multimodal_rwkv.__file__).parent / "assets" / "visualrwkv_synthetic", vis)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine\n")
    (tmp_path / "file").write_text("mine\n")
    for out, needle in ((vis, "not empty, holds a VisualRWKV model (config.json, model.safetensors, "
                              "preprocessor_config.json)"),
                        (tmp_path / "notes", "not empty, holds other files (todo.txt)")):
        before = snapshot(out)
        r = run("convert", world_pth, out)
        assert r.returncode == 2 and f"{out}: {needle}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and snapshot(out) == before
    r = run("convert", world_pth, tmp_path / "file")
    assert r.returncode == 2 and "file: exists and is not a folder" in r.stderr
    assert (tmp_path / "file").read_text() == "mine\n"
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "empty", tmp_path / "new" / "sub"):  # twice: over its own output
        r = run("convert", world_pth, out)
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    before = snapshot(tmp_path / "empty")
    for src, needle in ((tmp_path / "empty", "is the source"),
                        (tmp_path / "empty" / "model.safetensors", "holds the source")):
        r = run("convert", src, tmp_path / "empty")
        assert r.returncode == 2 and f"empty: {needle}" in r.stderr, r.stderr
    assert snapshot(tmp_path / "empty") == before
    (tmp_path / "empty" / "training_info.json").write_text("{}")  # a run's final/ folder: more than convert wrote
    r = run("convert", world_pth, tmp_path / "empty")
    assert r.returncode == 2 and "holds a model and other files" in r.stderr


def test_verbose_is_debug_logging_of_this_package_only():
    """-v: this package's debug lines; a third-party library's (filelock waiting for torch's extension
    lock, every 50 ms) stay out."""
    code = ("import logging, sys\nfrom multimodal_rwkv.cli import main\nmain(sys.argv[1:])\n"
            "logging.getLogger('filelock').debug('THIRD-PARTY DEBUG')\n"
            "logging.getLogger('filelock').info('THIRD-PARTY INFO')\n"
            "logging.getLogger('multimodal_rwkv.kernels.cpu').debug('OUR DEBUG')\n")
    for argv, ours in ((["-v"], True), ([], False)):  # no command: the help, after logging is set up
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
        assert ("DEBUG multimodal_rwkv.kernels.cpu: OUR DEBUG" in r.stderr) == ours, r.stderr
        assert "THIRD-PARTY DEBUG" not in r.stderr and "INFO filelock: THIRD-PARTY INFO" in r.stderr


class _BrokenStream:
    """A stdout whose reader went away (errno EPIPE), or whose disk is full (ENOSPC)."""

    def __init__(self, errno_):
        self.errno_ = errno_

    def write(self, text):
        import errno
        import os

        cls = BrokenPipeError if self.errno_ == errno.EPIPE else OSError
        raise cls(self.errno_, os.strerror(self.errno_))

    def flush(self):
        pass


def test_a_closed_or_full_standard_stream_is_handled_by_what_the_command_makes(tmp_path, world_pth, monkeypatch):
    """A reader that stopped (| head) made commands that write files exit 0 without writing them; a
    full disk said "No space left on device" without naming standard output; closed streams and
    Ctrl-C while the options were parsed gave tracebacks."""
    import errno
    import io

    from multimodal_rwkv import cli

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", _BrokenStream(errno.EPIPE))
    # a command that makes files goes on without its printout ...
    assert cli.main(["vision-synth", "--out", str(tmp_path / "ds"), "--n-train", "2", "--n-test", "1"]) == 0
    assert (tmp_path / "ds" / "train.json").is_file()
    # ... one whose product is its printout stops, successfully
    assert cli.main(["info", str(world_pth)]) == 0
    monkeypatch.setattr(sys, "stdout", _BrokenStream(errno.ENOSPC))
    assert cli.main(["info", str(world_pth)]) == 2
    assert "mmrwkv info: error: standard output: No space left on device" in err.getvalue()
    monkeypatch.setattr(sys, "stdout", None)  # started with >&-
    assert cli.main(["info", str(world_pth)]) == 2 and "standard output is closed" in err.getvalue()
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stdin", None)  # started with <&-
    assert cli.main(["generate", "--model", str(world_pth), "--prompt", "-"]) == 2
    assert "--prompt -: standard input is closed" in err.getvalue()

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["info", str(world_pth)]) == 130 and err.getvalue().endswith("interrupted\n")


def test_sigterm_cleans_up_as_ctrl_c_does_and_exits_143(tmp_path, monkeypatch, capsys):
    """SIGTERM during convert's weight write killed the process where it stood: a full-size hidden
    temporary file stayed in the output folder, and the same command run again was refused."""
    import os
    import signal

    from multimodal_rwkv import cli
    from multimodal_rwkv.model import checkpoint
    from multimodal_rwkv.model.random_checkpoint import make_blink_checkpoint

    src = make_blink_checkpoint(tmp_path / "a.pth", n_layer=1, n_embd=64, vocab_size=64)
    out = tmp_path / "out"
    assert cli.main(["convert", str(src), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = checkpoint.save_safetensors

    def write_then_terminated(path, tensors, metadata=None):
        def write(tmp):
            tmp.write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)  # arrives here, in the middle of the write
        checkpoint.atomic_write(path, write)

    monkeypatch.setattr(checkpoint, "save_safetensors", write_then_terminated)
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(["convert", str(src), str(out), "--dtype", "bf16"]) == 143
    assert capsys.readouterr().err.strip().endswith("terminated")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file, nothing replaced
    assert signal.getsignal(signal.SIGTERM) == handler  # put back
    monkeypatch.setattr(checkpoint, "save_safetensors", real)
    assert cli.main(["convert", str(src), str(out), "--dtype", "bf16"]) == 0


def test_an_output_on_a_read_only_file_system_says_so(tmp_path, monkeypatch):
    """A read-only mount was reported as 'no permission to write in ...'."""
    import os
    import types

    from multimodal_rwkv import fileio
    from multimodal_rwkv.errors import DataError

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(DataError, match="no permission to write in"):
        fileio.check_outputs([("--out", tmp_path / "x.mid")], [])
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(DataError, match=f"x.mid: cannot create --out \\({tmp_path} is on a read-only file system\\)"):
        fileio.check_outputs([("--out", tmp_path / "x.mid")], [])


def test_convert_over_an_earlier_output_replaces_it_whole_or_not_at_all(tmp_path, monkeypatch):
    """Files were replaced one by one: an interrupt after the weights left the new weights with the
    old config.json (a folder no loader took), and a generation_config.json the new model does not
    have stayed behind."""
    from multimodal_rwkv import cli
    from multimodal_rwkv.model.modeling import RWKVForCausalLM
    from multimodal_rwkv.model.random_checkpoint import make_blink_checkpoint

    a = make_blink_checkpoint(tmp_path / "a.pth", n_layer=1, n_embd=64, vocab_size=64)
    b = make_blink_checkpoint(tmp_path / "b.pth", n_layer=2, n_embd=64, vocab_size=64, seed=1)
    out = tmp_path / "out"
    assert cli.main(["convert", str(a), str(out)]) == 0
    (out / "generation_config.json").write_text('{"temperature": 0.5, "do_sample": true}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = RWKVForCausalLM.save_pretrained

    def weights_then_interrupted(self, d, **kw):
        real(self, d, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(RWKVForCausalLM, "save_pretrained", weights_then_interrupted)
    assert cli.main(["convert", str(b), str(out)]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier model, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.pth", "out"]  # no staging left
    monkeypatch.setattr(RWKVForCausalLM, "save_pretrained", real)
    assert cli.main(["convert", str(b), str(out)]) == 0
    assert "generation_config.json" not in {p.name for p in out.iterdir()}  # the new model's files only
    assert RWKVForCausalLM.from_pretrained(out).config.n_layer == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.pth", "out"]


def test_a_signal_while_the_old_output_is_removed_waits_for_the_removal(tmp_path, monkeypatch):
    """Ctrl-C while swap_in removed the old folder (after the new one was in place) stopped the
    removal halfway: convert said 'interrupted' and left a hidden .old-OUT beside the new model."""
    import os
    import signal

    from multimodal_rwkv import fileio

    out, new = tmp_path / "out", tmp_path / "new"
    for d, n in ((out, 5), (new, 1)):
        d.mkdir()
        for k in range(n):
            (d / f"f{k}").write_text(d.name)
    real_remove = fileio.remove_tree
    calls = []

    def remove_then_signal(path):
        calls.append(path)
        os.kill(os.getpid(), signal.SIGINT)  # arrives halfway through the cleanup
        real_remove(path)

    monkeypatch.setattr(fileio, "remove_tree", remove_then_signal)
    with pytest.raises(KeyboardInterrupt):
        fileio.swap_in(new, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the new one in place, the old one gone
    assert [p.name for p in out.iterdir()] == ["f0"] and (out / "f0").read_text() == "new"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


def test_an_output_that_is_a_device_or_a_fifo_is_refused_not_replaced(tmp_path):
    """music generate --out, eval-vqa --output (and every output check_outputs guards) replaced a
    FIFO, or a device node, by a regular file; /dev/stdout failed naming a temp file."""
    import os
    import stat

    from multimodal_rwkv.errors import DataError
    from multimodal_rwkv.fileio import check_outputs

    fifo = tmp_path / "song.mid"
    os.mkfifo(fifo)
    (tmp_path / "link.mid").symlink_to(fifo)
    for p in (fifo, tmp_path / "link.mid", "/dev/null"):
        with pytest.raises(DataError, match="--out is not a regular file"):
            check_outputs([("--out", p)])
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    from multimodal_rwkv.music import BACH_MODEL_DIR

    r = run("music", "generate", "--model", BACH_MODEL_DIR, "--out", fifo)
    assert r.returncode == 2 and "is not a regular file" in r.stderr and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_convert_that_cannot_write_leaves_no_folder_it_made(tmp_path, world_pth, monkeypatch):
    """A name too long, or a full disk while writing, left the folders convert had created (and a later
    convert into them was refused as holding other files)."""
    r = run("convert", world_pth, tmp_path / "deep" / ("b" * 300) / "x")
    assert r.returncode == 2 and "File name too long" in r.stderr and not (tmp_path / "deep").exists()
    from multimodal_rwkv.model import checkpoint

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device", "model.safetensors")

    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    r = run("convert", world_pth, tmp_path / "new" / "x")
    assert r.returncode == 2 and "No space left on device" in r.stderr and not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    r = run("convert", world_pth, tmp_path / "mine" / "x")
    assert r.returncode == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and not any(
        (tmp_path / "mine").iterdir())


def test_a_short_numpy_write_names_the_file_and_the_likely_reason(tmp_path):
    """numpy's tofile/save on a full disk say "13409 requested and 12224 written" (no errno, no file):
    music prepare and tokenize printed only that."""
    import numpy as np

    from multimodal_rwkv.fileio import naming_write_errors

    with pytest.raises(OSError) as e, open("/dev/full", "wb") as fh, naming_write_errors(tmp_path / "shard.npy"):
        np.arange(100000, dtype=np.uint16).tofile(fh)
    assert e.value.filename == str(tmp_path / "shard.npy") and "is the disk full?" in e.value.strerror
    with pytest.raises(OSError) as e, naming_write_errors(tmp_path / "x.npy"):
        raise OSError(13, "Permission denied", "/elsewhere")  # an error that names its file already: as it is
    assert e.value.filename == "/elsewhere"


def test_outputs_with_undecodable_bytes_in_their_names(tmp_path):
    """A file name holding a byte that is not UTF-8 (a surrogate escape in Python) crashed the
    temporary-name helper every writer uses (UnicodeEncodeError, a traceback with exit 1)."""
    import os

    from multimodal_rwkv.fileio import atomic_write_text, temp_name

    name = os.fsdecode(b"caf\xe9.jsonl")
    assert temp_name(tmp_path / name).parent == tmp_path
    atomic_write_text(tmp_path / name, "x")
    assert (tmp_path / name).read_text() == "x" and os.fsencode(name) in os.listdir(os.fsencode(tmp_path))


def test_models_load_from_paths_that_are_not_utf8(tmp_path, tiny_pth):
    """torch.load and safetensors take UTF-8 names: a valid .pth, a converted folder and a saved
    state under a name with a byte that is not UTF-8 were 'truncated or corrupt'; a training run
    into such an output_dir trained, then its resume called the checkpoints damaged."""
    import os

    from multimodal_rwkv import RWKVForCausalLM, RWKVState
    from multimodal_rwkv.errors import ConfigError
    from multimodal_rwkv.training import TrainConfig, train

    from pathlib import Path

    src = Path(tiny_pth())
    bad = tmp_path / os.fsdecode(b"bad\xff.pth")
    bad.write_bytes(src.read_bytes())
    want = RWKVForCausalLM.from_pretrained(src)(torch.tensor([[1, 2, 3]])).logits
    assert torch.equal(RWKVForCausalLM.from_pretrained(bad)(torch.tensor([[1, 2, 3]])).logits, want)
    from safetensors.torch import save_file

    one = tmp_path / os.fsdecode(b"one\xff.safetensors")  # a single safetensors file (torch.load reads it by name only)
    save_file(RWKVForCausalLM.from_pretrained(src).state_dict(), str(tmp_path / "one.safetensors"))
    (tmp_path / "one.safetensors").rename(one)
    assert torch.equal(RWKVForCausalLM.from_pretrained(one)(torch.tensor([[1, 2, 3]])).logits, want)
    out = tmp_path / os.fsdecode(b"out\xffdir")
    r = subprocess.run([sys.executable, "-m", "multimodal_rwkv", "convert", bad, out], capture_output=True)
    assert r.returncode == 0, r.stderr[-500:]
    m = RWKVForCausalLM.from_pretrained(out)
    assert torch.equal(m(torch.tensor([[1, 2, 3]])).logits, want)
    r = subprocess.run([sys.executable, "-m", "multimodal_rwkv", "info", out], capture_output=True)
    assert r.returncode == 0 and b"parameters" in r.stdout, r.stderr[-500:]
    st = m(torch.tensor([[1, 2]])).state
    st.save(tmp_path / os.fsdecode(b"s\xff.safetensors"))
    assert RWKVState.load(tmp_path / os.fsdecode(b"s\xff.safetensors")).equal(st)
    (tmp_path / "c.txt").write_text("hello world " * 50)
    run_dir = tmp_path / os.fsdecode(b"run\xff")
    with pytest.raises(ConfigError, match="output_dir: .*not valid UTF-8"):
        train(TrainConfig(), [f"output_dir={run_dir}", f"data.train_file={tmp_path / 'c.txt'}",
                              "data.tokenizer=bytes", "max_steps=1", "model.config={n_layer: 1, n_embd: 32, head_size: 16}"])


def test_errors_stay_on_one_line_and_name_the_reason(tmp_path):
    """A line break in a path split the one-line error; demo --image DIR said 'file not found';
    vqa's --top-k/--top-p did nothing without --do-sample and did not say so."""
    for args in (["info", "no\nsuch.pth"], ["music", "roll", "a\nb.mid", "--out", str(tmp_path / "r.png")]):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "\\n" in r.stderr, r.stderr
    (tmp_path / "pics").mkdir()
    r = run("demo", "--image", tmp_path / "pics", "--out", tmp_path / "demo")
    assert r.returncode == 2 and "pics: --image: a directory, not an image file" in r.stderr
    help_text = run("vqa", "--help").stdout
    assert "with --do-sample; 0 = off" in " ".join(help_text.split())
    assert "with --do-sample; nucleus mass" in " ".join(help_text.split())


def test_text_the_terminal_cannot_encode_is_written_with_replacements():
    """A latin-1 or ASCII standard output ended `mmrwkv generate` with a UnicodeEncodeError
    traceback (exit 1) when the model wrote a character it lacks."""
    import io

    from multimodal_rwkv import cli

    raw = io.BytesIO()
    out = cli._Stream(io.TextIOWrapper(raw, encoding="ascii"), "standard output", stop_when_gone=True)
    out.write("caf\u00e9 \u4e2d\u6587 ok\n")
    out.flush()
    assert raw.getvalue() == b"caf? ?? ok\n"
