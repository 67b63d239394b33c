"""C++ CPU kernels (``cpu_kernels.cpp``), built on first use, with plain-PyTorch fallbacks.

The kernels and the library route, each tested against its obviously-correct twin
(tests/test_cpu_kernels.py):

- :func:`few_rows_linear`: ``x @ w.T`` for 2-16 rows (batched decode). Decoding several streams
  at once multiplies a few rows by every weight matrix; the time should be that of reading the
  weight once, as for one row. With MKL it is not: on 2 cores a 65536x768 head takes 6.7 ms for
  one row (row-blocked ``bmm``, see ``modeling.Linear``) but 13 ms for 8 rows, because its GEMM
  repacks the weight on every call. The kernel streams the weight once: each thread takes blocks
  of 4 (or 2) weight rows and keeps ``M x 4`` AVX-512 accumulators, so each weight element is
  loaded once for all rows. 8 rows: head 8.8 ms, 768x768 0.09 ms (MKL 0.20 ms). Twin: ``x @ w.T``.
- :func:`wkv6_cpu`: the WKV-6 recurrence step by step in fp32, forward and backward (an
  ``autograd.Function``), the ``"cpu"`` backend of :func:`multimodal_rwkv.kernels.wkv6`. The
  recurrence is only ``O(T K V)`` per head, small next to the chunked form's matrix products,
  which on a CPU pay for memory traffic and many small ops. The forward saves the state every
  32 steps (``T/32`` states kept for backward, 128 KB each at H=8, K=V=64: 16 MB per layer at
  T=4096); the backward recomputes one 32-step chunk's states at a time from them (in L2 cache)
  and runs the exact backward recurrence (formulas in the .cpp). (With a state saved every 256
  steps it first recomputed the chunk starts of each segment, an extra pass over the recurrence:
  B1 T4096 H8 forward+backward took 51-53 ms against 42-47 ms now.) The decay
  factors ``exp(w)`` come in precomputed by torch's vectorised exp (a scalar exp per element in
  the loops cost more than the recurrence: B1 T1024 H8, forward 6.2 -> 3.6 ms). For value widths
  of 16, 32, 48 and 64 a step keeps ``v``, the output row (forward) or ``do`` and the ``dv`` row
  (backward) in AVX-512 registers while the state rows stream through L1 once (B1 T1024 H8:
  forward 3.6 -> 2.1 ms, backward 23 -> 13 ms); other widths run plain loops. Twin:
  ``kernels.reference`` (the plain step loop, differentiated by autograd).

- :func:`linear` / :func:`linear_t`: ``x @ w.T`` and ``d @ w`` (a linear layer's forward and input
  gradient) for more than 16 rows through oneDNN (``torch.ops.mkldnn._linear_pointwise``, the op
  torch's own compiler emits for CPU linears) instead of MKL's sgemm, which torch calls for fp32
  and which on the AMD EPYC CPUs measured here ran 1.1-1.5x slower at prefill and training shapes
  (2 threads: 512x768 @ 768x2688 133 vs 200 GFLOP/s; 4096x512 @ 512x512 139 vs 201). The weight
  gradient ``d.T @ x`` of the wide layers (a side of 1024 or more) goes through oneDNN on operands
  transposed first, the narrow ones stay with MKL (see :func:`weight_grad`). Twin: ``F.linear``.
  ``MMRWKV_ONEDNN_LINEAR=0`` turns this route off.

- :func:`mix` / :func:`mix_backward`: RWKV's token-shift mixing ``x + (x_{t-1} - x) * (mu_i + off_i)``
  for n slots at once (ddlerp's five, the channel mix's two) and all its gradients (``x``, the
  carried-in shift, ``mu``, the offsets) in one pass over the rows; and :func:`gn_gate` /
  :func:`gn_gate_backward`: time mixing's ``GroupNorm(y) * silu(gate)`` per group in registers
  (with a vectorised exp). Each PyTorch op of the twins is a pass over memory into a fresh buffer;
  a 6x512 training step at ctx 1024 spent 343 ms in such elementwise work around its GEMMs, 116 ms
  with these. Used in inference and inside model/lean.py's hand-written backward passes (never
  under autograd recording). Twins: :func:`mix_reference`, :func:`gn_gate_reference` (and
  autograd through them for the gradients).
- :func:`keep_freed_memory`: glibc's malloc settings that stop each forward or training step from
  page-faulting its big buffers in again (see there).

Built with ``torch.utils.cpp_extension.load`` (a C++ compiler with OpenMP and ninja; about a
minute once, then cached by torch). Used only where it can run: CPU tensors, AVX-512. Anything
else, or a failed build (logged once), makes the callers use their PyTorch paths.
``MMRWKV_CPU_KERNEL=0`` turns the C++ kernels off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_OFF, _ON = ("0", "false", "off", "no"), ("", "1", "true", "on", "yes")


def env_switch(name: str) -> bool:
    """A documented on/off environment switch (``MMRWKV_CPU_KERNEL``, ``MMRWKV_ONEDNN_LINEAR``,
    ``MMRWKV_MALLOC``), on unless set to 0/false/off/no (any case); another value is said once in
    a warning and leaves it on."""
    value = os.environ.get(name, "").strip().lower()
    if value in _OFF:
        return False
    if value not in _ON and name not in _state.setdefault("warned_env", set()):
        _state["warned_env"].add(name)
        logger.warning("%s=%r is not a switch value (0/false/off/no or 1/true/on/yes); it stays on", name,
                       os.environ[name])
    return True

MAX_ROWS = 16
WKV_CHUNK = 32  # the backward recomputes the states of this many steps at a time (in L2 cache)
WKV_SAVE_EVERY = 32  # steps between the states the forward saves (a multiple of WKV_CHUNK)
_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")

_lock = threading.Lock()
_state: dict = {}  # "module": the built extension, or "error": why it is not used


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


def _load_built(name: str):
    """The extension ``name`` from torch's extension cache when it was built there, imported
    directly, or None. torch's ``load()`` runs ninja in every process, and two ninja versions on
    one machine (a venv's and the system's) each take the other's build for out of date: the
    kernels were rebuilt, about 35 s, in turn (the build's name already holds what makes it
    current: source, flags, torch version)."""
    try:  # (private helpers of torch's: where load() keeps the build, and how it imports it)
        cpp = _cpp_extension()
        folder = cpp._get_build_directory(name, False)
        if not (Path(folder) / f"{name}.so").is_file():
            return None
        module = cpp._import_module_from_library(name, folder, True)
        logger.debug("loaded the C++ CPU kernels from torch's extension cache (%s)", folder)
        return module
    except Exception as e:  # noqa: BLE001 - not there in this torch, a partial .so: build with load()
        logger.debug("C++ CPU kernels: cached build not loaded directly (%s); building with torch's load()", e)
        return None


def extension():
    """The compiled extension, or None (with the reason in :func:`status`); built once per process."""
    with _lock:
        if "module" in _state or "error" in _state:
            return _state.get("module")
        why = None
        if not env_switch("MMRWKV_CPU_KERNEL"):
            why = f"MMRWKV_CPU_KERNEL={os.environ['MMRWKV_CPU_KERNEL']}"
        elif torch.backends.cpu.get_cpu_capability() != "AVX512":
            why = f"needs AVX-512 (this CPU: {torch.backends.cpu.get_cpu_capability()})"
        elif not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
            why = "no C++ compiler found"
        elif not _cpp_extension().is_ninja_available():
            why = "ninja (torch's C++ extension builder) is not installed"
        elif not _SOURCE.is_file():
            why = f"{_SOURCE} is missing"
        if why is None:
            try:
                # one build folder per source file and content, build flags and torch version: two
                # checkouts (or versions) sharing torch's extension cache would otherwise rebuild
                # each other's build in turn, and a build is never loaded into another torch
                cflags = ["-O3", "-mavx512f", "-mfma", "-fopenmp"]
                key = [str(_SOURCE.resolve()).encode(), _SOURCE.read_bytes(), repr(cflags).encode(),
                       torch.__version__.encode()]
                tag = hashlib.sha1(b"\0".join(key)).hexdigest()[:12]
                name = f"mmrwkv_cpu_kernels_{tag}"
                module = _load_built(name)
                if module is None:
                    logger.info("building the C++ CPU kernels (once per machine and version, about a minute; "
                                "then loaded from torch's extension cache)")
                    module = _cpp_extension().load(name, sources=[str(_SOURCE)], extra_cflags=cflags,
                                                   extra_ldflags=["-fopenmp"])
                _state["module"] = module  # (only once it is there: status() reads the key as "ready")
                return _state["module"]
            except Exception as e:  # noqa: BLE001 - any build failure: fall back, once
                msg = str(e).strip()
                why = f"build failed ({msg.splitlines()[-1][:200] if msg else type(e).__name__})"
        _state["error"] = why
        logger.info("C++ CPU kernels not used: %s", why)
        return None


def status() -> str:
    """'ready', 'not built yet', or why the kernels are not used."""
    if "module" in _state:
        return "ready"
    return _state.get("error", "not built yet")


# ------------------------------------------------------------------------- glibc malloc
_MMAP_THRESHOLD = 64 << 20  # bounded mode: blocks up to this size come from the heap...
_TRIM_THRESHOLD = 256 << 20  # ...and up to this much free memory at its top stays in the process


def keep_freed_memory(bounded: bool = True) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    A CPU forward (prefill) or training step allocates and frees the same large buffers every
    time. With glibc's defaults, freed heap beyond a small, moving threshold goes back to the OS
    and blocks over it are fresh mmaps, so each call page-faults (and the kernel zero-fills) that
    memory again: on the 2-core box about 7-15% of a 512-token prefill of a 12x768 model and
    13-15% of a 6x512 training step at ctx 1024.

    ``bounded=True`` (what :class:`~multimodal_rwkv.model.modeling.RWKVModel` sets on its first
    CPU forward): blocks up to 64 MB come from the heap and up to 256 MB of free memory at its top
    is kept, so the process holds at most that much more than it uses. ``bounded=False`` (the
    training engine's ``train.cpu_retain_memory``): no mmap for big blocks and no trimming; the
    process keeps its peak heap until it exits. Process-wide, applied once; a later
    ``bounded=False`` call widens a bounded setting, never the reverse. ``MMRWKV_MALLOC=0`` turns
    the automatic bounded setting off. Returns whether the setting is in force (False off glibc).
    """
    mode = "bounded" if bounded else "full"
    with _lock:
        done = _state.get("malloc")
        if done == "full" or done == mode:
            return True
        if done == "unavailable":
            return False
        try:
            import ctypes
            import sys

            if not sys.platform.startswith("linux"):
                raise OSError("not linux")
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            _state["malloc"] = "unavailable"
            return False
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
        if bounded:
            ok = mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        else:
            ok = mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        _state["malloc"] = mode if ok else "unavailable"
        return bool(ok)


def keep_freed_memory_for_forward() -> None:
    """The model's first CPU forward: :func:`keep_freed_memory` (bounded) unless ``MMRWKV_MALLOC=0``."""
    if "malloc" not in _state and env_switch("MMRWKV_MALLOC"):
        keep_freed_memory(bounded=True)


# ------------------------------------------------------------------------- few-rows product
def few_rows_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """``x [M, K] @ w[N, K].T`` with the kernel (the weight read once for all rows, fp32 sums), or
    None where it does not apply. It applies to CPU tensors of one dtype with a contiguous weight
    and no autograd recording: fp32 with 2-16 rows and ``K % 16 == 0`` (one row has its own path
    in ``modeling.Linear``), or bf16 with 1-16 rows and ``K % 32 == 0`` on a CPU with AVX512-BF16
    (torch's own bf16 product of one row reads the weight at about half the speed). The result
    has x's dtype."""
    M, K = x.shape
    if x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != w.dtype or not w.is_contiguous():
        return None
    if x.dtype == torch.float32:
        fits = 2 <= M <= MAX_ROWS and K % 16 == 0
    else:
        fits = x.dtype == torch.bfloat16 and 1 <= M <= MAX_ROWS and K % 32 == 0
    if not fits or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        return None
    mod = extension()
    if mod is None or (x.dtype == torch.bfloat16 and not _has_bf16_dot(mod)):
        return None
    y = mod.few_rows_linear(x.contiguous(), w)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _has_bf16_dot(mod) -> bool:
    if "bf16_dot" not in _state:
        _state["bf16_dot"] = bool(mod.has_avx512_bf16())
    return _state["bf16_dot"]


# ------------------------------------------------------------------------------------ WKV-6
def wkv6_cpu_unusable(r: torch.Tensor, *others: torch.Tensor) -> str | None:
    """Why :func:`wkv6_cpu` cannot run these inputs here (None if it can: CPU tensors of which none
    is float64 -- those compute in float64 elsewhere --, and the kernels built). ``others``: the
    other inputs (k, v, w, ...)."""
    if r.device.type != "cpu" or any(t is not None and t.dtype == torch.float64 for t in (r, *others)):
        return "it runs CPU tensors of float32/bfloat16/float16 only"
    if extension() is None:
        return f"the C++ kernels are unavailable: {status()}"
    return None


def _wkv6_forward(r32, k32, v32, e32, u32, s0, saved: bool):
    """The C++ forward on fp32 contiguous inputs and decay factors ``e = exp(w)``: ``(o, s, saved states)``."""
    B, T, H, K = r32.shape
    V = v32.shape[-1]
    _check_wkv_shapes(r32, k32, v32, e32, u32, s0)
    f32 = dict(dtype=torch.float32)
    s_in = torch.empty(0, **f32) if s0 is None else s0.detach().float().contiguous()
    s = torch.empty(B, H, K, V, **f32)  # the kernel starts it from s_in (never modified)
    o = torch.empty(B, T, H, V, **f32)
    kept = torch.empty(B, H, -(-T // WKV_SAVE_EVERY), K, V, **f32) if saved else torch.empty(0, **f32)
    extension().wkv6_forward(r32, k32, v32, e32, u32, s_in, s, o, kept, WKV_SAVE_EVERY)
    return o, s, kept


def _check_wkv_shapes(r, k, v, e, u, s0) -> None:
    """The kernel reads every tensor by r's sizes: any other shape is an error, never a read past
    the end (the public :func:`multimodal_rwkv.kernels.wkv6` checks the same before dispatching)."""
    from multimodal_rwkv.errors import KernelError

    if r.dim() != 4:
        raise KernelError(f"r must be [B, T, H, K], got {tuple(r.shape)}")
    B, T, H, K = r.shape
    V = v.shape[-1] if v.dim() == 4 else -1
    want = {"k": (k, (B, T, H, K)), "w": (e, (B, T, H, K)), "v": (v, (B, T, H, V)), "u": (u, (H, K))}
    if s0 is not None:
        want["initial_state"] = (s0, (B, H, K, V))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise KernelError(f"wkv6: {name} has shape {tuple(t.shape)}, expected {shape} (r is {tuple(r.shape)})")


class _WKV6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, k, v, w, u, s0, want_grad):
        r32, k32, v32 = (x.detach().float().contiguous() for x in (r, k, v))
        e32 = torch.exp(w.detach().float()).contiguous()  # decay factors: torch's vectorised exp
        u32 = u.detach().float().contiguous()
        o, s, saved = _wkv6_forward(r32, k32, v32, e32, u32, s0, want_grad)
        if want_grad:
            ctx.save_for_backward(r32, k32, v32, e32, u32, saved)
            ctx.strides = (WKV_CHUNK, WKV_SAVE_EVERY)
            ctx.dtypes = (r.dtype, k.dtype, v.dtype, w.dtype, u.dtype, None if s0 is None else s0.dtype)
        return o.to(r.dtype), s

    @staticmethod
    def backward(ctx, do, ds):
        from multimodal_rwkv.kernels.reference import first_derivatives_only

        first_derivatives_only("cpu")
        r, k, v, e, u, saved = ctx.saved_tensors
        B, T, H, K = r.shape
        V = v.shape[-1]
        f32 = dict(dtype=torch.float32)
        do = torch.zeros(B, T, H, V, **f32) if do is None else do.float().contiguous()
        g = torch.zeros(B, H, K, V, **f32) if ds is None else ds.float().clone().contiguous()
        dr, dk, dw = torch.empty_like(r), torch.empty_like(k), torch.empty_like(e)
        dv, du = torch.empty_like(v), torch.zeros(B, H, K, **f32)
        extension().wkv6_backward(r, k, v, e, u, saved, do, g, dr, dk, dv, dw, du, *ctx.strides)
        tr, tk, tv, tw, tu, ts = ctx.dtypes
        return (dr.to(tr), dk.to(tk), dv.to(tv), dw.to(tw), du.sum(0).to(tu),
                None if ts is None else g.to(ts), None)


def wkv6_cpu_decayed(r, k, v, e, u, initial_state=None):
    """Inference form of :func:`wkv6_cpu` given the decay factors ``e = exp(w)`` themselves (from
    :func:`decay_factors`; the log-decay is never formed): ``(o, final_state)``, or None where it
    does not apply (fp32 CPU inputs, no autograd recording, the kernels built; the caller then
    forms ``w`` and calls :func:`multimodal_rwkv.kernels.wkv6`, the twin in the tests)."""
    if _kernel_for(r, k, v, e, u, initial_state) is None:
        return None
    o, s, _ = _wkv6_forward(*(x.contiguous() for x in (r, k, v, e, u)), initial_state, saved=False)
    return o, s


def decay_factors(y: torch.Tensor, decay: torch.Tensor) -> torch.Tensor | None:
    """x060's decay factors ``exp(-exp(y + decay))`` (``y`` the decay LoRA's output ``[..., A]``,
    ``decay`` the ``time_decay [1, 1, A]``) in one C++ pass, or None where the kernel does not apply
    (fp32 CPU, no autograd recording, ``A % 16 == 0``); the twin: ``torch.exp(-torch.exp(y + decay))``."""
    if _kernel_for(y, decay) is None or y.shape[-1] != decay.numel() or decay.numel() % 16:
        return None
    e = torch.empty(y.shape)
    extension().decay_factors(_c(y), _c(decay), e)
    return e


def wkv6_cpu(r, k, v, w, u, initial_state=None, output_final_state=False):
    """WKV-6 with the C++ kernel (arguments and results as :func:`multimodal_rwkv.kernels.wkv6`;
    the caller checks :func:`wkv6_cpu_unusable`). Differentiable in every input."""
    want_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, k, v, w, u, initial_state))
    o, s = _WKV6.apply(r, k, v, w, u, initial_state, want_grad)
    return o, (s if output_final_state else None)


# ------------------------------------------------------------------------------ decode block
def decode_block(x, params, att_shift, wkv, ffn_shift, ln_eps: float, gn_eps: float, v6: bool):
    """One RWKV-6 (``v6``) or RWKV-5 block for one token per row in one C++ call (decoding), or
    None where the kernel does not apply (then the caller runs the block's own forward, the twin
    in the tests).

    ``x [B, C]`` the block input (before ``ln0`` for block 0); ``params`` the block's 30 tensors in
    the order ``decode_block`` in ``cpu_kernels.cpp`` lists; ``att_shift, ffn_shift [B, C]``,
    ``wkv [B, H, N, N]`` (key-major) the state before the token, never modified. Returns
    ``(out [B, C], att_shift, wkv, ffn_shift)``: the block's output and the state after the token.
    Applies to contiguous CPU parameters, fp32 except that the eight weight matrices may all be
    bf16 on a CPU with AVX512-BF16 (their products then take inputs rounded to bf16, as the
    model's bf16 forward has them); x and the state fp32; no autograd recording, 1-16 rows (bf16
    weights: any number, in groups of 16), sizes
    that are multiples of 16 (32 for bf16 weights: C, the attention and FFN widths; also the head
    size and x060's LoRA ranks x5 and decay rank). Called for every block of every decoded token:
    the checks on the parameters are the kernel's (it returns False where one fails)."""
    B, C = x.shape
    if B > MAX_ROWS and params[13].dtype == torch.bfloat16:
        # bf16 weights: groups of MAX_ROWS rows, so that a row's numbers do not depend on how many
        # groups there are (the plain bf16 forward would round every intermediate to bf16; 0.6%
        # apart here). Within a group, the fp32 products may round differently with the row count
        # (about 1e-7 relative), which a bf16 rounding of the output can still magnify
        parts = [decode_block(x[i:i + MAX_ROWS], params, att_shift[i:i + MAX_ROWS], wkv[i:i + MAX_ROWS],
                              ffn_shift[i:i + MAX_ROWS], ln_eps, gn_eps, v6) for i in range(0, B, MAX_ROWS)]
        return None if any(p is None for p in parts) else tuple(torch.cat(t) for t in zip(*parts))
    if not 1 <= B <= MAX_ROWS or torch.is_grad_enabled() or not all(type(t) in _PLAIN for t in params):
        return None
    if not all(_plain_fp32_cpu(t) for t in (x, att_shift, wkv, ffn_shift)):
        return None
    mod = extension()
    if mod is None or (params[13].dtype == torch.bfloat16 and not _has_bf16_dot(mod)):
        return None
    H, N = params[17].shape
    att_out, ffn_out, out = x.new_empty(B, C), x.new_empty(B, C), x.new_empty(B, C)
    wkv_out = x.new_empty(B, H, N, N)
    if not mod.decode_block(x.contiguous(), params, att_shift.contiguous(), wkv.contiguous(), ffn_shift.contiguous(),
                            out, att_out, wkv_out, ffn_out, float(ln_eps), float(gn_eps), bool(v6)):
        return None
    return out, att_out, wkv_out, ffn_out


# ------------------------------------------------------------------ dense products via oneDNN
_ONEDNN_MIN_ROWS = MAX_ROWS + 1  # fewer rows: decoding, served by few_rows_linear / modeling.Linear
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not a subclass such as a sharded DTensor


def _plain_fp32_cpu(t: torch.Tensor) -> bool:
    return type(t) in _PLAIN and t.dtype == torch.float32 and t.device.type == "cpu"


def _onednn_ok(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``x @ w.T (+ bias)`` may go through oneDNN: plain fp32 CPU tensors, at least 17
    rows, no autocast, oneDNN enabled and the op present."""
    return (_plain_fp32_cpu(x) and _plain_fp32_cpu(w) and (bias is None or _plain_fp32_cpu(bias))
            and w.dim() == 2 and x.dim() >= 2 and x.shape[-1] == w.shape[1]  # (else torch's own shape error)
            and (bias is None or tuple(bias.shape) == (w.shape[0],)) and x.numel() >= _ONEDNN_MIN_ROWS * x.shape[-1]
            and _onednn_available() and not torch.is_autocast_enabled("cpu"))


def _onednn_off() -> str | None:
    """Why the oneDNN route is off (None if it is on); the settings that cannot change are read once."""
    if "onednn_off" not in _state:
        if not env_switch("MMRWKV_ONEDNN_LINEAR"):
            _state["onednn_off"] = f"MMRWKV_ONEDNN_LINEAR={os.environ['MMRWKV_ONEDNN_LINEAR']}"
        elif not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            _state["onednn_off"] = "this torch has no oneDNN linear op"
        else:
            _state["onednn_off"] = None
    if _state["onednn_off"] is None and not torch.backends.mkldnn.enabled:
        return "torch.backends.mkldnn.enabled is False"
    return _state["onednn_off"]


def _onednn_available() -> bool:
    return _onednn_off() is None


def onednn_status() -> str:
    """Which library the fp32 CPU linears of more than 16 rows use, and why."""
    why = _onednn_off()
    return "oneDNN" if why is None else f"MKL ({why})"


def _onednn(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias):
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        return _onednn(x, w, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        d2 = dy.reshape(-1, dy.shape[-1])
        dx = linear_t(dy, w) if need[0] else None
        dw = weight_grad(d2, x) if need[1] else None
        db = d2.sum(0) if ctx.has_bias and need[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)``, through oneDNN where that applies (see the module docstring);
    differentiable. Elsewhere (few rows, other dtypes or devices, autocast) it is ``F.linear``."""
    if not _onednn_ok(x, w, bias):
        return torch.nn.functional.linear(x, w, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias)):
        return _Linear.apply(x, w, bias)
    return _onednn(x, w, bias)


def linear_t(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``d @ w`` (``d [..., N]``, ``w [N, K]``): the input gradient of a linear layer, through
    oneDNN where that applies. Not differentiable itself (it is used inside backward passes)."""
    if _onednn_ok(d, w):
        return _onednn(d, w.t(), None)
    return d @ w


def transpose(x: torch.Tensor) -> torch.Tensor:
    """``x.t().contiguous()`` for a 2-D tensor, through the C++ tile kernel where that applies
    (fp32 CPU, unit column stride, not recorded by autograd): about 10x torch's copy."""
    ext = _kernel_for(x)
    if ext is None or x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        return x.t().contiguous()
    out = x.new_empty(x.shape[1], x.shape[0])
    ext.transpose(x, out)
    return out


_WGRAD_MIN = 256  # fewer rows, or a narrower side: the transposes are not worth it (a LoRA's rank)
_WGRAD_MIN_WIDE = 1024  # nor below this wider side: 512x512 at 4096 rows came out even
_WGRAD_BLOCK = 1 << 24  # the transposed output gradient is made this many floats (64 MB) at a time


def weight_grad(d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``d.T @ a`` with the rows of ``d [..., O]`` and ``a [..., I]`` flattened: the weight
    gradient ``[O, I]`` of ``linear(a, W)`` given its output gradient ``d``. Not differentiable
    itself (it is used inside backward passes).

    For fp32 CPU tensors of at least 256 rows and columns, one side at least 1024, both operands
    are first transposed (:func:`transpose`) so that the long summed dimension is contiguous in
    both, then multiplied by oneDNN. On the 2-core box at 4096 rows the head's (16384x512) takes
    366 ms where MKL on the transposed view takes 494, the FFN's ~5% less; 512x512 came out even,
    so it stays with MKL (``python bench/cpu_fused.py``). A large ``O`` is done in row blocks, so
    the transposed ``d`` never takes more than 64 MB. Elsewhere, and as the twin in the tests:
    ``d.T @ a``."""
    d2, a2 = d.reshape(-1, d.shape[-1]), a.reshape(-1, a.shape[-1])
    n = d2.shape[0]
    if (min(n, d2.shape[1], a2.shape[1]) < _WGRAD_MIN or max(d2.shape[1], a2.shape[1]) < _WGRAD_MIN_WIDE
            or not _onednn_available() or torch.is_autocast_enabled("cpu")
            or _kernel_for(d2, a2) is None):
        return d2.t() @ a2
    at = transpose(a2)
    rows = max(16, min(d2.shape[1], _WGRAD_BLOCK // n))
    parts = [_onednn(transpose(d2[:, o:o + rows]), at, None) for o in range(0, d2.shape[1], rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------- fused elementwise parts
# Each takes one pass over memory where the PyTorch expressions (the twins, ``*_reference``) take
# several, each allocating a fresh buffer. Used where no autograd records through them: inference,
# and the hand-written backward passes of model/lean.py; the twins run everywhere else.
def _kernel_for(*ts: torch.Tensor | None):
    """The extension if these tensors may go through the fused kernels (fp32 CPU, not recorded by
    autograd, built kernels), else None."""
    if not all(t is None or (_plain_fp32_cpu(t)) for t in ts):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts):
        return None
    return extension()


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous()


def mix_reference(x, shift, mu, off=None):
    """Token-shift mixing: ``[x + (prev - x) * (mu[i] + off[i]) for i < n]``, each ``[B*T, C]``.

    ``x [B,T,C]``; ``shift [B,C]`` the token before t=0 (``prev`` is x shifted by one step);
    ``mu [n, C]``; ``off`` n tensors ``[B*T, C]`` (data-dependent offsets, ddlerp) or None."""
    B, T, C = x.shape
    prev = shift.to(x.dtype).unsqueeze(1) if T == 1 else torch.cat([shift.to(x.dtype).unsqueeze(1), x[:, :-1]], 1)
    xx = (prev - x).reshape(B * T, C)
    x2 = x.reshape(B * T, C)
    return [x2 + xx * (mu[i] if off is None else mu[i] + off[i]) for i in range(mu.shape[0])]


def mix(x, shift, mu, off=None):
    """:func:`mix_reference` in one pass (the kernel), or through the reference where the kernel
    does not apply."""
    mod = _kernel_for(x, shift, mu, *(off or ()))
    if mod is None:
        return mix_reference(x, shift, mu, off)
    B, T, C = x.shape
    offs = [_c(o) for o in off] if off is not None else []
    out = [torch.empty(B * T, C) for _ in range(mu.shape[0])]
    mod.mix_forward(_c(x), _c(shift), _c(mu), offs, out)
    return out


def mix_offsets(th: torch.Tensor, w2: torch.Tensor) -> list[torch.Tensor]:
    """ddlerp's data-dependent mix offsets ``m_i = th_i @ w2[i]`` (slots w, k, v, r, g), each
    ``[BT, C]``, from ``th = tanh(x @ w1)`` ``[BT, n*R]`` and ``w2`` ``[n, R, C]``: one product per
    slot through :func:`linear`. On the 2-core box, at BT=4096, R=32, C=512, the five oneDNN
    products take 7 ms where MKL's batched product takes 20 ms. The lean training backward needs
    them (the mixing's gradient does); the forward mixes with :func:`mix_lora`."""
    R = w2.shape[1]
    return [linear(th[:, i * R:(i + 1) * R], w2[i].t()) for i in range(w2.shape[0])]


def mix_lora_reference(x, shift, mu, th, w2):
    """ddlerp's mixing with its LoRA offsets: :func:`mix_reference` with ``off = mix_offsets(th, w2)``
    (``th [B*T, n*R]``, ``w2 [n, R, C]``)."""
    return mix_reference(x, shift, mu, mix_offsets(th, w2))


def mix_lora(x, shift, mu, th, w2):
    """:func:`mix_lora_reference` in one pass: each tile's rank-R offset product summed in registers
    and mixed on the spot (the C++ kernel), instead of n small-rank GEMMs whose [B*T, C] results
    the mixing reads back. At 512 rows, C=768, R=32 the five oneDNN products alone ran at ~35
    GFLOP/s. Elsewhere (other dtypes or devices, autograd recording, C % 16 != 0): the twin."""
    mod = _kernel_for(x, shift, mu, th, w2)
    B, T, C = x.shape
    if mod is None or C % 16 or w2.dim() != 3:
        return mix_lora_reference(x, shift, mu, th, w2)
    out = [torch.empty(B * T, C) for _ in range(mu.shape[0])]
    mod.mix_lora_forward(_c(x), _c(shift), _c(mu), _c(th), _c(w2), out)
    return out


def mix_backward(d, x, shift, mu, off=None, want_doff=False, dx=None, dshift=None):
    """Gradients of :func:`mix` given ``d`` (n tensors ``[B*T, C]``, of its results):
    ``(dx [B,T,C], dshift [B,C], dmu [n,C], doff)``; ``doff`` (n tensors) if ``want_doff`` else
    None. With ``dx``/``dshift`` given, the gradients are added to them (in place)."""
    B, T, C = x.shape
    mod = _kernel_for(x, shift, mu, *d, *(off or ()), dx, dshift)
    if mod is None:
        return _mix_backward_reference(d, x, shift, mu, off, want_doff, dx, dshift)
    acc = dx is not None
    dx = dx if acc else torch.empty(B, T, C)
    dshift = dshift if acc else torch.empty(B, C)
    if not (dx.is_contiguous() and dshift.is_contiguous()):
        return _mix_backward_reference(d, x, shift, mu, off, want_doff, dx, dshift)
    dmu = torch.empty(mu.shape[0], C, dtype=torch.float64)
    doff = [torch.empty(B * T, C) for _ in d] if want_doff else []
    mod.mix_backward([_c(t) for t in d], _c(x), _c(shift), _c(mu), [_c(o) for o in off] if off else [],
                     dx, dshift, dmu, doff, acc)
    return dx, dshift, dmu.float(), (doff if want_doff else None)


def _mix_backward_reference(d, x, shift, mu, off, want_doff, dx, dshift):
    """The twin: autograd through :func:`mix_reference`."""
    if want_doff and not off:
        raise ValueError("want_doff needs offsets")
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (x, shift, mu)]
        offs = [o.detach().requires_grad_() for o in off] if (off and want_doff) else off
        outs = mix_reference(*leaves, offs)
        wanted = leaves + (list(offs) if off and want_doff else [])
        g = torch.autograd.grad(outs, wanted, list(d), allow_unused=True)
    gx, gs, gmu = (t if t is not None else torch.zeros_like(l) for t, l in zip(g[:3], leaves))
    if dx is not None:
        dx += gx
        dshift += gs
        gx, gs = dx, dshift
    doff = [t if t is not None else torch.zeros_like(o) for t, o in zip(g[3:], offs)] if want_doff else None
    return gx, gs, gmu, doff


def gn_gate_reference(y, gp, weight, bias, groups, eps):
    """``GroupNorm(y) * silu(gp)`` (``y``, ``gp``: ``[R, A]``; ``groups`` groups over A)."""
    return F.group_norm(y, groups, weight, bias, eps) * F.silu(gp)


def _gn_gate_kernel(y, gp, weight, bias, groups):
    ok = (weight is not None and bias is not None and y.dim() == 2 and y.shape == gp.shape
          and weight.numel() == bias.numel() == y.shape[1]  # else the twin raises torch's own error
          and y.shape[1] % groups == 0 and (y.shape[1] // groups) % 16 == 0)
    return _kernel_for(y, gp, weight, bias) if ok else None


def gn_gate(y, gp, weight, bias, groups, eps):
    """:func:`gn_gate_reference` in one pass over each group (the kernel) where it applies."""
    mod = _gn_gate_kernel(y, gp, weight, bias, groups)
    if mod is None:
        return gn_gate_reference(y, gp, weight, bias, groups, eps)
    z = torch.empty(y.shape)
    mod.gn_gate_forward(_c(y), _c(gp), _c(weight), _c(bias), groups, float(eps), z)
    return z


def gn_gate_backward(y, gp, weight, bias, dz, groups, eps):
    """Gradients of :func:`gn_gate` given ``dz``: ``(dy, dgp, dweight, dbias, z)`` where ``z`` is the
    forward's result (which a following product's weight gradient needs)."""
    mod = _gn_gate_kernel(y, gp, weight, bias, groups)
    if mod is None or not _plain_fp32_cpu(dz):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (y, gp, weight, bias)]
            z = gn_gate_reference(*leaves, groups, eps)
            g = torch.autograd.grad(z, leaves, dz)
        return (*g, z.detach())
    dy, dgp, z = torch.empty(y.shape), torch.empty(y.shape), torch.empty(y.shape)
    dwb = torch.empty(2, y.shape[1], dtype=torch.float64)
    mod.gn_gate_backward(_c(y), _c(gp), _c(weight), _c(bias), _c(dz), groups, float(eps), dy, dgp, z, dwb)
    dwb = dwb.float()
    return dy, dgp, dwb[0], dwb[1], z


def sigmoid_gate_backward(dout, rr, vo):
    """Gradients of ``sigmoid(rr) * vo`` given ``dout``: ``(dvo, drr)``, in one pass where the
    kernel applies (fp32 CPU, a multiple of 16 elements), else by the twin's expressions
    ``dout * s``, ``dout * vo * s * (1 - s)``."""
    mod = _kernel_for(dout, rr, vo)
    if mod is None or dout.numel() % 16 or not (rr.shape == vo.shape == dout.shape):
        s = torch.sigmoid(rr)
        return dout * s, dout * vo * s * (1 - s)
    dvo, drr = torch.empty(dout.shape), torch.empty(dout.shape)
    mod.sigmoid_gate_backward(_c(dout), _c(rr), _c(vo), dvo, drr)
    return dvo, drr


def relu_square_backward_(g, q):
    """``g *= 2 * sqrt(q)`` in place, ``q = relu(h)^2`` (``sqrt(q) = relu(h)``, so this is the
    gradient through ``relu(h)^2``); one pass where the kernel applies (``g`` contiguous)."""
    mod = _kernel_for(g, q)
    if mod is None or g.numel() % 16 or g.shape != q.shape or not g.is_contiguous():
        return g.mul_(q.sqrt().mul_(2))
    mod.relu_square_backward_(g, _c(q))
    return g


# ------------------------------------------------------------------------- cross-entropy
class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction):
        x, t = _c(logits), targets.contiguous()
        lse, loss = torch.empty(x.shape[0]), torch.empty(x.shape[0])
        extension().ce_forward(x, t, ignore_index, lse, loss)
        n = int((t != ignore_index).sum()) if reduction == "mean" else 1
        ctx.save_for_backward(x, t, lse)
        ctx.args = (ignore_index, max(n, 1) if reduction == "mean" else 1)
        total = loss.double().sum()
        if reduction == "mean":
            total = total / n if n else total * float("nan")  # as F.cross_entropy: nan with no target
        return total.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        x, t, lse = ctx.saved_tensors
        ignore_index, n = ctx.args
        g = torch.empty_like(x)
        scale = (dloss.float() / n).expand(x.shape[0]).contiguous()
        extension().ce_backward(x, t, ignore_index, lse, scale, g)
        return g, None, None, None


def cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean"):
    """``F.cross_entropy(logits, targets, ignore_index=..., reduction=...)`` for ``logits [N, V]``,
    ``reduction`` "mean" or "sum"; differentiable in ``logits``.

    For fp32 CPU logits a C++ kernel computes each row's log-sum-exp in one pass and keeps only
    that ``[N]`` for backward, whose gradient ``softmax - onehot`` is one more pass. PyTorch keeps
    the ``[N, V]`` log-softmax output instead, and its backward zero-fills a ``[N, V]`` buffer,
    scatters into it and runs the log-softmax backward over both (6x512 model, ctx 4096, V=16384:
    the loss took 235 ms of a step and 256 MB more memory). Everything else (other devices or
    dtypes, no kernels) is ``F.cross_entropy``, the twin."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if (logits.dim() != 2 or targets.dim() != 1 or targets.dtype != torch.long or not _plain_fp32_cpu(logits)
            or targets.device.type != "cpu" or extension() is None):
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    return _CrossEntropy.apply(logits, targets, ignore_index, reduction)
