"""WKV-6 kernels: ``wkv6(r, k, v, w, u, initial_state=None, output_final_state=False, backend="auto")``.

Backends: ``reference`` (step loop, ground truth), ``torch`` (chunked pure PyTorch for CPUs),
``triton`` (chunked forward/backward and a decode-step kernel on CUDA). ``auto`` picks Triton on
CUDA and ``torch`` on CPU. Triton is imported lazily, only when that backend runs.
"""
from __future__ import annotations

from multimodal_rwkv.errors import KernelError
from multimodal_rwkv.kernels.reference import wkv6_reference

__all__ = ["wkv6", "wkv6_reference", "KernelError"]


def wkv6(r, k, v, w, u, initial_state=None, output_final_state=False, backend="auto"):
    """WKV-6 linear attention.

    Args:
        r, k, w: ``[B, T, H, K]``; ``w`` is the log-decay ``-exp(wraw)`` (<= 0).
        v: ``[B, T, H, V]``.
        u: ``[H, K]``.
        initial_state: ``[B, H, K, V]`` float32 or None.
        output_final_state: if True also return the state after the last token.
        backend: ``"auto" | "reference" | "torch" | "triton"``.

    Returns:
        ``(o, final_state)``; ``o`` ``[B, T, H, V]`` in the dtype of ``r``; ``final_state``
        ``[B, H, K, V]`` float32 (float64 when the inputs are float64), or None unless
        ``output_final_state``. The inputs (and ``initial_state``) are never modified.

    Raises:
        KernelError: bad shapes/dtypes/devices, an unknown backend, or a backend named explicitly
        that cannot run here (e.g. ``"triton"`` on CPU tensors outside the Triton interpreter).
    """
    from multimodal_rwkv.kernels.dispatch import dispatch

    return dispatch(r, k, v, w, u, initial_state, output_final_state, backend)
