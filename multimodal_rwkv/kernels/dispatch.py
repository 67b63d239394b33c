"""Backend selection and input validation for :func:`multimodal_rwkv.kernels.wkv6`."""
from __future__ import annotations

import torch

from multimodal_rwkv.errors import KernelError
from multimodal_rwkv.kernels.reference import wkv6_reference

BACKENDS = ("auto", "reference", "torch", "triton")


def dispatch(r, k, v, w, u, initial_state, output_final_state, backend):
    if backend not in BACKENDS:
        raise KernelError(f"wkv6: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend in ("auto", "torch", "reference"):
        o, s = wkv6_reference(r, k, v, w, u, initial_state, output_final_state)
        if s is not None:
            s = s.float()
        return o, s
    raise KernelError("wkv6: backend 'triton' is not implemented yet")
