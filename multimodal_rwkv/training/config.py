"""Typed training recipes: nested dataclasses that round-trip through YAML.

A recipe is a :class:`TrainConfig`. Loading is strict: unknown keys and wrongly typed values
raise :class:`~multimodal_rwkv.errors.ConfigError` naming the key (``optim.lr``) and the reason.
``--set a.b=value`` overrides parse ``value`` as YAML and go through the same type check.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from multimodal_rwkv.errors import ConfigError

__all__ = [
    "ModelSection", "DataSection", "OptimSection", "TrainSection", "PeftSection", "ExportSection",
    "TrainConfig", "load_config", "apply_overrides", "config_from_dict", "config_to_dict", "save_config",
]

DEFAULT_LORA_TARGETS = [
    "att.receptance", "att.key", "att.value", "att.gate", "att.output",
    "ffn.key", "ffn.receptance", "ffn.value",
]


@dataclass
class ModelSection:
    """Where the model comes from: a checkpoint (``from_pretrained``) or a fresh ``config``."""

    from_pretrained: Optional[str] = None
    config: dict = field(default_factory=dict)  # RWKVConfig kwargs for a fresh model
    options: dict = field(default_factory=dict)  # task-specific, validated by the task


@dataclass
class DataSection:
    """Training data. ``format: auto`` picks by file suffix (.txt, .jsonl, .bin/.idx, .npy, dir of .npy).
    A folder of text is read with its subfolders (linked ones too); a folder of .npy shards is read
    flat (a prepared music dataset's root holds its splits below); hidden files and folders are
    never data."""

    train_file: Optional[str] = None
    valid_file: Optional[str] = None
    format: Literal["auto", "txt", "jsonl", "binidx", "tokens", "llava"] = "auto"
    ctx_len: int = 512
    image_folder: Optional[str] = None
    on_bad_record: Literal["fail", "skip"] = "fail"
    tokenizer: Literal["world", "bytes"] = "world"  # bytes: id = byte + 1 (the World tokenizer's byte ids)
    cache_dir: Optional[str] = None  # token cache; default <output_dir>/token_cache
    shuffle: bool = True
    num_workers: int = 0
    options: dict = field(default_factory=dict)


@dataclass
class OptimSection:
    """AdamW with RWKV-LM's parameter groups and a warmup + decay schedule (lr per optimiser step)."""

    lr: float = 6e-4
    lr_final: float = 6e-5
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.001
    grad_clip: float = 1.0  # 0 disables clipping
    decay_lr_scale: float = 2.0  # RWKV-LM's "2x" group for time_decay
    # torch's fused AdamW kernel (same update, one pass over each tensor): null = on for one process
    # or DDP, off under FSDP/DeepSpeed (they shard or replace the optimiser). 5.7x faster step on
    # CPU measured (39M parameters, 2 threads: 19 ms against 109 ms for the per-tensor loop)
    fused: Optional[bool] = None


@dataclass
class TrainSection:
    """Batching, precision and memory knobs."""

    micro_batch_size: int = 4
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_checkpointing: bool = False
    l2wrap: bool = False
    bptt_chunk: Optional[int] = None  # truncated BPTT: chunks of this many tokens, state carried
    # CPU runs (glibc): keep freed memory in the process instead of returning it to the OS, so the
    # big per-step buffers are not page-faulted in again every step (7-14% faster steps measured)
    cpu_retain_memory: bool = True
    # CPU runs (Linux): the steps may map no more new memory than the machine has free, so a batch
    # too large fails as an allocation (one line naming the settings to lower), not by the kernel's
    # OOM killer (no message at all)
    cpu_memory_guard: bool = True


@dataclass
class PeftSection:
    """LoRA (``lora_r > 0``), state tuning (``train_state``) and freezing by name patterns (fnmatch)."""

    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    train_state: bool = False
    freeze: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    # final/ always holds the merged plain weights (every loader takes it); false: also write the
    # LoRA matrices alone (final/lora_adapter.safetensors + lora_adapter.json)
    merge_lora: bool = True


@dataclass
class ExportSection:
    include_files: list[str] = field(default_factory=list)
    pth: bool = False  # also write a BlinkDL-layout model.pth (official `rwkv` package) in final/


@dataclass
class TrainConfig:
    """A complete recipe. ``max_steps`` counts optimiser steps.

    ``max_minutes`` (optional) is a wall-clock training budget: the run also ends once its training
    steps have taken that long (summed over resumes; start-up, evaluation and export not counted),
    and the learning-rate decay then follows whichever of steps and time is further along, so a
    run cut short by time still finishes its schedule."""

    task: str = "lm"
    output_dir: str = "runs/lm"
    seed: int = 1234
    max_steps: int = 200
    max_minutes: Optional[float] = None
    checkpoint_every: int = 50
    keep_last: int = 2
    eval_every: int = 0  # 0: evaluate only at the end (when data.valid_file is set)
    # validation batches scored, each of an optimiser step's size (processes x micro_batch_size x
    # grad_accum windows); 0: the whole validation set
    eval_batches: int = 0
    log_every: int = 1  # rows sent to the trackers (log_with); metrics.jsonl has every step
    log_with: list[str] = field(default_factory=list)  # accelerate trackers, e.g. [tensorboard]
    progress_bar: bool = True
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    peft: PeftSection = field(default_factory=PeftSection)
    export: ExportSection = field(default_factory=ExportSection)

    def validate(self) -> "TrainConfig":
        """Check value ranges (types are checked on load). Returns self."""
        def need(cond, key, msg):
            if not cond:
                raise ConfigError(f"{key}: {msg}")
        need(self.output_dir.strip() != "", "output_dir", "must name a folder")
        need(self.max_steps >= 0, "max_steps", "must be >= 0")
        need(self.max_minutes is None or self.max_minutes > 0, "max_minutes", "must be > 0 or null")
        need(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)")
        need(self.keep_last >= 1, "keep_last", "must be >= 1")
        need(self.data.ctx_len >= 1, "data.ctx_len", "must be >= 1")
        need(self.train.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        need(self.train.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        need(self.train.bptt_chunk is None or self.train.bptt_chunk >= 1, "train.bptt_chunk", "must be >= 1 or null")
        need(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        need(self.data.num_workers >= 0, "data.num_workers", "must be >= 0")
        need(self.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)")
        need(self.eval_batches >= 0, "eval_batches", "must be >= 0 (0: the whole validation set)")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        o = self.optim
        need(math.isfinite(o.lr) and o.lr >= 0, "optim.lr", "must be a finite number >= 0")
        need(math.isfinite(o.lr_final) and o.lr_final >= 0, "optim.lr_final", "must be a finite number >= 0")
        need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two values in [0, 1)")
        need(math.isfinite(o.eps) and o.eps > 0, "optim.eps", "must be a finite number > 0")
        need(math.isfinite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", "must be a finite number >= 0")
        need(math.isfinite(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip", "must be a finite number >= 0 (0: off)")
        need(math.isfinite(o.decay_lr_scale) and o.decay_lr_scale >= 0, "optim.decay_lr_scale", "must be a finite number >= 0")
        need(self.peft.lora_r >= 0, "peft.lora_r", "must be >= 0")
        need(math.isfinite(self.peft.lora_alpha), "peft.lora_alpha", "must be a finite number")
        need(0 <= self.peft.lora_dropout < 1, "peft.lora_dropout", "must be in [0, 1)")
        return self


# ----------------------------------------------------------------------------- typed (de)serialisation

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the (lightly converted) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _plain(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return _plain(value)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if value is None:  # `model.config: null` / `--set model.config=null`: cleared, an empty mapping
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _plain(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "6e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (_YamlInt, _YamlFloat)):  # a file name like 007 or 2024_06_01: as written
            return value.source
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _from_dict(cls, data: Any, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}; known keys here: {sorted(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def config_from_dict(data: dict) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested dict; unknown keys / bad types -> ConfigError."""
    return _from_dict(TrainConfig, data).validate()


def config_to_dict(cfg) -> dict:
    """Plain nested dict (YAML/JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def _yaml():
    import yaml

    return yaml


_LOADER = None


class _YamlInt(int):
    """An int read from YAML that remembers its text (``source``): a string field given ``007``,
    ``0x1F`` or ``2024_06_01`` keeps that text instead of ``str`` of the number."""


class _YamlFloat(float):
    """A float read from YAML that remembers its text (``source``), like :class:`_YamlInt`."""


def _plain(value):
    """``value`` with the YAML number types above turned back into plain ints and floats."""
    if isinstance(value, _YamlInt):
        return int(value)
    if isinstance(value, _YamlFloat):
        return float(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _strict_loader():
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last
    one silently, so a second ``lr:`` in a section would quietly replace the first): ConfigError
    naming the key's dotted path and both lines. A merge key (``<<: *base``) may still be overridden."""
    global _LOADER
    if _LOADER is None:
        yaml = _yaml()

        class StrictSafeLoader(yaml.SafeLoader):
            def construct_document(self, node):
                self._checked = set()
                self._check_duplicates(node, "")
                return super().construct_document(node)

            def _check_duplicates(self, node, prefix):
                if id(node) in self._checked:  # an alias of a node already checked (maybe recursive)
                    return
                self._checked.add(id(node))
                if isinstance(node, yaml.SequenceNode):
                    for i, item in enumerate(node.value):
                        self._check_duplicates(item, f"{prefix}[{i}]")
                if not isinstance(node, yaml.MappingNode):
                    return
                lines: dict = {}
                for key_node, value_node in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                        continue
                    key = self.construct_object(key_node)
                    name = f"{prefix}.{key}" if prefix else str(key)
                    line = key_node.start_mark.line + 1
                    if key in lines:
                        raise ConfigError(f"duplicate key {name!r} at line {line} (first given at line "
                                          f"{lines[key]}): give each key once")
                    lines[key] = line
                    self._check_duplicates(value_node, name)

        def number(loader, node):  # ints and floats that keep their text (see _YamlInt)
            tag_int = node.tag == "tag:yaml.org,2002:int"
            v = (yaml.SafeLoader.construct_yaml_int if tag_int else yaml.SafeLoader.construct_yaml_float)(loader, node)
            out = _YamlInt(v) if tag_int else _YamlFloat(v)
            out.source = node.value
            return out

        # a date (2024-06-01, a common name for a data dump or a run folder) stays the text written:
        # no setting is a date, and a string setting got a datetime.date refused
        StrictSafeLoader.add_constructor("tag:yaml.org,2002:timestamp", lambda loader, node: node.value)
        StrictSafeLoader.add_constructor("tag:yaml.org,2002:int", number)
        StrictSafeLoader.add_constructor("tag:yaml.org,2002:float", number)
        _LOADER = StrictSafeLoader
    return _LOADER


def _load_yaml(text: str):
    """``yaml.safe_load`` with duplicate keys refused (see :func:`_strict_loader`)."""
    return _yaml().load(text, Loader=_strict_loader())


def _yaml_problem(e: Exception) -> str:
    """PyYAML's reason and where (line, column), not its context line ("while parsing a block
    mapping"), which names neither."""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe and apply ``overrides`` (``["optim.lr=1e-3", ...]``)."""
    yaml = _yaml()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # a PNG given by mistake, a recipe saved as Latin-1 or UTF-16
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not a UTF-8 YAML recipe (byte 0x{raw[e.start]:02x} at line {line} is not "
                          "UTF-8)") from None
    try:
        data = _load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({_yaml_problem(e)})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    try:
        cfg = _from_dict(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(cfg, overrides or [])


def _parse_value(text: str, key: str = ""):
    """An override's value as YAML (numbers, booleans, null, lists, mappings). A value that YAML
    reads as text is kept exactly as given unless it is quoted: YAML would fold a line break into a
    space and drop a ``#...`` comment (``output_dir=runs/a #1`` named ``runs/a``)."""
    yaml = _yaml()
    try:
        value = _load_yaml(text) if text.strip() != "" else ""
        if isinstance(value, str) and text.strip()[:1] not in ("'", '"'):
            return text.strip(" \t")
        return value
    except yaml.YAMLError as e:
        t = text.strip()
        if t[:1] + t[-1:] in ("[]", "{}"):  # meant as a list or a mapping: say why it is not one
            why = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override {key!r}: {t!r} is not valid YAML ({why}); quote the items "
                              "that start with * & ! or hold ': ', e.g. ['*.ln*']") from None
        return text
    except ConfigError as e:  # a duplicate key inside the value: {a: 1, a: 2}
        raise ConfigError(f"override {key!r}: {e}") from None


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key.path=value`` overrides (value parsed as YAML, then type-checked). Returns a new config."""
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        parts = key.split(".")
        node, cls = data, TrainConfig
        for i, part in enumerate(parts):
            sub = ".".join(parts[: i + 1])
            if cls is None or not dataclasses.is_dataclass(cls):
                if isinstance(node, dict) and i == len(parts) - 1:  # free-form dict (options/config)
                    node[part] = _parse_value(text, key)
                    break
                if isinstance(node, dict):
                    node = node.setdefault(part, {})
                    if not isinstance(node, dict):
                        raise ConfigError(f"override {key!r}: {sub!r} is not a mapping")
                    continue
                raise ConfigError(f"unknown config key {key!r}")
            names = {f.name: f for f in dataclasses.fields(cls)}
            if part not in names:
                raise ConfigError(f"unknown config key {key!r}; known keys in {'.'.join(parts[:i]) or 'recipe'}: {sorted(names)}")
            tp = _hints(cls)[part]
            if i == len(parts) - 1:
                value = _parse_value(text, key)
                if dataclasses.is_dataclass(tp):  # a whole section: its keys update the section's
                    if not isinstance(value, dict):
                        raise ConfigError(f"{key}: expected a mapping of its keys, got {value!r}")
                    node[part] = {**node[part], **value}  # keys and types checked with the rest below
                else:
                    node[part] = _coerce(value, tp, key)
            else:
                nxt = node[part]
                if not isinstance(nxt, dict):
                    raise ConfigError(f"unknown config key {key!r}: {sub!r} is a value, not a section")
                node = nxt
                cls = tp if dataclasses.is_dataclass(tp) else None
    return config_from_dict(data)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML (the same format :func:`load_config` reads), atomically: other ranks
    of a run may be reading the previous one."""
    from multimodal_rwkv.fileio import atomic_write_text

    atomic_write_text(path, _yaml().safe_dump(config_to_dict(cfg), sort_keys=False))
