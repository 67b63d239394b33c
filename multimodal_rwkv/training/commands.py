"""``mmrwkv train``: run a YAML recipe (resumes automatically from the output folder)."""
from __future__ import annotations

import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train or fine-tune a model from a YAML recipe",
        description=(
            "Train from a YAML recipe (text LM, VisualRWKV, music tokens; full or LoRA, and state tuning of a language model). "
            "Rerunning the same command with the same output_dir resumes from the last complete "
            "checkpoint; --set max_steps=N extends a finished run. Multi-GPU: prefix with "
            "'accelerate launch --config_file recipes/accelerate/<x>.yaml -m multimodal_rwkv'."),
        epilog="Example: mmrwkv train recipes/lm_tiny.yaml --set data.train_file=corpus.txt --set max_steps=300",
        usage="%(prog)s [-h] RECIPE [--set KEY=VALUE [KEY=VALUE ...]] [--print-config]",
    )
    # nargs="?": `train --set k=v RECIPE` lets --set (nargs="+") take the recipe too; cmd_train finds
    # it there, or says where it goes, instead of argparse's bare "required: recipe"
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="recipe YAML file (required; give it before --set)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override recipe values, e.g. --set optim.lr=3e-4 output_dir=runs/x "
                        "(several per flag, flag repeatable; type-checked)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.set_defaults(func=cmd_train)


def _check_recipe_not_overwritten(recipe, output_dir) -> None:
    """The run writes its resolved recipe to output_dir/recipe.yaml: refuse when that is the user's
    own recipe file in a folder that holds no run yet (its comments and layout would be lost). A
    run's saved recipe (checkpoints/ or final/ beside it) may be run again: it is what would be written."""
    from pathlib import Path

    out = Path(output_dir)
    target = out / "recipe.yaml"
    try:
        same = Path(recipe).resolve() == target.resolve()
    except OSError:
        return
    if same and not ((out / "checkpoints").is_dir() or (out / "final").is_dir()):
        from multimodal_rwkv.errors import ConfigError

        raise ConfigError(f"{recipe}: the run writes its resolved recipe to output_dir/recipe.yaml, which is this "
                          "file; keep your recipe outside output_dir (or set another output_dir)")


def cmd_train(args) -> int:
    from multimodal_rwkv.training.config import config_to_dict, load_config
    from multimodal_rwkv.training.loop import Trainer, TrainingInterrupted

    recipe, overrides = _recipe_and_overrides(args.recipe, list(args.overrides))
    cfg = load_config(recipe, overrides).validate()
    if args.print_config:
        import yaml

        from multimodal_rwkv.training.task import get_task

        get_task(cfg)  # the task's own checks of its options (cheap: no model, no data)

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    _check_recipe_not_overwritten(recipe, cfg.output_dir)
    trainer = Trainer(cfg)
    try:
        final = trainer.run()
    except TrainingInterrupted as e:
        logger.warning("%s", e)
        return 128 + int(e.signum or signal.SIGTERM)
    except RuntimeError as e:
        if _peer_gone(e):  # another rank stopped (its own error is printed by it): one line here too
            from multimodal_rwkv.training.loop import TrainingError

            raise TrainingError("another process of this run stopped (the connection to it closed); "
                                "its own error says why") from None
        raise
    if trainer.is_main_process:  # one line per run, not one per rank
        print(final)
    if _end_process_group():
        # every file is written and synced, the group closed: leave without the interpreter's
        # teardown, where gloo's threads still aborted a rank of a finished run now and then
        # ("terminate called without an active exception", exit -6: torchrun then reported a
        # failed run that had succeeded)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _recipe_and_overrides(recipe, overrides: list[str]) -> tuple[str, list[str]]:
    """A recipe given after ``--set`` (which takes every value up to the next flag) is the last
    override when that is not KEY=VALUE; otherwise a missing recipe is an error saying where it goes."""
    from multimodal_rwkv.errors import ConfigError

    if recipe is None and overrides and "=" not in overrides[-1]:  # never a valid override
        return overrides[-1], overrides[:-1]
    if recipe is None:
        raise ConfigError("the following arguments are required: recipe (put the recipe before --set: "
                          "mmrwkv train RECIPE.yaml --set KEY=VALUE ...)")
    return recipe, overrides


def _peer_gone(e: RuntimeError) -> bool:
    """Whether ``e`` is the collective error of a rank whose peer process exited (gloo/NCCL)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    msg = str(e).lower()
    return type(e).__name__ == "DistBackendError" or any(
        w in msg for w in ("connection closed by peer", "connection reset by peer", "broken pipe"))


def _end_process_group() -> bool:
    """The ranks of a finished multi-process run meet once more and close their process group
    before the interpreter exits: left to exit-time teardown, gloo's threads were once seen to
    abort a rank ("terminate called without an active exception") after the run had finished.
    Returns whether the group had several processes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        multi = dist.get_world_size() > 1
        dist.barrier()
        dist.destroy_process_group()
        return multi
    return False
