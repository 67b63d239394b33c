"""WKV-6 kernels: ``wkv6(r, k, v, w, u, initial_state=None, output_final_state=False, backend="auto")``.

Semantics (per batch and head; state ``S`` is ``[K, V]``, key-major)::

    o_t = r_t (S_{t-1} + diag(u) k_t^T v_t)        S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t

Backends:

- ``reference``: the plain step loop (:mod:`.reference`), the ground truth every other backend is
  tested against; fp32 inside (fp64 for fp64 inputs); differentiable with autograd.
- ``torch``: pure PyTorch (:mod:`.torch_chunked`). T <= 16: a step loop vectorised over batch and
  heads (decode). Longer: a chunked form (chunks of 32, sub-chunks of 8) whose exponents are all
  <= 0 and built as direct segment sums of ``w``, so it neither overflows (log-decay down to -20
  per step and below) nor loses ``dw`` precision; gradients through autograd.
- ``cpu``: C++ (:mod:`.cpu`, ``cpu_kernels.cpp``, built on first use): the step loop in fp32 with
  AVX-512, and its exact backward (the forward keeps the state every 32 steps; the backward
  recomputes each 32-step chunk from it); an ``autograd.Function``. CPU tensors (fp32/bf16/fp16
  inputs), AVX-512 and a C++ compiler. B=1, T=1024, H=4, K=V=64, 2 threads: forward 7x,
  forward+backward 4x the ``torch`` backend (``bench/cpu_kernels.py``).
- ``triton``: Triton kernels (:mod:`.triton_chunk`: chunked forward and backward with an
  ``autograd.Function``; :mod:`.triton_decode`: a recurrent kernel for T <= 16 without gradients,
  plus ``triton_decode.wkv6_decode_`` that advances a state in place). CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` was set before the kernels were first imported (tests).
- ``auto``: Triton on CUDA (the decode kernel when T <= 16 and no gradient is needed); on CPU
  ``cpu`` where it can run (fp64 inputs, no AVX-512 or a failed build: ``torch``). On CUDA it uses
  ``torch`` only when Triton cannot run the inputs (no triton, float64, head size not a power of
  two in 16..128), with one logged warning. A backend named explicitly never
  falls back: it runs or raises :class:`KernelError`.

Importing this package does not import triton (it is imported on the first Triton call).

:mod:`.cpu` also holds the dense products that are not WKV: a C++ kernel for the 2-16-row fp32
products of batched decoding (``cpu.few_rows_linear``) and the oneDNN route for fp32 products of
more rows (``cpu.linear``); ``model.modeling.Linear`` uses both, with fallbacks. And a whole x060 or
x052 block for one decoded token per row in one C++ call (``cpu.decode_block``: the norms, the mixing,
the decay, the WKV step and the gated norm in registers and cache, the eight products through the
few-rows kernel), which ``model.modeling.Block.decode_step`` uses for fp32 and bf16 CPU decoding.
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
        backend: ``"auto" | "reference" | "torch" | "cpu" | "triton"``.

    Returns:
        ``(o, final_state)``; ``o`` ``[B, T, H, V]`` in the dtype of ``r``; ``final_state``
        ``[B, H, K, V]`` float32 (float64 when the inputs are float64), or None unless
        ``output_final_state``. The inputs (and ``initial_state``) are never modified.

    Raises:
        KernelError: bad shapes/dtypes/devices, an unknown backend, a backend named explicitly
        that cannot run here (e.g. ``"triton"`` on CPU tensors outside the Triton interpreter),
        or, for CPU tensors, a positive ``w`` (a growing state: the chunked forms assume decay).
        On CUDA the values of ``w`` are not checked (that would wait for the GPU).
        Gradients: the ``cpu``, ``triton`` and chunked ``torch`` backends give first derivatives;
        a backward with ``create_graph=True`` through them is a RuntimeError (their gradients
        would carry no graph); ``reference`` differentiates twice.
    """
    import torch

    from multimodal_rwkv.kernels.dispatch import dispatch

    if isinstance(w, torch.Tensor) and w.device.type == "cpu" and w.is_floating_point() and w.numel():
        wd = w.detach()
        top = wd.max()
        if torch.isnan(top):  # a w holding NaN: its max is NaN, which no comparison fails; the rest is checked
            top = torch.where(torch.isnan(wd), -torch.inf, wd).max()
        if top > 0:
            raise KernelError(f"wkv6: w is the log-decay -exp(wraw) and must be <= 0; its largest value is {float(top):.4g}")
    return dispatch(r, k, v, w, u, initial_state, output_final_state, backend)
