"""Backend selection and input validation for :func:`multimodal_rwkv.kernels.wkv6`."""
from __future__ import annotations

import contextlib
import logging

import torch

from multimodal_rwkv.errors import KernelError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "torch", "cpu", "triton")
# On CPU the plain step loop beats the chunked form for short inputs (decode, tiny prefill).
CPU_STEP_LOOP_MAX_T = 16
# On CUDA the recurrent decode kernel is used for inference with T at most this.
CUDA_DECODE_MAX_T = 16


def _validate(r, k, v, w, u, initial_state):
    for name, x in (("r", r), ("k", k), ("v", v), ("w", w), ("u", u)):
        if not isinstance(x, torch.Tensor):
            raise KernelError(f"wkv6: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise KernelError(f"wkv6: {name} must be floating point, got {x.dtype}")
    if r.dim() != 4:
        raise KernelError(f"wkv6: r must be [B,T,H,K], got shape {tuple(r.shape)}")
    B, T, H, K = r.shape
    if k.shape != r.shape or w.shape != r.shape:
        raise KernelError(
            f"wkv6: r, k, w must share shape [B,T,H,K]; got r {tuple(r.shape)}, k {tuple(k.shape)}, w {tuple(w.shape)}")
    if v.dim() != 4 or v.shape[:3] != r.shape[:3]:
        raise KernelError(f"wkv6: v must be [B,T,H,V] with B,T,H of r {tuple(r.shape[:3])}; got {tuple(v.shape)}")
    if u.shape != (H, K):
        raise KernelError(f"wkv6: u must be [H,K] = {(H, K)}; got {tuple(u.shape)}")
    V = v.shape[-1]
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
            raise KernelError("wkv6: initial_state must be a floating-point torch.Tensor")
        if initial_state.shape != (B, H, K, V):
            raise KernelError(
                f"wkv6: initial_state must be [B,H,K,V] = {(B, H, K, V)} (key-major); got {tuple(initial_state.shape)}")
    devs = {x.device for x in (r, k, v, w, u) + ((initial_state,) if initial_state is not None else ())}
    if len(devs) > 1:
        raise KernelError(f"wkv6: all inputs must be on one device; got {sorted(str(d) for d in devs)}")


def _needs_grad(*xs):
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _run_torch(r, k, v, w, u, s0, out_final):
    from multimodal_rwkv.kernels.torch_chunked import wkv6_chunked, wkv6_recurrent

    if r.shape[1] <= CPU_STEP_LOOP_MAX_T:
        return wkv6_recurrent(r, k, v, w, u, s0, out_final)
    return wkv6_chunked(r, k, v, w, u, s0, out_final)


def _run_triton(r, k, v, w, u, s0, out_final, allow_decode):
    try:
        from multimodal_rwkv.kernels import triton_chunk, triton_decode
    except ImportError as exc:  # triton missing
        raise KernelError(f"wkv6: backend 'triton' needs the triton package ({exc})") from exc
    interp = triton_chunk.kernels_interpreted()
    if r.device.type == "cuda":
        if interp:
            raise KernelError("wkv6: backend 'triton' kernels were defined under TRITON_INTERPRET=1 "
                              "and cannot run on CUDA tensors in this process")
    elif not interp:
        raise KernelError(
            f"wkv6: backend 'triton' needs CUDA tensors (got {r.device.type}); on CPU it runs only under "
            "the Triton interpreter, with TRITON_INTERPRET=1 set before the kernels were first imported")
    if any(t.dtype == torch.float64 for t in (r, k, v, w, u)):  # (a float64 state is taken as float32)
        raise KernelError("wkv6: backend 'triton' supports float32/bfloat16/float16 inputs, not float64")
    triton_chunk.check_head_sizes(r.shape[-1], v.shape[-1])
    if allow_decode and r.shape[1] <= CUDA_DECODE_MAX_T and not _needs_grad(r, k, v, w, u, s0):
        return triton_decode.wkv6_decode(r, k, v, w, u, s0, out_final)
    return triton_chunk.wkv6_triton(r, k, v, w, u, s0, out_final)


def autocast_off(device: torch.device):
    """A context with autocast off for ``device``'s type: every backend computes in fp32 itself,
    and autocast would run the reference's and the torch backend's products in bf16/fp16."""
    try:
        on = torch.is_autocast_enabled(device.type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        on = False
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


def dispatch(r, k, v, w, u, initial_state, output_final_state, backend):
    if backend not in BACKENDS:
        raise KernelError(f"wkv6: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    _validate(r, k, v, w, u, initial_state)
    with autocast_off(r.device):
        if 0 in r.shape or 0 in v.shape:
            return _empty(r, k, v, w, u, initial_state, bool(output_final_state))
        return _dispatch(r, k, v, w, u, initial_state, bool(output_final_state), backend)


def _empty(r, k, v, w, u, initial_state, out_final):
    """Any backend, when a size is 0: no tokens (T = 0), rows, heads or head channels. ``o`` is
    still part of the autograd graph (a backward through it works and gives zero gradients) and
    the final state is a new tensor, never ``initial_state`` itself."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    if T:  # tokens but an empty head (K or V = 0) or no rows/heads: the plain loop is exact
        from multimodal_rwkv.kernels.reference import wkv6_reference

        o, s = wkv6_reference(r, k, v, w, u, initial_state, out_final)
        return o, (None if s is None else s.clone())
    wide = torch.float64 if torch.float64 in (r.dtype, k.dtype, v.dtype, w.dtype) else torch.float32
    o = sum(x.sum() for x in (r, k, v, w)).to(r.dtype).expand(B, 0, H, V)  # no values: anchored in the graph
    if not out_final:
        return o, None
    if initial_state is None:
        return o, torch.zeros(B, H, K, V, dtype=wide, device=r.device)
    return o, initial_state.to(wide).clone()


def _dispatch(r, k, v, w, u, initial_state, out_final, backend):
    if backend == "reference":
        from multimodal_rwkv.kernels.reference import wkv6_reference

        o, s = wkv6_reference(r, k, v, w, u, initial_state, out_final)
        if s is not None and s.dtype != torch.float64:
            s = s.float()
        return o, s
    if backend == "torch":
        return _run_torch(r, k, v, w, u, initial_state, out_final)
    if backend == "cpu":
        from multimodal_rwkv.kernels import cpu

        why = cpu.wkv6_cpu_unusable(r, k, v, w, u)
        if why is not None:
            raise KernelError(f"wkv6: backend 'cpu' cannot run here: {why}")
        return cpu.wkv6_cpu(r, k, v, w, u, initial_state, out_final)
    if backend == "triton":
        return _run_triton(r, k, v, w, u, initial_state, out_final, allow_decode=True)
    # auto: Triton on CUDA when it can run these inputs, else the torch backend (logged once)
    if r.device.type == "cuda":
        why = _triton_unusable(r, k, v, w, u)
        if why is None:
            return _run_triton(r, k, v, w, u, initial_state, out_final, allow_decode=True)
        if why not in _WARNED:
            _WARNED.add(why)
            logger.warning("wkv6 auto: using the torch backend on CUDA because %s", why)
    elif r.device.type == "cpu":
        from multimodal_rwkv.kernels import cpu

        if cpu.wkv6_cpu_unusable(r, k, v, w, u) is None:
            return cpu.wkv6_cpu(r, k, v, w, u, initial_state, out_final)
    return _run_torch(r, k, v, w, u, initial_state, out_final)


_WARNED: set = set()


def _triton_unusable(r, k, v, w, u):
    """Why auto cannot use Triton for these CUDA inputs (None if it can)."""
    if any(t.dtype == torch.float64 for t in (r, k, v, w, u)):
        return "the inputs are float64"
    K, V = r.shape[-1], v.shape[-1]
    if not all(16 <= n <= 128 and (n & (n - 1)) == 0 for n in (K, V)):
        return f"head size K={K}, V={V} is not a power of two in 16..128"
    try:
        from multimodal_rwkv.kernels import triton_chunk
    except ImportError as exc:
        return f"triton cannot be imported ({exc})"
    if triton_chunk.kernels_interpreted():
        return "the Triton kernels were defined under TRITON_INTERPRET=1"
    return None
