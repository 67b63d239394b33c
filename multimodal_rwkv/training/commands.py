"""``mmrwkv train``: run a YAML recipe (resumes automatically from the output folder)."""
from __future__ import annotations

import logging
import signal

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train or fine-tune a model from a YAML recipe",
        description=(
            "Train from a YAML recipe (text LM, VisualRWKV, music tokens; full, LoRA or state tuning). "
            "Rerunning the same command with the same output_dir resumes from the last complete "
            "checkpoint; --set max_steps=N extends a finished run. Multi-GPU: prefix with "
            "'accelerate launch --config_file recipes/accelerate/<x>.yaml -m multimodal_rwkv'."),
        epilog="Example: mmrwkv train recipes/lm_tiny.yaml --set data.train_file=corpus.txt --set max_steps=300",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override recipe values, e.g. --set optim.lr=3e-4 output_dir=runs/x "
                        "(several per flag, flag repeatable; type-checked)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from multimodal_rwkv.training.config import config_to_dict, load_config
    from multimodal_rwkv.training.loop import Trainer, TrainingInterrupted

    cfg = load_config(args.recipe, args.overrides).validate()
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        final = Trainer(cfg).run()
    except TrainingInterrupted as e:
        logger.warning("%s", e)
        return 128 + int(e.signum or signal.SIGTERM)
    print(final)
    _end_process_group()
    return 0


def _end_process_group() -> None:
    """The ranks of a finished multi-process run meet once more and close their process group
    before the interpreter exits: left to exit-time teardown, gloo's threads were once seen to
    abort a rank ("terminate called without an active exception") after the run had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
