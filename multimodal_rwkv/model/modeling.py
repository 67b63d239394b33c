"""RWKV-6 "Finch" (x060) and RWKV-5 "Eagle" (x052) language models, one readable file.

Parameter names and shapes follow the official BlinkDL checkpoints, prefixed with ``rwkv.``
(``head.weight`` stays at the top), so loading an official ``.pth`` is a rename, not a reshape.

The parallel form (a whole sequence at once) and the recurrent form (token by token) are the
same code: every block takes the recurrent state in and gives it out, and the WKV recurrence is
:func:`multimodal_rwkv.kernels.wkv6`, whose backends are tested against a step-by-step reference.
"""
from __future__ import annotations

import copy

import functools
import json
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from multimodal_rwkv.kernels import cpu, wkv6
from multimodal_rwkv.model.config import RWKVConfig
from multimodal_rwkv.model.generation import MAX_TEMPERATURE, MIN_TEMPERATURE
from multimodal_rwkv.model.lean import ChannelMixLean, DDLerpProject, NormGatedOutput, stack_mix
from multimodal_rwkv.model.state import RWKVState

logger = logging.getLogger(__name__)


@dataclass
class RWKVOutput(ModelOutput):
    """``loss`` (if labels given), ``logits`` ``[B, T', V]``, ``state`` after the last token and,
    with ``output_hidden_states=True``, ``hidden_states``: the embeddings and each block's output
    (``[B, T, C]`` each, n_layer + 1 of them; the last after ``ln_out``, transformers' convention)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: RWKVState | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cache: RWKVState | None = None  # ``state`` again with ``use_cache=True`` (read by transformers' guidance)


@dataclass
class RWKVModelOutput(ModelOutput):
    """:class:`RWKVModel`'s output (transformers' base-model convention): ``last_hidden_state``
    ``[B, T', C]`` (after ``ln_out``), ``state`` after the last token and, with
    ``output_hidden_states=True``, ``hidden_states`` (the embeddings and each block's output)."""

    last_hidden_state: torch.Tensor | None = None
    state: RWKVState | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


_FEW_ROWS = 16  # up to this many rows, a CPU fp32 matrix product is memory-bound (decode)


@functools.lru_cache(maxsize=None)
def _row_blocks(out_features: int, threads: int, rows: int) -> int:
    """How many row blocks of the weight to give ``bmm``: one per thread for a single row (the
    weight is read once, split across threads); for 2-16 rows, blocks of about 1024 output rows
    (a multiple of the thread count that divides the output size), which keeps each block's
    product in cache (65536x768 head, 8 rows, 2 threads: 18.3 ms as one product, 12.6 ms in 64
    blocks). 0: no split fits. Cached: it runs for every projection of every decoded token, and
    the divisor search can take thousands of steps for an output size with few even divisors."""
    if out_features % threads:
        return 0
    if rows == 1:
        return threads
    target = max(threads, out_features // 1024)
    for nb in range(target, out_features + 1):
        if out_features % nb == 0 and nb % threads == 0:
            return nb
    return threads


class Linear(nn.Linear):
    """``nn.Linear`` whose few-row case reads the weight on every CPU thread.

    Decoding multiplies a handful of rows by each weight matrix, so the time is the time to read
    the weight. On a CPU in fp32, MKL runs that product on one thread however many torch has
    (measured on 2 cores: the 65536x768 head takes 15.4 ms with 1 or 2 threads, ~13 GB/s).
    With rows <= 16 and several threads, the weight's output rows are cut into blocks
    (:func:`_row_blocks`) and the product is one ``bmm``, which runs its batch in parallel: the
    head takes 5.5-6 ms for one row. For 2-16 rows without autograd, the C++ kernel of
    :mod:`multimodal_rwkv.kernels.cpu` reads the weight once for all rows (8 rows: 8.8 ms
    instead of 13); in bf16 it serves 1-16 rows on CPUs with AVX512-BF16 (where torch's own bf16
    product of one row reads the weight at half the speed). Each output is the same dot product;
    only the summation order inside it may differ. More rows in fp32 on a CPU go through oneDNN
    (:func:`multimodal_rwkv.kernels.cpu.linear`, 1.1-1.5x MKL's speed here); other cases (fp16,
    CUDA, one thread, bf16 without the kernel) call ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.bias is None and x.device.type == "cpu" and x.numel() <= _FEW_ROWS * x.shape[-1]:
            out_f, in_f = w.shape
            rows = x.reshape(-1, in_f)
            if rows.shape[0] > 1 or x.dtype == torch.bfloat16:
                y = cpu.few_rows_linear(rows, w)  # None where the kernel does not apply
                if y is not None:
                    return y.reshape(*x.shape[:-1], out_f)
            n = torch.get_num_threads()
            if x.dtype == w.dtype == torch.float32 and w.is_contiguous() and n > 1 and rows.shape[0] > 0:
                nb = _row_blocks(out_f, n, rows.shape[0])
                if nb:
                    wb = w.view(nb, out_f // nb, in_f)
                    if rows.shape[0] == 1:  # [nb, out/nb, 1]: already in output order
                        y = torch.bmm(wb, rows.t().unsqueeze(0).expand(nb, -1, -1)).reshape(1, out_f)
                    else:
                        y = torch.bmm(rows.unsqueeze(0).expand(nb, -1, -1), wb.transpose(1, 2))
                        y = y.transpose(0, 1).reshape(rows.shape[0], out_f)
                    return y.reshape(*x.shape[:-1], out_f)
        return cpu.linear(x, w, self.bias)


# Training (autograd recording) uses the memory-lean forms of model/lean.py where they apply; the
# plain forms below are their reference (tests set this to False to compare the two).
LEAN_TRAINING = True


def _lean(x: torch.Tensor, *linears: nn.Module) -> bool:
    """Whether a block part may take its lean form: gradients are being recorded, no autocast, and
    every projection is a plain bias-free :class:`Linear` of ``x``'s dtype (not LoRA-wrapped), on
    a real device (meta tensors, shapes only, take the plain form)."""
    return (LEAN_TRAINING and torch.is_grad_enabled() and x.device.type != "meta"
            and not torch.is_autocast_enabled(x.device.type)
            and all(type(m) is Linear and m.bias is None and m.weight.dtype == x.dtype for m in linears)
            and (x.requires_grad or any(m.weight.requires_grad for m in linears)))


def _check_scan_order(order, B: int, T: int) -> None:
    """``order`` must be a ``[B, T]`` integer tensor holding a permutation of ``0..T-1`` in each row
    (anything else would leave positions of the reordered stream unset)."""
    if not isinstance(order, torch.Tensor) or order.dtype.is_floating_point or order.dtype.is_complex \
            or order.dtype == torch.bool or tuple(order.shape) != (B, T):
        what = f"{order.dtype} {tuple(order.shape)}" if isinstance(order, torch.Tensor) else type(order).__name__
        raise ValueError(f"scan_order must be a [B, T] = [{B}, {T}] integer tensor, got {what}")
    want = torch.arange(T, device=order.device)
    if not bool((order.sort(dim=1).values == want).all()):
        raise ValueError(f"scan_order must hold a permutation of 0..{T - 1} in every row")


def _logits_to_keep(keep, T: int):
    """transformers' ``logits_to_keep``: an int k (0: every position, k > 0: the last k) -> k, or a
    1-D integer tensor of positions to keep -> that tensor (checked against ``T``). Anything else
    is a TypeError/ValueError naming what it got."""
    if isinstance(keep, torch.Tensor):
        if keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dtype == torch.bool or keep.dim() > 1:
            raise TypeError(f"logits_to_keep: an int or a 1-D integer tensor of positions, got a {keep.dim()}-D "
                            f"{keep.dtype} tensor")
        if keep.dim() == 0:
            keep = int(keep)
        else:
            if keep.numel() and not (-T <= int(keep.min()) and int(keep.max()) < T):
                raise ValueError(f"logits_to_keep: positions must be in [-{T}, {T}) for {T} tokens, got "
                                 f"{keep.tolist()}")
            return keep.long()
    if isinstance(keep, bool) or not hasattr(keep, "__index__"):
        raise TypeError(f"logits_to_keep: an int or a 1-D integer tensor of positions, got {keep!r}")
    keep = keep.__index__()
    if keep < 0:
        raise ValueError(f"logits_to_keep must be >= 0 (0: every position), got {keep}")
    return keep


def _kept_positions(hidden: torch.Tensor, keep) -> torch.Tensor:
    """``hidden[:, positions]`` for a ``logits_to_keep`` already checked by :func:`_logits_to_keep`."""
    if isinstance(keep, torch.Tensor):
        return hidden[:, keep.to(hidden.device)]
    return hidden[:, -keep:] if keep else hidden


def keep_logit_positions(hidden: torch.Tensor, keep) -> torch.Tensor:
    """``hidden[:, positions]`` for a ``logits_to_keep`` (see :func:`_logits_to_keep`)."""
    return _kept_positions(hidden, _logits_to_keep(keep, hidden.shape[1]))


def _check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """``[B, T]`` integer ids with T >= 1, inside the vocabulary (checked on CPU, where it costs
    nothing; on CUDA the check would wait for the device at every step)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"input_ids must be a [B, T] tensor with T >= 1, got {shape}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer ids, got {ids.dtype}")
    if ids.device.type == "cpu" and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"input_ids hold id {lo if lo < 0 else hi}, outside the model's vocabulary "
                             f"[0, {vocab_size})")


def _check_state_shapes(state, config, B: int) -> None:
    """Every layer's token shifts ``[B, C]`` and WKV state ``[B, H, K, V]`` (the kernels read them
    by these sizes: a state of another model must be refused, not read past its end)."""
    H, N, C = config.n_head, config.head_size, config.n_embd
    for i, (a, w, f) in enumerate(zip(state.att_shift, state.wkv, state.ffn_shift)):
        for what, t, want in (("att_shift", a, (B, C)), ("wkv", w, (B, H, N, N)), ("ffn_shift", f, (B, C))):
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"state layer {i} {what} has shape {tuple(t.shape)}, this model needs {want} "
                                 f"([B, C] token shifts, [B, H, K, V] WKV state)")


def _apply_pad_mask(x: torch.Tensor, prev: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A pad position takes the value of the last token before it (``prev``, the incoming token
    shift, if none): the token after a pad then shifts in the token before the pad, and the last
    position carries the last token's value into the state, wherever the pads are (left, right,
    between tokens). With left padding every pad simply takes ``prev``."""
    if mask is None:
        return x
    B, T = mask.shape
    pos = torch.arange(T, device=mask.device).expand(B, T)
    last = torch.where(mask, pos, -1).cummax(dim=1).values  # last token position <= t, -1 if none
    x = x.gather(1, last.clamp(min=0).unsqueeze(-1).expand_as(x))  # (no host sync to test for gaps)
    return torch.where((last >= 0).unsqueeze(-1), x, prev.unsqueeze(1).to(x.dtype))


class TimeMix(nn.Module):
    """RWKV-6 time mixing (x060: ddlerp + data-dependent decay) or RWKV-5 (x052: static)."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        self.v6 = config.version == "x060"
        C, A, H, N = config.n_embd, config.dim_att, config.n_head, config.head_size
        self.n_head, self.head_size = H, N
        if self.v6:
            R, D = config.d_mix_lora, config.d_decay_lora
            for name in ("x", "w", "k", "v", "r", "g"):
                setattr(self, f"time_maa_{name}", nn.Parameter(torch.zeros(1, 1, C)))
            self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * R))
            self.time_maa_w2 = nn.Parameter(torch.zeros(5, R, C))
            self.time_decay = nn.Parameter(torch.zeros(1, 1, A))
            self.time_decay_w1 = nn.Parameter(torch.zeros(C, D))
            self.time_decay_w2 = nn.Parameter(torch.zeros(D, A))
            self.gn_eps = 1e-5 * config.head_size_divisor**2
        else:
            for name in ("k", "v", "r", "g"):
                setattr(self, f"time_mix_{name}", nn.Parameter(torch.zeros(1, 1, C)))
            self.time_decay = nn.Parameter(torch.zeros(H, N))
            self.gn_eps = 1e-5
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        if config.has_initial_state:
            # official layout: value-major [H, V, K] (see reference notes §1.3)
            self.time_state = nn.Parameter(torch.zeros(H, N, N))
        self.receptance = Linear(C, A, bias=False)
        self.key = Linear(C, A, bias=False)
        self.value = Linear(C, A, bias=False)
        self.gate = Linear(C, A, bias=False)
        self.output = Linear(A, C, bias=False)
        self.ln_x = nn.GroupNorm(H, A, eps=self.gn_eps)

    def initial_wkv(self, batch_size: int) -> torch.Tensor | None:
        """The trained initial state (state tuning) as key-major ``[B,H,K,V]`` fp32, or None."""
        if not self.config.has_initial_state:
            return None
        return self.time_state.transpose(1, 2).float().unsqueeze(0).expand(batch_size, -1, -1, -1)

    def forward(self, x, shift, wkv_state, mask=None, tail=None, out_scale: float = 1.0):
        """x: ``[B,T,C]`` ln1 output; shift ``[B,C]``; wkv_state ``[B,H,K,V]`` fp32 or None.

        Returns ``(out [B,T,C], new_shift [B,C], new_wkv [B,H,K,V])``. ``tail``: only the last
        ``tail`` positions of ``out`` are wanted (``out`` is ``[B,tail,C]``): the receptance, gate
        and output products run on those alone (the state needs k, v and the decay of every
        position, never r). Inference only (the caller checks). ``out_scale``: ``out`` times this,
        applied to the output product's input (fp16 rescaling, see :data:`FP16_RESCALE_LAYER`).
        """
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        x = _apply_pad_mask(x, shift, mask)
        lean = self.v6 and _lean(x, self.receptance, self.key, self.value, self.gate)
        decay = None  # the decay factors exp(logw) where computed directly
        if lean:
            r, k, v, gate_pre, logw = DDLerpProject.apply(
                x, shift, self.time_maa_x, self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r,
                self.time_maa_g, self.time_maa_w1, self.time_maa_w2, self.receptance.weight, self.key.weight,
                self.value.weight, self.gate.weight, self.time_decay, self.time_decay_w1, self.time_decay_w2)
            r, k, v, logw = r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N), logw.view(B, T, H, N)
        elif self.v6:
            xxx = cpu.mix(x, shift, stack_mix(self.time_maa_x))[0]
            th = torch.tanh(cpu.linear(xxx, self.time_maa_w1.t()))
            maas = stack_mix(self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g)
            # x_i = x + (prev - x) * (maa_i + m_i), m_i the data-dependent offsets (slots w, k, v, r, g)
            xw, xk, xv, xr, xg = (xi.view(B, T, C) for xi in cpu.mix_lora(x, shift, maas, th, self.time_maa_w2))
            wy = cpu.linear(torch.tanh(cpu.linear(xw, self.time_decay_w1.t())), self.time_decay_w2.t())
            # inference on CPU: the decay factors exp(-exp(decay + wy)) in one pass, for the WKV kernel
            # as they are (the log-decay is never formed); elsewhere the log-decay for wkv6
            decay = (cpu.decay_factors(wy, self.time_decay)
                     if mask is None and self.config.wkv_backend in ("auto", "cpu") else None)
            if decay is None:
                logw = -torch.exp((self.time_decay + wy).float()).view(B, T, H, N)
        else:
            # x * mix + prev * (1 - mix) == x + (prev - x) * (1 - mix)
            mus = 1 - stack_mix(self.time_mix_k, self.time_mix_v, self.time_mix_r, self.time_mix_g)
            xk, xv, xr, xg = (xi.view(B, T, C) for xi in cpu.mix(x, shift, mus))
            logw = (-torch.exp(self.time_decay.float())).view(1, 1, H, N).expand(B, T, H, N)
        if not lean:
            k = self.key(xk).view(B, T, H, N)
            v = self.value(xv).view(B, T, H, N)
            if tail is not None and tail < T:  # r = 0 elsewhere: outputs there are not wanted
                r = k.new_zeros(B, T, H, N)
                r[:, T - tail:] = self.receptance(xr[:, T - tail:]).view(B, tail, H, N)
                gate_pre = self.gate(xg[:, T - tail:])
            else:
                r = self.receptance(xr).view(B, T, H, N)
                gate_pre = self.gate(xg)
        if mask is not None:  # pads add nothing to the state and do not decay it
            m4 = mask.view(B, T, 1, 1)
            k = k * m4.to(k.dtype)
            logw = logw * m4.to(logw.dtype)
        if wkv_state is None:
            wkv_state = self.initial_wkv(B)
        half = r.dtype == torch.float16
        if half:  # the WKV output and its GroupNorm in fp32, as the official fp16 strategies: y can pass 65504
            r = r.float()
        done = decay is not None and cpu.wkv6_cpu_decayed(r, k, v, decay.view(B, T, H, N), self.time_faaaa, wkv_state)
        if done:
            y, new_wkv = done
        else:
            if decay is not None:  # the kernel did not take these inputs after all: the log-decay
                logw = -torch.exp((self.time_decay + wy).float()).view(B, T, H, N)
            y, new_wkv = wkv6(
                r, k, v, logw.to(r.dtype) if r.dtype == torch.float64 else logw.float(), self.time_faaaa.to(r.dtype),
                initial_state=wkv_state, output_final_state=True, backend=self.config.wkv_backend,
            )
        Tout = gate_pre.shape[1]
        y = y[:, T - Tout:].reshape(B * Tout, H * N)
        div = 1 if self.v6 else self.config.head_size_divisor
        if out_scale == 1.0 and _lean(y, self.output):
            out = NormGatedOutput.apply(y, gate_pre, self.ln_x.weight, self.ln_x.bias, self.output.weight, H,
                                        self.gn_eps, div)
        else:
            # GroupNorm(y / div, eps) == GroupNorm(y, eps * div^2); an fp16 model's in fp32 (see above)
            cd = torch.float32 if half else gate_pre.dtype
            z = cpu.gn_gate(y.to(cd), gate_pre.reshape(B * Tout, -1).to(cd), self.ln_x.weight.to(cd),
                            self.ln_x.bias.to(cd), H, self.gn_eps * div * div)
            if out_scale != 1.0:
                z = z * out_scale
            out = self.output(z.to(gate_pre.dtype).view(B, Tout, -1))
        return out, x[:, -1], new_wkv


class ChannelMix(nn.Module):
    """RWKV channel mixing: ``sigmoid(r) * value(relu(key(x_k))^2)`` with token shift."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        self.v6 = config.version == "x060"
        C, F_ = config.n_embd, config.dim_ffn
        if self.v6:
            self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
            self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        else:
            self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
            self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = Linear(C, F_, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(F_, C, bias=False)

    def forward(self, x, shift, mask=None, out_scale: float = 1.0):
        """``out_scale``: the output times this, applied to the value product's input (fp16
        rescaling, see :data:`FP16_RESCALE_LAYER`)."""
        x = _apply_pad_mask(x, shift, mask)
        if out_scale == 1.0 and _lean(x, self.key, self.receptance, self.value):
            mu_k, mu_r = ((self.time_maa_k, self.time_maa_r) if self.v6
                          else (1 - self.time_mix_k, 1 - self.time_mix_r))
            out = ChannelMixLean.apply(x, shift, mu_k, mu_r, self.key.weight, self.receptance.weight,
                                       self.value.weight)
            return out, x[:, -1]
        B, T, C = x.shape
        mus = (stack_mix(self.time_maa_k, self.time_maa_r) if self.v6
               else 1 - stack_mix(self.time_mix_k, self.time_mix_r))
        xk, xr = (xi.view(B, T, C) for xi in cpu.mix(x, shift, mus))
        if torch.is_grad_enabled():
            k = torch.relu(self.key(xk)).square()
            if out_scale != 1.0:
                k = k * out_scale
            return torch.sigmoid(self.receptance(xr)) * self.value(k), x[:, -1]
        k = self.key(xk).relu_().square_()  # in place: no fresh buffers to page-fault in
        if out_scale != 1.0:
            k.mul_(out_scale)
        return self.receptance(xr).sigmoid_().mul_(self.value(k)), x[:, -1]


# Decoding (one token per row, fp32 or bf16 on a CPU, no gradients) runs each block as one C++ call
# (Block.decode_step), not through the block's forward (so forward hooks on blocks do not run for
# those tokens); set this to False for the blocks' own forward (the tests compare the two).
FAST_DECODE = True
# In fp16 the residual stream of a deep model outgrows fp16's range (65504): as the official package
# (its RESCALE_LAYER for fp16 strategies), it is halved after every this many blocks, and each
# block's additions scaled to match (the norms are scale-invariant, so the outputs do not change).
FP16_RESCALE_LAYER = 6
_NO_TENSOR = torch.empty(0)


class Block(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        C, eps = config.n_embd, config.layer_norm_eps
        self.eps = eps
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C, eps=eps)
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ln2 = nn.LayerNorm(C, eps=eps)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config, layer_id)
        self._fp32_copies: dict = {}  # decode_step's fp32 copies of a low-precision model's small parameters

    def train(self, mode: bool = True):
        self._fp32_copies.clear()  # parameters may have changed in place (see _fp32)
        return super().train(mode)

    def _fp32(self, p: torch.Tensor) -> torch.Tensor:
        """``p`` in fp32: itself, or a copy kept until ``p`` changes (its version or storage), or
        until the next forward that is not a one-token decode, a switch of ``train`` mode or
        ``generate()``: an in-place change that leaves the version alone (a fused optimiser
        step, an edit through ``.data``) is seen from then on."""
        if p.dtype == torch.float32:
            return p
        hit = self._fp32_copies.get(id(p))
        if hit is None or hit[0] is not p or hit[1] != (p._version, p.data_ptr()):
            if len(self._fp32_copies) > 64:  # parameters replaced over and over: drop the stale copies
                self._fp32_copies.clear()
            hit = self._fp32_copies[id(p)] = (p, (p._version, p.data_ptr()), p.detach().float())
        return hit[2]

    def decode_step(self, x, att_shift, wkv_state, ffn_shift):
        """:meth:`forward` for one token per row (``x [B,1,C]``) through the fused C++ block
        (:func:`multimodal_rwkv.kernels.cpu.decode_block`), or None where that does not apply:
        a projection that is not a plain bias-free :class:`Linear` (LoRA), other dtypes, no kernel."""
        att, ffn = self.att, self.ffn
        if not all(type(m) is Linear and m.bias is None for m in (
                att.receptance, att.key, att.value, att.gate, att.output, ffn.key, ffn.receptance, ffn.value)):
            return None
        B = x.shape[0]
        if wkv_state is None:
            wkv_state = att.initial_wkv(B)
            if wkv_state is None:
                wkv_state = x.new_zeros(B, att.n_head, att.head_size, att.head_size, dtype=torch.float32)
        # read from the modules' own dicts: this runs for every block of every decoded token
        a, f, none = att._parameters, ffn._parameters, _NO_TENSOR
        ln0 = self._modules.get("ln0")
        ln0 = (ln0.weight, ln0.bias) if ln0 is not None else (none, none)
        if att.v6:
            mixing = [a["time_maa_x"], a["time_maa_w"], a["time_maa_k"], a["time_maa_v"], a["time_maa_r"],
                      a["time_maa_g"], a["time_maa_w1"], a["time_maa_w2"], a["time_decay"], a["time_decay_w1"],
                      a["time_decay_w2"]]
            ffn_mix, gn_eps = [f["time_maa_k"], f["time_maa_r"]], att.gn_eps
        else:  # x052: static mixing and decay (the kernel takes 1 - time_mix), GroupNorm(y / divisor)
            mixing = [none, none, a["time_mix_k"], a["time_mix_v"], a["time_mix_r"], a["time_mix_g"], none, none,
                      a["time_decay"], none, none]
            ffn_mix, gn_eps = [f["time_mix_k"], f["time_mix_r"]], att.gn_eps * att.config.head_size_divisor ** 2
        # the eight weight matrices as they are (fp32, or bf16 for the kernel's bf16 products); the
        # other parameters, the input and the shifts in fp32 (the kernel computes in fp32)
        f32 = self._fp32
        params = [f32(self.ln1.weight), f32(self.ln1.bias), *map(f32, mixing), att.receptance.weight,
                  att.key.weight, att.value.weight, att.gate.weight, f32(a["time_faaaa"]), f32(att.ln_x.weight),
                  f32(att.ln_x.bias), att.output.weight, f32(self.ln2.weight), f32(self.ln2.bias),
                  *map(f32, ffn_mix), ffn.key.weight, ffn.receptance.weight, ffn.value.weight, *map(f32, ln0)]
        res = cpu.decode_block(x.view(B, -1).float(), params, att_shift.float(), wkv_state, ffn_shift.float(),
                               self.eps, gn_eps, att.v6)
        if res is None:
            return None
        out, att_shift, wkv_state, ffn_shift = res
        dt = x.dtype
        return out.view(B, 1, -1).to(dt), att_shift.to(dt), wkv_state, ffn_shift.to(dt)

    def forward(self, x, att_shift, wkv_state, ffn_shift, mask=None, tail=None, scale: float = 1.0):
        """``tail``: only the output's last ``tail`` positions are wanted (no pad mask; inference):
        the channel mix then runs on those alone, and the time mix's output on one more (whose
        norm is the channel mix's token shift). The states are exact either way. ``scale``: the
        residual stream ``x`` is the true one times this (fp16 rescaling): the block's two
        additions are scaled alike (the norms do not see the scale)."""
        # ln0 runs here, inside the block's own forward (as in RWKV-LM), not from the caller: FSDP
        # gathers a wrapped block's parameters only around its forward.
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        T = x.shape[1]
        if tail is None or tail >= T:
            a, att_shift, wkv_state = self.att(self.ln1(x), att_shift, wkv_state, mask, out_scale=scale)
            x = x + a
            f, ffn_shift = self.ffn(self.ln2(x), ffn_shift, mask, out_scale=scale)
            return x + f, att_shift, wkv_state, ffn_shift
        a, att_shift, wkv_state = self.att(self.ln1(x), att_shift, wkv_state, None, tail=tail + 1, out_scale=scale)
        x = x[:, T - tail - 1:] + a
        xn = self.ln2(x)
        f, ffn_shift = self.ffn(xn[:, 1:], xn[:, 0], None, out_scale=scale)
        return x[:, 1:] + f, att_shift, wkv_state, ffn_shift


class RWKVPreTrainedModel(PreTrainedModel):
    config_class = RWKVConfig
    base_model_prefix = "rwkv"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _is_stateful = True
    _no_split_modules = ["Block"]

    def _init_weights(self, module):  # RWKV's own initialisation is done in RWKVModel.reset_parameters
        pass


def _orthogonal_(weight: torch.Tensor, gain: float) -> None:
    """``nn.init.orthogonal_`` for any dtype: its QR has no bf16/fp16 kernel on a CPU, so a
    low-precision weight is drawn in fp32 and rounded."""
    if weight.dtype in (torch.float32, torch.float64):
        nn.init.orthogonal_(weight, gain=gain)
    else:
        with torch.no_grad():
            weight.copy_(nn.init.orthogonal_(torch.empty(weight.shape, dtype=torch.float32, device=weight.device),
                                             gain=gain))


class RWKVModel(RWKVPreTrainedModel):
    """Embedding + blocks + final LayerNorm; returns hidden states ``[B,T,C]`` and the state."""

    @classmethod
    def from_pretrained(cls, src, *args, **kwargs) -> "RWKVModel":
        """The model without its head, from any source :meth:`RWKVForCausalLM.from_pretrained`
        reads (a BlinkDL ``.pth``, a Hugging Face-layout folder, a saved ``RWKVForCausalLM``), with
        its keywords, checks and CheckpointErrors; the head is dropped. A folder that
        ``RWKVModel.save_pretrained`` wrote (no head; ``"architectures": ["RWKVModel"]`` in its
        config.json) goes through transformers' loader."""
        if _saved_base_model(src):
            return super().from_pretrained(src, *args, **kwargs)
        return RWKVForCausalLM.from_pretrained(src, *args, **kwargs).rwkv

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained; a path that is a file is a FileExistsError (transformers
        logged it and returned, having saved nothing)."""
        from multimodal_rwkv.fileio import save_folder

        save_folder(save_directory)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def __init__(self, config: RWKVConfig):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_out = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        if self.emb.weight.device.type != "meta":  # from_pretrained builds on meta, then loads
            self.reset_parameters()
        self.post_init()

    def get_input_embeddings(self):
        return self.emb

    def set_input_embeddings(self, value):
        self.emb = value

    def drop_decode_copies(self) -> None:
        """Forget the blocks' fp32 copies of small parameters (see :meth:`Block._fp32`)."""
        for block in self.blocks:
            block._fp32_copies.clear()

    def empty_state(self, batch_size: int, device=None, dtype=None) -> RWKVState:
        """The state before any token: zeros, or the trained initial state if the model has one
        (a copy: changing the state in place leaves the model's ``time_state`` alone)."""
        p = self.emb.weight
        st = RWKVState.zeros(self.config, batch_size, device or p.device, dtype or p.dtype)
        if self.config.has_initial_state:
            st.wkv = [b.att.initial_wkv(batch_size).to(st.wkv[0].device).clone() for b in self.blocks]
        return st

    def forward(self, input_ids=None, inputs_embeds=None, state=None, attention_mask=None, scan_order=None,
                logits_to_keep: int = 0, output_hidden_states: bool | None = None, return_dict: bool | None = None):
        """Hidden states ``[B,T,C]`` after ``ln_out`` and the new state, as a
        :class:`RWKVModelOutput` (``last_hidden_state``, ``state``), or with ``return_dict=False``
        (or ``config.return_dict`` False) the tuple ``(hidden, state)``. ``logits_to_keep=k > 0``
        (inference without a pad mask or scan order): only the last k positions are wanted, and the
        last block computes only those (its r/gate/output products and its channel mix on k+1 and
        k rows instead of T; a 12-layer prefill of 512 tokens skips ~7% of its products); the
        hidden states returned are then those k positions, the state is exact.
        ``output_hidden_states=True`` (None: ``config.output_hidden_states``): ``hidden_states``
        (a third item of the tuple), the embeddings and every block's output (all T positions; the
        last one after ``ln_out``)."""
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            _check_ids(input_ids, self.config.vocab_size)
            if input_ids.dtype not in (torch.int64, torch.int32):
                input_ids = input_ids.long()  # uint8, int16, ...: the embedding takes int32/int64
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0 or inputs_embeds.shape[2] != self.config.n_embd:
            raise ValueError(f"inputs_embeds must be [B, T, C={self.config.n_embd}] with T >= 1, got shape "
                             f"{tuple(inputs_embeds.shape)}")
        bt = tuple((input_ids if inputs_embeds is None else inputs_embeds).shape[:2])
        logits_to_keep = _logits_to_keep(logits_to_keep, bt[1])
        if not isinstance(logits_to_keep, int):
            raise TypeError("RWKVModel.forward: logits_to_keep is a count here (positions: RWKVForCausalLM)")
        if bt[0] == 0:
            raise ValueError("the input batch has no rows")
        if attention_mask is not None and tuple(attention_mask.shape) != bt:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the input is {bt} ([B, T])")
        x = self.emb(input_ids) if inputs_embeds is None else inputs_embeds.to(self.emb.weight.dtype)
        if x.device.type == "cpu":
            cpu.keep_freed_memory_for_forward()  # no page faults on every call's buffers (see there)
        B, T, C = x.shape
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(device=x.device, dtype=torch.bool)
            if mask.is_meta or bool(mask.all()):  # (meta tensors: shapes only, either form)
                mask = None
        in_state = state
        if in_state is None:
            att_s = [None] * self.config.n_layer
            wkv_s = [None] * self.config.n_layer
            ffn_s = [None] * self.config.n_layer
            zero = x.new_zeros(B, C)
        else:
            if in_state.n_layer != self.config.n_layer or in_state.batch_size != B:
                raise ValueError(
                    f"state has {in_state.n_layer} layers x batch {in_state.batch_size}; "
                    f"model has {self.config.n_layer} layers and the input batch is {B}"
                )
            _check_state_shapes(in_state, self.config, B)
            att_s, wkv_s, ffn_s = in_state.att_shift, in_state.wkv, in_state.ffn_shift
        new_att, new_wkv, new_ffn = [], [], []
        tail = (logits_to_keep if logits_to_keep > 0 and mask is None and scan_order is None
                and not torch.is_grad_enabled() and not output_hidden_states else 0)
        every = [x] if output_hidden_states else None
        decode = (FAST_DECODE and T == 1 and mask is None and scan_order is None and x.device.type == "cpu"
                  and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
                  and self.config.wkv_backend in ("auto", "cpu"))  # a backend named otherwise runs as named
        if not decode:  # a prefill or a training step: the next decode reads the parameters afresh
            self.drop_decode_copies()
        if scan_order is not None:
            _check_scan_order(scan_order, B, T)
            perm = scan_order.to(x.device).long().unsqueeze(-1).expand(B, T, C)
            perm_mask = None if mask is None else mask.gather(1, scan_order.long())
        # fp16: the residual stream is halved after every FP16_RESCALE_LAYER blocks (and each block's
        # additions scaled alike), as the official package does, so that it stays within fp16's range
        rescale = FP16_RESCALE_LAYER if x.dtype == torch.float16 else 0
        for i, block in enumerate(self.blocks):
            a_s = att_s[i] if att_s[i] is not None else zero
            f_s = ffn_s[i] if ffn_s[i] is not None else zero
            reorder = scan_order is not None and i % 2 == 1
            xin, m = (x.gather(1, perm), perm_mask) if reorder else (x, mask)
            scale = 0.5 ** (i // rescale) if rescale else 1.0
            if self.gradient_checkpointing and self.training:
                out = torch.utils.checkpoint.checkpoint(block, xin, a_s, wkv_s[i], f_s, m, None, scale,
                                                        use_reentrant=False)
            else:
                out = block.decode_step(xin, a_s, wkv_s[i], f_s) if decode else None
                if out is None:
                    out = block(xin, a_s, wkv_s[i], f_s, m, tail=tail if tail and i == len(self.blocks) - 1 else None,
                                scale=scale)
            xo, a_s, w_s, f_s = out
            if reorder:
                x = torch.empty_like(xo).scatter_(1, perm, xo)
            else:
                x = xo
            if rescale and (i + 1) % rescale == 0:
                x = x / 2
            new_att.append(a_s)
            new_wkv.append(w_s)
            new_ffn.append(f_s)
            if every is not None:  # the true residual stream (its scale undone)
                every.append(x * 2.0 ** ((i + 1) // rescale) if rescale and i + 1 >= rescale else x)
        x = self.ln_out(x)
        if every is not None:
            every[-1] = x
        state = RWKVState(new_att, new_wkv, new_ffn)
        every = tuple(every) if every is not None else None
        if return_dict is False or return_dict is None and not getattr(self.config, "return_dict", True):
            return (x, state) + ((every,) if every is not None else ())
        return RWKVModelOutput(last_hidden_state=x, state=state, hidden_states=every)

    @torch.no_grad()
    def reset_parameters(self):
        """RWKV-LM's published initialisation (README "Initializing RWKV 5/6 Models")."""
        cfg = self.config
        L, C = cfg.n_layer, cfg.n_embd
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        for lid, block in enumerate(self.blocks):
            for ln in (getattr(block, "ln0", None), block.ln1, block.ln2):
                if ln is not None:
                    nn.init.ones_(ln.weight)
                    nn.init.zeros_(ln.bias)
            att, ffn = block.att, block.ffn
            r0 = lid / (L - 1) if L > 1 else 0.0  # 0 to 1
            r1 = 1.0 - lid / L  # 1 to ~0
            ddd = torch.arange(C, dtype=torch.float32) / C
            A = cfg.dim_att
            n = torch.arange(A, dtype=torch.float32)
            if att.v6:
                att.time_maa_x.copy_(1.0 - ddd.pow(r1).view(1, 1, C))
                att.time_maa_w.copy_(1.0 - ddd.pow(r1).view(1, 1, C))
                att.time_maa_k.copy_(1.0 - ddd.pow(r1).view(1, 1, C))
                att.time_maa_v.copy_(1.0 - (ddd.pow(r1) + 0.3 * r0).view(1, 1, C))
                att.time_maa_r.copy_(1.0 - ddd.pow(0.5 * r1).view(1, 1, C))
                att.time_maa_g.copy_(1.0 - ddd.pow(0.5 * r1).view(1, 1, C))
                nn.init.zeros_(att.time_maa_w1)
                nn.init.uniform_(att.time_maa_w2, -0.01, 0.01)
                decay = -6 + 5 * (n / max(A - 1, 1)).pow(0.7 + 1.3 * r0)
                att.time_decay.copy_(decay.view(1, 1, A))
                nn.init.zeros_(att.time_decay_w1)
                nn.init.uniform_(att.time_decay_w2, -0.01, 0.01)
            else:
                att.time_mix_k.copy_(ddd.pow(r1).view(1, 1, C))
                att.time_mix_v.copy_((ddd.pow(r1) + 0.3 * r0).view(1, 1, C))
                att.time_mix_r.copy_(ddd.pow(0.5 * r1).view(1, 1, C))
                att.time_mix_g.copy_(ddd.pow(0.5 * r1).view(1, 1, C))
                decay = -6 + 5 * (n / max(A - 1, 1)).pow(0.7 + 1.3 * r0)
                att.time_decay.copy_(decay.view(att.n_head, att.head_size))
            zigzag = ((n + 1) % 3 - 1) * 0.1
            att.time_faaaa.copy_((r0 * (1 - n / max(A - 1, 1)) + zigzag).view(att.n_head, att.head_size))
            if cfg.has_initial_state:
                nn.init.zeros_(att.time_state)
            for lin in (att.receptance, att.value):
                nn.init.uniform_(lin.weight, -0.5 / math.sqrt(C), 0.5 / math.sqrt(C))
            _orthogonal_(att.key.weight, gain=0.1)
            _orthogonal_(att.gate.weight, gain=0.1)
            nn.init.zeros_(att.output.weight)
            nn.init.ones_(att.ln_x.weight)
            att.ln_x.weight.mul_(((1 + lid) / L) ** 0.7)
            nn.init.zeros_(att.ln_x.bias)
            if ffn.v6:
                ffn.time_maa_k.copy_(1.0 - ddd.pow(r1).view(1, 1, C))
                ffn.time_maa_r.copy_(1.0 - ddd.pow(r1).view(1, 1, C))
            else:
                ffn.time_mix_k.copy_(ddd.pow(r1).view(1, 1, C))
                ffn.time_mix_r.copy_(ddd.pow(r1).view(1, 1, C))
            _orthogonal_(ffn.key.weight, gain=1.0)
            nn.init.zeros_(ffn.receptance.weight)
            nn.init.zeros_(ffn.value.weight)
        nn.init.ones_(self.ln_out.weight)
        nn.init.zeros_(self.ln_out.bias)


class RWKVForCausalLM(RWKVPreTrainedModel, GenerationMixin):
    """RWKV language model: :class:`RWKVModel` + an untied head.

    ``out = model(input_ids, state=None)`` gives ``out.logits`` ``[B,T,V]`` and ``out.state``;
    feeding ``ids[:, :k]`` then ``ids[:, k:]`` with the state equals feeding ``ids`` at once.
    """

    # the loss is a mean over the batch's targets: transformers' Trainer must not pass
    # num_items_in_batch (it would, seeing **kwargs in forward's signature)
    accepts_loss_kwargs = False

    def __init__(self, config: RWKVConfig):
        super().__init__(config)
        self.rwkv = RWKVModel(config)
        self.head = Linear(config.n_embd, config.vocab_size, bias=False)
        if self.head.weight.device.type != "meta":  # the blocks are initialised by RWKVModel
            V, C = config.vocab_size, config.n_embd
            _orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        self.post_init()

    # ---- transformers plumbing ----------------------------------------------------------
    def get_input_embeddings(self):
        return self.rwkv.emb

    def set_input_embeddings(self, value):
        self.rwkv.emb = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None):
        self.rwkv.gradient_checkpointing = enable

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.rwkv.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.rwkv.gradient_checkpointing = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # the RNN state is the cache
        return False

    def empty_state(self, batch_size: int = 1, device=None, dtype=None) -> RWKVState:
        return self.rwkv.empty_state(batch_size, device, dtype)

    # ---- forward ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        state: RWKVState | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        attention_mask: torch.Tensor | None = None,
        scan_order: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        past_key_values: RWKVState | None = None,
        cache: RWKVState | None = None,
        **kwargs,
    ) -> RWKVOutput:
        """Run the model on ``[B,T]`` ids (or ``[B,T,C]`` embeddings taken before ``ln0``).

        Args:
            state: the state after the tokens before these (None: start of text).
            labels: ``[B,T]``; the loss is the mean cross-entropy of ``logits[:, :-1]`` against
                ``labels[:, 1:]`` over positions that are not -100 (transformers' convention).
            logits_to_keep: 0 for all positions, k>0 for only the last k (a long prefill then
                does not pay for a ``[T, V]`` head it does not use), or, as in transformers, a 1-D
                integer tensor of the positions to keep.
            attention_mask: ``[B,T]`` 1 for tokens, 0 for padding (batched prompts of different
                lengths). Pads leave the state exactly as it was, wherever they are: the logits
                of the tokens and the returned state are those of each row's tokens alone. Their
                own logits are meaningless. (``generate`` needs left padding: it continues every
                row from its last position.)
            scan_order: ``[B,T]`` permutation of ``0..T-1`` per row; odd-numbered blocks see ``x``
                in this order (VisualRWKV's bidirectional image scan).
            output_hidden_states: also return ``hidden_states`` (see :class:`RWKVOutput`).
            return_dict: False (or ``config.return_dict`` False) returns a plain tuple of the
                fields that are set, in :class:`RWKVOutput`'s order, as transformers models do.
            past_key_values / cache: transformers' names for a cache; here they name the state.
                With a state, an ``attention_mask`` longer than the input (transformers' mask over
                the cached tokens too) is cut to its last T columns. ``use_cache=True`` also returns
                the state as ``cache``.
        ``output_attentions=True`` and any other keyword are errors (RWKV has no attention weights).
        """
        if kwargs:
            hint = " (its name here is logits_to_keep)" if "num_logits_to_keep" in kwargs else ""
            raise TypeError(f"RWKVForCausalLM.forward() got unexpected keyword argument(s) "
                            f"{', '.join(sorted(kwargs))}{hint}")
        if output_attentions or output_attentions is None and getattr(self.config, "output_attentions", False):
            raise ValueError("output_attentions: RWKV has no attention weights to return")
        state = _state_from_cache_names(state, past_key_values=past_key_values, cache=cache)
        src = input_ids if input_ids is not None else inputs_embeds
        T = src.shape[1] if src is not None and src.dim() >= 2 else 0
        keep = _logits_to_keep(logits_to_keep, T)
        if (state is not None and attention_mask is not None and attention_mask.dim() == 2
                and attention_mask.shape[1] > T):  # transformers' mask over the cached tokens too
            attention_mask = attention_mask[:, -T:] if T else attention_mask[:, :0]
        hidden, new_state, *every = self.rwkv(
            input_ids=input_ids, inputs_embeds=inputs_embeds, state=state, attention_mask=attention_mask,
            scan_order=scan_order, logits_to_keep=keep if isinstance(keep, int) else 0,
            output_hidden_states=bool(self.config.output_hidden_states if output_hidden_states is None
                                      else output_hidden_states), return_dict=False,
        )
        logits = self.head(_kept_positions(hidden, keep))
        loss = None
        if labels is not None:
            if isinstance(keep, torch.Tensor) or keep:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            if tuple(labels.shape) != tuple(logits.shape[:2]):
                raise ValueError(f"labels must have the input's shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            # shift the labels, not the logits (as transformers does): slicing the [B,T,V] logits
            # would add a full-size zero-filled gradient buffer in backward
            targets = F.pad(labels.to(logits.device), (0, 1), value=-100)[:, 1:]
            loss = cpu.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                     ignore_index=-100)
        out = RWKVOutput(loss=loss, logits=logits, state=new_state, hidden_states=every[0] if every else None,
                         cache=new_state if use_cache else None)
        if return_dict is False or return_dict is None and not getattr(self.config, "return_dict", True):
            return out.to_tuple()  # transformers' return_dict=False: the fields that are set, in order
        return out

    # ---- generation ---------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self, input_ids, state=None, attention_mask=None, inputs_embeds=None, is_first_iteration=False, **kwargs
    ):
        extra = {k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if kwargs.get(k)}
        if is_first_iteration or state is None and kwargs.get("_rwkv_first", True):
            if inputs_embeds is not None and is_first_iteration:
                return {"inputs_embeds": inputs_embeds, "state": state, "attention_mask": attention_mask,
                        "logits_to_keep": 1, **extra}
            return {"input_ids": input_ids, "state": state, "attention_mask": attention_mask, "logits_to_keep": 1,
                    **extra}
        return {"input_ids": input_ids[:, -1:], "state": state, "logits_to_keep": 1, **extra}

    def _get_logits_processor(self, *args, **kwargs):
        """transformers' processors in RWKV's order:

        - :class:`FiniteLogitsGuard` first: transformers puts the caller's list (which holds it)
          after its own, whose bans (no_repeat_ngram_size, bad_words_ids, min_new_tokens) could
          leave a row -inf throughout before the guard saw it;
        - every processor that is no warper (bans, penalties, the vocabulary limit) before the
          warpers, a warper of the caller's list too;
        - then top-p, top-k and the temperature, as ``rwkv.utils.PIPELINE.sample_logits``: the
          nucleus is taken from the untempered probabilities, ties at its edge kept
          (:class:`~multimodal_rwkv.model.generation.RWKVTopP` stands for transformers' top-p,
          which cuts a tie; and transformers divides by the temperature first, so T > 1 drew
          tokens outside the official sampler's nucleus);
        - then the other warpers (min-p, typical, epsilon, eta, top-h: defined on the tempered
          distribution), and last the watermark and the logit normalisation."""
        import transformers.generation.logits_process as lp

        from multimodal_rwkv.model.generation import FiniteLogitsGuard, RWKVTopP

        processors = list(super()._get_logits_processor(*args, **kwargs))
        kinds = [(lp.TopPLogitsWarper, RWKVTopP), (lp.TopKLogitsWarper,), (lp.TemperatureLogitsWarper,)]
        late = (lp.MinPLogitsWarper, lp.TypicalLogitsWarper, lp.EpsilonLogitsWarper, lp.EtaLogitsWarper,
                getattr(lp, "TopHLogitsWarper", lp.EtaLogitsWarper))
        last = (lp.LogitNormalization, lp.WatermarkLogitsProcessor, lp.SynthIDTextWatermarkLogitsProcessor)
        cuts = tuple(k for group in kinds for k in group)
        rwkv = [[RWKVTopP(p.top_p, p.min_tokens_to_keep) if isinstance(p, lp.TopPLogitsWarper) else p
                 for p in processors if isinstance(p, group)] for group in kinds]
        order = ([p for p in processors if isinstance(p, FiniteLogitsGuard)]
                 + [p for p in processors if not isinstance(p, (FiniteLogitsGuard,) + cuts + late + last)]
                 + [p for group in rwkv for p in group]
                 + [p for p in processors if isinstance(p, late)]
                 + [p for p in processors if isinstance(p, last)])
        return lp.LogitsProcessorList(order)

    def _reorder_cache(self, state, beam_idx):
        """Beam search: the rows of the state that the surviving beams continue from."""
        return state[beam_idx.to(state.wkv[0].device)]

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs["state"] = outputs.state
        model_kwargs["_rwkv_first"] = False
        if model_kwargs.get("attention_mask") is not None:
            am = model_kwargs["attention_mask"]
            model_kwargs["attention_mask"] = torch.cat([am, am.new_ones((am.shape[0], num_new_tokens))], dim=-1)
        return model_kwargs

    def generate(self, inputs=None, generation_config=None, logits_processor=None, stopping_criteria=None, *,
                 input_ids=None, stop=None, tokenizer=None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, penalty_decay: float = 0.996, seed: int | None = None,
                 state: RWKVState | None = None, **kwargs):
        """Generate with transformers' GenerationMixin (stock logits processors, stopping criteria,
        streamers), the RNN state serving as the cache. Returns ids ``[B, T + new]``. Stop strings
        are ``stop=`` / ``stop_strings=`` with ``tokenizer=``: transformers' ``StopStringCriteria``
        reads a ``PreTrainedTokenizer``'s string vocabulary, which the World tokenizer's byte tokens
        are not (build it with a transformers tokenizer only).

        Extra arguments on top of transformers':
            stop: a string or list of strings (e.g. ``"\\n\\n"``) that ends a row; needs ``tokenizer``.
                transformers' ``stop_strings`` (argument or generation config) join them.
            presence_penalty / frequency_penalty / penalty_decay: RWKV-style repetition penalties,
                as ``rwkv.utils.PIPELINE.generate``: ``logit -= presence + count * frequency`` for
                the tokens generated so far, counts decayed each step; spaces, tabs and digits
                (a token whose text is part of ``" \\t0123456789"``) add nothing to their count.
                Those are found with ``tokenizer``, or the World vocabulary for a 65536-id model.
            seed: seeds torch's RNG first, for reproducible sampling.
            state: continue from this state (prefix reuse); ``input_ids`` are then the new tokens only.
                ``past_key_values=`` / ``cache=`` (transformers' names) are taken as ``state=``.
        The first four parameters are transformers' (``inputs``: the prompt ids ``[B, T]``, also
        taken as ``input_ids=``). Without ``attention_mask`` every id is a token, id 0 (the end
        of text) too; a padded batch needs the tokenizer's ``attention_mask``. The caller's
        ``logits_processor`` / ``stopping_criteria`` lists are not changed.
        Sampling uses no top-k unless ``top_k`` is given (RWKV's samplers: top-p and temperature;
        transformers' own default would be top-k 50). The temperature applies after top-p and
        top-k, as in ``rwkv.utils.PIPELINE.sample_logits`` (transformers applies it first).
        With a ``tokenizer`` of fewer ids than the model's vocabulary, the ids it cannot decode are
        never generated. A sampling temperature below 1e-30 counts as 1e-30 (the logits divided by
        it would overflow): as good as greedy; one above 1e30 counts as 1e30.
        """
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from multimodal_rwkv.argtypes import integer_number, real_number
        from multimodal_rwkv.model.generation import (FiniteLogitsGuard, RWKVPenaltyProcessor, StopStringsCriteria,
                                                      VocabLimitProcessor, check_penalties, decodable_ids, joined_stops,
                                                      uncounted_ids)

        if inputs is not None and input_ids is not None:
            raise ValueError("generate: pass the prompt once, as inputs or as input_ids")
        input_ids = inputs if inputs is not None else input_ids
        if (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 0
                and kwargs.get("inputs_embeds") is None):  # (with embeddings, transformers' own empty ids)
            _check_ids(input_ids, self.config.vocab_size)  # T >= 1: the same error for every batch size
        for key, value in (("generation_config", generation_config), ("logits_processor", logits_processor),
                           ("stopping_criteria", stopping_criteria)):
            if value is not None:
                kwargs[key] = value
        if input_ids is not None and (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2):
            raise ValueError(f"input_ids must be a [B, T] tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        state = _state_from_cache_names(state, past_key_values=kwargs.pop("past_key_values", None),
                                        cache=kwargs.pop("cache", None))
        if kwargs.get("attention_mask") is None and input_ids is not None and input_ids.numel():
            # every id is a token, 0 too (World's end of text): transformers would infer a mask that
            # drops the ids equal to pad_token_id (0) whenever eos_token_id is another id
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        mask = kwargs.get("attention_mask")
        if mask is not None and input_ids is not None:  # (transformers drops a mask of all ones unchecked)
            B, T = input_ids.shape
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != B or not (
                    mask.shape[1] == T or state is not None and mask.shape[1] > T):
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"attention_mask has shape {got}, the input is {(B, T)} ([B, T]; with a state, "
                                 "[B, cached + T] too)")
        if mask is not None and input_ids is not None and mask.shape == input_ids.shape:
            empty = (mask == 0).all(dim=1).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"row(s) {empty} of the batch hold no token (attention_mask all 0): a row needs "
                                 "at least one token to continue from (e.g. the end-of-text id 0)")
            if not bool((mask[:, -1] != 0).all()):
                raise ValueError("generate continues every row from its last position: pad on the left "
                                 "(attention_mask[:, -1] must be 1 for every row)")
        presence_penalty, frequency_penalty, penalty_decay = check_penalties(presence_penalty, frequency_penalty,
                                                                             penalty_decay)
        if seed is not None:
            n = integer_number(seed)
            if n is None:
                raise ValueError(f"seed must be an integer, got {seed!r}")
            torch.manual_seed(n)
        prompt_len = input_ids.shape[1] if input_ids is not None else 0  # with inputs_embeds: no prompt ids
        # copies: the caller's lists must not collect this call's processors (a later call would run them)
        processors = LogitsProcessorList([FiniteLogitsGuard(self.dtype)] + list(kwargs.pop("logits_processor", None) or []))
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        if presence_penalty or frequency_penalty:
            counts_by = tokenizer
            if counts_by is None and self.config.vocab_size == 65536:  # the World vocabulary
                from multimodal_rwkv.model.tokenizer import WorldTokenizer

                counts_by = WorldTokenizer()
            uncounted = uncounted_ids(counts_by, self.config.vocab_size) if frequency_penalty and counts_by else ()
            processors.append(RWKVPenaltyProcessor(presence_penalty, frequency_penalty, penalty_decay,
                                                   prompt_len=prompt_len, uncounted=uncounted))
        n_ids = decodable_ids(tokenizer, self.config.vocab_size) if tokenizer is not None else self.config.vocab_size
        if n_ids < self.config.vocab_size:
            processors.append(VocabLimitProcessor(n_ids))
        # transformers' stop_strings (the argument, or the generation config in use) need its own
        # tokenizer type: they join our stop strings, and the config in use is given none below
        user_gc = kwargs.pop("generation_config", None)
        base = user_gc if user_gc is not None else self.generation_config
        stops = joined_stops(self, stop, kwargs.pop("stop_strings", None), user_gc)
        if stops:
            if tokenizer is None:
                raise ValueError("stop strings (stop= or stop_strings=) need tokenizer=")
            pad = next((x for x in (kwargs.get("pad_token_id"), getattr(base, "pad_token_id", None),
                                    self.config.pad_token_id) if x is not None), None)
            criteria.append(StopStringsCriteria(tokenizer, stops, prompt_len=prompt_len, pad_finished=pad is not None))
        if state is not None:  # transformers repeats each row for beams / returned sequences; the state too
            beams = kwargs.get("num_beams") or getattr(base, "num_beams", 1) or 1
            seqs = kwargs.get("num_return_sequences") or getattr(base, "num_return_sequences", 1) or 1
            repeat = beams if beams > 1 else seqs
            rows = (input_ids if input_ids is not None else kwargs.get("inputs_embeds")).shape[0]
            if repeat > 1 and state.batch_size == rows:
                state = state[torch.arange(state.batch_size).repeat_interleave(repeat)]
        # our defaults, where neither the arguments nor the generation config set them: a pad id,
        # the state as the cache, greedy, and when sampling no top-k (RWKV's own samplers and
        # `mmrwkv generate` use none; transformers' default is 50). Given a generation_config, they
        # go into a copy of it (transformers warns when a config comes with loose settings).
        ours = {}
        for key, value in (("pad_token_id", self.config.pad_token_id), ("use_cache", True), ("do_sample", False)):
            if kwargs.get(key) is None and getattr(base, key, None) is None:
                ours[key] = value
        sampling = kwargs.get("do_sample", ours.get("do_sample", getattr(base, "do_sample", False)))
        if sampling and "top_k" not in kwargs and getattr(base, "top_k", None) is None:
            ours["top_k"] = 0
        temperature = real_number(kwargs.get("temperature", getattr(base, "temperature", None)))
        if sampling and temperature is not None and (0 < temperature < MIN_TEMPERATURE or temperature > MAX_TEMPERATURE):
            ours["temperature"] = min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)  # (see MIN_TEMPERATURE)
            kwargs.pop("temperature", None)
        if user_gc is not None:
            user_gc = copy.deepcopy(user_gc)
            for key, value in ours.items():
                setattr(user_gc, key, value)
            user_gc.stop_strings = None  # joined our stop strings above
            kwargs["generation_config"] = user_gc
        else:
            kwargs.update(ours)
        self.rwkv.drop_decode_copies()  # the parameters may have changed since the last decode
        # the model's own config's: cleared for the call, also when a generation_config is given
        # (transformers copies the model's stop strings into it, and asks for its own tokenizer type)
        own_stops = getattr(self.generation_config, "stop_strings", None)
        if own_stops:
            self.generation_config.stop_strings = None
        try:
            return super().generate(input_ids, logits_processor=processors, stopping_criteria=criteria,
                                    state=state, **kwargs)
        finally:
            if own_stops:
                self.generation_config.stop_strings = own_stops

    # ---- I/O ----------------------------------------------------------------------------
    # transformers' loading keywords (AutoModelForCausalLM passes some): no effect on a local source
    _HUB_KWARGS = ("adapter_kwargs", "trust_remote_code", "cache_dir", "force_download",
                   "local_files_only", "token", "proxies", "_from_auto", "_commit_hash", "use_safetensors",
                   "low_cpu_mem_usage", "resume_download")

    @classmethod
    def from_pretrained(cls, src, *args, dtype=None, torch_dtype=None, device=None, state_file=None,
                        **kwargs) -> "RWKVForCausalLM":
        """Load a BlinkDL ``.pth``, a Hugging Face-layout RWKV-6 folder, or a folder saved by
        :meth:`save_pretrained`. Sizes are inferred from tensor shapes. Raises CheckpointError.

        ``dtype`` (or transformers' ``torch_dtype``): fp32, bf16 or fp16 (a string or a torch
        dtype; None or "auto": the dtype most of the file's weights have). ``device`` (or
        ``device_map`` naming one device). ``state_file``: a state-tuning file
        (``blocks.N.att.time_state``) whose state becomes the initial state. ``config=`` (what
        ``AutoModelForCausalLM`` passes) and config keywords: the sizes must be the checkpoint's
        (a difference is an error); ``wkv_backend``, the token ids and ``output_hidden_states``
        are taken. transformers' hub keywords (``revision``, ``cache_dir``, ...) mean nothing for
        a local file and are ignored; any other keyword is an error."""
        from multimodal_rwkv.model.checkpoint import load_model, resolve_dtype

        if args:
            raise TypeError(f"from_pretrained() takes the source and keywords only; got {len(args)} more "
                            "positional argument(s)")
        if dtype is not None and torch_dtype is not None and resolve_dtype(dtype) != resolve_dtype(torch_dtype):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one")
        device_map = kwargs.pop("device_map", None)
        if isinstance(device_map, dict) and set(device_map) == {""}:  # transformers' one-device map
            device_map = device_map[""]
        if device_map is not None:
            if isinstance(device_map, dict):
                raise ValueError("device_map: a model split over devices is not supported; give one device")
            if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):  # one device here
                device_map = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                torch.device(device_map)
            except (RuntimeError, TypeError):
                raise ValueError(f"device_map={device_map!r}: not a device (cpu, cuda, cuda:1, 0, auto, ...)") from None
            if device is not None and torch.device(device) != torch.device(device_map):
                raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; give one")
            device = device_map
        for key, default in (("revision", "main"), ("subfolder", "")):
            value = kwargs.pop(key, None)
            if value not in (None, default):
                raise ValueError(f"{key}={value!r}: a local checkpoint has no {key}s (download it first)")
        if kwargs.pop("variant", None) is not None:
            raise ValueError("variant: weights variants (model.<variant>.safetensors) are not supported; this "
                             "package reads and writes model.safetensors (load a dtype with dtype=)")
        from multimodal_rwkv.model.checkpoint import CONFIG_OVERRIDES, MODEL_SIZE_KEYS

        config = kwargs.pop("config", None)
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in MODEL_SIZE_KEYS + CONFIG_OVERRIDES}
        unknown = sorted(k for k in kwargs if k not in cls._HUB_KWARGS)
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword argument(s) {', '.join(unknown)}")
        return load_model(cls, src, dtype=dtype if dtype is not None else torch_dtype, device=device,
                          state_file=state_file, config=config, overrides=overrides)

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None,
                        max_shard_size: int | str | None = None, push_to_hub: bool = False, save_function=None,
                        safe_serialization: bool = True, variant: str | None = None, **kwargs) -> None:
        """Write ``config.json`` + ``model.safetensors`` (atomically) into ``save_directory``, and
        ``generation_config.json`` when the generation defaults were changed.

        transformers' keywords: ``is_main_process=False`` writes nothing (the other ranks of a
        distributed run); ``state_dict`` writes those weights instead of the model's own (under
        FSDP/DeepSpeed, ``accelerator.get_state_dict(model)``), and must have the model's keys
        and shapes; ``max_shard_size`` splits the weights into shards with an index, as
        transformers does. ``save_function`` (accelerate's idiom passes ``accelerator.save``) is
        not needed: safetensors files are written directly. ``safe_serialization`` (transformers
        4's keyword) is taken: the weights are always safetensors, as in transformers 5.
        ``variant``, ``push_to_hub`` and any other keyword are refused."""
        from multimodal_rwkv.model.checkpoint import save_model

        if variant is not None:
            raise ValueError("save_pretrained: variant (model.<variant>.safetensors) is not supported; the "
                             "weights are written as model.safetensors")
        if not safe_serialization:
            logger.warning("save_pretrained: safe_serialization=False: the weights are written as safetensors "
                           "all the same (pickled weights are not written)")
        if kwargs:
            raise TypeError(f"save_pretrained() got an unexpected keyword argument {next(iter(kwargs))!r}")
        if push_to_hub:
            raise ValueError("save_pretrained: push_to_hub is not supported; upload the folder with huggingface_hub")
        del save_function
        if not is_main_process:
            return
        save_model(self, save_directory, state_dict=state_dict, max_shard_size=max_shard_size)


def _saved_base_model(src) -> bool:
    """Whether ``src`` is a folder ``RWKVModel.save_pretrained`` wrote (its config.json names
    RWKVModel as the architecture)."""
    try:
        with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("architectures") == ["RWKVModel"]
    except (OSError, TypeError, ValueError, AttributeError):  # not a folder, no or a bad config.json
        return False


def _state_from_cache_names(state, **names):
    """``state``, or the RWKVState given under one of transformers' names for a cache
    (``past_key_values``, ``cache``): here the cache is the state. Both at once, or a cache that
    is no RWKVState, is a ValueError."""
    for name, past in names.items():
        if past is not None:
            if not isinstance(past, RWKVState) or state is not None:
                raise ValueError(f"{name}: pass the RNN state as state= (an RWKVState), not both")
            state = past
    return state


def _register_auto_model() -> None:
    """``AutoModel`` and ``AutoModelForCausalLM`` know model_type "mmrwkv" once this module is
    imported (``AutoConfig`` already does: config.py registers it)."""
    from transformers import AutoModel, AutoModelForCausalLM

    AutoModel.register(RWKVConfig, RWKVModel, exist_ok=True)
    AutoModelForCausalLM.register(RWKVConfig, RWKVForCausalLM, exist_ok=True)


_register_auto_model()
