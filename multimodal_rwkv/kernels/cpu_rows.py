"""A CPU kernel for a few rows times a big fp32 weight (batched decode): ``y = x @ w.T``.

Decoding several streams at once multiplies 2-16 rows by every weight matrix. The time should be
the time to read the weight once, as for one row; with MKL it is not: on 2 cores of this machine a
65536x768 head takes 6.7 ms for one row (row-blocked ``bmm``, see ``modeling.Linear``) but 13 ms
for 8 rows, and a 768x768 projection 2.2x its one-row time, because MKL's GEMM repacks the weight
on every call and small-M products use its slow paths. This kernel streams the weight once:
each thread takes blocks of 4 (or 2) weight rows and keeps ``M x 4`` AVX-512 accumulators, so each
weight element is loaded once and used by all M rows; the rows of ``x`` stay in L1. Measured (2
threads): head 8 rows 8.8 ms, 768x768 8 rows 0.09 ms (vs 0.20), 2688x768 0.36 ms (vs 0.58).

It is C++ built on first use with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler with
OpenMP; about 30 s once, then cached by torch) and used only where it applies: CPU, fp32,
contiguous, AVX-512, ``2 <= M <= 16``, ``K % 16 == 0``, no autograd. Anything else, or a failed
build (logged once), returns None and the caller uses the plain product. ``MMRWKV_CPU_KERNEL=0``
turns it off. Each output is the same dot product as ``x @ w.T``; only the summation order differs
(tests/test_cpu_rows.py compares them)."""
from __future__ import annotations

import logging
import os
import shutil
import threading

import torch

logger = logging.getLogger(__name__)

MAX_ROWS = 16

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y[m, n0:n1] = x[m, :] . w[n, :] for NR weight rows at a time; K % 16 == 0.
template <int M, int NR>
static void rows_block(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n + NR <= n1; n += NR) {
    __m512 acc[NR][M];
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r)
      _Pragma("GCC unroll 16") for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    const float* wr = w + n * K;
    for (int64_t k = 0; k < K; k += 16) {
      __m512 b[NR];
      _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) {
        b[r] = _mm512_loadu_ps(wr + r * K + k);
        _mm_prefetch((const char*)(wr + (r + NR) * K + k), _MM_HINT_T0);
      }
      _Pragma("GCC unroll 16") for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + k);
        _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(xv, b[r], acc[r][m]);
      }
    }
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r)
      for (int m = 0; m < M; ++m) y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
  }
}

template <int M>
static void rows(const float* x, const float* w, float* y, int64_t K, int64_t N) {
  constexpr int NR = M <= 8 ? 4 : 2;  // M * NR accumulators + NR weight vectors in 32 registers
  const int64_t blocks = N / NR;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    rows_block<M, NR>(x, w, y, K, N, b0 * NR, b1 * NR);
  });
  rows_block<M, 1>(x, w, y, K, N, blocks * NR, N);  // the last N % NR rows
}

torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "few_rows_linear: shapes");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "few_rows_linear: fp32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(1) % 16 == 0, "few_rows_linear: layout");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (M) {
#define ROWS(i) case i: rows<i>(xp, wp, yp, K, N); break;
    ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
    ROWS(9) ROWS(10) ROWS(11) ROWS(12) ROWS(13) ROWS(14) ROWS(15) ROWS(16)
#undef ROWS
    default: TORCH_CHECK(false, "few_rows_linear: 1..16 rows");
  }
  return y;
}
"""

_lock = threading.Lock()
_state: dict = {}  # "module": the built extension, or "error": why it is not used


def _build():
    """The compiled extension, or None (with the reason in ``_state["error"]``); built once per process."""
    with _lock:
        if "module" in _state or "error" in _state:
            return _state.get("module")
        why = None
        if os.environ.get("MMRWKV_CPU_KERNEL", "1") == "0":
            why = "MMRWKV_CPU_KERNEL=0"
        elif torch.backends.cpu.get_cpu_capability() != "AVX512":
            why = f"needs AVX-512 (this CPU: {torch.backends.cpu.get_cpu_capability()})"
        elif not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
            why = "no C++ compiler found"
        elif not _cpp_extension().is_ninja_available():
            why = "ninja (torch's C++ extension builder) is not installed"
        if why is None:
            try:
                logger.info("loading the CPU few-rows kernel (the first time, a C++ build of ~30 s; then cached by torch)")
                _state["module"] = _cpp_extension().load_inline(
                    "mmrwkv_cpu_rows_v1", cpp_sources=_SRC, functions=["few_rows_linear"],
                    extra_cflags=["-O3", "-mavx512f", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
                return _state["module"]
            except Exception as e:  # noqa: BLE001 - any build failure: fall back, once
                why = f"build failed ({str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__})"
        _state["error"] = why
        logger.info("CPU few-rows kernel not used: %s", why)
        return None


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning
    (irrelevant to a CPU build)."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        cpp_log.setLevel(level)
    return cpp_extension


def status() -> str:
    """'ready', 'not built yet', or why it is not used."""
    if "module" in _state:
        return "ready"
    return _state.get("error", "not built yet")


def few_rows_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """``x [M, K] @ w[N, K].T`` with the kernel, or None where it does not apply (see module doc)."""
    M, K = x.shape
    if not (2 <= M <= MAX_ROWS and K % 16 == 0 and x.device.type == "cpu" and w.device.type == "cpu"
            and x.dtype == torch.float32 and w.dtype == torch.float32 and w.is_contiguous()):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return None
    mod = _build()
    if mod is None:
        return None
    return mod.few_rows_linear(x.contiguous(), w)
