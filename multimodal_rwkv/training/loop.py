"""The training loop: one function for CPU, one GPU, DDP, FSDP and DeepSpeed (via ``accelerate``).

Layout of ``output_dir``::

    recipe.yaml         the resolved recipe of the latest (re)start
    metrics.jsonl       one JSON object per optimiser step (step, loss, lr, tokens_per_s, ...)
    checkpoints/step_XXXXXXXX/   accelerate save_state + trainer_state.json (renamed into place)
    final/              the exported model folder (from_pretrained / --model)
    loss.png            loss curve

Data order is a pure function of (seed, position): sample ``q`` of the global stream is
``perm_{q // N}[q % N]`` with ``perm_e`` a seeded permutation per epoch. Optimiser step ``s`` consumes
``G = world_size * grad_accum * micro_batch`` consecutive positions; process ``r`` takes micro-batch
``a`` from positions ``a*W + r``. So one process with batch 2B sees exactly what two processes with
batch B see, and resuming needs only the number of samples consumed.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from multimodal_rwkv.errors import ConfigError, MMRWKVError
from multimodal_rwkv.fileio import (atomic_write, atomic_write_text, discard_tree, fsync_path, fsync_tree, is_utf8_path,
                                    make_dirs, naming_target, naming_write_errors, remove_dirs, remove_tree, swap_in)
from multimodal_rwkv.training.config import TrainConfig, apply_overrides, config_to_dict, load_config, save_config

logger = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^step_(\d{8,})$")


class TrainingError(MMRWKVError):
    """Training cannot go on (non-finite loss, ...); the message says what to do."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: a checkpoint was saved; rerun the same command to resume."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


# --------------------------------------------------------------------------------------- optimiser


def param_groups(model, optim) -> list[dict]:
    """RWKV-LM's AdamW groups over trainable parameters.

    - ``time_decay`` (not its LoRA ``_w1``/``_w2``): lr x ``optim.decay_lr_scale`` (2), no decay;
    - other ``time_*`` params, norms, biases, LoRA factors, states and every tensor with < 2 dims: no decay;
    - remaining 2-D+ ``.weight`` tensors (linears, embedding, head): ``optim.weight_decay``.
    Each group carries ``lr_scale`` (applied to the scheduled lr) and ``names``.
    """
    decay, no_decay, fast = [], [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = n.rsplit(".", 1)[-1]
        if "time_decay" in leaf and not (leaf.endswith("_w1") or leaf.endswith("_w2")):
            fast.append((n, p))
        elif leaf.startswith("time_") or "_w1" in leaf or "_w2" in leaf:
            no_decay.append((n, p))
        elif p.ndim >= 2 and leaf == "weight" and not re.search(r"(^|\.)(ln|norm|ln_\w+|\w*norm\w*)(\.|$)", n):
            decay.append((n, p))
        else:
            no_decay.append((n, p))
    groups = []
    for items, wd, scale in ((decay, optim.weight_decay, 1.0), (no_decay, 0.0, 1.0), (fast, 0.0, optim.decay_lr_scale)):
        if items:
            groups.append({"params": [p for _, p in items], "names": [n for n, _ in items],
                           "weight_decay": wd, "lr_scale": scale})
    return groups


# what a param group takes from the recipe (lr follows the schedule at every step)
_RECIPE_GROUP_KEYS = ("weight_decay", "betas", "eps", "lr_scale")


def build_optimizer(model, optim, distributed_type=None):
    """AdamW over :func:`param_groups`; torch's fused kernel when ``optim.fused`` says so (``None``:
    on unless the run is sharded by FSDP or DeepSpeed, which manage the optimiser themselves)."""
    import torch
    from accelerate.utils import DistributedType

    fused = optim.fused
    if fused is None:
        fused = distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, optim)]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused)


def lr_at(step: int, optim, max_steps: int, time_frac: float = 0.0) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warmup from 1% over
    ``warmup_steps``, then cosine/linear decay from ``lr`` to ``lr_final`` at ``max_steps``.
    ``time_frac``: the share of a wall-clock budget (``max_minutes``) used so far; the decay
    follows it when it is further along than the steps."""
    lr, lr_final, warm = optim.lr, optim.lr_final, optim.warmup_steps
    if warm > 0 and step < warm:
        return lr * (0.01 + 0.99 * step / warm)
    if optim.schedule == "constant":
        return lr
    span = max(max_steps - warm, 1)
    prog = min(max((step - warm) / span, time_frac, 0.0), 1.0)
    if optim.schedule == "linear":
        return lr + (lr_final - lr) * prog
    return lr_final + 0.5 * (lr - lr_final) * (1.0 + math.cos(math.pi * prog))


def _drop_inherited_lock(fd, lock_id, _worker_id) -> None:
    """DataLoader worker start: a forked worker shares the run's lock on ``output_dir/.lock``
    (flock belongs to the open file, not the process), so after a ``kill -9`` of the run the
    workers, which outlive it by seconds, kept the folder "in use" and the rerun was refused.
    Closing the worker's copy leaves the lock to the run alone. Checked by inode: a worker that
    was not forked has no such descriptor, and ``fd`` may be another file there."""
    if fd is None:
        return
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == lock_id:
            os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------------------- data order


class GlobalOrderSampler:
    """Infinite index stream for one process (see the module docstring). Yields dataset indices."""

    def __init__(self, n: int, seed: int, shuffle: bool, start: int, micro: int, accum: int, world: int, rank: int):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.start, self.B, self.A, self.W, self.r = start, micro, accum, world, rank
        self._perms: dict[int, object] = {}

    def index(self, q: int) -> int:
        """Dataset index at global position ``q``."""
        e, i = divmod(q, self.n)
        if not self.shuffle:
            return i
        if e not in self._perms:
            import torch

            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            self._perms = {e: torch.randperm(self.n, generator=g)}
        return int(self._perms[e][i])

    def __iter__(self):
        q0 = self.start
        G = self.W * self.A * self.B
        while True:
            for a in range(self.A):
                base = q0 + (a * self.W + self.r) * self.B
                for j in range(self.B):
                    yield self.index(base + j)
            q0 += G


# --------------------------------------------------------------------------------------- files


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``[(step, path)]`` sorted by step (temp folders are never listed)."""
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / "trainer_state.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def read_metrics(path: Path) -> list[dict]:
    """Parse ``metrics.jsonl``; a torn last line (killed mid-write) is ignored."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# --------------------------------------------------------------------------------------- loss plot


def _json_row(row: dict) -> str:
    """A metrics row as JSON: a non-finite number is written as null (NaN is not JSON) and named in
    ``"nonfinite"`` (a null loss alone means nothing was evaluated)."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return json.dumps(row)
    out = {k: (None if k in bad else v) for k, v in row.items()}
    out["nonfinite"] = sorted(set(out.get("nonfinite") or []) | set(bad))
    return json.dumps(out)


def _resume_hint(last_ckpt) -> str:
    return (f"last good checkpoint: {last_ckpt}; rerunning resumes from it" if last_ckpt else
            "no checkpoint yet: rerunning starts again from step 0")


def _exported_step(final: Path):
    """The step final/ was exported at (its training_info.json), None if it does not say."""
    try:
        step = json.loads((final / "training_info.json").read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def plot_losses(metrics_path: Path, png_path: Path, width: int = 800, height: int = 480) -> bool:
    """Draw train (and valid) loss vs step into a PNG with Pillow. Returns False if no data."""
    from PIL import Image, ImageDraw

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows  # loss null: a step without target tokens
             if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    valid = [(r["step"], r["valid_loss"]) for r in rows
             if isinstance(r.get("valid_loss"), (int, float)) and math.isfinite(r["valid_loss"])]
    if not train:
        return False
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    L, R, T, B = 70, 20, 30, 50
    xs = [s for s, _ in train + valid]
    ys = [v for _, v in train + valid]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(s, v):
        return (L + (s - x0) / (x1 - x0) * (width - L - R), T + (y1 - v) / (y1 - y0) * (height - T - B))

    d.rectangle([L, T, width - R, height - B], outline="black")
    for k in range(5):
        v = y0 + (y1 - y0) * k / 4
        _, yy = px(x0, v)
        d.line([L - 4, yy, L, yy], fill="black")
        d.text((4, yy - 6), f"{v:.3f}", fill="black")
    for s in sorted({round(x0 + (x1 - x0) * k / 4) for k in range(5)}):  # whole steps, drawn where they are
        xx, _ = px(s, y0)
        d.line([xx, height - B, xx, height - B + 4], fill="black")
        d.text((xx - 10, height - B + 8), str(s), fill="black")
    d.text((width // 2 - 20, height - 20), "step", fill="black")
    d.text((L, 8), "loss (nats/token): train" + (" / valid" if valid else ""), fill="black")
    if len(train) > 1:
        d.line([px(s, v) for s, v in train], fill=(31, 119, 180), width=2)
    else:
        x, y = px(*train[0])
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    for s, v in valid:
        x, y = px(s, v)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(214, 39, 40))
    if len(valid) > 1:
        d.line([px(s, v) for s, v in valid], fill=(214, 39, 40), width=1)
    atomic_write(png_path, lambda tmp: img.save(tmp, format="PNG"))
    return True


# --------------------------------------------------------------------------------------- helpers


def _to_device(batch, device):
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v if v is not None else "null"
        else:
            out[key] = str(v)
    return out


class _ReportsDrops:
    """A dataset whose items come out as ``(item, [messages])``: the records the dataset dropped while
    reading that item (see :class:`~multimodal_rwkv.training.task.Task`: it appends a message per
    dropped record to its ``bad_records`` list). Through the DataLoader the messages reach the loop
    also from worker processes, whose copies of the dataset the loop's process never sees."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        bad = getattr(self.ds, "bad_records", None)
        n = len(bad) if isinstance(bad, list) else 0
        item = self.ds[i]
        return item, (list(bad[n:]) if isinstance(bad, list) else [])


class _CollateDrops:
    """``collate`` over :class:`_ReportsDrops` items -> ``(batch, [messages])`` (a class: workers pickle it)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, pairs):
        return self.collate([it for it, _ in pairs]), [m for _, ms in pairs for m in ms]


def _available_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable + SwapFree), or None where /proc/meminfo
    does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kb = {k: v.split()[0] for k, v in (ln.split(":", 1) for ln in f if ":" in ln)}
        return (int(kb["MemAvailable"]) + int(kb.get("SwapFree", 0))) * 1024
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _address_space() -> int | None:
    """This process's virtual memory size in bytes (VmSize), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))
    except (OSError, ValueError, StopIteration, IndexError):
        return None


@contextlib.contextmanager
def _memory_guard(enabled: bool):
    """While training on a CPU, the process may map no more new memory than the machine has
    free (RLIMIT_AS = its size now + MemAvailable + SwapFree, shared among the processes of this
    machine). Linux lets a process allocate more than there is and kills it when it touches the
    memory (no error to catch, no line saying which settings to lower); with the limit, the
    allocation that would not fit fails instead, and the run stops with the out-of-memory line.
    The limit is put back afterwards."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        enabled = False
    vm, avail = (_address_space(), _available_memory()) if enabled else (None, None)
    if vm is None or avail is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # processes sharing this machine
    limit = vm + avail // local
    for cap in (soft, hard):
        if cap != resource.RLIM_INFINITY:
            limit = min(limit, cap)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):  # not allowed here: train without it
        yield
        return
    try:
        yield
    except RuntimeError as e:  # oneDNN says no more than this when its buffers do not fit
        if "could not create a primitive" in str(e):
            raise MemoryError("a oneDNN product found no memory for its buffers") from None
        raise
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class _SignalFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each optimiser step; a second SIGINT aborts."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: saving a checkpoint after this step, then stopping",
                       signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# --------------------------------------------------------------------------------------- train


def _resolve_config(recipe, overrides) -> TrainConfig:
    if isinstance(overrides, (str, bytes)):  # one string would be read character by character
        raise ConfigError(f"overrides must be a list of KEY=VALUE strings, got the string {overrides!r}: "
                          f"use [{overrides!r}]")
    if isinstance(recipe, TrainConfig):
        cfg = apply_overrides(recipe, list(overrides or []))
    else:
        cfg = load_config(recipe, overrides)
    return cfg.validate()


def train(recipe, overrides: Optional[list[str]] = None) -> Path:
    """Train from a recipe (path or :class:`TrainConfig`) with ``--set`` style ``overrides``.

    Resumes from the newest complete checkpoint in ``output_dir``. Returns the exported model
    folder ``output_dir/final``. Raises :class:`TrainingInterrupted` after saving on SIGINT/SIGTERM,
    :class:`TrainingError` on a non-finite loss, ConfigError/DataError on bad input.
    """
    cfg = _resolve_config(recipe, overrides)
    return Trainer(cfg).run()


def _check_folder_setting(key: str, path: Path) -> None:
    """ConfigError naming ``key`` when ``path`` or a folder above it is a file (mkdir's bare
    FileExistsError / NotADirectoryError named neither the setting nor the reason)."""
    for p in (path, *path.parents):
        try:
            p.stat()
        except (FileNotFoundError, NotADirectoryError):  # (below a file: that file is found next)
            if os.path.lexists(p):  # a link to nothing
                raise ConfigError(f"{key}: {path}: {p} is a broken link") from None
            continue
        except OSError as e:  # a link loop, a permission
            raise ConfigError(f"{key}: {path}: {p}: {e.strerror or e}") from None
        if not p.is_dir():
            raise ConfigError(f"{key}: {path} is a file, not a folder" if p == path else
                              f"{key}: {path} cannot be a folder: {p} is a file")
        return


@contextlib.contextmanager
def _random_states_failure():
    """``with _random_states_failure() as failed:`` -- ``failed`` (a list) is non-empty after the
    block if accelerate's ``load_state`` could not restore the RNG states (it logs that at INFO and
    carries on; an exact resume needs them)."""
    failed: list[str] = []
    log = logging.getLogger("accelerate.checkpointing")
    level = log.level
    catch = logging.Handler(logging.INFO)
    catch.emit = lambda r: failed.append(r.getMessage()) if "Could not load random states" in r.getMessage() else None
    log.addHandler(catch)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield failed
    finally:
        log.removeHandler(catch)
        log.setLevel(level)


def _unwrap(acc, model):
    """``acc.unwrap_model(model)``, without importing DeepSpeed where no DeepSpeed engine can be:
    accelerate imports it whenever it is installed (to test for its engine class), and on a CPU
    that import prints DeepSpeed's "Setting accelerator to CPU..." warning in every run."""
    from accelerate.utils import DistributedType

    if (acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP) or "deepspeed" in sys.modules
            or hasattr(model, "_orig_mod")):  # torch.compile'd: left to accelerate
        return acc.unwrap_model(model)
    import torch

    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def _is_out_of_memory(e: Exception) -> bool:
    """Whether ``e`` is an allocation failure: MemoryError (numpy, Python), torch's CUDA/XPU
    OutOfMemoryError, or the RuntimeError of torch's CPU allocator ("can't allocate memory")."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        w in msg for w in ("can't allocate memory", "not enough memory", "out of memory"))


def _trainer_state(ckpt: Path) -> dict:
    """A checkpoint's trainer_state.json (step, data position, ...), or a CheckpointError naming it."""
    from multimodal_rwkv.errors import CheckpointError

    p = ckpt / "trainer_state.json"
    try:
        st = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(st, dict) or not isinstance(st.get("step"), int):
            raise ValueError("no integer 'step'")
        return st
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: damaged trainer state ({e}); delete {ckpt} to resume from the checkpoint "
                              "before it") from None


def _single_process_cpu_launch(env) -> bool:
    """Whether this is ``accelerate launch --cpu --num_processes N`` (N > 1) without mpirun: accelerate's
    simple launcher then starts this one process and sets only ``MASTER_ADDR`` (with its own
    ``ACCELERATE_DYNAMO_BACKEND`` and ``ACCELERATE_MIXED_PRECISION``, which a job script that exports
    ``MASTER_ADDR`` for other reasons lacks), so the run would silently train alone with 1/N of the
    asked-for batch."""
    from accelerate.utils import str_to_bool

    try:
        cpu = str_to_bool(env.get("ACCELERATE_USE_CPU", "false"))
    except ValueError:
        cpu = False
    mpi = any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE"))
    launched = "ACCELERATE_DYNAMO_BACKEND" in env and "ACCELERATE_MIXED_PRECISION" in env
    return bool(cpu) and launched and "MASTER_ADDR" in env and not mpi


class Trainer:
    """Holds the pieces of one run; :meth:`run` does the work (see :func:`train`)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self._lock_fd = None
        self._lock_id = None  # (device, inode) of output_dir/.lock while held
        self._new_dirs: list[Path] = []  # the parents this run created and output_dir (removed if it fails early)
        self._found: set[str] = set()  # what output_dir held before this run (when it existed)
        self._phase = "setting up"  # what the run is doing: named in an out-of-memory error
        self.is_main_process = True  # False on the other ranks of a multi-process run (set by run())
        self._warned_no_valid_targets = False
        self.dropped: dict[str, None] = {}  # records the datasets dropped while read (messages, in order)

    # ----------------------------------------------------------------- setup
    def _accelerator(self, find_unused_parameters: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        cfg = self.cfg
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision]
        log_with = list(cfg.log_with) or None
        import accelerate.utils

        for t in cfg.log_with:  # accelerate itself only warns, and trains without the tracker
            available = getattr(accelerate.utils, f"is_{t}_available", None)
            if available is not None and not available():
                package = "tensorboard" if t == "tensorboard" else t.replace("_", "-")
                raise ConfigError(f"log_with: {t} needs the '{package}' package, which is not installed "
                                  f"(pip install {package})")
        from accelerate.state import AcceleratorState, GradientState

        # accelerate keeps process-wide singletons; a second train() in the same process (Python API,
        # tests) may use another precision / accumulation. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        try:
            ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
            acc = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.train.grad_accum,
                              log_with=log_with, kwargs_handlers=[ddp],
                              project_config=ProjectConfiguration(project_dir=str(self.out),
                                                                  logging_dir=str(self.out / "logs")))
        except ValueError as e:
            what = "log_with" if "logging capability" in str(e) else f"train.precision={cfg.train.precision}"
            raise ConfigError(f"{what}: {str(e).splitlines()[0]}") from None
        if cfg.train.precision != "fp32" and not getattr(acc, "native_amp", True):
            logger.warning("train.precision=%s is not available on %s: training in fp32", cfg.train.precision,
                           acc.device)
        return acc

    def _build_model(self, task):
        from multimodal_rwkv.training import peft as P

        cfg = self.cfg
        model = task.build_model()
        if cfg.peft.train_state:
            P.enable_state_tuning(model)
        if cfg.peft.lora_r > 0:
            P.apply_lora(model, cfg.peft.lora_r, cfg.peft.lora_alpha, cfg.peft.lora_targets, cfg.peft.lora_dropout)
        P.select_trainable(model, cfg.peft, task.trainable_filter)
        if cfg.train.grad_checkpointing:
            fn = getattr(model, "gradient_checkpointing_enable", None)
            if fn is None or not getattr(model, "supports_gradient_checkpointing", True):
                raise ConfigError("train.grad_checkpointing: this model does not support gradient checkpointing")
            try:
                fn(gradient_checkpointing_kwargs={"use_reentrant": False})
            except TypeError:
                fn()
            except ValueError as e:
                raise ConfigError(f"train.grad_checkpointing: {e}") from None
        model.train()
        return model

    # ----------------------------------------------------------------- checkpoints
    def _check_weights(self, acc, model, step: int, last_ckpt) -> None:
        """TrainingError if a trainable weight is NaN or infinite (an update that overflowed): such
        weights are neither checkpointed (a resume would start from them) nor exported."""
        import torch

        bad = next((n for n, p in _unwrap(acc, model).named_parameters()
                    if p.requires_grad and not bool(torch.isfinite(p).all())), None)
        flag = torch.tensor([0.0 if bad is None else 1.0], device=acc.device)
        if acc.num_processes > 1:  # (FSDP: each rank holds a shard)
            flag = acc.reduce(flag, reduction="sum")
        if float(flag[0]) > 0:
            raise TrainingError(f"the update of step {step} made the weights non-finite ({bad or 'on another rank'}): "
                                f"stopped without saving them; {_resume_hint(last_ckpt)} (try a lower optim.lr, "
                                "precision fp32, or check the data)")

    def _save_checkpoint(self, acc, step: int, samples: int, extra: dict):
        """Write ``checkpoints/step_N`` atomically: temp folder, fsync, rename; keep the last K."""
        final = self.ckpt_dir / f"step_{step:08d}"
        tmp = self.ckpt_dir / f".tmp-step_{step:08d}"
        if acc.is_main_process:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp), safe_serialization=True)
        except (RuntimeError, OSError) as e:  # torch.save on a full disk: "basic_ios::clear: iostream error"
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.filename:
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise OSError(getattr(e, "errno", None), f"cannot write this checkpoint ({first}); is the disk full? "
                          "The checkpoints before it are kept", str(final)) from None
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": step, "samples_consumed": samples, "complete": True,
                     "world_size": acc.num_processes, "time": time.time(), **extra}
            with open(tmp / "trainer_state.json", "w") as f:
                json.dump(state, f, indent=1)
            fsync_tree(tmp)
            swap_in(tmp, final)  # (a checkpoint of the same step, a re-run's, is replaced)
            fsync_path(self.ckpt_dir)
            if self.metrics_path.exists():
                fsync_path(self.metrics_path)
            for s, p in list_checkpoints(self.ckpt_dir)[: -self.cfg.keep_last]:
                try:
                    discard_tree(p)  # renamed away first: a kill mid-delete leaves no half checkpoint
                except OSError as e:  # (an immutable folder): the run goes on, the old checkpoint stays
                    logger.warning("could not remove the old checkpoint %s (%s); remove it by hand", p,
                                   e.strerror or e)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    # recipe keys that only say how long a run goes on or how it reports: a finished run whose recipe
    # differs from the saved one in these alone is still finished
    _RUN_LENGTH_KEYS = ("max_steps", "max_minutes", "checkpoint_every", "keep_last", "eval_every", "log_every",
                        "progress_bar")

    # settings a checkpoint's weights depend on: a resumed (or re-exported) run must keep them.
    # Not compared: peft.merge_lora (how final/ is written), peft.lora_dropout (training noise
    # only), model.from_pretrained (the checkpoint holds every weight; a path spelled another way
    # or moved is the same run), the LoRA settings when neither recipe has LoRA.
    _NOT_COMPARED = ("peft.merge_lora", "peft.lora_dropout", "model.from_pretrained")
    _LORA_KEYS = ("peft.lora_alpha", "peft.lora_targets")

    def _saved_recipe(self) -> Optional[dict]:
        """The recipe the run last started with (``recipe.yaml``), JSON-normalised; None if unreadable."""
        import yaml

        try:
            saved = yaml.safe_load((self.out / "recipe.yaml").read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
            return None
        return json.loads(json.dumps(saved, default=str)) if isinstance(saved, dict) else None

    @staticmethod
    def _model_config_meaning(d) -> dict:
        """A ``model.config`` dict as the sizes it means (defaults filled in; the kernel choice and
        other runtime keys left out), the dict itself if it is no RWKV config, None if it is an
        invalid one (a misspelt key: the model build reports it)."""
        from multimodal_rwkv.model.checkpoint import MODEL_SIZE_KEYS
        from multimodal_rwkv.model.config import RWKVConfig

        if not isinstance(d, dict) or not d:
            return d or {}
        try:
            cfg = RWKVConfig(**d)
        except ConfigError:  # a misspelt key or a bad value
            return None
        except Exception:  # noqa: BLE001 - another task's config: compared as written
            return d
        return {k: getattr(cfg, k) for k in MODEL_SIZE_KEYS}

    def _check_model_settings_kept(self, checkpoint, free_options=(), data_keys=()) -> None:
        """ConfigError if the recipe changes a model or PEFT setting of the run being resumed
        (``lora_alpha``, a ``model.config`` size such as ``head_size_divisor``, ...): the
        checkpoint's weights would silently mean another model. ``free_options``: the task's
        ``model.options`` keys that may change (:attr:`Task.free_options`); ``data_keys``: the
        ``data`` keys that may not (:attr:`Task.kept_data_keys`, the tokenizer)."""
        saved = self._saved_recipe()
        if saved is None:  # nothing to compare with (a folder from an older version)
            return
        now = json.loads(json.dumps(config_to_dict(self.cfg)))
        no_lora = not (saved.get("peft") or {}).get("lora_r") and not (now.get("peft") or {}).get("lora_r")
        skip = (self._NOT_COMPARED + (self._LORA_KEYS if no_lora else ())
                + tuple(f"model.options.{k}" for k in free_options))
        changed: list[str] = []

        def diff(name: str, a, b) -> None:
            if name in skip or a == b:
                return
            if isinstance(a, dict) and isinstance(b, dict):
                for key in sorted(set(a) | set(b), key=str):
                    diff(f"{name}.{key}", a.get(key), b.get(key))
            else:
                changed.append(f"{name}: {json.dumps(a)} -> {json.dumps(b)}")

        for sec in ("model", "peft"):
            a, b = dict(saved.get(sec) or {}), dict(now.get(sec) or {})
            if sec == "model":
                meaning = self._model_config_meaning(b.get("config"))
                if meaning is None:  # a misspelt key: the model build names it
                    a.pop("config", None)
                    b.pop("config", None)
                else:
                    a["config"], b["config"] = self._model_config_meaning(a.get("config")), meaning
            diff(sec, a, b)
        for key in data_keys:
            diff(f"data.{key}", (saved.get("data") or {}).get(key), (now.get("data") or {}).get(key))
        if changed:
            raise ConfigError(f"{checkpoint}: this run was trained with other model/PEFT settings "
                              f"({'; '.join(changed)}); a resumed or re-exported run keeps them (set them back, "
                              "or train in a new output_dir)")

    def _recipe_unchanged(self) -> bool:
        """Whether the recipe equals the one the run last started with (``recipe.yaml``), run length aside."""
        saved = self._saved_recipe()
        if saved is None:
            return False
        now = json.loads(json.dumps(config_to_dict(self.cfg)))
        for k in self._RUN_LENGTH_KEYS:
            now.pop(k, None)
            saved.pop(k, None)
        return now == saved

    def _cleanup_temp(self):
        if self.ckpt_dir.is_dir():
            for p in self.ckpt_dir.iterdir():
                if p.name.startswith(".tmp-") or p.name.startswith(".old-"):
                    shutil.rmtree(p, ignore_errors=True)
        for p in self.out.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if (self.out / "final").is_dir():  # the model final/ replaced, kept by an export that was interrupted
            for p in self.out.glob(".old-final*"):
                remove_tree(p)

    # ----------------------------------------------------------------- eval
    def _evaluate(self, acc, task, model, valid_ds, collate) -> Optional[float]:
        import torch

        cfg = self.cfg
        n = len(valid_ds)
        B = cfg.train.micro_batch_size
        n_batches = -(-n // B)
        if cfg.eval_batches > 0:  # batches of an optimiser step's size, whatever its split into
            # micro-batches and processes: a run on 2 processes with half the micro-batch scores
            # the same windows as on one
            n_batches = min(n_batches, cfg.eval_batches * acc.num_processes * cfg.train.grad_accum)
        tot = torch.zeros(3, dtype=torch.float64, device=acc.device)
        model.eval()
        ds, coll, msgs = _ReportsDrops(valid_ds), _CollateDrops(collate), []
        # every process runs as many forwards (a wrapped model's forward is collective: DDP
        # broadcasts buffers, FSDP gathers parameters); one past the batches repeats an earlier
        # batch, uncounted, or a process with no batch would leave the others waiting forever
        W = acc.num_processes
        for b in range(acc.process_index, -(-n_batches // W) * W, W):
            extra = b >= n_batches
            if extra:
                b %= n_batches
            batch, m = coll([ds[i] for i in range(b * B, min((b + 1) * B, n))])
            batch = _to_device(batch, acc.device)
            with acc.autocast():
                ls, k = task.eval_step(model, batch)
            if extra:
                continue
            msgs += m
            tot[0] += float(ls)
            tot[1] += k
        model.train()
        new = self._new_drops(msgs)
        tot[2] = len(new)
        if acc.num_processes > 1:
            tot = acc.reduce(tot, reduction="sum")
        self._note_drops(acc, new, int(tot[2]))
        if tot[1] == 0:
            if not self._warned_no_valid_targets:
                logger.warning("the validation windows evaluated have no target token (all masked with -100): "
                               "no valid_loss (raise eval_batches, or check data.valid_file)")
                self._warned_no_valid_targets = True
            return None
        return float(tot[0] / tot[1])

    # ----------------------------------------------------------------- dropped records
    def _new_drops(self, msgs) -> list[str]:
        """The messages of ``msgs`` not yet counted (each dropped record is counted once, by its message)."""
        return list(dict.fromkeys(m for m in msgs if m not in self.dropped))

    def _note_drops(self, acc, new: list[str], n_all: int) -> None:
        """Count this process's newly dropped records ``new``; ``n_all``: their number summed over the
        processes (all call this together). With several, each gets the union, so all count alike."""
        if n_all and acc.num_processes > 1:
            from accelerate.utils import gather_object

            new = gather_object(new)
        self.dropped.update(dict.fromkeys(new))

    def _skip_state(self, skipped: int) -> dict:
        """trainer_state.json's count of bad records: the run's total so far and those dropped while read."""
        return {"skipped_records": skipped + len(self.dropped), "dropped_records": list(self.dropped)}

    # ----------------------------------------------------------------- export
    def _export(self, acc, task, model, step: int) -> Path:
        import copy

        from multimodal_rwkv.training import peft as P

        cfg = self.cfg
        final = self.out / "final"
        unwrapped = _unwrap(acc, model)
        from accelerate.utils import DistributedType

        if acc.distributed_type == DistributedType.FSDP:
            sd = acc.get_state_dict(model)
            if acc.is_main_process:
                unwrapped = self._build_model(task)
                unwrapped.load_state_dict(sd)
        if acc.is_main_process:
            tmp = self.out / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            export_model = unwrapped
            if cfg.peft.lora_r > 0:  # final/ always holds plain weights, so every loader takes it
                export_model = copy.deepcopy(unwrapped)
                n = P.merge_lora(export_model)
                logger.info("merged %d LoRA layers into plain weights for export", n)
            export_model.eval()
            try:  # a failed export (a full disk) leaves no half-written .tmp-final behind
                task.save_pretrained(export_model, tmp)
                info = tmp / "training_info.json"
                if info.is_file():  # the step exported: a rerun knows whether final/ is the latest checkpoint's
                    atomic_write_text(info, json.dumps({**json.loads(info.read_text(encoding="utf-8")), "step": step},
                                                       indent=1))
                if cfg.peft.lora_r > 0 and not cfg.peft.merge_lora:
                    P.export_lora_adapter(unwrapped, cfg.peft, tmp)
                if cfg.peft.train_state:
                    P.export_time_state(export_model, tmp / "time_state.pth")
                if cfg.export.pth:
                    P.export_blinkdl_pth(export_model, tmp / "model.pth")
                for f in cfg.export.include_files:
                    # a file the export wrote (those it always writes are refused up front); generation
                    # defaults given as a file take the place of the starting model's
                    if (tmp / Path(f).name).exists() and Path(f).name != "generation_config.json":
                        raise ConfigError(f"export.include_files: {f} would replace final/{Path(f).name}, which the "
                                          "export wrote; rename it (the checkpoints are kept: rerun to export)")
                    with naming_target(final / Path(f).name):  # (not the source, which a full disk leaves whole)
                        shutil.copy2(f, tmp / Path(f).name)
                fsync_tree(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            swap_in(tmp, final)  # (a link final/ is replaced by the folder; what it points to stays)
            for p in self.out.glob(".old-final*"):  # what an export killed before its end left aside
                remove_tree(p)
            fsync_path(self.out)
            logger.info("exported model to %s", final)
        acc.wait_for_everyone()
        return final

    def _export_names(self) -> set[str]:
        """What the export writes into final/ with this recipe (export.include_files must not
        replace them; a generation_config.json written only for changed defaults is found when
        copying)."""
        cfg = self.cfg
        names = {"config.json", "model.safetensors", "training_info.json"}
        if cfg.task == "visualrwkv":
            names.add("preprocessor_config.json")
        if cfg.peft.lora_r > 0 and not cfg.peft.merge_lora:
            names |= {"lora_adapter.safetensors", "lora_adapter.json"}
        if cfg.peft.train_state:
            names.add("time_state.pth")
        if cfg.export.pth:
            names.add("model.pth")
        return names

    # ----------------------------------------------------------------- run
    def run(self) -> Path:
        names: dict[str, str] = {}
        for f in self.cfg.export.include_files:  # checked now, not after all the training
            if not Path(f).is_file():
                hint = "" if Path(f).parent.is_dir() else (
                    f" (nor is {Path(f).parent} a folder: a dataset not prepared yet? see recipes/README.md)")
                raise ConfigError(f"export.include_files: {f} is not a file{hint}")
            name = Path(f).name
            if name in self._export_names():
                raise ConfigError(f"export.include_files: {f} would replace final/{name}, which the export writes")
            if name in names:
                raise ConfigError(f"export.include_files: {names[name]} and {f} would both be final/{name}")
            if name == "generation_config.json":  # what from_pretrained will read: checked now
                from multimodal_rwkv.model.checkpoint import read_generation_config

                try:
                    read_generation_config(f)
                except MMRWKVError as e:
                    raise ConfigError(f"export.include_files: {e}") from None
            names[name] = f
        try:
            return self._run()
        except BaseException as e:
            self._remove_new_output_dir()
            if isinstance(e, Exception) and _is_out_of_memory(e):
                raise TrainingError(self._out_of_memory_message(e)) from None
            raise
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the output_dir lock
                self._lock_fd = None

    def _out_of_memory_message(self, e: BaseException) -> str:
        """One line: what ran out of memory and which settings to lower."""
        cfg = self.cfg
        m = re.search(r"[Tt]ried to allocate ([\d.]+) ?(\w+)", str(e))
        if m and m.group(2) == "bytes":
            n = int(float(m.group(1)))  # (under train.cpu_memory_guard, often a small one that did not fit)
            size = f" (tried to allocate {n / 2**30:.1f} GiB)" if n >= 2**30 else f" (tried to allocate {n / 2**20:.1f} MiB)"
        elif m:
            size = f" (tried to allocate {m.group(1)} {m.group(2)})"
        else:
            size = f" ({str(e).strip().splitlines()[0][:200]})" if str(e).strip() else ""
        if self._phase == "model":
            return (f"out of memory building the model{size}: use a smaller model (model.config: n_layer, "
                    "n_embd, vocab_size) or a machine with more memory")
        if self._phase not in ("steps", "eval"):
            return f"out of memory while {self._phase}{size}: free memory or use a machine with more"
        what = "for a training step" if self._phase == "steps" else "evaluating"
        return (f"out of memory {what}{size} with train.micro_batch_size={cfg.train.micro_batch_size} x "
                f"data.ctx_len={cfg.data.ctx_len} tokens: lower train.micro_batch_size or data.ctx_len (raise "
                "train.grad_accum to keep the batch), or set train.bptt_chunk or train.grad_checkpointing=true")

    @staticmethod
    def _run_scaffolding(p: Path) -> bool:
        """Whether ``p`` (in output_dir) is only what a run sets up before its first checkpoint: the
        lock, the recipe, metrics, logs, temp folders, a checkpoints or token_cache folder without a
        finished checkpoint or cache."""
        if p.name in (".lock", "recipe.yaml", "metrics.jsonl", "logs", "vocab_subset.json") or p.name.startswith(".tmp-"):
            return True
        return p.is_dir() and p.name in ("checkpoints", "token_cache") and all(
            q.name.startswith((".tmp-", ".old-", ".broken-")) for q in p.iterdir())

    def _remove_new_output_dir(self) -> None:
        """After a failed run, what it set up without a checkpoint to show for it: output_dir if
        this run created it (with the parents it created), or in a folder that existed before, the
        entries this run added there (the user's own files, and an earlier run's, stay). Nothing
        is removed once there is a checkpoint, a final/ model or a finished token cache (a rerun
        reuses it)."""
        if self._lock_fd is None:  # another run's folder (not locked by this one)
            return
        out = self.out
        try:
            added = [p for p in out.iterdir() if self._new_dirs or p.name not in self._found]
            keep = [p.name for p in added if not self._run_scaffolding(p)]
            if keep:
                logger.debug("kept %s after the failed run: it holds %s", out, ", ".join(sorted(keep)))
                return
            if self._new_dirs:
                shutil.rmtree(out)
                remove_dirs(self._new_dirs[:-1])  # the parents this run created, while empty
                return
            for p in added:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        except OSError as e:
            logger.debug("could not remove %s: %s", out, e)

    def _lock_output_dir(self) -> None:
        """One run per output_dir: an exclusive lock on ``output_dir/.lock`` for the run's life
        (the OS drops it when the process dies, however it dies). A second run on the same folder
        would delete the first one's checkpoint in progress."""
        import fcntl

        path = self.out / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"{self.out}: output_dir is in use by another training run; wait for it to "
                              "finish or use another output_dir") from None
        self._lock_fd = fd
        st = os.fstat(fd)
        self._lock_id = (st.st_dev, st.st_ino)

    def _run(self) -> Path:
        import torch
        from accelerate.utils import set_seed

        cfg = self.cfg
        from multimodal_rwkv.kernels.cpu import keep_freed_memory
        from multimodal_rwkv.training.task import get_task

        task = get_task(cfg)
        if cfg.export.pth and not task.exports_pth:
            raise ConfigError(f"export.pth: the {task.name} task's model is not a language model alone, which a "
                              "BlinkDL-layout model.pth holds; its final/ folder is what its loaders read")
        acc = self._accelerator(task.find_unused_parameters)
        if _single_process_cpu_launch(os.environ):
            raise ConfigError("accelerate launch --cpu starts one process even when asked for more (it sets up "
                              "no process group); for several CPU processes run ACCELERATE_USE_CPU=1 torchrun "
                              "--nproc_per_node N -m multimodal_rwkv train ... (see recipes/accelerate/README.md)")
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and acc.num_processes == 1:  # each process would train alone, on the same output_dir
            raise ConfigError(f"launched as one of {launched} processes, but they formed no process group "
                              f"(a multi-GPU launch config on a machine without GPUs? on CPUs set "
                              f"ACCELERATE_USE_CPU=1, see recipes/accelerate/README.md)")
        from accelerate.utils import DistributedType, parse_flag_from_env

        for flag, kind, want in (("ACCELERATE_USE_FSDP", "FSDP", DistributedType.FSDP),
                                 ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", DistributedType.DEEPSPEED)):
            if parse_flag_from_env(flag) and acc.distributed_type != want:
                runs = ("one process" if acc.num_processes == 1 else
                        f"plain data parallel over {acc.num_processes} processes")
                raise ConfigError(f"the launch config asks for {kind}, but accelerate runs {runs} here (it enables "
                                  f"{kind} only on accelerators; on CPUs it would silently train without sharding): "
                                  "use a GPU, or a DDP launch (recipes/accelerate/README.md)")
        main = self.is_main_process = acc.is_main_process
        if not main:  # the other ranks' warnings repeat the main one's (the same data, the same run): errors only
            logging.getLogger("multimodal_rwkv").setLevel(logging.ERROR)
        if cfg.train.cpu_retain_memory and acc.device.type == "cpu" and keep_freed_memory(bounded=False):
            logger.debug("glibc malloc: freed memory kept for reuse (train.cpu_retain_memory)")
        if main:
            _check_folder_setting("output_dir", self.out)
            if not is_utf8_path(self.out.absolute()):  # torch and accelerate open checkpoints by a UTF-8 name
                raise ConfigError(f"output_dir: {self.out}: the path is not valid UTF-8, and the run could not "
                                  "read its checkpoints back (torch and accelerate take UTF-8 names); choose "
                                  "another folder")
            if getattr(cfg.data, "cache_dir", None):
                _check_folder_setting("data.cache_dir", Path(cfg.data.cache_dir))
            self._found = {p.name for p in self.out.iterdir()} if self.out.is_dir() else set()
            self._new_dirs = make_dirs(self.out)
            self._lock_output_dir()
            self._cleanup_temp()
        acc.wait_for_everyone()

        ckpts = list_checkpoints(self.ckpt_dir)
        resume = ckpts[-1] if ckpts else None
        final_dir = self.out / "final"
        if resume is None and cfg.max_steps > 0 and (final_dir / "config.json").is_file():
            raise ConfigError(f"{self.out}: holds a finished run's final/ but no checkpoints (deleted?): the run "
                              "cannot be resumed or extended, and training again from step 0 would replace final/; "
                              "move final/ away to train again here, or use a new output_dir")
        budget = cfg.max_minutes * 60.0 if cfg.max_minutes else None  # seconds of training steps
        if resume is None and cfg.max_steps == 0:
            logger.warning("max_steps=0: nothing is trained; final/ is the starting model")
        reexport = False
        if resume is not None:
            self._check_model_settings_kept(resume[1], task.free_options, task.kept_data_keys)
            st = _trainer_state(resume[1])
            timed_out = budget is not None and float(st.get("elapsed_s", 0.0)) >= budget
            # final/ of another step: an extension interrupted after its first checkpoint (exported below)
            exported = _exported_step(final_dir)
            finished = ((st["step"] >= cfg.max_steps or timed_out) and (final_dir / "config.json").is_file()
                        and exported in (None, st["step"]))
            if finished and self._recipe_unchanged():
                logger.info("run in %s already finished at step %d (max_steps=%d, max_minutes=%s); raise them to "
                            "extend it", self.out, st["step"], cfg.max_steps, cfg.max_minutes)
                return final_dir
            saved_w = int(st.get("world_size", acc.num_processes) or acc.num_processes)
            if saved_w != acc.num_processes and not finished:  # a finished run is only exported again
                raise ConfigError(f"{resume[1]}: checkpointed by {saved_w} process(es), resumed with "
                                  f"{acc.num_processes}: resume with {saved_w} (each rank's random state and "
                                  "share of the global batch are its own), or train in a new output_dir")
            reexport = finished
            if finished:  # the recipe changed: checked as on any resume, then final/ is exported again
                logger.info("run in %s already finished at step %d, but the recipe changed: checking it against "
                            "the checkpoint and exporting final/ again", self.out, st["step"])
            elif st["step"] > cfg.max_steps:
                logger.warning("%s is at step %d, past max_steps=%d: training does not go back; exporting the "
                               "model of step %d", resume[1], st["step"], cfg.max_steps, st["step"])

        task.check_data_settings()  # before the model is built or loaded (a finished run needs no data)
        set_seed(cfg.seed)
        self._phase = "model"
        model = self._build_model(task)
        self._phase = "reading the data"
        with acc.main_process_first():
            train_ds, valid_ds, collate = task.build_datasets(model)
        skipped = int(getattr(task, "skipped", 0))
        if skipped:
            logger.warning("skipped %d bad records (data.on_bad_record=skip)", skipped)
        if len(train_ds) == 0:
            raise ConfigError("data.train_file: the training set is empty")

        self._phase = "model"
        opt = build_optimizer(model, cfg.optim, acc.distributed_type)
        if acc.distributed_type == DistributedType.DEEPSPEED:
            # our data loader is not prepared by accelerate, so DeepSpeed learns the micro-batch here
            ds_cfg = acc.state.deepspeed_plugin.deepspeed_config
            if ds_cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds_cfg["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
        model, opt = acc.prepare(model, opt)

        if acc.distributed_type == DistributedType.DEEPSPEED:
            if acc.gradient_accumulation_steps != cfg.train.grad_accum:
                raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} but the DeepSpeed config has "
                                  f"gradient_accumulation_steps={acc.gradient_accumulation_steps}; make them equal")
            if cfg.train.bptt_chunk:
                raise ConfigError("train.bptt_chunk: truncated BPTT needs several backward passes per micro-batch, "
                                  "which DeepSpeed does not support; use DDP or FSDP")

        self._phase = "resuming from the checkpoint" if resume is not None else "setting up"
        step, samples, tokens_seen, t_elapsed = 0, 0, 0, 0.0
        if resume is not None:
            # the optimiser's settings come from the recipe, as the lr does: load_state would put
            # back the saved groups' weight decay, betas, eps and lr scale (a run extended with
            # other optim.* values would silently keep the old ones)
            wanted = [{k: g[k] for k in _RECIPE_GROUP_KEYS if k in g} for g in opt.param_groups]
            try:
                with _random_states_failure() as rng_failed:
                    acc.load_state(str(resume[1]))
                if rng_failed:  # accelerate only logs it at INFO: say it where it is seen
                    logger.warning("%s: the random states (random_states_*.pkl) are missing or damaged; training "
                                   "goes on from this checkpoint, but not bit-exactly as an uninterrupted run",
                                   resume[1])
            except (KeyboardInterrupt, SystemExit, GeneratorExit):
                raise
            except BaseException as e:  # noqa: BLE001 - torch, safetensors, accelerate: each its own types;
                # torch.distributed.checkpoint's CheckpointException (FSDP) is a BaseException
                from multimodal_rwkv.errors import CheckpointError

                lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
                first = lines[0] if not lines[0].endswith(":") else " ".join(lines[:2])  # torch: "...for X:\n\tsize..."
                first = first[:300]
                sharded = type(e).__name__ == "CheckpointException"
                missing = isinstance(e, FileNotFoundError) or "no such file" in first.lower()
                damaged = type(e).__name__ in ("SafetensorError", "UnpicklingError", "EOFError") or any(
                    w in first.lower() for w in ("header", "truncat", "corrupt", "eof", "deserializ"))
                why = ("a file in it is damaged; delete this checkpoint folder to resume from the one before"
                       if damaged else
                       "a file of it is missing; delete this checkpoint folder to resume from the one before"
                       if missing else
                       "a file in it is damaged, or it was written under another launch config (DDP and FSDP "
                       "checkpoints differ); delete this checkpoint folder, or resume with the launch config "
                       "that wrote it" if sharded else
                       "the recipe's model or PEFT settings probably changed: use a new output_dir")
                raise CheckpointError(f"{resume[1]}: cannot resume from this checkpoint ({first}); {why}") from None
            if len(wanted) == len(opt.param_groups):
                for g, w in zip(opt.param_groups, wanted):
                    g.update(w)
            step, samples = int(st["step"]), int(st["samples_consumed"])
            tokens_seen, t_elapsed = int(st.get("tokens_seen", 0)), float(st.get("elapsed_s", 0.0))
            self.dropped = dict.fromkeys(st.get("dropped_records", []))
            logger.info("resumed from %s (step %d)", resume[1], step)
            if main:  # drop metrics logged after the checkpoint (they will be recomputed identically)
                rows = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= step]
                atomic_write_text(self.metrics_path, "".join(_json_row(r) + "\n" for r in rows))
        elif main and self.metrics_path.exists():
            self.metrics_path.unlink()
        if main and not reexport:
            save_config(cfg, self.out / "recipe.yaml")
        acc.wait_for_everyone()

        if cfg.log_with:
            acc.init_trackers("mmrwkv", config=_flat(config_to_dict(cfg)))

        W, A, B = acc.num_processes, cfg.train.grad_accum, cfg.train.micro_batch_size
        sampler = GlobalOrderSampler(len(train_ds), cfg.seed, cfg.data.shuffle, samples, B, A, W, acc.process_index)
        from torch.utils.data import DataLoader

        loader = DataLoader(_ReportsDrops(train_ds), batch_size=B, sampler=sampler,
                            collate_fn=_CollateDrops(collate), num_workers=cfg.data.num_workers, drop_last=False,
                            persistent_workers=cfg.data.num_workers > 0,
                            worker_init_fn=functools.partial(_drop_inherited_lock, self._lock_fd, self._lock_id),
                            # its own generator: creating the iterator must not draw from the global
                            # RNG, or a resumed run's dropout etc. would be shifted by one draw
                            generator=torch.Generator().manual_seed(cfg.seed))
        it = iter(loader)

        from multimodal_rwkv.kernels.dispatch import autocast_off
        from multimodal_rwkv.training.task import StepContext

        def backward(loss):
            # the forward runs under autocast; its backward does not (PyTorch advises against it):
            # under autocast, operations the forward ran in fp32 would be run in bf16 when going back
            with autocast_off(acc.device):
                acc.backward(loss)

        trainable = [p for p in model.parameters() if p.requires_grad]
        last_ckpt = resume[1] if resume else None
        last_saved_step = step if resume else -1
        bar = None
        if main and cfg.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)
        metrics_f = open(self.metrics_path, "a", encoding="utf-8") if main else None

        def log_row(row, to_trackers: bool = True):
            """metrics.jsonl gets every step's row; the trackers (TensorBoard, ...) every log_every-th."""
            if main:
                with naming_write_errors(self.metrics_path):  # a full disk names the file
                    metrics_f.write(_json_row(row) + "\n")
                    metrics_f.flush()
            if cfg.log_with and to_trackers:
                acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])

        t_sched = t_elapsed  # training time all ranks agree on (the mean over ranks)
        warned_no_targets = warned_zero_grad = False
        time_up = budget is not None and t_sched >= budget
        self._phase = "steps"
        try:
            with _SignalFlag() as sig, _memory_guard(acc.device.type == "cpu" and cfg.train.cpu_memory_guard):
                while step < cfg.max_steps and not time_up:
                    t0 = time.perf_counter()
                    fetched = [next(it) for _ in range(A)]
                    batches = [_to_device(b, acc.device) for b, _ in fetched]
                    new_drops = self._new_drops(m for _, ms in fetched for m in ms)
                    counts = torch.tensor([sum(task.count_targets(b) for b in batches),
                                           sum(task.count_tokens(b) for b in batches), len(new_drops)],
                                          dtype=torch.float64, device=acc.device)
                    if W > 1:
                        counts = acc.reduce(counts, reduction="sum")
                    n_targets, n_tokens = float(counts[0]), int(counts[1])
                    self._note_drops(acc, new_drops, int(counts[2]))
                    scale = (W * A / n_targets) if n_targets > 0 else 0.0
                    token_scale = W * A / max(n_tokens, 1)
                    lr = lr_at(step, cfg.optim, cfg.max_steps, t_sched / budget if budget else 0.0)
                    for g in opt.param_groups:
                        g["lr"] = lr * g.get("lr_scale", 1.0)
                    acc.step = 0  # keep accelerate's accumulate() aligned with our optimiser steps
                    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
                    loss = grad_norm = None
                    if n_targets == 0:
                        # no target token in the whole step, on any rank (chat windows inside a user
                        # turn): nothing to learn. Every rank skips the same step, so no forward, no
                        # backward, no optimiser step (DeepSpeed's would still apply weight decay)
                        if not warned_no_targets:
                            warned_no_targets = True
                            logger.warning("step %d has no target tokens (every position masked with -100): "
                                           "no update; its loss is logged as null", step + 1)
                        batches = []
                    for a, batch in enumerate(batches):
                        with acc.accumulate(model):
                            ctx = StepContext(backward, lambda: acc.no_sync(model), scale, token_scale)
                            with acc.autocast():
                                ls, _ = task.training_step(model, batch, ctx)
                            loss_sum += ls.double()
                            if acc.sync_gradients:
                                tot = acc.reduce(loss_sum.clone(), reduction="sum") if W > 1 else loss_sum
                                loss = float(tot) / n_targets
                                if not math.isfinite(loss):
                                    latest = last_ckpt is not None and Path(last_ckpt).name == f"step_{step:08d}"
                                    where = (f"the latest checkpoint, {last_ckpt}, holds the weights that gave it, and "
                                             "rerunning resumes from it: unless the data is at fault, move it out of "
                                             "checkpoints/ to resume from the one before" if latest else
                                             _resume_hint(last_ckpt))
                                    raise TrainingError(
                                        f"non-finite loss ({loss}) at step {step + 1}: stopped before the update; "
                                        f"{where} (try a lower optim.lr, precision fp32, or check the data)")
                                gn = acc.clip_grad_norm_(trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
                                grad_norm = float(gn) if gn is not None else None
                                if grad_norm == 0.0 and not warned_zero_grad:
                                    warned_zero_grad = True
                                    logger.warning(
                                        "gradient norm 0 at step %d: the loss does not depend on any trainable "
                                        "parameter, so nothing learns (VisualRWKV stage 1 on a freshly initialised "
                                        "language model, for one: RWKV's initialisation zeroes its output "
                                        "projections, so no answer depends on the image yet; start stage 1 from "
                                        "a pretrained model)", step + 1)
                                # fp16: the grad scaler skips overflowing steps and lowers its scale itself
                                if (grad_norm is not None and not math.isfinite(grad_norm)
                                        and cfg.train.precision != "fp16"):
                                    raise TrainingError(
                                        f"non-finite gradient norm at step {step + 1}: stopped before the update; "
                                        f"{_resume_hint(last_ckpt)}")
                                opt.step()
                                opt.zero_grad(set_to_none=True)
                    step += 1
                    samples += W * A * B
                    tokens_seen += n_tokens
                    dt = time.perf_counter() - t0
                    t_elapsed += dt
                    stop = sig.signum
                    t_sched = t_elapsed
                    if W > 1:  # one reduce: any rank's signal, and the ranks' mean training time
                        flag = acc.reduce(torch.tensor([float(stop or 0), t_elapsed], dtype=torch.float64,
                                                       device=acc.device), reduction="sum")
                        stop = int(flag[0].item()) if float(flag[0]) > 0 else None
                        t_sched = float(flag[1]) / W
                    time_up = budget is not None and t_sched >= budget
                    done = step == cfg.max_steps or time_up
                    if time_up and step < cfg.max_steps:
                        logger.info("max_minutes=%g reached at step %d of max_steps=%d: finishing the run",
                                    cfg.max_minutes, step, cfg.max_steps)
                    row = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": n_tokens / max(dt, 1e-9),
                           "tokens": tokens_seen, "grad_norm": grad_norm, "elapsed_s": round(t_elapsed, 3)}
                    if loss is None:
                        row["no_targets"] = True
                    if valid_ds is not None and cfg.eval_every > 0 and step % cfg.eval_every == 0 and not done:
                        self._phase = "eval"
                        vl = self._evaluate(acc, task, model, valid_ds, collate)
                        self._phase = "steps"
                        if vl is not None:
                            row["valid_loss"] = vl
                    if skipped or self.dropped:  # after the evaluation: it may drop records too
                        row["skipped_records"] = skipped + len(self.dropped)
                    log_row(row, step % max(cfg.log_every, 1) == 0 or done or "valid_loss" in row)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss="-" if loss is None else f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{lr:.2e}")
                    extra = {"tokens_seen": tokens_seen, "elapsed_s": t_elapsed, **self._skip_state(skipped)}
                    if stop or done or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0):
                        if metrics_f is not None:
                            with naming_write_errors(self.metrics_path):
                                metrics_f.flush()
                                os.fsync(metrics_f.fileno())
                        self._check_weights(acc, model, step, last_ckpt)
                        last_ckpt = self._save_checkpoint(acc, step, samples, extra)
                        last_saved_step = step
                    if stop:
                        name = signal.Signals(sig.signum).name if sig.signum else "signal"
                        raise TrainingInterrupted(
                            f"stopped by {name} at step {step}; checkpoint saved to {last_ckpt}; "
                            f"rerun the same command to resume", sig.signum or signal.SIGTERM)
                if last_saved_step != step:
                    extra = {"tokens_seen": tokens_seen, "elapsed_s": t_elapsed, **self._skip_state(skipped)}
                    self._check_weights(acc, model, step, last_ckpt)
                    last_ckpt = self._save_checkpoint(acc, step, samples, extra)
        finally:
            if bar is not None:
                bar.close()
            if metrics_f is not None:
                metrics_f.close()

        if valid_ds is not None:
            self._phase = "eval"
            n_dropped = len(self.dropped)
            vl = self._evaluate(acc, task, model, valid_ds, collate)
            if main and (vl is not None or len(self.dropped) > n_dropped):
                rows = read_metrics(self.metrics_path)
                if not rows or rows[-1].get("step") != step:
                    rows.append({"step": step})
                if vl is not None:
                    rows[-1]["valid_loss"] = vl
                    logger.info("validation loss at step %d: %.4f nats/token", step, vl)
                if len(self.dropped) > n_dropped:
                    rows[-1]["skipped_records"] = skipped + len(self.dropped)
                atomic_write_text(self.metrics_path, "".join(_json_row(r) + "\n" for r in rows))
            if main and len(self.dropped) > n_dropped and last_ckpt is not None:  # the checkpoint of this step too
                st = {**_trainer_state(last_ckpt), **self._skip_state(skipped)}
                atomic_write_text(last_ckpt / "trainer_state.json", json.dumps(st, indent=1))
            if cfg.log_with and vl is not None:
                acc.log({"valid_loss": vl}, step=step)
        if self.dropped:
            logger.warning("%d records were dropped while training; %d bad records skipped in all",
                           len(self.dropped), skipped + len(self.dropped))
        task.skipped = skipped + len(self.dropped)  # what save_pretrained reports
        self._phase = "exporting the model"
        self._check_weights(acc, model, step, last_ckpt)
        final = self._export(acc, task, model, step)
        if main and reexport:  # (saved only now: a failed export is tried again by the next run)
            save_config(cfg, self.out / "recipe.yaml")
        if main:
            try:
                plot_losses(self.metrics_path, self.out / "loss.png")
            except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
                logger.warning("could not draw loss.png: %s", e)
        if cfg.log_with:
            acc.end_training()
        return final
