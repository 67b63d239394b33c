"""Checkpoint I/O: BlinkDL ``.pth`` files, Hugging Face-layout folders, and our own folders.

Every size is inferred from tensor shapes (the LoRA ranks of 7B/14B differ from 1B6/3B).
``.pth`` files are read with ``torch.load(weights_only=True)`` only (memory-mapped where the
file format allows), so a file with pickled code is refused, never executed.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
import warnings
from pathlib import Path

import torch
from transformers import PretrainedConfig

from multimodal_rwkv.errors import CheckpointError, ConfigError
from multimodal_rwkv.fileio import atomic_write, atomic_write_text, is_utf8_path, save_folder, save_safetensors
from multimodal_rwkv.model.config import RWKVConfig

log = logging.getLogger(__name__)

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype) -> torch.dtype | None:
    """Accept torch dtypes and the usual strings ("bf16", "float16", ...); None keeps the file's."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise CheckpointError(f"unsupported dtype {dtype}; use fp32, bf16 or fp16")
        return dtype
    if dtype is None or dtype == "auto":
        return None
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None


# ---- reading raw state dicts ------------------------------------------------------------------
def load_safetensors(path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, also for a path that is not valid UTF-8 (read from its bytes)."""
    from safetensors.torch import load, load_file

    if is_utf8_path(path):
        return load_file(os.fspath(path), device=device)
    with open(path, "rb") as f:
        return {k: v.to(device) for k, v in load(f.read()).items()}


def safetensors_header(path) -> dict:
    """The JSON header of a safetensors file (tensor names -> dtype/shape/offsets, and
    ``__metadata__``), read directly: any path, no tensor data. ValueError if it is not one."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(100_000_000, os.fstat(f.fileno()).st_size - 8):
            raise ValueError("not a safetensors file (bad header length)")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not a JSON object)")
    return header


def _is_safetensors(path) -> bool:
    try:
        safetensors_header(path)
        return True
    except ValueError:  # (a header that is not UTF-8 JSON too)
        return False


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` state dict safely; every failure becomes a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": ahead of the one-line error
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            if not is_utf8_path(path):  # torch encodes a path as UTF-8: read through a file object (no mmap)
                if _is_safetensors(path):  # (torch.load reads these by name only)
                    sd = load_safetensors(path)
                else:
                    with open(path, "rb") as f:
                        sd = torch.load(f, map_location="cpu", weights_only=True)
            else:
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):  # legacy (non-zip) format cannot be memory-mapped
                        raise
                    sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; classify the message
        msg = str(e).strip() or type(e).__name__
        first = msg.splitlines()[0]
        if len(first) > 120:  # cut at a word, not in one
            first = first[:117].rsplit(" ", 1)[0] + " ..."
        if path.suffix.lower() == ".json":
            raise CheckpointError(f"{path}: a JSON file, not a checkpoint (for a model folder, give the folder)") from None
        with open(path, "rb") as f:
            head = f.read(9)
        known = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or head[8:9] == b"{"  # zip, pickle, safetensors
        if head[:1] == b"\x80" and "Unsupported operand" in msg:
            raise CheckpointError(f"{path}: a pickle file that is not a PyTorch checkpoint (opcodes that "
                                  "torch.load(weights_only=True) does not read)") from None
        if not known or "Unsupported operand" in msg:  # some other kind of file
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip nor a pickle file)") from None
        if "Weights only load failed" in msg or "Unsupported global" in msg or "unsupported" in msg.lower() and "global" in msg.lower():
            raise CheckpointError(
                f"{path}: contains pickled code or objects, refused (only plain tensors are loaded, weights_only=True)"
            ) from None
        if isinstance(e, EOFError) or "failed finding central directory" in msg or "PytorchStreamReader" in msg \
                or "unexpected eof" in msg.lower() or "Ran out of input" in msg or "truncated" in msg.lower():
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first})") from None
        if head[:4] == b"PK\x03\x04":  # a zip that torch cannot read: cut off or damaged
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first})") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({first})") from None
    # a training checkpoint's dict: the weights under "state_dict" (Lightning), "model" (a plain
    # {"model": ..., "optimizer": ...} save) or "module" (DeepSpeed); keys all prefixed by a
    # wrapper's name (DDP's "module.", Lightning's "model.", torch.compile's "_orig_mod.") lose it
    for key in ("state_dict", "model", "module"):
        inner = sd.get(key) if isinstance(sd, dict) else None
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            sd = inner
            break
    while isinstance(sd, dict) and sd and all(isinstance(k, str) for k in sd):  # stacked too (compile(DDP(m)))
        prefix = next((p for p in ("module.", "_orig_mod.", "model.") if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        what = (f"a dict of {', '.join(map(str, list(sd)[:6]))}{', ...' if len(sd) > 6 else ''}"
                if isinstance(sd, dict) and sd else type(sd).__name__)
        raise CheckpointError(f"{path}: not a state dict of tensors ({what}; no dict of tensors under "
                              "'state_dict', 'model' or 'module' either)")
    if not sd:
        raise CheckpointError(f"{path}: empty state dict")
    return sd


def _read_shards(folder: Path, index: Path, load) -> dict[str, torch.Tensor]:
    """The weights of a sharded folder (safetensors or ``pytorch_model-*.bin`` shards, read by
    ``load``), each key from the shard its index names: the index and the shards must agree exactly
    (a key in two shards, in a shard the index does not say, or missing from the index is a
    CheckpointError naming the file)."""
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        wmap = meta.get("weight_map")
        save_id = (meta.get("metadata") or {}).get("save_id")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a readable JSON index ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointError(f"{index}: needs a \"weight_map\" object of tensor name -> shard file")
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(wmap.values())):
        # a plain file name of this folder, as written (a hub cache snapshot's files are links into
        # its blobs/ folder: where a link points does not matter, what the index names does)
        if shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise CheckpointError(f"{index}: shard {shard!r} is not a file of this folder")
        path = folder / shard
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {shard} is missing")
        try:
            part = load(path)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            msg = " ".join(str(e).split())[:120] or type(e).__name__
            raise CheckpointError(f"{path}: unreadable shard ({msg})") from None
        # (an index without an id and a shard with one: a save of this version over an older folder)
        if path.suffix == ".safetensors" and _safetensors_meta(path).get("save_id") != save_id:
            raise CheckpointError(f"{path}: a shard of another save than {index.name} (a save interrupted "
                                  "halfway over an earlier one): save the model again")
        want = {k for k, v in wmap.items() if v == shard}
        if set(part) != want:
            extra, missing = sorted(set(part) - want), sorted(want - set(part))
            raise CheckpointError(f"{path}: does not hold what {index.name} says"
                                  + (f"; also holds {extra[:5]}" if extra else "")
                                  + (f"; lacks {missing[:5]}" if missing else ""))
        sd.update(part)
    return sd


def _safetensors_meta(path: Path) -> dict:
    """The metadata of a safetensors file's header ({} without any)."""
    return safetensors_header(path).get("__metadata__") or {}


def read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Weights of a folder: model.safetensors, sharded safetensors, pytorch_model.bin, or sharded
    pytorch_model-*.bin (each with its ``*.index.json``)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    for f in (single, index):
        if f.is_file() and not os.access(f, os.R_OK):  # safetensors would say "No such file"
            raise CheckpointError(f"{f}: cannot read it (permission denied)")
    try:
        if single.is_file():
            return load_safetensors(single)
        if index.is_file():
            return _read_shards(folder, index, load_safetensors)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip() or type(e).__name__
        where = single if single.is_file() else folder
        raise CheckpointError(f"{where}: unreadable safetensors weights ({msg.splitlines()[0][:120]})") from None
    for name in ("pytorch_model.bin", "model.pth"):
        if (folder / name).is_file():
            return read_pth(folder / name)
    if (folder / "pytorch_model.bin.index.json").is_file():
        return _read_shards(folder, folder / "pytorch_model.bin.index.json", read_pth)
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
                          " (or its index)")


# ---- layout detection and conversion ----------------------------------------------------------
def detect_version(sd: dict[str, torch.Tensor], src) -> str:
    """Which RWKV generation the (BlinkDL-layout) state dict holds; unsupported ones raise."""
    keys = sd.keys()
    has = lambda suffix: any(k.endswith(suffix) for k in keys)  # noqa: E731
    if has("att.time_maa_x") or has("att.time_maa_w1"):
        return "x060"
    if has("att.x_r") or has("att.w0") or has("att.k_k") or has("att.a0"):
        raise CheckpointError(f"{src}: RWKV-7 checkpoint detected (att.w0/att.a0/att.k_k); only RWKV-6 (x060) and RWKV-5.2 (x052) are supported")
    if has("att.time_first") and not has("att.ln_x.weight"):  # time_mix_k (BlinkDL) or time_mix_key (HF)
        raise CheckpointError(f"{src}: RWKV-4 checkpoint detected (time_first, no ln_x); only RWKV-6 (x060) and RWKV-5.2 (x052) are supported")
    if has("att.ln_x.weight"):
        decays = [v for k, v in sd.items() if k.endswith("att.time_decay")]
        per_head = sum(1 for v in decays if v.dim() == 2 and v.shape[1] > 1)  # x052's [H, N] (most layers':
        if has("att.gate.weight") and decays and 2 * per_head >= len(decays):  # one odd layer is mis-shaped)
            if not has("att.time_faaaa"):
                raise CheckpointError(f"{src}: RWKV-5.2 checkpoint with time_first instead of time_faaaa is not supported")
            return "x052"
        raise CheckpointError(f"{src}: RWKV-5.0/5.1 checkpoint detected (no gate or per-channel decay); only x052 and x060 are supported")
    if keys and all(_STATE_KEY.fullmatch(k) for k in keys):
        raise CheckpointError(f"{src}: a state-tuning file (blocks.N.att.time_state only), not a model; load it "
                              "onto the model it was tuned for: from_pretrained(MODEL, state_file=THIS) or "
                              "mmrwkv generate --model MODEL --state THIS")
    raise CheckpointError(f"{src}: not an RWKV checkpoint (no emb/blocks.N.att keys of a known RWKV version)")


_STATE_KEY = re.compile(r"(?:rwkv\.)?blocks\.(\d+)\.att(?:ention)?\.time_state")


_HF_RENAMES = [
    (re.compile(r"^rwkv\.embeddings\."), "emb."),
    (re.compile(r"^rwkv\.blocks\.0\.pre_ln\."), "blocks.0.ln0."),
    (re.compile(r"^rwkv\."), ""),
    (re.compile(r"\.attention\."), ".att."),
    (re.compile(r"\.feed_forward\."), ".ffn."),
    # RWKV-5 (and RWKV-4) spell the static token-shift mixes out: time_mix_key -> time_mix_k
    (re.compile(r"\.time_mix_(k|v|r|g)(?:ey|alue|eceptance|ate)$"), r".time_mix_\1"),
]


def _hf_name_to_blink(k: str) -> str:
    """A Hugging Face RWKV-6/RWKV-5 key name (``rwkv.blocks.N.attention...``) → the BlinkDL name."""
    for pat, rep in _HF_RENAMES:
        k = pat.sub(rep, k)
    return k


def _layers_size(sd: dict[str, torch.Tensor], n_layer: int, *where: tuple[str, int]) -> int:
    """A size as most of the tensors that carry it say, over every layer: ``where`` names them as
    ``(key in blocks.N, dimension)``. A file whose one layer differs is then refused naming that
    layer's keys, not every other layer's; a tie goes to layer 0's first key. KeyError (that key)
    when no layer has any of them, ValueError when none has the dimension."""
    found = [(sd[k], dim) for name, dim in where for i in range(n_layer) if (k := f"blocks.{i}.{name}") in sd]
    if not found:
        raise KeyError(f"blocks.0.{where[0][0]}")
    votes = [t.shape[dim] for t, dim in found if t.dim() > dim]
    if not votes:
        raise ValueError(f"blocks.*.{where[0][0]} has {found[0][0].dim()} dimension(s)")
    return max(dict.fromkeys(votes), key=votes.count)  # (a dict keeps first-seen order for ties)


def infer_config(sd: dict[str, torch.Tensor], src) -> RWKVConfig:
    """Build the config from BlinkDL-layout tensor shapes alone (each size as most layers have it;
    :func:`check_state_keys` then names any layer that differs)."""
    try:
        version = detect_version(sd, src)
        V = sd["emb.weight"].shape[0]
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        n_layer = max(layers) + 1
        size = functools.partial(_layers_size, sd, n_layer)
        try:  # the width as most layers give it (the embedding's alone named every block's tensors
            # mis-shaped when the embedding was the odd one)
            C = size(("ln1.weight", 0), ("att.key.weight", 1), ("ffn.key.weight", 1))
        except KeyError:
            C = sd["emb.weight"].shape[1]
        dim_att = size(("att.key.weight", 0), ("att.value.weight", 0), ("att.receptance.weight", 0),
                       ("att.gate.weight", 0), ("att.output.weight", 1))
        dim_ffn = size(("ffn.key.weight", 0), ("ffn.value.weight", 1))
        H, N = size(("att.time_faaaa", 0)), size(("att.time_faaaa", 1))
        kw = {}
        if version == "x060":
            kw["d_mix_lora"] = size(("att.time_maa_w2", 1))
            kw["d_decay_lora"] = size(("att.time_decay_w1", 1), ("att.time_decay_w2", 0))
    except KeyError as e:
        common = os.path.commonprefix(list(sd))
        common = common[:common.rfind(".") + 1]  # whole dotted names
        hint = (f" (every key starts with '{common}': a wrapper's prefix? the weights' own names start with emb., "
                "blocks., ln_out. and head.)" if common and not common.startswith("blocks.") else "")
        raise CheckpointError(f"{src}: missing key {e.args[0]} needed to infer the model size{hint}") from None
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"{src}: unexpected tensor shape while inferring the model size ({e})") from None
    if H * N != dim_att:
        raise CheckpointError(f"{src}: time_faaaa {H}x{N} does not match dim_att {dim_att}")
    tuned = sum(f"blocks.{i}.att.time_state" in sd for i in range(n_layer))  # as most layers say (the odd one named)
    has_state = 2 * tuned > n_layer or (2 * tuned == n_layer and "blocks.0.att.time_state" in sd)
    try:
        return RWKVConfig(vocab_size=V, n_layer=n_layer, n_embd=C, head_size=N, dim_att=dim_att, dim_ffn=dim_ffn,
                          version=version, has_initial_state=has_state, **kw)
    except ConfigError as e:  # e.g. an embedding of 0 rows
        raise CheckpointError(f"{src}: the sizes its tensors give are not a model ({e})") from None


def _blink_name_to_hf(k: str) -> str:
    """A BlinkDL key name as a Hugging Face-layout RWKV-6 folder spells it (for error messages)."""
    if k == "head.weight":
        return k
    k = re.sub(r"^emb\.", "embeddings.", k)
    k = re.sub(r"^blocks\.0\.ln0\.", "blocks.0.pre_ln.", k)
    return "rwkv." + k.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")


def _our_name(k: str) -> str:
    return k if k == "head.weight" else "rwkv." + k


def blink_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BlinkDL key names → this package's module names (``rwkv.`` prefix, ``head`` on top)."""
    return {_our_name(k): v for k, v in sd.items()}


def _blink_name(k: str) -> str:
    return k[len("rwkv."):] if k.startswith("rwkv.") else k


def ours_to_blink(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_blink_name(k): v for k, v in sd.items()}


def _summarise(names, limit=8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_keys(model, sd: dict[str, torch.Tensor], src, name=None) -> None:
    """Raise a CheckpointError listing the missing, unexpected and mis-shaped keys of ``sd`` for
    ``model`` (which may live on the meta device). ``name`` maps a key to the name the source
    file uses for it (the messages speak the file's language); default: the key itself."""
    name = name or (lambda k: k)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [name(k) for k in set(own) - set(sd)]
    unexpected = [name(k) for k in set(sd) - set(own)]
    misshaped = [f"{name(k)} {tuple(sd[k].shape)}!={own[k]}" for k in set(own) & set(sd) if tuple(sd[k].shape) != own[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_summarise(misshaped)}")
    if problems:
        raise CheckpointError(f"{src}: " + "; ".join(problems))


def load_state_into(model, sd: dict[str, torch.Tensor], src, name=None) -> None:
    """Strict load that reports missing, unexpected and mis-shaped keys by name (see check_state_keys)."""
    check_state_keys(model, sd, src, name)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            p.copy_(sd[k].reshape(p.shape))


def refuse_training_checkpoint(path: Path) -> None:
    """CheckpointError if ``path`` is one of a training run's ``checkpoints/step_*`` folders
    (optimiser and trainer state for resuming, not a model folder)."""
    if (path / "trainer_state.json").is_file() and not (path / "config.json").is_file():
        final = path.parent.parent / "final" if path.parent.name == "checkpoints" else None
        raise CheckpointError(f"{path}: a training checkpoint (for resuming the run), not a model folder; "
                              + (f"the run's model is {final}" if final is not None else "load a run's final/ folder"))


def _load_raw(src, state_file=None):
    """``(config, our-layout state dict, name)`` from any supported source (no model built);
    ``name`` maps one of our key names to the name the source uses for it (error messages).
    ``state_file``: a state-tuning file merged in (see :func:`load_model`)."""
    cfg, sd, name = _load_raw_model(src)
    _check_floats(sd, src, name)
    if state_file is not None:
        cfg = _merge_state_file(cfg, sd, state_file)
    return cfg, sd, name


def _settings(config_dict: dict) -> dict:
    """A config dict without transformers' bookkeeping keys: what RWKVConfig(**...) takes."""
    return {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version", "architectures")}


# a Hugging Face-layout folder's config.json (the RWKV org's rwkv5/rwkv6 repos): its names for the sizes
_HF_SIZES = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "vocab_size": "vocab_size",
             "head_size": "head_size", "attention_hidden_size": "dim_att", "intermediate_size": "dim_ffn"}


def _with_hf_config(cfg: RWKVConfig, hf: dict, cfg_file: Path) -> RWKVConfig:
    """``cfg`` (inferred from the tensors) checked against a Hugging Face-layout ``config.json``:
    a size or version that disagrees is a CheckpointError naming the key (a mixed-up folder); its
    ``layer_norm_epsilon`` and ``head_size_divisor`` are taken, as the hub's modeling code does."""
    kind = str(hf.get("model_type", "")).lower()
    if kind in ("rwkv5", "rwkv6") and kind != {"x060": "rwkv6", "x052": "rwkv5"}[cfg.version]:
        raise CheckpointError(f"{cfg_file}: model_type {hf['model_type']!r}, but the weights are "
                              f"{'RWKV-6 (x060)' if cfg.version == 'x060' else 'RWKV-5 (x052)'}")
    if kind not in ("rwkv5", "rwkv6"):
        return cfg
    for key, ours in _HF_SIZES.items():
        value = hf.get(key)
        if value is not None and value != getattr(cfg, ours):
            raise CheckpointError(f"{cfg_file}: {key} is {value!r}, but the weights have {ours} {getattr(cfg, ours)}")
    kw = {}
    eps = hf.get("layer_norm_epsilon")
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0 and eps != cfg.layer_norm_eps:
        kw["layer_norm_eps"] = float(eps)
    div = hf.get("head_size_divisor")
    if cfg.version == "x052" and isinstance(div, (int, float)) and not isinstance(div, bool) and div > 0 \
            and div != cfg.head_size_divisor:
        kw["head_size_divisor"] = div
    if not kw:
        return cfg
    return RWKVConfig(**{**_settings(cfg.to_dict()), **kw})


def _check_config_against_weights(cfg: RWKVConfig, sd: dict, path: Path, cfg_file: Path) -> None:
    """A size in our folder's config.json that the weights disagree with is a CheckpointError
    naming config.json and the setting (it was a list of the weights' missing and mis-shaped keys,
    as if the weights were wrong). Weights whose sizes cannot be inferred are left to the key check."""
    try:
        inferred = _from_named_weights(sd, path)[0]
    except CheckpointError:
        return
    for key in MODEL_SIZE_KEYS:
        if key in ("head_size_divisor", "layer_norm_eps") or (  # (not in the shapes)
                key in ("d_mix_lora", "d_decay_lora") and cfg.version != "x060"):
            continue
        if getattr(cfg, key) != getattr(inferred, key):
            raise CheckpointError(f"{cfg_file}: {key} is {getattr(cfg, key)!r}, but the weights have "
                                  f"{getattr(inferred, key)!r}")


_VISUALRWKV = ("a VisualRWKV model (vision + language); use it with mmrwkv vqa / eval-vqa or "
               "multimodal_rwkv.vision.VisualRWKV.from_pretrained")


def _load_raw_model(src):
    path = Path(src)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            refuse_training_checkpoint(path)
            raise CheckpointError(f"{path}: folder has no config.json")
        try:
            cfg_dict = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # (a UnicodeDecodeError is a ValueError)
            raise CheckpointError(f"{cfg_file}: unreadable config ({e})") from None
        if not isinstance(cfg_dict, dict):
            raise CheckpointError(f"{cfg_file}: not a JSON object (a model config maps names to values)")
        if cfg_dict.get("model_type") == "visualrwkv":
            raise CheckpointError(f"{path}: {_VISUALRWKV}")
        other = {"rwkv7": "RWKV-7", "rwkv": "RWKV-4"}.get(str(cfg_dict.get("model_type", "")).lower())
        if other:
            raise CheckpointError(f"{path}: {other} model folder detected (config.json model_type "
                                  f"{cfg_dict['model_type']!r}); only RWKV-6 (x060) and RWKV-5.2 (x052) are supported")
        sd = read_folder_weights(path)
        if cfg_dict.get("model_type") == RWKVConfig.model_type:
            cfg_dict = _settings(cfg_dict)
            try:
                cfg = RWKVConfig(**cfg_dict)
            except (TypeError, ValueError, ConfigError, AttributeError) as e:  # (AttributeError: a dtype torch lacks)
                raise CheckpointError(f"{cfg_file}: invalid config ({e})") from None
            _check_config_against_weights(cfg, sd, path, cfg_file)
            if "rwkv.emb.weight" not in sd and "emb.weight" in sd:  # a BlinkDL-layout model.pth (export.pth)
                original = {_our_name(_hf_name_to_blink(k)): k for k in sd}
                return cfg, {o: sd[k] for o, k in original.items()}, lambda k: original.get(k, _blink_name(k))
            return cfg, sd, None
        cfg, ours, name = _from_named_weights(sd, path)  # a Hugging Face-layout RWKV-6/5, or BlinkDL keys
        return _with_hf_config(cfg, cfg_dict, cfg_file), ours, name
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return _from_named_weights(read_pth(path), path)


def _from_named_weights(sd: dict[str, torch.Tensor], path: Path):
    """Config (inferred from shapes), our-layout state dict and the name map for weights named the
    BlinkDL way (``blocks.N.att...``), the Hugging Face way (``rwkv.blocks.N.attention...``) or
    ours (``rwkv.blocks.N.att...``, e.g. a model.safetensors given alone)."""
    if any(k.startswith(("vit.", "proj.")) for k in sd) and any(k.startswith("rwkv.") for k in sd):
        raise CheckpointError(f"{path}: {_VISUALRWKV} (a VisualRWKV-v060 file: rwkv.*, vit.*, proj.* weights)")
    renamed = {k: _hf_name_to_blink(k) for k in sd}  # each key renamed once
    seen: dict[str, str] = {}
    for k, b in renamed.items():  # one weight under two names (HF and BlinkDL/ours): which one is meant?
        if b in seen:
            raise CheckpointError(f"{path}: {seen[b]} and {k} are the same weight under two names; a checkpoint "
                                  "holds each weight once")
        seen[b] = k
    cfg = infer_config({renamed[k]: v for k, v in sd.items()}, path)
    ours = {_our_name(renamed[k]): v for k, v in sd.items()}
    original = {_our_name(b): k for k, b in renamed.items()}  # our name -> the file's
    hf = any(".attention." in k or ".feed_forward." in k or k.startswith("rwkv.embeddings.") for k in sd)
    return cfg, ours, lambda k: original.get(k) or (_blink_name_to_hf(_blink_name(k)) if hf else _blink_name(k))


def load_raw(src, check: bool = False, state_file=None) -> tuple[RWKVConfig, dict[str, torch.Tensor]]:
    """Config and our-layout state dict from any supported source. ``check``: also verify that
    the keys and shapes are exactly those of the model the config describes (built on the meta
    device, no memory), as loading it would. ``state_file``: see :func:`load_model`."""
    cfg, sd, name = _load_raw(src, state_file)
    if check:
        from multimodal_rwkv.model.modeling import RWKVForCausalLM

        with torch.device("meta"):
            model = RWKVForCausalLM(cfg)
        check_state_keys(model, sd, src, name)
    return cfg, sd


def weights_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype a model loaded without ``dtype=`` gets: the floating dtype holding most of the
    weights (not the first tensor's: a bf16 model may carry an fp32 state); float64 as fp32, and
    a dtype a model cannot compute in (float8 kinds) as bf16, which holds every such value."""
    counts: dict[torch.dtype, int] = {}
    for v in sd.values():
        counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    dtype = max(counts, key=counts.get) if counts else torch.float32
    if dtype == torch.float64:
        return torch.float32
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


# the config keys that describe the weights (a checkpoint fixes them) and those a loader may set
MODEL_SIZE_KEYS = ("vocab_size", "n_layer", "n_embd", "head_size", "dim_att", "dim_ffn", "version", "d_mix_lora",
                   "d_decay_lora", "head_size_divisor", "layer_norm_eps", "has_initial_state")
CONFIG_OVERRIDES = ("wkv_backend", "bos_token_id", "eos_token_id", "pad_token_id", "output_hidden_states")


def _apply_config(cfg: RWKVConfig, src, config=None, overrides=None, state_file=None) -> RWKVConfig:
    """``cfg`` (the checkpoint's) with the settings of ``config`` (a config, a dict of its keys, or
    a folder / config.json path, as transformers allows) and ``overrides`` that a loader may
    change (CONFIG_OVERRIDES); a size (MODEL_SIZE_KEYS) that differs from the checkpoint's is a
    CheckpointError, a misspelt or invalid value a ConfigError. With a ``state_file``, the
    checkpoint's own lack of an initial state is no difference."""
    given: dict = {}
    if config is not None:
        if isinstance(config, (str, os.PathLike)):
            if not os.path.exists(config):
                raise CheckpointError(f"{config}: config= names no such file or folder")
            try:
                config = RWKVConfig.from_pretrained(str(config))
            except Exception as e:  # noqa: BLE001 - transformers raises several types
                raise CheckpointError(f"{config}: not a readable RWKV config ({' '.join(str(e).split())[:160]})") from None
        if isinstance(config, dict):
            given.update(config)
        elif isinstance(config, PretrainedConfig):
            given.update({k: getattr(config, k) for k in MODEL_SIZE_KEYS + CONFIG_OVERRIDES if hasattr(config, k)})
        else:
            raise TypeError(f"config= takes a config, a dict of its keys or a config path, not {type(config).__name__}")
    given.update(overrides or {})
    if not given:
        return cfg
    base = _settings(cfg.to_dict())
    want = RWKVConfig.from_dict({**base, **given})  # near-misses, bad values: ConfigError
    skip = {"has_initial_state"} if state_file is not None else set()
    clash = [f"{k} {getattr(want, k)!r} (the checkpoint has {getattr(cfg, k)!r})" for k in MODEL_SIZE_KEYS
             if k in given and k not in skip and getattr(want, k) != getattr(cfg, k)]
    if clash:
        raise CheckpointError(f"{src}: the config given differs from the checkpoint's: {', '.join(clash)}")
    cfg = copy.deepcopy(cfg)
    for k in CONFIG_OVERRIDES:
        if k in given:
            setattr(cfg, k, getattr(want, k))
    return cfg


def load_model(cls, src, dtype=None, device=None, state_file=None, config=None, overrides=None):
    """Build ``cls`` from ``src`` (see :meth:`RWKVForCausalLM.from_pretrained`). ``state_file``: a
    state-tuning file (``blocks.N.att.time_state`` tensors, as BlinkDL releases them) whose
    state becomes the model's initial state. A trained initial state is held in fp32 whatever
    the weights' dtype (the wkv state is fp32)."""
    if state_file is not None and (overrides or {}).get("has_initial_state") is False:
        raise ValueError("has_initial_state=False contradicts state_file= (which gives the model its initial state)")
    cfg, sd, name = _load_raw(src, state_file)
    cfg = _apply_config(cfg, src, config, overrides, state_file)
    dtype = resolve_dtype(dtype) or weights_dtype(sd)
    check_range(sd, dtype, src, name)
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device=device if device is not None else "cpu").to(dtype)
    for m in model.modules():
        if isinstance(getattr(m, "time_state", None), torch.nn.Parameter):
            m.time_state.data = m.time_state.data.float()
    load_state_into(model, sd, src, name)
    _load_generation_config(model, src)
    model.config.dtype = dtype  # what it was loaded as (transformers' from_pretrained does the same)
    model.eval()
    return model


GENERATION_CONFIG = "generation_config.json"


def _generation_settings(gc) -> dict:
    """A GenerationConfig's settings, without the bookkeeping keys transformers adds."""
    return {k: v for k, v in gc.to_diff_dict().items() if k not in ("transformers_version", "_from_model_config")}


def read_generation_config(f):
    """``generation_config.json`` (transformers' file of generation defaults) -> GenerationConfig;
    CheckpointError naming the file if it is not one, or its stop strings are not strings."""
    from transformers import GenerationConfig

    f = Path(f)
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        gc = GenerationConfig.from_dict(d)
    except Exception as e:  # noqa: BLE001 - OSError, JSON and transformers' own errors
        raise CheckpointError(f"{f}: not a readable generation config ({' '.join(str(e).split())[:160]})") from None
    stops = getattr(gc, "stop_strings", None)
    if stops is not None and not (isinstance(stops, str) or isinstance(stops, list)
                                  and all(isinstance(x, str) for x in stops)):
        raise CheckpointError(f"{f}: stop_strings must be a string or a list of strings, got {stops!r}")
    # the sampling values (transformers' own check warns, or fails only when generate samples)
    from multimodal_rwkv.model.generation import check_sampling

    get = lambda key, default: default if getattr(gc, key, None) is None else getattr(gc, key)  # noqa: E731
    try:
        check_sampling(get("temperature", 1.0), get("top_k", 0), get("top_p", 1.0))
        if not isinstance(get("do_sample", False), bool):
            raise ValueError(f"do_sample must be true or false, got {gc.do_sample!r}")
        if get("do_sample", False) and get("temperature", 1.0) == 0:  # (transformers refuses it when sampling)
            raise ValueError("temperature 0 with do_sample true: sampling needs a temperature > 0")
        rp = get("repetition_penalty", 1.0)
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not 0 < rp < float("inf"):
            raise ValueError(f"repetition_penalty must be a number > 0, got {rp!r}")
    except ValueError as e:
        raise CheckpointError(f"{f}: {e}") from None
    return gc


def _load_generation_config(model, src) -> None:
    """A folder's ``generation_config.json`` becomes the model's ``generation_config``."""
    f = Path(src) / GENERATION_CONFIG
    if f.is_file():
        model.generation_config = read_generation_config(f)


def check_range(sd: dict[str, torch.Tensor], dtype: torch.dtype, src, name=None) -> None:
    """CheckpointError if a weight does not fit ``dtype`` (fp16 tops out at 65504: a cast would
    make it infinite, and every output NaN); the trained initial state stays fp32."""
    if dtype != torch.float16:
        return
    top = torch.finfo(dtype).max
    for k, v in sd.items():
        if k.endswith("time_state") or not v.is_floating_point() or not v.numel():
            continue
        big = float(v.detach().abs().max())
        if big > top:
            raise CheckpointError(f"{src}: {(name or (lambda x: x))(k)} holds {big:.4g}, beyond fp16's range "
                                  f"({top:.0f}): load it as bf16 or fp32")


def _all_finite(v: torch.Tensor) -> bool:
    try:
        return bool(torch.isfinite(v).all())
    except (NotImplementedError, RuntimeError):  # float8 kinds: isfinite is not implemented for them
        return bool(torch.isfinite(v.float()).all())


def _check_floats(sd: dict[str, torch.Tensor], src, name=None) -> None:
    """Every RWKV weight is a real floating-point tensor of finite values: an integer, bool or
    complex one is a broken or foreign file (loading would cast it silently and generate
    garbage), a NaN or inf one makes every output NaN. ``name``: our key -> the file's, for the
    message."""
    name = name or (lambda k: k)
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"{src}: {_summarise([name(k) for k in bad], 3)} hold{'s' if len(bad) == 1 else ''} "
                              f"{str(sd[bad[0]].dtype).replace('torch.', '')} values; an RWKV checkpoint's "
                              "tensors are floating point")
    # NaN or inf anywhere makes every output NaN: a corrupt file (or a diverged training run)
    bad = [k for k, v in sd.items() if v.numel() and not _all_finite(v)]
    if bad:
        raise CheckpointError(f"{src}: {_summarise([name(k) for k in bad], 3)} hold{'s' if len(bad) == 1 else ''} "
                              "NaN or infinite values (a corrupt file, or weights of a training run that diverged)")


def _merge_state_file(cfg: RWKVConfig, sd: dict[str, torch.Tensor], state_file) -> RWKVConfig:
    """Add a state-tuning file's ``time_state`` tensors to ``sd`` (our names); the config then
    has an initial state. Each layer's state must be there, shaped ``[n_head, head_size, head_size]``."""
    path = Path(state_file)
    raw = read_pth(path) if not path.is_dir() else None
    if raw is None:
        raise CheckpointError(f"{path}: a folder; state_file is a .pth of blocks.N.att.time_state tensors")
    _check_floats(raw, path)
    layers: dict[int, torch.Tensor] = {}
    for k, v in raw.items():
        m = _STATE_KEY.fullmatch(k)
        if m is None:
            raise CheckpointError(f"{path}: {k} is not a time_state tensor; a state file holds only "
                                  "blocks.N.att.time_state")
        layers[int(m.group(1))] = v
    want = (cfg.n_head, cfg.head_size, cfg.head_size)
    if sorted(layers) != list(range(cfg.n_layer)):
        raise CheckpointError(f"{path}: holds the states of layers {sorted(layers)}; the model has {cfg.n_layer} "
                              "layers (a state file of another model?)")
    for i, v in layers.items():
        if tuple(v.shape) != want:
            raise CheckpointError(f"{path}: blocks.{i}.att.time_state is {tuple(v.shape)}, the model's state is "
                                  f"{want} (a state file of another model?)")
        sd[f"rwkv.blocks.{i}.att.time_state"] = v
    cfg = copy.deepcopy(cfg)
    cfg.has_initial_state = True
    return cfg


def save_model(model, out_dir, state_dict: dict | None = None, max_shard_size: int | str | None = None) -> None:
    """config.json + model.safetensors, each written to a temp file, fsynced and renamed.

    ``state_dict``: the weights to write instead of the model's own (its keys and shapes).
    ``max_shard_size`` (bytes, or transformers' "2GB" / "500MB" strings): weights bigger than that
    are written as ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``
    (transformers' layout); a single file otherwise. Weights of an earlier save in the other
    layout are removed, so the folder never holds two. The generation config is checked before
    anything is written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    gc = getattr(model, "generation_config", None)
    if gc is not None:
        try:
            gc.validate()  # what transformers could not load back (loose settings only warn)
        except ValueError as e:
            raise ValueError(f"the model's generation_config is invalid: {' '.join(str(e).split())}") from None
    _check_config_saves(model)
    own = model.state_dict()
    if state_dict is None:
        state_dict = own
    else:
        _check_state_dict(state_dict, own)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    negative = isinstance(max_shard_size, str) and max_shard_size.strip().startswith("-")  # "-1GB"
    if negative or isinstance(max_shard_size, bool) or (isinstance(max_shard_size, (int, float))
                                                        and not max_shard_size >= 0):  # (NaN too)
        raise ValueError(f"max_shard_size must be a size in bytes (>= 0) or a string such as '2GB', got "
                         f"{max_shard_size!r}")
    try:
        split = split_torch_state_dict_into_shards(
            tensors, max_shard_size="50GB" if max_shard_size is None else max_shard_size)
    except (ValueError, TypeError) as e:
        raise ValueError(f"max_shard_size: {e}") from None
    out = save_folder(out_dir)

    # one id for this save in every shard and in the index: a save killed halfway over an earlier one
    # leaves shards of two saves under the same names, which the loader then refuses (not a mix)
    save_id = os.urandom(8).hex() if split.is_sharded else None
    metadata = {"format": "pt", **({"save_id": save_id} if save_id else {})}

    index = out / "model.safetensors.index.json"
    old_shards = _indexed_shards(index)
    existed = {n for n in split.filename_to_tensors if (out / n).exists()}
    try:
        for name, keys in split.filename_to_tensors.items():
            save_safetensors(out / name, {k: tensors[k] for k in keys}, metadata)
    except BaseException:  # the new layout's files that nothing names yet go again (the old index stays)
        for name in split.filename_to_tensors:
            if name not in existed and name not in old_shards:
                (out / name).unlink(missing_ok=True)
        raise
    if split.is_sharded:
        atomic_write_text(index, json.dumps({"metadata": {**split.metadata, "save_id": save_id},
                                             "weight_map": split.tensor_to_filename}, indent=2, sort_keys=True) + "\n")
        stale = [out / "model.safetensors"] + [out / f for f in old_shards - set(split.filename_to_tensors)]
    else:
        stale = [index] + [out / f for f in old_shards]
    for f in stale:
        if f.is_file():
            f.unlink()
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = str(weights_dtype(tensors)).replace("torch.", "")  # as transformers: what the weights are
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # generation defaults set on the model (transformers' generation_config.json); a stale one goes
    if gc is not None:
        from transformers import GenerationConfig

        if _generation_settings(gc) != _generation_settings(GenerationConfig.from_model_config(model.config)):
            atomic_write_text(out / GENERATION_CONFIG, gc.to_json_string())
        elif (out / GENERATION_CONFIG).is_file():
            (out / GENERATION_CONFIG).unlink()


def _check_config_saves(model) -> None:
    """The config as :func:`load_model` will read it back, before anything is written: a config
    edited after the model was built (``config.update({"n_layers": 3})``, ``config.version =
    "x070"``, ``config.head_size = 32``) or a model whose layers were changed (LoRA not merged)
    would be saved beside weights it cannot load: the weights a model of the config has (built on
    the meta device, no memory) must be the model's, name for name and shape for shape."""
    cfg = model.config
    try:
        again = RWKVConfig(**_settings(cfg.to_dict()))
    except (TypeError, ValueError, ConfigError) as e:
        raise ConfigError(f"the model's config is invalid, nothing written ({e})") from None
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in type(model)(again).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if bad:
        k = bad[0]
        said = "none" if k not in want else want[k]
        has = "none" if k not in have else have[k]
        raise ConfigError(f"the model's config does not describe its weights ({len(bad)} differ; {k}: the config "
                          f"gives {said}, the model has {has}): nothing written (a config changed after the model "
                          "was built, or LoRA layers not merged?)")


def _check_state_dict(given, own) -> None:
    """A ``state_dict`` given to save must have the model's keys and shapes (ValueError naming them)."""
    if not isinstance(given, dict) or not all(isinstance(v, torch.Tensor) for v in given.values()):
        raise ValueError("state_dict must be a dict of tensor name -> tensor")
    missing = sorted(set(own) - set(given))
    extra = sorted(set(given) - set(own))
    shapes = sorted(k for k in set(own) & set(given) if tuple(given[k].shape) != tuple(own[k].shape))
    problems = ([f"missing keys {missing[:5]}"] if missing else []) + ([f"unexpected keys {extra[:5]}"] if extra else [])
    problems += [f"{k}: shape {tuple(given[k].shape)}, the model's is {tuple(own[k].shape)}" for k in shapes[:5]]
    if problems:
        raise ValueError("state_dict does not fit the model: " + "; ".join(problems))


def _indexed_shards(index: Path) -> set[str]:
    """The shard files an existing ``model.safetensors.index.json`` of this folder names (plain
    names only; an unreadable index names none)."""
    try:
        wmap = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {f for f in wmap.values() if isinstance(f, str) and f == Path(f).name and f.endswith(".safetensors")
                and f != "model.safetensors"}
    except (OSError, ValueError, AttributeError):
        return set()


def save_blink_pth(model, path) -> None:
    """Write the model as an official BlinkDL ``.pth`` (flat state dict, official key names)."""
    sd = {k: v.detach().contiguous().cpu() for k, v in ours_to_blink(model.state_dict()).items()}
    atomic_write(path, lambda tmp: torch.save(sd, str(tmp)))
