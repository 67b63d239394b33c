"""VQA scoring (normalisation, soft accuracy, multiple choice), question files, synthetic data."""
import json
import random
from pathlib import Path

import pytest

from multimodal_rwkv.errors import DataError
from multimodal_rwkv.vision.evaluate import (
    format_multiple_choice,
    mc_accuracy,
    normalize_answer,
    read_questions,
    vqa_soft_accuracy,
)


@pytest.mark.parametrize("raw,want", [
    ("Two", "2"), ("a dog.", "dog"), ("The Dog!", "dog"), ("yes\n", "yes"), ("none", "0"),
    ("isnt", "isn't"), ("red, white", "red white"), ("1,000", "1000"), ("3.5", "3.5"),
    ("an apple and the pear", "apple and pear"), ("left-hand", "left hand"), ("(yes)", "yes"),
])
def test_normalize_answer(raw, want):
    assert normalize_answer(raw) == want


def test_soft_accuracy_leave_one_out():
    ten = ["2"] * 3 + ["3"] * 7
    assert vqa_soft_accuracy("two", ten) == pytest.approx(1.0 * 7 / 10 + (2 / 3) * 3 / 10)
    # k matching answers of 10: k left out score min(1,(k-1)/3), 10-k score min(1,k/3)
    for k in range(0, 11):
        ans = ["cat"] * k + ["dog"] * (10 - k)
        want = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10 if k else 0.0
        assert vqa_soft_accuracy("Cat.", ans) == pytest.approx(want)
    assert vqa_soft_accuracy("A cat", ["cat"]) == 1.0  # one reference: exact match after normalising
    assert vqa_soft_accuracy("cats", ["cat"]) == 0.0
    with pytest.raises(ValueError):
        vqa_soft_accuracy("x", [])


def test_multiple_choice():
    ch = ["red", "green", "blue"]
    p = format_multiple_choice("Colour?", ch)
    assert p == "Colour?\nA. red\nB. green\nC. blue\nAnswer with the option's letter from the given choices directly."
    assert mc_accuracy("B", ["B"], ch) == 1.0
    assert mc_accuracy("(b).", ["B"], ch) == 1.0
    assert mc_accuracy("green", ["B"], ch) == 1.0
    assert mc_accuracy("B", ["green"], ch) == 1.0
    assert mc_accuracy("C", ["B"], ch) == 0.0
    assert mc_accuracy("B is right", ["B"], ch) == 0.0  # exact match only


def test_read_questions_reports_bad_lines(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    lines = [
        json.dumps({"question_id": 1, "image": "x.png", "question": "Q?", "answers": ["a"] * 10}),
        "{broken",
        json.dumps({"question_id": 2, "image": "missing.png", "question": "Q?"}),
        json.dumps({"question_id": 3, "image": "x.png"}),
        json.dumps({"question_id": 1, "image": "x.png", "question": "dup?"}),
        json.dumps([1, 2]),
        "",
        json.dumps({"question_id": "q4", "image": "x.png", "question": "Pick", "choices": ["a", "b"], "answers": "A"}),
        # LLaVA's eval question files: the question is "text"; a single "answer" is accepted too
        json.dumps({"question_id": "llava", "image": "x.png", "text": "What is it?\nAnswer briefly.", "answer": "a"}),
        # one image, two places for it: refused here, not after the model was loaded (as a bad image)
        json.dumps({"question_id": 9, "image": "x.png", "question": "<image> <image> hi"}),
        json.dumps({"question_id": 10, "image": "x.png", "question": "<image>\nWhat is it?"}),
        # the placeholders alone: the same reason (it was called an empty question)
        json.dumps({"question_id": 11, "image": "x.png", "question": "<image> <image>"}),
    ]
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(lines) + "\n")
    qf = read_questions(f)
    assert [q.question_id for q in qf.questions] == [1, "q4", "llava", 10]
    assert qf.questions[2].question == "What is it?\nAnswer briefly." and qf.questions[2].answers == ["a"]
    assert len(qf.bad_lines) == 7
    for n, why in ((2, "invalid JSON"), (3, "image file not found"), (4, "'question'"), (5, "duplicate"),
                   (6, "not a JSON object"), (10, "'question' has 2 <image> placeholders for its one image"),
                   (12, "'question' has 2 <image> placeholders for its one image")):
        assert any(b.startswith(f"{f}:{n}: ") and why in b for b in qf.bad_lines), (n, qf.bad_lines)
    assert qf.questions[1].score("A") == 1.0 and qf.questions[0].score("b") == 0.0
    # whole-file mistakes are one error, not a bad line per line: a missing image folder, a binary
    # file or UTF-16 text given as the questions
    with pytest.raises(DataError, match=r"nowhere: image folder not found"):
        read_questions(f, image_folder=tmp_path / "nowhere")
    import os

    real_scandir = os.scandir

    def scandir(path="."):  # a folder of mode 000, for a user who is not root
        if not isinstance(path, int) and os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    (tmp_path / "locked").mkdir()
    os.scandir = scandir
    try:
        with pytest.raises(DataError, match=r"locked: cannot list the image folder \(Permission denied\)"):
            read_questions(f, image_folder=tmp_path / "locked")
    finally:
        os.scandir = real_scandir
    import numpy as np

    for raw in (bytes(range(256)) * 40, bytes(1024), np.arange(1000, dtype=np.int32).tobytes(),
                np.arange(1000, dtype=np.uint16).tobytes()):  # (zeros and int arrays were called UTF-32/16 text)
        (tmp_path / "b.jsonl").write_bytes(raw)
        with pytest.raises(DataError, match=r"b.jsonl: not a text file \(it holds NUL bytes"):
            read_questions(tmp_path / "b.jsonl")
    cjk = json.dumps({"question_id": 1, "image": "x.png", "text": "日本語の質問ですか"}, ensure_ascii=False)
    for text in (lines[0], cjk):
        for enc in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"):  # with, without a BOM
            (tmp_path / "u.jsonl").write_text(text, encoding=enc)
            with pytest.raises(DataError, match=rf"u.jsonl: {enc[:6].upper()} text; a questions file must be UTF-8"):
                read_questions(tmp_path / "u.jsonl")
    # an "image" that names a folder says so (it was "image file not found"), as vqa does
    (tmp_path / "d.png").mkdir()
    (tmp_path / "qd.jsonl").write_text(json.dumps({"question_id": 1, "image": "d.png", "question": "Q?"}) + "\n")
    assert read_questions(tmp_path / "qd.jsonl").bad_lines == [f"{tmp_path / 'qd.jsonl'}:1: a directory, not an "
                                                              f"image file: {tmp_path / 'd.png'}"]
    with pytest.raises(DataError, match="not found"):
        read_questions(tmp_path / "none.jsonl")
    # a question that is not text (an unpaired surrogate), an answers entry without "answer",
    # choices that are not strings: bad lines, skipped, never the end of the run
    (tmp_path / "q2.jsonl").write_text("\n".join([
        '{"question_id": 1, "image": "x.png", "question": "bad \\ud800 x"}',
        json.dumps({"question_id": 2, "image": "x.png", "question": "Q?", "answers": [{"foo": "1"}]}),
        json.dumps({"question_id": 3, "image": "x.png", "question": "Q?", "choices": ["a", None]}),
        json.dumps({"question_id": 4, "image": "x.png", "question": "Q?", "answers": [{"answer": "yes"}]}),
        json.dumps({"question_id": 5, "image": "x.png", "question": "<image>\n "}),  # no question text
    ]) + "\n")
    qf = read_questions(tmp_path / "q2.jsonl")
    assert [q.question_id for q in qf.questions] == [4] and qf.questions[0].answers == ["yes"]
    for n, why in ((1, "unpaired surrogate"), (2, "'answers' must be a list of strings"), (3, "'choices'"),
                   (5, "'question' must be a non-empty string")):
        assert any(b.startswith(f"{tmp_path / 'q2.jsonl'}:{n}: ") and why in b for b in qf.bad_lines), (n, qf.bad_lines)


def test_synthetic_dataset_is_consistent(tmp_path):
    from multimodal_rwkv.vision.synthetic import COLORS, draw_scene, generate_dataset, vocabulary_texts

    info = generate_dataset(tmp_path, n_train=30, n_test=10, questions_per_image=3, size=48, seed=5)
    train = json.loads((tmp_path / "train.json").read_text())
    test_lines = [json.loads(x) for x in (tmp_path / "test_questions.jsonl").read_text().splitlines()]
    assert info["train_records"] == len(train) and info["test_questions"] == len(test_lines) > 0
    train_imgs = {r["image"] for r in train}
    assert not train_imgs & {q["image"] for q in test_lines}  # held-out scenes
    texts = set(vocabulary_texts())
    for r in train:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert q.startswith("<image>\n") and q[len("<image>\n"):] in texts and a in texts
    # answers are checked against the drawn pixels: count coloured blobs per cell
    img, objs = draw_scene(11, size=64)
    import numpy as np

    a = np.asarray(img).astype(int)
    for cell in range(4):
        y, x = (cell // 2) * 32, (cell % 2) * 32
        patch = a[y:y + 32, x:x + 32].reshape(-1, 3)
        present = [c for c, rgb in COLORS.items() if (np.abs(patch - rgb).sum(1) < 10).sum() > 20]
        want = [o.color for o in objs if o.cell == cell]
        assert present == want
    # object_scale sets each object's side as a fraction of its cell (square: the bounding box)
    from multimodal_rwkv.vision.synthetic import SceneObject

    for lo, hi in ((0.5, 0.55), (0.85, 0.9)):
        img, _ = draw_scene(3, size=64, objects=[SceneObject("square", "blue", 0)], object_scale=(lo, hi))
        a = np.asarray(img).astype(int)
        side = int(((np.abs(a - COLORS["blue"]).sum(2) < 10).any(0)).sum())
        assert lo * 32 - 2 <= side <= hi * 32 + 2, (lo, hi, side)
    # the largest objects, jittered, stay inside their cells: no pixel of a colour outside its cell
    rng = random.Random(0)
    for _ in range(300):
        img, objs = draw_scene(rng, size=64, object_scale=(0.9, 0.9))
        a = np.asarray(img).astype(int)
        for color in {o.color for o in objs}:
            inside = np.zeros((64, 64), bool)  # the cells of this colour's objects
            for o in objs:
                if o.color == color:
                    x, y = (o.cell % 2) * 32, (o.cell // 2) * 32
                    inside[y:y + 32, x:x + 32] = True
            assert not ((np.abs(a - COLORS[color]).sum(2) < 60) & ~inside).any()
    for bad in ((0.5, 0.95), (0.05, 0.5), (0.8, 0.7)):
        with pytest.raises(ValueError, match="an object stays inside its cell"):
            draw_scene(0, object_scale=bad)
    # same seed, same dataset
    generate_dataset(tmp_path / "again", n_train=30, n_test=10, questions_per_image=3, size=48, seed=5)
    assert (tmp_path / "again" / "train.json").read_text() == (tmp_path / "train.json").read_text()


def test_an_interrupted_vision_synth_leaves_the_earlier_dataset_as_it_was(tmp_path, monkeypatch):
    """A re-run interrupted while drawing used to leave the old train.json naming the new run's
    pictures: labels that did not match the pixels, and training took them."""
    from multimodal_rwkv.vision import synthetic

    out = tmp_path / "ds"
    synthetic.generate_dataset(out, n_train=6, n_test=3, questions_per_image=2, size=32, seed=0)

    def snapshot():
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = snapshot()
    drawn = []
    real_draw = synthetic.draw_scene

    def draw_then_stop(*a, **kw):
        drawn.append(1)
        if len(drawn) == 8:  # in the test split of the new run
            raise KeyboardInterrupt
        return real_draw(*a, **kw)

    monkeypatch.setattr(synthetic, "draw_scene", draw_then_stop)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate_dataset(out, n_train=6, n_test=3, questions_per_image=2, size=32, seed=1)
    assert snapshot() == before and sorted(p.name for p in out.iterdir()) == [
        "images", "test.json", "test_questions.jsonl", "train.json"]
    monkeypatch.undo()
    synthetic.generate_dataset(out, n_train=6, n_test=3, questions_per_image=2, size=32, seed=1)  # replaced
    assert snapshot() != before and sorted(p.name for p in out.iterdir()) == [
        "images", "test.json", "test_questions.jsonl", "train.json"]


def test_read_questions_bom_and_a_line_that_is_not_utf8(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    q = [json.dumps({"question_id": i, "image": "x.png", "question": "Which colour?"}).encode() for i in (1, 2, 3)]
    q[1] = q[1].replace(b"Which", b"Wh\xe9ch")  # latin-1, not UTF-8
    f = tmp_path / "q.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b"\n".join(q) + b"\n")  # a byte-order mark first
    qf = read_questions(f)
    assert [x.question_id for x in qf.questions] == [1, 3]
    col = q[1].index(b"\xe9") + 1  # counted in bytes from 1
    assert qf.bad_lines == [f"{f}:2: not valid UTF-8 (byte 0xe9 at column {col}: invalid continuation byte)"]


def test_cli_eval_vqa_skips_a_line_that_is_not_utf8(tmp_path, capsys):
    from pathlib import Path

    from PIL import Image

    import multimodal_rwkv
    from multimodal_rwkv.cli import main

    model = Path(multimodal_rwkv.__file__).parent / "assets" / "visualrwkv_synthetic"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "x.png")
    f = tmp_path / "q.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question_id": 1, "image": "x.png", "question": "Colour?"}).encode()
                  + b"\n" + b'{"question_id": 2, "image": "x.png", "question": "Col\xe9ur?"}\n')
    out = tmp_path / "a.jsonl"
    rc = main(["eval-vqa", "--model", str(model), "--questions", str(f), "--output", str(out), "--device", "cpu",
               "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"skipped {f}:2: not valid UTF-8" in err and "Traceback" not in err
    assert [json.loads(x)["question_id"] for x in out.read_text().splitlines()] == [1]


def test_cli_eval_vqa_that_answers_nothing_keeps_the_earlier_output(tmp_path, capsys):
    """Every image corrupt (found only when answering): it said 'answered 0 questions', exited 0 and
    replaced the earlier answers with an empty file."""
    from pathlib import Path

    from PIL import Image

    import multimodal_rwkv
    from multimodal_rwkv.cli import main

    model = Path(multimodal_rwkv.__file__).parent / "assets" / "visualrwkv_synthetic"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "x.png")
    (tmp_path / "bad.png").write_bytes((tmp_path / "x.png").read_bytes()[:60])  # a header, then cut off
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"question_id": i, "image": "bad.png", "question": "Colour?"}) + "\n"
                         for i in range(2)))
    out = tmp_path / "a.jsonl"
    out.write_text('{"question_id": 9, "answer": "red"}\n')
    rc = main(["eval-vqa", "--model", str(model), "--questions", str(f), "--output", str(out), "--device", "cpu",
               "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "no question answered" in err.strip().splitlines()[-1]
    assert out.read_text() == '{"question_id": 9, "answer": "red"}\n'


def test_cli_eval_vqa_never_writes_over_an_input(tmp_path, capsys):
    """--output naming the questions file (by any name), an image a question asks about or a file of the
    model folder is refused before the model is loaded, and the file is left as it was; the answers are
    written through a temporary name of their own (OUTPUT.tmp may be someone's file: here the questions)."""
    import os
    import shutil
    from pathlib import Path

    from PIL import Image

    import multimodal_rwkv
    from multimodal_rwkv.cli import main

    model = tmp_path / "model"
    shutil.copytree(Path(multimodal_rwkv.__file__).parent / "assets" / "visualrwkv_synthetic", model)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "x.png")
    q = tmp_path / "a.jsonl.tmp"
    q.write_text(json.dumps({"question_id": 1, "image": "x.png", "question": "Colour?"}) + "\nnot json\n")
    os.symlink(q, tmp_path / "link.jsonl")
    for output, needle in ((q, "is the --questions file"), (tmp_path / "link.jsonl", "is the --questions file"),
                           (tmp_path / "x.png", f"is the image of {tmp_path / 'link.jsonl'}:1"),
                           (model / "model.safetensors", f"is a file of {model} (the --model)")):
        before = {p: p.read_bytes() for p in (q, tmp_path / "x.png", model / "model.safetensors")}
        rc = main(["eval-vqa", "--model", str(model), "--questions", str(tmp_path / "link.jsonl"), "--output",
                   str(output), "--device", "cpu", "--max-new-tokens", "2"])
        err = capsys.readouterr().err
        assert rc == 2 and f"{output}: --output {needle}" in err and "would destroy that input" in err, err
        if "questions" in needle:  # refused before the questions are read: no report of their bad lines
            assert len(err.strip().splitlines()) == 1, err
        assert {p: p.read_bytes() for p in before} == before
    question = q.read_text()
    rc = main(["eval-vqa", "--model", str(model), "--questions", str(q), "--output", str(tmp_path / "a.jsonl"),
               "--device", "cpu", "--max-new-tokens", "2"])
    assert rc == 0, capsys.readouterr().err
    assert q.read_text() == question
    assert [json.loads(x)["question_id"] for x in (tmp_path / "a.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.jsonl.tmp", "link.jsonl", "model", "x.png"]


def test_vision_synth_size_has_an_upper_bound(tmp_path, capsys):
    """--size beyond 4096 (said in --help) is a usage error before anything is written: 100000 once
    drew a 30 GB image until the process was killed, leaving a half-made folder."""
    from multimodal_rwkv.cli import main
    from multimodal_rwkv.vision.synthetic import generate_dataset

    with pytest.raises(SystemExit) as e:
        main(["vision-synth", "--out", str(tmp_path / "h"), "--size", "4097", "--n-train", "1", "--n-test", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --size: must be an integer in [16, 4096], got 4097" in err
    assert not (tmp_path / "h").exists()
    with pytest.raises(ValueError, match="16 <= size <= 4096"):
        generate_dataset(tmp_path / "h", n_train=1, n_test=0, size=4097)
    assert not (tmp_path / "h").exists()
    with pytest.raises(SystemExit):
        main(["vision-synth", "--help"])
    assert "image side in pixels, 16 to 4096" in capsys.readouterr().out


def test_vision_synth_writes_only_into_a_new_empty_or_own_folder(tmp_path, capsys):
    """--out DIR replaced whatever train.json / test.json DIR held (someone's own data), and a
    smaller rerun left the old pictures behind."""
    from multimodal_rwkv.cli import main

    out = tmp_path / "d"
    assert main(["vision-synth", "--out", str(out), "--n-train", "3", "--n-test", "2", "--size", "32"]) == 0
    assert main(["vision-synth", "--out", str(out), "--n-train", "2", "--n-test", "0", "--size", "32"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["train_000000.png", "train_000001.png"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.json").write_text("[]")
    (mine / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main(["vision-synth", "--out", str(mine), "--n-train", "2", "--n-test", "0", "--size", "32"]) == 2
    assert "holds files this did not write (notes.txt, train.json)" in capsys.readouterr().err
    (mine / "notes.txt").unlink()  # a train.json alone is someone's data too
    assert main(["vision-synth", "--out", str(mine), "--n-train", "2", "--n-test", "0", "--size", "32"]) == 2
    assert (mine / "train.json").read_text() == "[]"
    (out / "images" / "cat.jpg").write_bytes(b"x")
    assert main(["vision-synth", "--out", str(out), "--n-train", "2", "--n-test", "0", "--size", "32"]) == 2
    assert "images/cat.jpg" in capsys.readouterr().err and (out / "images" / "cat.jpg").exists()


def test_vision_synth_test_scenes_are_never_training_scenes(tmp_path):
    """About 1 in 30 'held-out' scenes came out pixel for pixel like a training scene."""
    import hashlib

    from PIL import Image

    from multimodal_rwkv.vision.synthetic import generate_dataset

    generate_dataset(tmp_path, n_train=600, n_test=200, questions_per_image=1, size=16, seed=0)
    digest = {p.name: hashlib.sha256(Image.open(p).convert("RGB").tobytes()).digest()
              for p in (tmp_path / "images").iterdir()}
    train = {d for n, d in digest.items() if n.startswith("train")}
    assert len([n for n in digest if n.startswith("test")]) == 200
    assert not [n for n, d in digest.items() if n.startswith("test") and d in train]


def test_scoring_of_letters_and_llava_answer_forms(tmp_path):
    """An empty or article-only prediction scored 1.0 against the answer "A" (both normalise to "");
    "B. dog" and "The answer is B." (LLaVA's ScienceQA forms) scored 0; a reference letter beyond
    the choices was scored instead of reported."""
    from multimodal_rwkv.vision.evaluate import _parse_question, mc_accuracy, vqa_soft_accuracy

    for pred in ("", "the", ".", "an"):
        assert vqa_soft_accuracy(pred, ["A"]) == 0.0
    assert vqa_soft_accuracy("A", ["A"]) == vqa_soft_accuracy("a.", ["A"]) == 1.0
    assert vqa_soft_accuracy("two dogs", ["2 dogs"]) == 1.0  # the usual normalisation stays
    choices = ["cat", "dog", "cow"]
    for pred in ("B", "B. dog", "The answer is B.", "(B)", "dog"):
        assert mc_accuracy(pred, ["B"], choices) == 1.0, pred
    for pred in ("D. cow", "The answer is A. The answer is B.", "b. dog"):
        assert mc_accuracy(pred, ["B"], choices) == 0.0, pred
    # a choice's own text that reads like "X. ...": that choice, not option X
    bacteria = ["B. subtilis", "E. coli", "S. aureus"]
    assert mc_accuracy("A", ["B. subtilis"], bacteria) == 1.0 and mc_accuracy("B", ["B. subtilis"], bacteria) == 0.0
    assert mc_accuracy("E. coli", ["B"], bacteria) == 1.0
    with pytest.raises(DataError, match="answer 'Z' is neither an option letter A-C nor one of the choices"):
        _parse_question({"question_id": 1, "image": "x.png", "question": "Q?", "choices": choices,
                         "answers": ["Z"]}, Path("."), "q:1")
    with pytest.raises(DataError, match="'image' must be a file name"):
        _parse_question({"question_id": 1, "image": " ", "question": "Q?"}, Path("."), "q:1")
    # a "type" that is no single name, or a surrogate in "type" or "choices": bad lines, at read time
    # (they crashed the per-type report after answering, or were reported as a failed image)
    for bad, match in (({"type": ["a", "b"]}, "'type' must be a string or an integer"),
                       ({"type": "\udc00"}, "'type' must be"),
                       ({"choices": ["a", "b\udc00"], "answers": ["A"]}, "'choices' holds an unpaired surrogate")):
        (tmp_path / "x.png").write_bytes(b"png")
        with pytest.raises(DataError, match=match):
            _parse_question({"question_id": 1, "image": "x.png", "question": "Q?", **bad}, tmp_path, "q:1")


def test_a_failed_vision_synth_removes_the_folders_it_made(tmp_path, monkeypatch):
    """A write failure (a full disk) left the new output folder, and its new parents, behind."""
    from multimodal_rwkv.vision import synthetic

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synthetic, "_draw_splits", full)
    with pytest.raises(OSError):
        synthetic.generate_dataset(tmp_path / "new" / "deeper", n_train=2, n_test=1, size=32)
    assert list(tmp_path.iterdir()) == []


def test_a_second_vision_synth_on_the_same_folder_is_refused_while_the_first_draws(tmp_path, monkeypatch):
    """Both runs staged in the same folder: the second deleted the first one's images while it
    drew, and the first then wrote a train.json naming thousands of missing pictures (exit 0)."""
    from multimodal_rwkv.errors import DataError
    from multimodal_rwkv.vision import synthetic

    out = tmp_path / "ds"
    real_draw, seen = synthetic.draw_scene, []

    def draw_and_meanwhile_run_another(*a, **kw):
        if not seen:
            seen.append(1)
            with pytest.raises(DataError, match=f"{out}: in use by another vision-synth run"):
                synthetic.generate_dataset(out, n_train=2, n_test=1, size=32, seed=5)
        return real_draw(*a, **kw)

    monkeypatch.setattr(synthetic, "draw_scene", draw_and_meanwhile_run_another)
    synthetic.generate_dataset(out, n_train=4, n_test=2, questions_per_image=1, size=32, seed=1)
    assert seen and sorted(p.name for p in out.iterdir()) == ["images", "test.json", "test_questions.jsonl",
                                                              "train.json"]  # the lock file is gone
    names = {r["image"] for r in json.loads((out / "train.json").read_text())}
    assert names and all((out / "images" / n).is_file() for n in names)
    synthetic.generate_dataset(out, n_train=2, n_test=1, size=32, seed=2)  # free again afterwards


def test_vision_synth_over_a_dataset_whose_images_folder_is_a_link(tmp_path):
    """The linked images folder was renamed away and left (rmtree does nothing on a link); the next
    run deleted the labels, then failed: the earlier dataset lost, every later run failing."""
    import os

    from multimodal_rwkv.vision.synthetic import generate_dataset

    out = tmp_path / "ds"
    generate_dataset(out, n_train=2, n_test=1, size=32)
    (out / "images").rename(tmp_path / "elsewhere")
    (out / "images").symlink_to(tmp_path / "elsewhere")
    for seed in (1, 2):
        generate_dataset(out, n_train=2, n_test=1, size=32, seed=seed)
    assert sorted(os.listdir(out)) == ["images", "test.json", "test_questions.jsonl", "train.json"]
    assert len(list((out / "images").glob("*.png"))) == 3 and len(list((tmp_path / "elsewhere").glob("*.png"))) == 3
