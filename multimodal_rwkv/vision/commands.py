"""`mmrwkv vqa`, `mmrwkv eval-vqa` and `mmrwkv vision-synth` subcommands."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from multimodal_rwkv.argtypes import add_sampling_args, device, file_arg, int_min, int_range, path_arg, seed
from multimodal_rwkv.errors import DataError, on_one_line
from multimodal_rwkv.fileio import check_outputs, write_outputs
from multimodal_rwkv.vision.synthetic import MAX_SIZE, MIN_SIZE

logger = logging.getLogger(__name__)

_RAW = argparse.RawDescriptionHelpFormatter


def register(sub) -> None:
    p = sub.add_parser(
        "vqa", help="answer a question about an image with a VisualRWKV model",
        description="Answer one question about one image (greedy by default) and print the answer.\n\n"
                    "Example:\n  mmrwkv vqa --model runs/visualrwkv_synthetic/final --image scene.png "
                    "--question 'How many shapes are there?'",
        formatter_class=_RAW)
    p.add_argument("--model", type=path_arg, required=True, help="VisualRWKV folder (save_pretrained) or VisualRWKV-v060 .pth")
    p.add_argument("--image", type=path_arg, required=True, help="image file")
    p.add_argument("--question", required=True, help="the question (an <image> placeholder is added if absent; one that "
                   "starts with '-': --question=-TEXT)")
    p.add_argument("--vision-tower", type=path_arg, default=None, help="CLIP hub id/folder for a v060 .pth (config + processor)")
    _gen_args(p)
    p.set_defaults(func=_vqa)

    p = sub.add_parser(
        "eval-vqa", help="answer a VQA questions file and score it",
        description="Read JSONL lines {\"question_id\", \"image\", \"question\", \"answers\"?, \"choices\"?}\n"
                    "(LLaVA's eval files, with \"text\" for the question, work too),\n"
                    "write {\"question_id\", \"answer\"} lines, and print VQAv2 soft accuracy (standard answer\n"
                    "normalisation; exact letter match when \"choices\" is given) if answers are present.\n"
                    "Bad lines are reported (file:line: reason) and skipped.\n\n"
                    "Example:\n  mmrwkv eval-vqa --model runs/visualrwkv_synthetic/final "
                    "--questions data/synth/test_questions.jsonl \\\n"
                    "      --image-folder data/synth/images --output answers.jsonl",
        formatter_class=_RAW)
    p.add_argument("--model", type=path_arg, required=True, help="VisualRWKV folder or VisualRWKV-v060 .pth")
    p.add_argument("--questions", type=path_arg, required=True, help="questions .jsonl")
    p.add_argument("--image-folder", type=path_arg, default=None, help="root of relative image paths (default: the file's folder)")
    p.add_argument("--output", type=file_arg, required=True, help="answers .jsonl to write (not one of the input files)")
    p.add_argument("--batch-size", type=int_min(1), default=16, help="questions decoded together (default 16)")
    p.add_argument("--limit", type=int_min(0), default=0, help="answer only the first N questions (0: all)")
    p.add_argument("--vision-tower", type=path_arg, default=None, help="CLIP hub id/folder for a v060 .pth")
    _gen_args(p)
    p.set_defaults(func=_eval_vqa)

    p = sub.add_parser(
        "vision-synth", help="generate the synthetic shapes/colours/counts VQA dataset",
        description="Write a synthetic visual QA dataset in LLaVA format: images/, train.json, test.json and\n"
                    "test_questions.jsonl (held-out scenes) for eval-vqa.\n\n"
                    "Example:\n  mmrwkv vision-synth --out data/synth --n-train 4000 --n-test 300 --multi-turn\n"
                    "  mmrwkv train recipes/visualrwkv_synthetic.yaml --set data.train_file=data/synth/train.json "
                    "data.image_folder=data/synth/images output_dir=runs/visualrwkv_synthetic",
        formatter_class=_RAW)
    p.add_argument("--out", type=path_arg, required=True, help="output folder: new or empty, or one holding a dataset vision-synth wrote (replaced)")
    p.add_argument("--n-train", type=int_min(1), default=4000, help="training images (default 4000)")
    p.add_argument("--n-test", type=int_min(0), default=300, help="held-out test images (default 300)")
    p.add_argument("--questions-per-image", type=int_min(1), default=3, help="questions per image (default 3)")
    p.add_argument("--size", type=int_range(MIN_SIZE, MAX_SIZE), default=64,
                   help=f"image side in pixels, {MIN_SIZE} to {MAX_SIZE} (default 64)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--multi-turn", action="store_true",
                   help="training records hold all questions about an image as one conversation")
    p.add_argument("--object-scale", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="an object's side as a fraction of its cell, 0.1 to 0.9 (default 0.6 0.8)")
    p.set_defaults(func=_synth)


def _gen_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int_min(1), default=128, help="(default 128)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    add_sampling_args(p, top_p=1.0, only="with --do-sample")
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on CUDA)")


def _gen_kwargs(args) -> dict:
    if not args.do_sample and (args.temperature != 1.0 or args.top_k or args.top_p != 1.0):
        print("note: --temperature, --top-k and --top-p apply with --do-sample only; answering greedily",
              file=sys.stderr)
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def _load(args):
    import torch

    from multimodal_rwkv.vision.modeling import VisualRWKV

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    return VisualRWKV.from_pretrained(args.model, dtype=dtype, device=device, vision_tower=args.vision_tower)


def _vqa(args) -> int:
    from multimodal_rwkv.vision.processor import IMAGE_TOKEN, is_blank_question, missing_image

    why = missing_image(args.image)
    if why:
        raise DataError(f"{args.image}: {why}")

    n = args.question.count(IMAGE_TOKEN)
    if n > 1:  # (before "empty": '<image><image>' has two places for the one image)
        raise DataError(f"--question has {n} {IMAGE_TOKEN} placeholders for its one image")
    if is_blank_question(args.question):
        raise DataError("--question is empty")
    model = _load(args)
    print(model.answer(args.image, args.question, **_gen_kwargs(args)))
    return 0


def _eval_vqa(args) -> int:
    from multimodal_rwkv.vision.evaluate import read_questions

    inputs = [("--questions file", args.questions), ("--model", args.model), ("--vision-tower", args.vision_tower)]
    check_outputs([("--output", args.output)], inputs)  # said before reading anything
    qf = read_questions(args.questions, args.image_folder)
    # an image as output: found now, not after answering every question
    check_outputs([("--output", args.output)], [(f"image of {q.where}", q.image) for q in qf.questions])
    for b in qf.bad_lines:
        print(f"mmrwkv eval-vqa: skipped {on_one_line(b)}", file=sys.stderr)
    questions = qf.questions[: args.limit] if args.limit else qf.questions
    if not questions:
        raise DataError(f"{args.questions}: no usable question lines")
    model = _load(args)
    gen = _gen_kwargs(args)
    scores, by_type = [], {}
    n_failed = 0
    t0 = time.perf_counter()

    def answer_all(tmp) -> None:  # into a temporary file: an error or ^C leaves no half-written answers
        nonlocal n_failed
        with open(tmp, "w", encoding="utf-8") as f:
            for s in range(0, len(questions), max(args.batch_size, 1)):
                chunk = questions[s:s + args.batch_size]
                # sampling with --seed: one stream per question (seed + its place in the run), so an
                # answer does not depend on --batch-size or on the other questions of its batch
                seeds = None if gen.get("seed") is None else [(gen["seed"] + s + i) % 2**63 for i in range(len(chunk))]
                try:
                    answers = model.answer_batch([q.image for q in chunk], [q.prompt for q in chunk],
                                                 **{**gen, "seed": seeds})
                except DataError:  # a bad image: answer the chunk one by one to isolate it
                    answers = []
                    for i, q in enumerate(chunk):
                        try:
                            answers.append(model.answer(q.image, q.prompt,
                                                        **{**gen, "seed": None if seeds is None else [seeds[i]]}))
                        except DataError as e:
                            print(f"mmrwkv eval-vqa: skipped {on_one_line(f'{q.where}: {e}')}", file=sys.stderr)
                            n_failed += 1
                            answers.append(None)
                for q, a in zip(chunk, answers):
                    if a is None:
                        continue
                    f.write(json.dumps({"question_id": q.question_id, "answer": a}) + "\n")
                    sc = q.score(a)
                    if sc is not None:
                        scores.append(sc)
                        if q.qtype:
                            by_type.setdefault(q.qtype, []).append(sc)
        if n_failed == len(questions):  # nothing to write: an earlier output stays as it was
            raise DataError(f"{args.questions}: no question answered (each one failed, as said above); "
                            f"{args.output} not written")

    write_outputs([(args.output, answer_all)])
    dt = time.perf_counter() - t0
    n_done = len(questions) - n_failed
    print(f"answered {n_done} questions in {dt:.1f} s -> {args.output}"
          + (f" ({len(qf.bad_lines) + n_failed} bad lines skipped)" if qf.bad_lines or n_failed else ""))
    if scores:
        print(f"accuracy: {100.0 * sum(scores) / len(scores):.2f}% over {len(scores)} questions with answers")
        for t, v in sorted(by_type.items()):
            print(f"  {t}: {100.0 * sum(v) / len(v):.2f}% ({len(v)})")
    return 0


def _synth(args) -> int:
    from multimodal_rwkv.vision.synthetic import OBJECT_SCALE_LIMITS, generate_dataset

    extra = {}
    if args.object_scale is not None:
        lo, hi = args.object_scale
        if not OBJECT_SCALE_LIMITS[0] <= lo <= hi <= OBJECT_SCALE_LIMITS[1]:
            raise DataError(f"--object-scale needs {OBJECT_SCALE_LIMITS[0]} <= MIN <= MAX <= "
                            f"{OBJECT_SCALE_LIMITS[1]} (an object stays inside its cell), got {lo} {hi}")
        extra["object_scale"] = (lo, hi)
    info = generate_dataset(args.out, n_train=args.n_train, n_test=args.n_test,
                            questions_per_image=args.questions_per_image, size=args.size, seed=args.seed,
                            multi_turn=args.multi_turn, **extra)
    print(json.dumps(info, indent=1))
    return 0
