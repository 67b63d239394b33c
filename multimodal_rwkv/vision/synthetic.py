"""Synthetic visual question answering in LLaVA format: shapes, colours, counts, positions.

A scene is a white square canvas split into a 2x2 grid; each cell holds at most one object (a
circle, square or triangle in red, green, blue or yellow, 60-80% of the cell by default, near its centre). Questions
(answers are one or two words, so exact match after VQA normalisation is the natural score):

- count:        "How many shapes are there?"                 -> "3"
- count colour: "How many red shapes are there?"             -> "0" .. "4"
- colour:       "What color is the circle?"  (unique shape)  -> "red"
- shape:        "What shape is the blue one?" (unique colour) -> "triangle"
- position:     "Where is the green square?" (unique object) -> "top left"
- exists:       "Is there a yellow circle?"                   -> "yes" / "no" (balanced)
- cell:         "What is in the bottom right?"                -> "red square" / "nothing"

:func:`generate_dataset` writes ``images/``, ``train.json`` (LLaVA list), ``test.json`` and
``test_questions.jsonl`` (the ``mmrwkv eval-vqa`` format). The test split uses images drawn from a
different random stream, and a test scene that comes out pixel for pixel like a training scene
is drawn again (held-out scenes, never seen in training: with 4000 training images, about 1 in
30 test scenes used to repeat one); every (image, question) pair is unique. Everything is deterministic given the seed.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from multimodal_rwkv.errors import DataError

if TYPE_CHECKING:  # PIL is imported where a scene is drawn: the CLI reads MIN_SIZE/MAX_SIZE at start-up
    from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
QUESTION_TYPES = ("count", "count_color", "color", "shape", "position", "exists", "cell")


@dataclass
class SceneObject:
    shape: str
    color: str
    cell: int  # index into POSITIONS

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


OBJECT_SCALE = (0.6, 0.8)
# an object's side as a fraction of its cell: at most 0.9, so that with the +-5% jitter of its
# position it stays inside its cell (objects never touch or overlap, nor leave the picture)
OBJECT_SCALE_LIMITS = (0.1, 0.9)
MIN_SIZE, MAX_SIZE = 16, 4096  # image side in pixels (4096: 48 MiB an image while drawn)


def draw_scene(seed_or_rng=0, size: int = 64, n_objects: int | None = None,
               objects: list[SceneObject] | None = None,
               object_scale: tuple[float, float] = OBJECT_SCALE) -> tuple[Image.Image, list[SceneObject]]:
    """Draw one scene -> (RGB PIL image of ``size`` x ``size`` pixels, its objects).

    ``seed_or_rng``: an int seed or a ``random.Random``. ``n_objects`` (1-4) defaults to random;
    ``objects`` fixes the content (shapes, colours and cells), only sizes and jitter are random.
    ``object_scale``: the range of an object's side as a fraction of its cell, within
    ``OBJECT_SCALE_LIMITS`` (0.1 to 0.9: an object stays inside its cell).
    """
    from PIL import Image, ImageDraw

    lo, hi = object_scale
    if not OBJECT_SCALE_LIMITS[0] <= lo <= hi <= OBJECT_SCALE_LIMITS[1]:
        raise ValueError(f"object_scale needs {OBJECT_SCALE_LIMITS[0]} <= MIN <= MAX <= {OBJECT_SCALE_LIMITS[1]} "
                         f"(an object stays inside its cell), got {lo} {hi}")

    rng = seed_or_rng if isinstance(seed_or_rng, random.Random) else random.Random(seed_or_rng)
    if objects is None:
        n = n_objects if n_objects is not None else rng.randint(1, 4)
        if not 1 <= n <= 4:
            raise ValueError(f"n_objects must be 1..4, got {n}")
        cells = rng.sample(range(4), n)
        objects = [SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), c) for c in cells]
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    half = size / 2
    for o in objects:
        cx0, cy0 = (o.cell % 2) * half, (o.cell // 2) * half
        s = rng.uniform(*object_scale) * half
        x0 = cx0 + (half - s) / 2 + rng.uniform(-0.05, 0.05) * half
        y0 = cy0 + (half - s) / 2 + rng.uniform(-0.05, 0.05) * half
        box = [x0, y0, x0 + s, y0 + s]
        col = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse(box, fill=col)
        elif o.shape == "square":
            d.rectangle(box, fill=col)
        else:
            d.polygon([(x0 + s / 2, y0), (x0 + s, y0 + s), (x0, y0 + s)], fill=col)
    return img, list(objects)


def questions_for(objects: list[SceneObject], rng: random.Random) -> list[tuple[str, str, str]]:
    """All askable (type, question, answer) triples for a scene; exists/cell questions are sampled
    so that yes/no and object/nothing are balanced."""
    qs = []
    n = len(objects)
    qs.append(("count", "How many shapes are there?", str(n)))
    c = rng.choice(list(COLORS))
    qs.append(("count_color", f"How many {c} shapes are there?", str(sum(o.color == c for o in objects))))
    for s in SHAPES:
        m = [o for o in objects if o.shape == s]
        if len(m) == 1:
            qs.append(("color", f"What color is the {s}?", m[0].color))
    for col in COLORS:
        m = [o for o in objects if o.color == col]
        if len(m) == 1:
            qs.append(("shape", f"What shape is the {col} one?", m[0].shape))
    for o in objects:
        if sum(p.shape == o.shape and p.color == o.color for p in objects) == 1:
            qs.append(("position", f"Where is the {o.color} {o.shape}?", o.position))
    present = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        col, s = rng.choice(sorted(present))
        qs.append(("exists", f"Is there a {col} {s}?", "yes"))
    else:
        absent = [(col, s) for col in COLORS for s in SHAPES if (col, s) not in present]
        col, s = rng.choice(absent)
        qs.append(("exists", f"Is there a {col} {s}?", "no"))
    by_cell = {o.cell: o for o in objects}
    empty = [i for i in range(4) if i not in by_cell]
    if empty and rng.random() < 0.3:
        cell = rng.choice(empty)
        qs.append(("cell", f"What is in the {POSITIONS[cell]}?", "nothing"))
    else:
        o = rng.choice(objects)
        qs.append(("cell", f"What is in the {o.position}?", f"{o.color} {o.shape}"))
    return qs


def generate_dataset(out_dir, n_train: int = 4000, n_test: int = 300, questions_per_image: int = 3,
                     size: int = 64, seed: int = 0, multi_turn: bool = False,
                     object_scale: tuple[float, float] = OBJECT_SCALE) -> dict:
    """Write a synthetic VQA dataset (see module doc) -> summary dict (counts and file paths).

    ``n_train`` / ``n_test``: number of images; each image gets ``questions_per_image`` distinct
    questions of different types (fewer if the scene allows fewer). ``multi_turn``: the training
    records hold all of an image's questions as one conversation (``<image>`` in the first turn);
    test questions are always single-turn."""
    if n_train < 1 or n_test < 0 or questions_per_image < 1 or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"generate_dataset: need n_train >= 1, n_test >= 0, questions_per_image >= 1 and "
                         f"{MIN_SIZE} <= size <= {MAX_SIZE}; got {n_train}, {n_test}, {questions_per_image}, {size}")
    from multimodal_rwkv.fileio import folder_lock, make_dirs, remove_dirs

    out = Path(out_dir)
    _check_target(out)
    made = make_dirs(out)  # the folders this run makes: removed again if it fails
    try:
        with folder_lock(out, _LOCK, "vision-synth run"):  # two runs would delete each other's images
            return _generate(out, n_train, n_test, questions_per_image, size, seed, multi_turn, object_scale)
    except BaseException:
        remove_dirs(made)  # a folder this run made goes again
        raise


def _generate(out: Path, n_train, n_test, questions_per_image, size, seed, multi_turn, object_scale) -> dict:
    from multimodal_rwkv.fileio import naming_write_errors, remove_tree

    # everything is drawn into a staging folder inside ``out`` and moved into place at the end, so
    # an interrupted run leaves the earlier dataset as it was (or, while the two swap, no labels)
    stage = out / _STAGE
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "images").mkdir(parents=True)
    try:
        with naming_write_errors(out):  # a full disk names the dataset folder (PIL's errors name no file)
            splits = _draw_splits(stage, n_train, n_test, questions_per_image, size, seed, multi_turn, object_scale)
        _write_json(stage / "train.json", splits["train"])
        _write_json(stage / "test.json", splits["test"])
        with open(stage / "test_questions.jsonl", "w", encoding="utf-8") as f:
            for r in splits["test"]:
                q = r["conversations"][0]["value"].replace("<image>\n", "")
                f.write(json.dumps({"question_id": r["id"], "image": r["image"], "question": q,
                                    "answers": [r["conversations"][1]["value"]], "type": r["type"]}) + "\n")
        labels = _OWN[:3]
        for name in labels:  # labels first: from here on no label file can name the other set's images
            (out / name).unlink(missing_ok=True)
        old = out / (_STAGE + "-old")
        remove_tree(old)  # (a link: the link itself; a folder it points to keeps the earlier images)
        if (out / "images").exists() or (out / "images").is_symlink():
            (out / "images").rename(old)
        (stage / "images").rename(out / "images")
        for name in labels:
            os.replace(stage / name, out / name)
        remove_tree(old)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return {"train_records": len(splits["train"]), "test_questions": len(splits["test"]),
            "train_file": str(out / "train.json"), "test_file": str(out / "test.json"),
            "questions_file": str(out / "test_questions.jsonl"), "image_folder": str(out / "images")}


def _draw_splits(out: Path, n_train, n_test, questions_per_image, size, seed, multi_turn, object_scale) -> dict:
    """Draw both splits' images into ``out/images``; returns their records."""
    splits = {}
    train_scenes: set[bytes] = set()
    for split, n_img, split_seed in (("train", n_train, seed * 2 + 1), ("test", n_test, seed * 2 + 2)):
        rng = random.Random(split_seed)
        records = []
        for i in range(n_img):
            for _ in range(1000):  # held out: a scene drawn the same as a training one is drawn again
                img, objs = draw_scene(rng, size=size, object_scale=object_scale)
                key = hashlib.sha256(img.tobytes()).digest()
                if split == "train" or key not in train_scenes:
                    break
            if split == "train":
                train_scenes.add(key)
            name = f"{split}_{i:06d}.png"
            img.save(out / "images" / name)
            qs = questions_for(objs, rng)
            by_type: dict[str, list] = {}
            for t, q, a in qs:
                by_type.setdefault(t, []).append((q, a))
            types = rng.sample(sorted(by_type), min(questions_per_image, len(by_type)))
            qas = [(t,) + rng.choice(by_type[t]) for t in types]
            if multi_turn and split == "train":
                conv = []
                for j, (t, q, a) in enumerate(qas):
                    conv += [{"from": "human", "value": f"<image>\n{q}" if j == 0 else q}, {"from": "gpt", "value": a}]
                records.append({"id": f"{split}_{i:06d}", "image": name, "type": "+".join(types),
                                "conversations": conv})
                continue
            for j, (t, q, a) in enumerate(qas):
                records.append({"id": f"{split}_{i:06d}_{j}", "image": name, "type": t,
                                "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                  {"from": "gpt", "value": a}]})
        splits[split] = records
    return splits


_STAGE = ".vision-synth-staging"  # inside the output folder while a dataset is drawn (see generate_dataset)
_LOCK = ".vision-synth.lock"  # held by the run drawing into the folder
_OWN = ("train.json", "test.json", "test_questions.jsonl", "images", _STAGE, _STAGE + "-old", _LOCK)
_OWN_IMAGE = re.compile(r"(train|test)_\d{6}\.png")


def _check_target(out: Path) -> None:
    """``out`` must be new or empty, or hold only a dataset this wrote (which is replaced): a
    folder with anything else (someone's own train.json, other pictures) is refused."""
    if not out.exists():
        if out.is_symlink():
            raise DataError(f"{out}: a broken link; give a new or empty folder")
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    other = sorted(n for n in os.listdir(out) if n not in _OWN)
    images = out / "images"
    if images.is_dir():
        other += sorted(f"images/{n}" for n in os.listdir(images) if not _OWN_IMAGE.fullmatch(n))
    elif images.exists() or images.is_symlink():
        other.append("images")
    for name in _OWN[:3]:
        if (out / name).exists() and (not (out / name).is_file() or not images.is_dir()):
            other.append(name)  # not a file, or without the images/ folder this writes first: not ours
    if other:
        more = f" (+{len(other) - 5} more)" if len(other) > 5 else ""
        raise DataError(f"{out}: holds files this did not write ({', '.join(other[:5])}{more}); give a new or empty "
                        "folder (a dataset vision-synth wrote there is replaced)")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=0), encoding="utf-8")
    tmp.replace(path)


def vocabulary_texts() -> list[str]:
    """Every question and answer string the generator can produce (to build a vocab subset that
    covers the synthetic task whatever scenes are drawn)."""
    texts = ["How many shapes are there?"] + [str(i) for i in range(5)] + ["yes", "no", "nothing"]
    for c in COLORS:
        texts.append(f"How many {c} shapes are there?")
        texts.append(f"What shape is the {c} one?")
        texts.append(c)
        for s in SHAPES:
            texts += [f"Where is the {c} {s}?", f"Is there a {c} {s}?", f"{c} {s}"]
    for s in SHAPES:
        texts += [f"What color is the {s}?", s]
    for p in POSITIONS:
        texts += [f"What is in the {p}?", p]
    return texts
