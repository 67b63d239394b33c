"""Core subcommands: generate, convert, info, env."""
from __future__ import annotations

import glob
import json
import logging
import os
import sys
from pathlib import Path

from multimodal_rwkv.argtypes import add_sampling_args, device, finite, int_min, path_arg, seed, unescape
from multimodal_rwkv.errors import CheckpointError, DataError
from multimodal_rwkv.fileio import atomic_write_text, fsync_tree, make_dirs, remove_tree, swap_in, temp_name

TRAINING_INFO = "training_info.json"  # what `mmrwkv train` writes beside a model it exports
logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text from an RWKV model",
        description="Generate text with an RWKV-6/RWKV-5 model (BlinkDL .pth, Hugging Face folder, or a folder saved by this package). "
                    "Text is encoded with the World tokenizer, or with the tokenizer a model of `mmrwkv train` was "
                    "trained with (\"tokenizer\" in the training_info.json next to it: world or bytes). "
                    "It decodes greedily (--temperature 0) or samples by its options alone: of a model folder's "
                    "generation_config.json it uses the stop strings and end-of-text ids, nothing else.",
        epilog="Example: mmrwkv generate --model RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth --prompt 'The Eiffel tower is in' --max-new-tokens 40",
    )
    p.add_argument("--model", type=path_arg, required=True, help="checkpoint file or folder")
    p.add_argument("--state", type=path_arg, default=None,
                   help="a state-tuning file (blocks.N.att.time_state tensors) to start from")
    p.add_argument("--prompt", required=True,
                   help="prompt text; \\n, \\t, \\r and \\\\ are unescaped ('-' reads standard input as it is; "
                        "a prompt that starts with '-': --prompt=-TEXT)")
    p.add_argument("--max-new-tokens", type=int_min(1), default=100, help="(default 100)")
    add_sampling_args(p, top_p=0.85)
    p.add_argument("--presence-penalty", type=finite, default=0.0)
    p.add_argument("--frequency-penalty", type=finite, default=0.0)
    p.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable, unescaped as --prompt), e.g. '\\n\\n'")
    p.add_argument("--seed", type=seed, default=None, help="for reproducible sampling (default: none, a fresh draw)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--no-stream", action="store_true", help="print the completion at the end instead of streaming")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "convert", help="convert a checkpoint to this package's folder format",
        description="Convert a BlinkDL .pth, a Hugging Face-layout RWKV folder or one of our folders into "
                    "config.json + model.safetensors (+ generation_config.json when the model has generation "
                    "defaults, + the training_info.json `mmrwkv train` wrote beside SRC, which says the tokenizer). "
                    "OUT_DIR must be new or empty, or hold only a model convert wrote (those files, which are "
                    "replaced; a training_info.json counts as convert's only when it is SRC's, so a training "
                    "run's final/ folder is kept); a folder holding anything else (another model, a VisualRWKV, "
                    "other files) is refused, and so is SRC's own folder.",
        epilog="Example: mmrwkv convert RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth ./finch-1b6",
    )
    p.add_argument("src", type=path_arg)
    p.add_argument("out_dir", type=path_arg)
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16; default: the dtype of most of the file's "
                   "weights (float64 as fp32, float8 as bf16); a trained initial state stays fp32")
    p.add_argument("--state", type=path_arg, default=None,
                   help="a state-tuning file (blocks.N.att.time_state) built into the model as its initial state")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "info", help="print a checkpoint's inferred config and parameter count",
        description="Inspect a checkpoint without building the model: version, sizes, LoRA ranks, parameter count.",
        epilog="Example: mmrwkv info RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth",
    )
    p.add_argument("src", type=path_arg)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("env", help="print versions and available kernel backends",
                       description="Print package versions, threads, CUDA/Triton availability (for bug reports).",
                       epilog="Example: mmrwkv env")
    p.set_defaults(func=cmd_env)


def _check_vocab(model, tokenizer, src) -> None:
    if model.config.vocab_size < tokenizer.vocab_size:
        name = "byte" if getattr(tokenizer, "name", None) == "bytes" else "World"
        raise CheckpointError(
            f"{src}: vocab_size {model.config.vocab_size} is smaller than the {name} tokenizer's "
            f"{tokenizer.vocab_size}; this model was not trained on text with the {name} vocabulary"
        )


def _training_info(src) -> Path | None:
    """The training_info.json `mmrwkv train` wrote beside the model at ``src`` (the folder, or its
    model.safetensors / model.pth), or None."""
    path = Path(src)
    info = (path if path.is_dir() else path.parent) / TRAINING_INFO
    if info.is_file() and (path.is_dir() or path.name in ("model.safetensors", "model.pth")):
        return info
    return None


def _tokenizer_for(src):
    """The tokenizer the model at ``src`` was trained with: the "tokenizer" of the training_info.json
    that `mmrwkv train` writes into its model folder ("world" or "bytes"; for the model.safetensors or
    model.pth of such a folder, the folder's), else the World tokenizer."""
    from multimodal_rwkv.model.tokenizer import WorldTokenizer

    info = _training_info(src)
    if info is None:
        return WorldTokenizer()
    try:
        d = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{info}: unreadable training info ({' '.join(str(e).split())[:120]}); it says "
                              "which tokenizer the model was trained with") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{info}: not a JSON object (training info maps names to values)")
    name = d.get("tokenizer", "world")
    if name in ("world", None):  # None: trained on token files, tokenized elsewhere
        return WorldTokenizer()
    if name == "bytes":
        from multimodal_rwkv.training.data import ByteTokenizer

        logger.info("%s: trained with the byte tokenizer (%s); text is encoded as UTF-8 bytes", src, info.name)
        return ByteTokenizer()
    raise CheckpointError(f"{info}: the model was trained with tokenizer {name!r}; generate knows 'world' and "
                          "'bytes'")


def _written_by_convert(path: Path) -> bool:
    """Whether a safetensors file holds our layout (``rwkv.emb.weight``, ``head.weight``): the
    weights convert writes first."""
    from multimodal_rwkv.model.checkpoint import safetensors_header

    try:
        keys = set(safetensors_header(path))
    except (OSError, ValueError):  # unreadable or not safetensors: not ours
        return False
    return {"rwkv.emb.weight", "head.weight"} <= keys


def _convert_leftover(name: str) -> bool:
    """A temporary file of a convert that was killed while writing (see fileio.atomic_write)."""
    return name.startswith((".tmp-model.safetensors-", ".tmp-config.json-"))


def _check_convert_target(src, out_dir) -> None:
    """convert writes config.json + model.safetensors into ``out_dir``: refuse a target where that
    would destroy something (see the convert help). Checked before the source is read."""
    out, src = Path(out_dir), Path(src)
    if not out.exists():
        if out.is_symlink():
            raise CheckpointError(f"{out}: a broken link; give a new or empty folder as OUT_DIR")
        return
    if not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; OUT_DIR is the folder convert writes into")
    if src.exists():
        s, o = src.resolve(), out.resolve()
        if s == o or o in s.parents or os.path.samefile(src, out):
            raise CheckpointError(f"{out}: {'is' if s == o else 'holds'} the source {src}; convert into another "
                                  "folder (it would overwrite its own input)")
    names = sorted(p.name for p in out.iterdir() if not _convert_leftover(p.name))
    if not names:
        return
    model_type = None
    if (out / "config.json").is_file():
        try:
            cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
            model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
        except (OSError, ValueError):
            pass
    from multimodal_rwkv.model.config import RWKVConfig

    ours = {"config.json", "model.safetensors", "generation_config.json"}
    info = _training_info(src) if src.exists() else None
    if info is not None and (out / TRAINING_INFO).is_file() and (out / TRAINING_INFO).read_bytes() == info.read_bytes():
        ours.add(TRAINING_INFO)  # the copy convert wrote before; another (a run's final/ folder) is kept
    if model_type == RWKVConfig.model_type and set(names) <= ours:
        return  # a model convert wrote: replaced
    if names == ["model.safetensors"] and _written_by_convert(out / "model.safetensors"):
        return  # a convert killed before its config.json: redone
    what = ("a VisualRWKV model" if model_type == "visualrwkv"
            else "a model and other files" if model_type == RWKVConfig.model_type
            else f"another model (config.json model_type {model_type!r})" if model_type else "other files")
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
    raise CheckpointError(f"{out}: not empty, holds {what} ({shown}); convert writes into a new or empty "
                          "folder, or over config.json + model.safetensors it wrote before")


def _utf8(text, what: str) -> str:
    """Text given as bytes or as a command-line string (where bytes that are not UTF-8 arrive as
    lone surrogates), checked to be UTF-8."""
    try:
        if isinstance(text, bytes):
            return text.decode("utf-8")
        text.encode("utf-8")
        return text
    except UnicodeError as e:
        raise DataError(f"{what} is not valid UTF-8 (at {'byte' if isinstance(text, bytes) else 'character'} "
                        f"{e.start})") from None


def cmd_generate(args) -> int:
    import torch

    from multimodal_rwkv.model.generation import trim_at_stop
    from multimodal_rwkv.model.modeling import RWKVForCausalLM

    if args.prompt == "-":
        if sys.stdin is None:  # started with <&-
            raise DataError("--prompt -: standard input is closed")
        prompt = _utf8(sys.stdin.buffer.read(), "standard input")
    else:
        prompt = unescape(_utf8(args.prompt, "--prompt"))
    stops = [unescape(_utf8(s, "--stop")) for s in args.stop] if args.stop else []
    if "" in stops:
        raise DataError("--stop: an empty stop string (it would match everywhere)")
    model = RWKVForCausalLM.from_pretrained(args.model, dtype=args.dtype, device=args.device, state_file=args.state)
    tok = _tokenizer_for(args.model)
    _check_vocab(model, tok, args.model)
    ids = tok.encode(prompt) or [0]
    from multimodal_rwkv.model.generation import StopAwareStreamer, cut_at_eos, eos_ids, joined_stops

    # the decoding is this command's (greedy, or sampling by its options), whatever a model folder's
    # generation_config.json says (sampling, beams, filters, other decoding modes): a config of its
    # own, which takes only that file's end-of-text, padding and stop settings
    from transformers import GenerationConfig

    own = model.generation_config  # (replaced, not passed: transformers would fill a passed one from it)
    model.generation_config = GenerationConfig(**{k: getattr(own, k, None) for k in (
        "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings")})
    gen = dict(max_new_tokens=args.max_new_tokens, stop=stops, tokenizer=tok,
               seed=args.seed, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
               do_sample=args.temperature > 0)
    if args.temperature > 0:
        gen.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    stops = joined_stops(model, stops)  # for the streamer and the final cut

    streamer = None
    if not args.no_stream:
        streamer = StopAwareStreamer(tok, stops, prompt_len=len(ids), eos=eos_ids(model))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=model.device), streamer=streamer, **gen)
    if streamer is None:
        print(trim_at_stop(tok.decode(cut_at_eos(out[0, len(ids):].tolist(), eos_ids(model))), stops))
    else:
        print()
    return 0


def cmd_convert(args) -> int:
    from multimodal_rwkv.model.modeling import RWKVForCausalLM

    _check_convert_target(args.src, args.out_dir)
    model = RWKVForCausalLM.from_pretrained(args.src, dtype=args.dtype, state_file=args.state)
    if os.path.isdir(args.out_dir):
        for p in Path(args.out_dir).iterdir():
            if _convert_leftover(p.name) and p.is_file():
                p.unlink()
    out = Path(args.out_dir)
    # an earlier convert's model (the only non-empty folder _check_convert_target lets through) is
    # replaced whole, once the new one is complete beside it: an interrupt never leaves new weights
    # with the old config.json, nor a file of the old model the new one does not have
    replace = out.is_dir() and any(out.iterdir())
    made = [] if replace else make_dirs(out)
    target = temp_name(out) if replace else out
    try:
        if replace:
            remove_tree(target)
        model.save_pretrained(target)
        info = _training_info(args.src)
        if info is not None:  # which tokenizer the model was trained with travels with it
            atomic_write_text(target / TRAINING_INFO, info.read_text(encoding="utf-8"))
        if replace:
            fsync_tree(target)
            swap_in(target, out)
        for p in out.parent.glob(f".old-{glob.escape(out.name)}*"):  # what a convert killed mid-swap left aside
            remove_tree(p)
    except BaseException:
        if replace:
            remove_tree(target)
        if made:  # folders this convert created (a full disk, a name too long, Ctrl-C): they go again
            remove_tree(made[0])
        raise
    print(f"wrote {args.out_dir} ({model.config.version}, {sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def cmd_info(args) -> int:
    from multimodal_rwkv.model.checkpoint import load_raw

    cfg, sd = load_raw(args.src, check=True)  # what convert and from_pretrained would refuse, refused
    n = sum(v.numel() for v in sd.values())
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    print(f"source:        {args.src}")
    print(f"version:       {cfg.version} ({'RWKV-6 Finch' if cfg.version == 'x060' else 'RWKV-5 Eagle'})")
    for k in ("n_layer", "n_embd", "n_head", "head_size", "dim_att", "dim_ffn", "vocab_size"):
        print(f"{k + ':':<15}{getattr(cfg, k)}")
    if cfg.version == "x060":
        print(f"{'lora ranks:':<15}mix {cfg.d_mix_lora}, decay {cfg.d_decay_lora}")
    print(f"{'state tuned:':<15}{'yes (time_state)' if cfg.has_initial_state else 'no'}")
    print(f"{'parameters:':<15}{n:,}")
    print(f"{'dtype:':<15}{', '.join(dtypes)}")
    state_bytes = cfg.n_layer * (2 * cfg.n_embd * 4 + cfg.n_head * cfg.head_size ** 2 * 4)
    print(f"{'state/stream:':<15}{state_bytes:,} bytes (fp32)")
    return 0


def cmd_env(args) -> int:
    import platform

    import torch

    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()})")
    for mod in ("triton", "transformers", "accelerate", "mido", "PIL", "rwkv", "music21", "fla"):
        try:
            m = __import__(mod)
            print(f"{mod:<13} {getattr(m, '__version__', 'installed')}")
        except Exception:  # noqa: BLE001
            print(f"{mod:<13} not installed")
    from multimodal_rwkv.kernels import cpu

    cpu.extension()  # builds the C++ kernels on first use
    print(f"cpu kernels   C++ WKV-6 and few-rows decode products: {cpu.status()}")
    print(f"cpu linears   fp32, more than {cpu.MAX_ROWS} rows: {cpu.onednn_status()}")
    keep = cpu.env_switch("MMRWKV_MALLOC")
    print(f"cpu malloc    freed memory kept for reuse by the model's forward: {'on' if keep else 'off'}"
          + ("" if keep else f" (MMRWKV_MALLOC={os.environ['MMRWKV_MALLOC']})"))
    return 0
