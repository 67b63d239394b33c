"""Parameter-efficient fine-tuning: LoRA on linear layers, state tuning, freezing by name pattern.

- LoRA (Hu et al.): ``y = x W^T + (alpha / r) * x A^T B^T`` with ``A [r, in]`` (Kaiming-uniform)
  and ``B [out, r]`` (zeros), so training starts from the base model. :func:`merge_lora` folds
  ``(alpha/r) * B A`` into ``W`` and turns the layer back into a plain ``nn.Linear``.
- State tuning (RWKV-LM ``--train_type states``): train only each layer's initial WKV state.
  Exported as ``blocks.L.att.time_state`` ``[H, N, N]`` in the official *value-major* layout
  (element ``[h, i, j]`` = value i, key j), the transpose of this package's key-major state.
- Freezing: ``freeze``/``trainable`` are fnmatch patterns over parameter names (``blocks.0.*``,
  ``*.ln*``); ``trainable`` wins over ``freeze``.
"""
from __future__ import annotations

import fnmatch
import logging
import math

import torch
from torch import nn

from multimodal_rwkv.errors import ConfigError

logger = logging.getLogger(__name__)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a low-rank update; keeps the base ``weight`` name so checkpoints line up.

    Shapes: ``weight [out, in]``, ``lora_A [r, in]``, ``lora_B [out, r]``; input ``[..., in]``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        lora = nn.functional.linear(nn.functional.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)),
                                    self.lora_B.to(x.dtype))
        return y + lora * self.scaling

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + (alpha/r) B A`` (computed in fp32)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            lin.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(self.weight.requires_grad)
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}"


def _matches(name: str, patterns) -> bool:
    """``name`` matches a pattern if fnmatch does on the whole name or on a tail of it that starts at
    a module boundary (``blocks.0.*`` matches ``rwkv.blocks.0.att.key.weight``)."""
    for p in patterns:
        if name == p or fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p):
            return True
    return False


def _set_module(root: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def apply_lora(model: nn.Module, r: int, alpha: float, targets, dropout: float = 0.0) -> list[str]:
    """Replace every ``nn.Linear`` whose module name matches ``targets`` with :class:`LoRALinear`.

    Returns the wrapped module names; ConfigError if a target matches no linear layer (a misspelt
    target is a mistake, not a no-op, as for ``peft.freeze``/``peft.trainable`` patterns).
    """
    from multimodal_rwkv.argtypes import integer_number

    if (integer_number(r) or 0) < 1:
        raise ConfigError(f"peft.lora_r: LoRA needs a rank >= 1, got {r!r}")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [t for t in targets if not any(_matches(n, [t]) for n in linears)]
    if unmatched or not linears:
        raise ConfigError(f"peft.lora_targets {unmatched or list(targets)} match no linear layer; linear layers "
                          f"look like {linears[:8]}")
    names = [n for n in linears if not isinstance(model.get_submodule(n), LoRALinear) and _matches(n, targets)]
    if not names:
        raise ConfigError(f"peft.lora_targets {list(targets)} match no linear layer without LoRA; linear layers "
                          f"look like {linears[:8]}")
    for n in names:
        _set_module(model, n, LoRALinear(model.get_submodule(n), r, alpha, dropout))
    logger.info("LoRA r=%d alpha=%g on %d linear layers", r, alpha, len(names))
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every :class:`LoRALinear` back into a plain ``nn.Linear`` in place; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        _set_module(model, n, model.get_submodule(n).merged_linear())
    return len(names)


def export_lora_adapter(model: nn.Module, peft, out_dir) -> None:
    """The LoRA matrices alone: ``lora_adapter.safetensors`` (``<layer>.lora_A`` ``[r, in]``,
    ``<layer>.lora_B`` ``[out, r]``) and ``lora_adapter.json`` (r, alpha, scaling, targets), for
    ``peft.merge_lora: false`` (the model folder itself holds the merged weights)."""
    import json
    from pathlib import Path

    from multimodal_rwkv.fileio import save_safetensors

    tensors = {n: p.detach().contiguous().cpu() for n, p in model.state_dict().items() if is_lora_param(n)}
    out = Path(out_dir)
    # (atomic: the usual mode for a new file; save_file alone makes it 0600, unlike the rest of final/)
    save_safetensors(out / "lora_adapter.safetensors", tensors, {"format": "pt"})
    info = {"r": peft.lora_r, "alpha": peft.lora_alpha, "scaling": peft.lora_alpha / peft.lora_r,
            "targets": list(peft.lora_targets), "formula": "W + scaling * lora_B @ lora_A"}
    (out / "lora_adapter.json").write_text(json.dumps(info, indent=1) + "\n")


def is_lora_param(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B")


def is_state_param(name: str) -> bool:
    """The trainable initial state (named ``time_state`` / ``initial_state`` by the core)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("time_state", "initial_state") or ".initial_state." in name or "initial_state" in leaf


def select_trainable(model: nn.Module, peft, task_filter=None) -> tuple[int, int]:
    """Set ``requires_grad`` from the PEFT settings. Order of precedence (last wins):
    everything trainable → LoRA / state tuning restrict to their parameters → ``freeze`` patterns →
    ``trainable`` patterns → the task's ``trainable_filter``.

    Returns ``(n_trainable, n_total)`` parameter counts; ConfigError if nothing is trainable.
    """
    names = [n for n, _ in model.named_parameters()]
    for key in ("freeze", "trainable"):  # a pattern that matches nothing is a mistake, not a no-op
        for pat in getattr(peft, key):
            if not any(_matches(n, [pat]) for n in names):
                raise ConfigError(f"peft.{key}: pattern {pat!r} matches no parameter (names look like "
                                  f"{names[0]!r}, {names[len(names) // 2]!r})")
    restrict = peft.lora_r > 0 or peft.train_state
    for n, p in model.named_parameters():
        on = True
        lora = peft.lora_r > 0 and is_lora_param(n)
        # what a PEFT setting asked of this parameter in so many words, and which one
        asked = "peft.lora_r (a LoRA adapter)" if lora else None
        if restrict:
            on = lora or (peft.train_state and is_state_param(n))
        if peft.freeze and _matches(n, peft.freeze):
            on, asked = False, "peft.freeze"
        if peft.trainable and _matches(n, peft.trainable):
            on, asked = True, "peft.trainable"
        if task_filter is not None:
            forced = task_filter(n, p)
            if forced is not None and asked is not None and bool(forced) != on:
                # overriding it silently would train (or export as zeros) what the recipe did not ask
                who = getattr(getattr(task_filter, "__self__", None), "trainable_options", "the task's settings")
                raise ConfigError(f"{asked} asks for {n} to be {'trained' if on else 'frozen'}, but the task "
                                  f"{'freezes' if not forced else 'trains'} it ({who} decide that)")
            if forced is not None:
                on = bool(forced)
        p.requires_grad_(on)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if n_train == 0:
        raise ConfigError("no trainable parameters left after peft settings (check peft.freeze / peft.trainable)")
    logger.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_total, 100.0 * n_train / max(n_total, 1))
    return n_train, n_total


def state_key_major_to_official(s: torch.Tensor) -> torch.Tensor:
    """``[H, K, V]`` key-major (this package) -> ``[H, V, K]`` value-major (``time_state``)."""
    return s.transpose(-1, -2).contiguous()


def state_official_to_key_major(s: torch.Tensor) -> torch.Tensor:
    """``time_state`` ``[H, V, K]`` value-major -> ``[H, K, V]`` key-major."""
    return s.transpose(-1, -2).contiguous()


def _time_mix_modules(model: nn.Module):
    """The core's TimeMix modules (``...blocks.L.att``) in layer order."""
    base = getattr(model, "rwkv", model)
    blocks = getattr(base, "blocks", None)
    if blocks is None:
        raise ConfigError(f"peft.train_state: {type(model).__name__} has no RWKV blocks at .rwkv.blocks or "
                          ".blocks (state tuning trains a language model's initial state)")
    return [b.att for b in blocks]


def enable_state_tuning(model: nn.Module) -> int:
    """Give every layer a trainable initial WKV state ``att.time_state`` ``[H, N, N]``
    (official value-major layout; zeros, i.e. the plain model, unless the checkpoint had one).
    Sets ``config.has_initial_state`` so the exported folder reloads with it. Returns the layer count."""
    atts = _time_mix_modules(model)
    for att in atts:
        if getattr(att, "time_state", None) is None:
            ref = att.time_faaaa
            H, N = att.n_head, att.head_size
            att.time_state = nn.Parameter(torch.zeros(H, N, N, device=ref.device, dtype=torch.float32))
    model.config.has_initial_state = True
    for att in atts:  # TimeMix keeps its own reference to the config; make sure it agrees
        if getattr(att, "config", None) is not None and att.config is not model.config:
            att.config.has_initial_state = True
    return len(atts)


def time_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"blocks.L.att.time_state": [H, N, N] value-major fp32}`` (the official state-tuning file)."""
    out = {}
    for i, att in enumerate(_time_mix_modules(model)):
        ts = getattr(att, "time_state", None)
        if ts is None:
            raise ConfigError("model has no time_state (state tuning was not enabled)")
        out[f"blocks.{i}.att.time_state"] = ts.detach().float().contiguous().cpu()
    return out


def export_time_state(model: nn.Module, path) -> None:
    """Write only the tuned states as a ``.pth`` (``blocks.L.att.time_state``, value-major)."""
    from multimodal_rwkv.fileio import atomic_write

    sd = time_state_dict(model)
    atomic_write(path, lambda tmp: torch.save(sd, str(tmp)))


def export_blinkdl_pth(model: nn.Module, path) -> None:
    """Write the whole model (with ``time_state`` if state-tuned) as an official BlinkDL ``.pth``."""
    from multimodal_rwkv.model.checkpoint import save_blink_pth

    save_blink_pth(model, path)
