"""`mmrwkv demo`: the toolkit end to end on the small models that ship inside the package.

1. Music: a model trained by ``recipes/music_bach_midi.yaml`` writes ``song.mid`` and a piano roll.
2. Vision: a VisualRWKV trained by ``recipes/visualrwkv_synthetic.yaml`` answers questions about
   images it draws (and about one you pass with ``--image``).
Both load through the same public API as any other model.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

from multimodal_rwkv.argtypes import float_min, path_arg, seed
from multimodal_rwkv.errors import DataError

MUSIC_ASSET = "music_bach"
DEFAULT_QUESTION = "How many shapes are there?"
VISION_ASSET = "visualrwkv_synthetic"


def asset_dir(name: str) -> Path:
    """Folder of a model shipped with the package (``multimodal_rwkv/assets/<name>``)."""
    return Path(__file__).resolve().parent / "assets" / name


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="run the toolkit end to end on the bundled demo models",
        description=(
            "Generate a piece of music (MIDI + piano-roll PNG) with the bundled Bach-chorale model and answer "
            "questions about images with the bundled VisualRWKV. Runs on a CPU in about a minute."),
        epilog="Example: mmrwkv demo --out demo_out --image my_photo.jpg --question 'What colour is the circle?'",
    )
    p.add_argument("--out", type=path_arg, default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--image", type=path_arg, action="append", default=[], help="also ask about this image (repeatable)")
    p.add_argument("--question", action="append", default=[],
                   help=f"question for --image (default: {DEFAULT_QUESTION!r}); repeatable: one for every --image, "
                        "or one per --image, in order")
    p.add_argument("--seconds", type=float_min(0, strict=True), default=20.0, help="length of the generated music (default 20)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--skip-music", action="store_true", help="no music part (not with --skip-vision)")
    p.add_argument("--skip-vision", action="store_true", help="no vision part (not with --skip-music)")
    p.set_defaults(func=run_demo)


def _check_inputs(args) -> None:
    """Everything the demo can refuse, refused before it writes or computes anything."""
    from multimodal_rwkv.fileio import check_outputs
    from multimodal_rwkv.vision.processor import IMAGE_TOKEN, is_blank_question, is_unicode, load_image, missing_image

    if args.skip_music and args.skip_vision:
        raise DataError("--skip-music and --skip-vision together leave the demo nothing to do")
    for q in args.question:
        if is_blank_question(q):
            raise DataError("--question is empty")
        if not is_unicode(q):
            raise DataError("--question holds bytes that are not UTF-8 text")
        if q.count(IMAGE_TOKEN) > 1:
            raise DataError(f"--question holds {q.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders; it is "
                            f"asked about one --image at a time (at most one {IMAGE_TOKEN})")
    if args.question and not args.image:
        raise DataError("--question is asked about an --image: give one (or more) with it")
    if len(args.question) > 1 and len(args.question) != len(args.image):
        raise DataError(f"{len(args.question)} --question for {len(args.image)} --image: give one question for "
                        "every image, or one per image (in the same order)")
    if args.image and args.skip_vision:
        raise DataError("--image is answered by the vision part of the demo, which --skip-vision turns off")

    names = (() if args.skip_music else ("song.mid", "song.png")) + (
        () if args.skip_vision else ("scene_0.png", "scene_1.png", "scene_2.png"))
    outputs = [Path(args.out) / n for n in names]
    for img in args.image:
        why = missing_image(img)
        if why is not None:
            raise DataError(f"{img}: --image: {why}")
        hit = next((o for o in outputs if o.exists() and os.path.samefile(o, img)), None)
        if hit is not None:
            raise DataError(f"{img}: the demo writes {hit.name} into --out {args.out} and would draw over this "
                            "--image (copy it elsewhere, or give another --out)")
        load_image(img)  # not an image, truncated, too big: said before the demo runs, not after
    if not 0 < args.seconds <= 600:
        raise DataError(f"--seconds must be in (0, 600], got {args.seconds}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DataError(f"{args.out}: --out exists and is not a folder")
    check_outputs([(f"the demo's {p.name}", p) for p in outputs], [("--image", i) for i in args.image])


def _demo_music(args, out: Path) -> list[str]:
    from multimodal_rwkv.music import generate_midi

    t = time.perf_counter()
    print(f"[music] generating {args.seconds:.0f} s of four-part chorale-style music ...", flush=True)
    midi = generate_midi(asset_dir(MUSIC_ASSET), seconds=args.seconds, seed=args.seed, temperature=1.0,
                         top_p=0.95, out=out / "song.mid", png=out / "song.png", progress=True)
    n_notes = sum(1 for tr in midi.tracks for m in tr if m.type == "note_on" and m.velocity > 0)
    print(f"[music] {n_notes} notes, {midi.length:.1f} s, in {time.perf_counter() - t:.1f} s", flush=True)
    return [f"{out / 'song.mid'}  (open in any MIDI player)", f"{out / 'song.png'}  (piano roll)"]


def _demo_vision(args, out: Path) -> list[str]:
    from multimodal_rwkv.fileio import atomic_write
    from multimodal_rwkv.vision import VisualRWKV
    from multimodal_rwkv.vision.synthetic import draw_scene, questions_for

    if not (asset_dir(VISION_ASSET) / "config.json").is_file():
        print(f"[vision] no bundled VisualRWKV at {asset_dir(VISION_ASSET)}; skipped", flush=True)
        return []
    t = time.perf_counter()
    model = VisualRWKV.from_pretrained(asset_dir(VISION_ASSET))
    rng = random.Random(args.seed)
    written, right, total = [], 0, 0
    print("[vision] questions about images the demo draws:", flush=True)
    for i in range(3):
        img, objects = draw_scene(rng, size=model.config.image_size or 64)
        path = out / f"scene_{i}.png"
        atomic_write(path, lambda tmp, img=img: img.save(tmp, format="PNG"))  # a full disk leaves no 0-byte scene
        written.append(str(path))
        qa = questions_for(objects, rng)
        for _, q, expected in rng.sample(qa, min(3, len(qa))):
            got = model.answer(img, q, max_new_tokens=8)
            ok = got.strip().lower() == expected.strip().lower()
            right += ok
            total += 1
            print(f"  {path.name}: {q!r} -> {got!r} (expected {expected!r}) {'ok' if ok else 'wrong'}", flush=True)
    questions = args.question if len(args.question) > 1 else (args.question or [DEFAULT_QUESTION]) * len(args.image)
    for img_path, question in zip(args.image, questions):
        got = model.answer(img_path, question, max_new_tokens=16)
        print(f"  {img_path}: {question!r} -> {got!r}", flush=True)
    print(f"[vision] {right}/{total} correct on drawn scenes, in {time.perf_counter() - t:.1f} s", flush=True)
    return written


def run_demo(args) -> int:
    _check_inputs(args)
    from multimodal_rwkv.fileio import make_dirs, remove_dirs

    out = Path(args.out)
    made = make_dirs(out)  # removed again (where empty) if the demo fails
    written = []
    try:
        if not args.skip_music:
            written += _demo_music(args, out)
        if not args.skip_vision:
            written += _demo_vision(args, out)
    except BaseException:
        remove_dirs(made)
        raise
    print("\nWritten:")
    for w in written:
        print(f"  {w}")
    print(
        "\nGo on:\n"
        "  mmrwkv music generate --model <dir> --out song.mid --png roll.png   # your own music model\n"
        "  pip install -e '.[music]' && mmrwkv music prepare --corpus bach-chorales --out data/music/bach --transpose 3\n"
        "  mmrwkv train recipes/music_bach_midi.yaml --set output_dir=runs/bach  # then train the music model again\n"
        "  mmrwkv train recipes/visualrwkv_synthetic.yaml ...                    # see recipes/README.md\n"
        "  mmrwkv generate --model RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth --prompt 'Hello'  # official checkpoint\n"
        "  mmrwkv --help"
    )
    return 0
