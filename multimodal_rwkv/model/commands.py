"""Core subcommands: generate, convert, info, env."""
from __future__ import annotations

import sys

from multimodal_rwkv.argtypes import add_sampling_args, device, finite, int_min, path_arg, seed, unescape
from multimodal_rwkv.errors import CheckpointError, DataError


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text from an RWKV model",
        description="Generate text with an RWKV-6/RWKV-5 model (BlinkDL .pth, Hugging Face folder, or a folder saved by this package).",
        epilog="Example: mmrwkv generate --model RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth --prompt 'The Eiffel tower is in' --max-new-tokens 40",
    )
    p.add_argument("--model", type=path_arg, required=True, help="checkpoint file or folder")
    p.add_argument("--prompt", required=True,
                   help="prompt text; \\n, \\t, \\r and \\\\ are unescaped ('-' reads standard input as it is)")
    p.add_argument("--max-new-tokens", type=int_min(1), default=100)
    add_sampling_args(p, top_p=0.85)
    p.add_argument("--presence-penalty", type=finite, default=0.0)
    p.add_argument("--frequency-penalty", type=finite, default=0.0)
    p.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable, unescaped as --prompt), e.g. '\\n\\n'")
    p.add_argument("--seed", type=seed, default=None)
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--no-stream", action="store_true", help="print the completion at the end instead of streaming")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "convert", help="convert a checkpoint to this package's folder format",
        description="Convert a BlinkDL .pth or a Hugging Face-layout RWKV folder into config.json + model.safetensors.",
        epilog="Example: mmrwkv convert RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth ./finch-1b6",
    )
    p.add_argument("src", type=path_arg)
    p.add_argument("out_dir", type=path_arg)
    p.add_argument("--dtype", default=None, help="keep the file's dtype unless given (fp32 | bf16 | fp16)")
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
        raise CheckpointError(
            f"{src}: vocab_size {model.config.vocab_size} is smaller than the World tokenizer's "
            f"{tokenizer.vocab_size}; this model was not trained on text with the World vocabulary"
        )


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
    from multimodal_rwkv.model.tokenizer import WorldTokenizer

    if args.prompt == "-":
        prompt = _utf8(sys.stdin.buffer.read(), "standard input")
    else:
        prompt = unescape(_utf8(args.prompt, "--prompt"))
    stops = [unescape(_utf8(s, "--stop")) for s in args.stop] if args.stop else None
    model = RWKVForCausalLM.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    tok = WorldTokenizer()
    _check_vocab(model, tok, args.model)
    ids = tok.encode(prompt) or [0]
    gen = dict(max_new_tokens=args.max_new_tokens, stop=stops, tokenizer=tok, seed=args.seed,
               presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
    if args.temperature > 0:
        gen.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None)
    streamer = None
    if not args.no_stream:
        from multimodal_rwkv.model.generation import StopAwareStreamer

        streamer = StopAwareStreamer(tok, stops, prompt_len=len(ids))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=model.device), streamer=streamer, **gen)
    if streamer is None:
        new = out[0, len(ids):].tolist()
        if 0 in new:
            new = new[: new.index(0)]
        print(trim_at_stop(tok.decode(new), stops))
    else:
        print()
    return 0


def cmd_convert(args) -> int:
    from multimodal_rwkv.model.modeling import RWKVForCausalLM

    model = RWKVForCausalLM.from_pretrained(args.src, dtype=args.dtype)
    model.save_pretrained(args.out_dir)
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
    return 0
