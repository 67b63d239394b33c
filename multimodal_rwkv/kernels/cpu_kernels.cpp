// C++ CPU kernels of multimodal_rwkv (built on first use by multimodal_rwkv/kernels/cpu.py).
//
// few_rows_linear: y = x @ w.T for 1-16 rows of x (decoding), reading the weight once; fp32 or bf16.
// wkv6_forward / wkv6_backward: the WKV-6 recurrence, step by step in fp32, with its exact
//   gradients. The forward saves the state every LS steps (a segment); the backward recomputes a
//   segment's chunk-start states (every L steps) from it, then one chunk's states at a time.
// gn_gate_* / mix_*: fused elementwise parts of a block (group norm times the silu gate; the
//   token-shift mixing), forward and backward, one pass over memory each. mix_lora_forward: the
//   mixing of ddlerp's five slots with their rank-R LoRA offsets computed on the fly.
// ce_*: cross-entropy over [N, V] logits, keeping only the log-sum-exp per row for backward.
// sigmoid_gate_backward / relu_square_backward_: the channel mix's elementwise backward.
// transpose: dst = src.T in 16x16 register tiles (a weight gradient's operands, made K-contiguous).
//
// Shapes (all fp32, contiguous): r, k, e [B,T,H,K]; v, o [B,T,H,V]; u [H,K]; states [B,H,K,V].
// e = exp(w), the decay factors, computed by the caller with torch's vectorised exp (a scalar exp
// per element here cost more than the recurrence's own arithmetic).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

// ------------------------------------------------------------------------- few-rows product
// Element types: fp32 (FMA), and bf16 (AVX512-BF16: dot products of bf16 pairs into fp32 sums,
// 32 weights per instruction). The bf16 instructions run only where the CPU has them
// (has_avx512_bf16); the fp32 instances, compiled under the same target, use none.
#define MMRWKV_BF16_TARGET __attribute__((target("avx512f,avx512bf16")))
struct F32 {
  using T = float;
  using V = __m512;
  static constexpr int64_t step = 16;
  static V load(const T* p) { return _mm512_loadu_ps(p); }
  MMRWKV_BF16_TARGET static __m512 dot(__m512 acc, V x, V w) { return _mm512_fmadd_ps(x, w, acc); }
};
struct BF16 {
  using T = uint16_t;
  using V = __m512i;
  static constexpr int64_t step = 32;
  static V load(const T* p) { return _mm512_loadu_si512(p); }
  MMRWKV_BF16_TARGET static __m512 dot(__m512 acc, V x, V w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
  }
};

bool has_avx512_bf16() { return __builtin_cpu_supports("avx512bf16"); }

// The lane sums of four vectors: {sum(a), sum(b), sum(c), sum(d)}.
MMRWKV_BF16_TARGET static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512d ab = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)));
  const __m512d cd = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d)));
  __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)), _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0x4E));  // 128-bit lanes: 0+2, 1+3
  return _mm_add_ps(_mm512_castps512_ps128(t), _mm512_extractf32x4_ps(t, 1));
}

// y[m, n] = x[m, :] . w[n, :] (fp32 sums) for NR weight rows at a time; K % E::step == 0.
template <class E, int M, int NR>
MMRWKV_BF16_TARGET static void rows_block(const typename E::T* x, const typename E::T* w, float* y, int64_t K,
                                          int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n + NR <= n1; n += NR) {
    __m512 acc[NR][M];
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r)
      _Pragma("GCC unroll 16") for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    const typename E::T* wr = w + n * K;
    for (int64_t k = 0; k < K; k += E::step) {
      typename E::V b[NR];
      _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) {
        b[r] = E::load(wr + r * K + k);
        _mm_prefetch((const char*)(wr + (r + 4 * NR) * K + k), _MM_HINT_T1);  // into L2: 21 -> 29 GB/s at 8 rows
      }
      _Pragma("GCC unroll 16") for (int m = 0; m < M; ++m) {
        const typename E::V xv = E::load(x + m * K + k);
        _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) acc[r][m] = E::dot(acc[r][m], xv, b[r]);
      }
    }
    if constexpr (NR <= 2) {
      _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r)
        for (int m = 0; m < M; ++m) y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
      continue;
    }
    // the NR sums of each row, four at a time through a shuffle tree (not NR full reductions)
    _Pragma("GCC unroll 16") for (int m = 0; m < M; ++m)
      _Pragma("GCC unroll 4") for (int r = 0; r < NR; r += 4) {
        const __m512 z = _mm512_setzero_ps();
        const __m128 s = sum4(acc[r][m], r + 1 < NR ? acc[r + 1][m] : z, r + 2 < NR ? acc[r + 2][m] : z,
                              r + 3 < NR ? acc[r + 3][m] : z);
        if (r + 4 <= NR) {
          _mm_storeu_ps(y + m * N + n + r, s);
        } else {
          alignas(16) float t[4];
          _mm_store_ps(t, s);
          for (int j = 0; r + j < NR; ++j) y[m * N + n + r + j] = t[j];
        }
      }
  }
}

// One product y [M, N] = x [M, K] @ w [N, K].T of a batch that rows() runs in one parallel region.
template <class E>
struct RowsJob {
  const typename E::T* x;
  const typename E::T* w;
  float* y;
  int64_t K, N;
};
constexpr int kMaxRowsJobs = 4;

template <class E, int M>
static void rows(const RowsJob<E>* jobs, int n) {
  // M * NR accumulators + NR weight vectors + one input vector within the 32 registers (more spills)
  constexpr int NR = M <= 2 ? 8 : M <= 4 ? 5 : M <= 6 ? 4 : M <= 9 ? 3 : 2;
  TORCH_CHECK(n >= 1 && n <= kMaxRowsJobs, "few-rows products: 1 to ", kMaxRowsJobs, " per call");
  int64_t start[kMaxRowsJobs + 1] = {0};  // the jobs' blocks of NR weight rows, numbered in turn
  for (int j = 0; j < n; ++j) start[j + 1] = start[j] + jobs[j].N / NR;
  at::parallel_for(0, start[n], 16, [&](int64_t b0, int64_t b1) {
    for (int j = 0; j < n; ++j) {
      const int64_t lo = std::max(b0, start[j]) - start[j], hi = std::min(b1, start[j + 1]) - start[j];
      const RowsJob<E>& J = jobs[j];
      if (lo < hi) rows_block<E, M, NR>(J.x, J.w, J.y, J.K, J.N, lo * NR, hi * NR);
    }
  });
  for (int j = 0; j < n; ++j) {  // the last N % NR rows of each
    const RowsJob<E>& J = jobs[j];
    rows_block<E, M, 1>(J.x, J.w, J.y, J.K, J.N, J.N / NR * NR, J.N);
  }
}

// The products of jobs[0 .. n) (each with M rows), all weights split across the threads at once.
template <class E>
static void rows_for(int64_t M, const RowsJob<E>* jobs, int n) {
  switch (M) {
#define ROWS(i) case i: rows<E, i>(jobs, n); break;
    ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
    ROWS(9) ROWS(10) ROWS(11) ROWS(12) ROWS(13) ROWS(14) ROWS(15) ROWS(16)
#undef ROWS
    default: TORCH_CHECK(false, "few_rows_linear: 1..16 rows");
  }
}

// x [M, K] @ w [N, K].T for 1-16 rows, both fp32 (K % 16 == 0) or both bf16 (K % 32 == 0): an fp32 result.
torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "few_rows_linear: shapes");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "few_rows_linear: layout");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  if (x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat) {
    TORCH_CHECK(K % 16 == 0, "few_rows_linear: fp32 needs K % 16 == 0");
    const RowsJob<F32> job{x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), K, N};
    rows_for<F32>(M, &job, 1);
  } else if (x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16) {
    TORCH_CHECK(K % 32 == 0 && has_avx512_bf16(), "few_rows_linear: bf16 needs K % 32 == 0 and AVX512-BF16");
    const RowsJob<BF16> job{(const uint16_t*)x.data_ptr(), (const uint16_t*)w.data_ptr(), y.data_ptr<float>(), K, N};
    rows_for<BF16>(M, &job, 1);
  } else {
    TORCH_CHECK(false, "few_rows_linear: fp32 or bf16 operands of one dtype");
  }
  return y;
}

// ----------------------------------------------------------------------------- transpose
// dst[j, i] = src[i, j] for a 16x16 tile: src rows ls floats apart, dst rows ld floats apart.
// Three shuffle stages: pairs of rows interleaved, then 2x2 blocks, then 128-bit lanes (twice).
static void transpose_tile16(const float* s, int64_t ls, float* d, int64_t ld) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(s + i * ls);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(d + i * ld, r[i]);
}

// dst[j, i] = src[i, j] for rows i0..i1 and columns j0..j1: 16x16 register tiles, scalar tails.
// src rows ls floats apart, dst rows ld floats apart (one thread; transpose() splits the work).
static void transpose_block(const float* s, int64_t ls, float* d, int64_t ld, int64_t i0, int64_t i1, int64_t j0,
                            int64_t j1) {
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) transpose_tile16(s + i * ls + j, ls, d + j * ld + i, ld);
    for (; j < j1; ++j)
      for (int64_t ii = i; ii < i + 16; ++ii) d[j * ld + ii] = s[ii * ls + j];
  }
  for (; i < i1; ++i)
    for (int64_t j = j0; j < j1; ++j) d[j * ld + i] = s[i * ls + j];
}

// ------------------------------------------------------------------------------------ WKV-6
// Per (batch, head), with S [K,V] the state before step t and e = exp(w_t) (given):
//   o_t = r_t S + (r_t . (u * k_t)) v_t          S <- diag(e) S + k_t^T v_t
static void check_wkv(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                      const torch::Tensor& e, const torch::Tensor& u) {
  for (const auto* t : {&r, &k, &v, &e, &u})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous(), "wkv6 cpu: fp32 contiguous inputs");
  TORCH_CHECK(r.dim() == 4 && k.sizes() == r.sizes() && e.sizes() == r.sizes() && v.dim() == 4, "wkv6 cpu: shapes");
}

// The register-path instance of a step kernel for a width of 16, 32, 48 or 64 (pick gets NV =
// width / 16 as a compile-time constant), or its plain-loop instance (NV = 0) for any other width.
template <typename Pick>
static auto by_width(int64_t width, Pick pick) {
  switch (width) {
    case 16: return pick(std::integral_constant<int, 1>{});
    case 32: return pick(std::integral_constant<int, 2>{});
    case 48: return pick(std::integral_constant<int, 3>{});
    case 64: return pick(std::integral_constant<int, 4>{});
    default: return pick(std::integral_constant<int, 0>{});
  }
}

// One forward step of one head: out = r S + c v (c = r . (u * k)), then S' = diag(e) S + k^T v,
// read from Sin and written to Sout (the same array, or the initial state and the output state:
// a decode step then reads and writes the state once, without copying it first).
// NV > 0: V = 16 NV, with v and the output row held in AVX-512 registers while the state streams
// through L1 once; NV == 0: any V, plain loops.
template <int NV, bool STREAM = false>
static void fwd_step(const float* rt, const float* kt, const float* et, const float* vt, float c, const float* Sin,
                     float* Sout, float* out, int64_t K, int64_t V) {
  if constexpr (NV > 0) {
    __m512 vv[NV], acc[NV];
    _Pragma("GCC unroll 4") for (int n = 0; n < NV; ++n) {
      vv[n] = _mm512_loadu_ps(vt + 16 * n);
      acc[n] = _mm512_mul_ps(_mm512_set1_ps(c), vv[n]);
    }
    for (int64_t i = 0; i < K; ++i) {
      const __m512 ri = _mm512_set1_ps(rt[i]), ei = _mm512_set1_ps(et[i]), ki = _mm512_set1_ps(kt[i]);
      const float* Si = Sin + i * (16 * NV);
      float* So = Sout + i * (16 * NV);
      _Pragma("GCC unroll 4") for (int n = 0; n < NV; ++n) {
        const __m512 sv = _mm512_loadu_ps(Si + 16 * n);
        acc[n] = _mm512_fmadd_ps(ri, sv, acc[n]);
        const __m512 sn = _mm512_fmadd_ps(ei, sv, _mm512_mul_ps(ki, vv[n]));
        if constexpr (STREAM) _mm512_stream_ps(So + 16 * n, sn); else _mm512_storeu_ps(So + 16 * n, sn);
      }
    }
    _Pragma("GCC unroll 4") for (int n = 0; n < NV; ++n) _mm512_storeu_ps(out + 16 * n, acc[n]);
  } else {
    for (int64_t j = 0; j < V; ++j) out[j] = c * vt[j];
    for (int64_t i = 0; i < K; ++i) {
      const float ri = rt[i], ei = et[i], ki = kt[i];
      const float* Si = Sin + i * V;
      float* So = Sout + i * V;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) {
        const float sv = Si[j];
        out[j] += ri * sv;
        So[j] = ei * sv + ki * vt[j];
      }
    }
  }
}

// Two forward steps (t, t+1) in one pass over the state: each row of S is read and written once
// per two steps (the single step's arithmetic, half its memory traffic). V = 16 NV.
struct Step {
  const float *r, *k, *e, *v;
  float c;
  float* out;
};
template <int NV>
static void fwd_step2(const Step& a, const Step& b, const float* Sin, float* Sout, int64_t K) {
  __m512 va[NV], vb[NV], acc_a[NV], acc_b[NV];
  _Pragma("GCC unroll 4") for (int n = 0; n < NV; ++n) {
    va[n] = _mm512_loadu_ps(a.v + 16 * n);
    vb[n] = _mm512_loadu_ps(b.v + 16 * n);
    acc_a[n] = _mm512_mul_ps(_mm512_set1_ps(a.c), va[n]);
    acc_b[n] = _mm512_mul_ps(_mm512_set1_ps(b.c), vb[n]);
  }
  for (int64_t i = 0; i < K; ++i) {
    const __m512 ra = _mm512_set1_ps(a.r[i]), ea = _mm512_set1_ps(a.e[i]), ka = _mm512_set1_ps(a.k[i]);
    const __m512 rb = _mm512_set1_ps(b.r[i]), eb = _mm512_set1_ps(b.e[i]), kb = _mm512_set1_ps(b.k[i]);
    const float* Si = Sin + i * (16 * NV);
    float* So = Sout + i * (16 * NV);
    _Pragma("GCC unroll 4") for (int n = 0; n < NV; ++n) {
      const __m512 s0 = _mm512_loadu_ps(Si + 16 * n);
      acc_a[n] = _mm512_fmadd_ps(ra, s0, acc_a[n]);
      const __m512 s1 = _mm512_fmadd_ps(ea, s0, _mm512_mul_ps(ka, va[n]));
      acc_b[n] = _mm512_fmadd_ps(rb, s1, acc_b[n]);
      _mm512_storeu_ps(So + 16 * n, _mm512_fmadd_ps(eb, s1, _mm512_mul_ps(kb, vb[n])));
    }
  }
  _Pragma("GCC unroll 4") for (int n = 0; n < NV; ++n) {
    _mm512_storeu_ps(a.out + 16 * n, acc_a[n]);
    _mm512_storeu_ps(b.out + 16 * n, acc_b[n]);
  }
}

using FwdStep2 = void (*)(const Step&, const Step&, const float*, float*, int64_t);

using FwdStep = void (*)(const float*, const float*, const float*, const float*, float, const float*, float*, float*,
                         int64_t, int64_t);

// s0: [B,H,K,V] initial state, or an empty tensor for zeros; s: [B,H,K,V] the final state (out).
// saved: [B,H,NS,K,V] (the state before step c*LS) or an empty tensor (inference: nothing saved).
void wkv6_forward(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor e, torch::Tensor u,
                  torch::Tensor s0, torch::Tensor s, torch::Tensor o, torch::Tensor saved, int64_t LS) {
  check_wkv(r, k, v, e, u);
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), K = r.size(3), V = v.size(3);
  const bool save = saved.numel() > 0;
  const int64_t NS = save ? saved.size(2) : 0;
  const float *rp = r.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *ep = e.data_ptr<float>(), *up = u.data_ptr<float>();
  TORCH_CHECK(s.scalar_type() == torch::kFloat && s.is_contiguous(), "wkv6 cpu: fp32 contiguous state");
  const bool has_s0 = s0.numel() > 0;
  TORCH_CHECK(!has_s0 || (s0.scalar_type() == torch::kFloat && s0.is_contiguous()), "wkv6 cpu: fp32 contiguous state");
  const float* s0p = has_s0 ? s0.data_ptr<float>() : nullptr;
  float *sp = s.data_ptr<float>(), *op = o.data_ptr<float>();
  float* savp = save ? saved.data_ptr<float>() : nullptr;
  const auto fstep = by_width(V, [](auto nv) -> FwdStep { return fwd_step<decltype(nv)::value>; });
  const auto fstep2 = by_width(V, [](auto nv) -> FwdStep2 {  // none for the plain loops
    if constexpr (decltype(nv)::value > 0) return fwd_step2<decltype(nv)::value>; else return nullptr;
  });
  at::parallel_for(0, B * H, 1, [&](int64_t bh0, int64_t bh1) {
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* S = sp + bh * K * V;
      const float* S_first = S;  // the state before step 0: s0 as given (read, never written), or zeros
      if (has_s0 && T > 0)
        S_first = s0p + bh * K * V;
      else if (has_s0)
        std::memcpy(S, s0p + bh * K * V, sizeof(float) * K * V);
      else
        std::fill(S, S + K * V, 0.f);
      const float* uh = up + h * K;
      auto at_step = [&](int64_t t) {
        const int64_t ik = ((b * T + t) * H + h) * K, iv = ((b * T + t) * H + h) * V;
        const float *rt = rp + ik, *kt = kp + ik;
        float c = 0.f;
#pragma omp simd reduction(+ : c)
        for (int64_t i = 0; i < K; ++i) c += rt[i] * uh[i] * kt[i];
        return Step{rt, kt, ep + ik, vp + iv, c, op + iv};
      };
      for (int64_t t = 0; t < T;) {
        const float* Sin = t == 0 ? S_first : S;
        if (save && t % LS == 0) std::memcpy(savp + (bh * NS + t / LS) * K * V, Sin, sizeof(float) * K * V);
        const Step a = at_step(t);
        if (fstep2 && t + 1 < T && !(save && (t + 1) % LS == 0)) {  // two steps, no state to save between
          fstep2(a, at_step(t + 1), Sin, S, K);
          t += 2;
        } else {
          fstep(a.r, a.k, a.e, a.v, a.c, Sin, S, a.out, K, V);
          t += 1;
        }
      }
    }
  });
}

// The backward works on value-major copies of the state and its gradient (St[j, i] = S[i, j]): the
// sums over the value index (dr, dk, dw) then add whole rows of K lanes, and only dv needs a
// horizontal sum (one per value index instead of three per key index in the key-major layout).
static void transpose_kv(const float* src, float* dst, int64_t K, int64_t V) {  // dst[V,K] = src[K,V].T
  transpose_block(src, V, dst, K, 0, K, 0, V);
}

// One step of the value-major state: Snt[j, :] = e * St[j, :] + v[j] k. NK as in bwd_step.
template <int NK>
static void state_step(const float* St, float* Snt, const float* kt, const float* et, const float* vt, int64_t K,
                       int64_t V) {
  if constexpr (NK > 0) {
    __m512 kv[NK], ev[NK];
    _Pragma("GCC unroll 4") for (int n = 0; n < NK; ++n) {
      kv[n] = _mm512_loadu_ps(kt + 16 * n);
      ev[n] = _mm512_loadu_ps(et + 16 * n);
    }
    for (int64_t j = 0; j < V; ++j) {
      const __m512 vj = _mm512_set1_ps(vt[j]);
      _Pragma("GCC unroll 4") for (int n = 0; n < NK; ++n)
        _mm512_storeu_ps(Snt + j * K + 16 * n,
                         _mm512_fmadd_ps(ev[n], _mm512_loadu_ps(St + j * K + 16 * n), _mm512_mul_ps(vj, kv[n])));
    }
  } else {
    for (int64_t j = 0; j < V; ++j) {
      const float vj = vt[j];
#pragma omp simd
      for (int64_t i = 0; i < K; ++i) Snt[j * K + i] = et[i] * St[j * K + i] + vj * kt[i];
    }
  }
}

// One backward step of one head (formulas above wkv6_backward), value-major. St: the state before
// the step; Gt: the gradient of the state after it, updated in place to the gradient before it.
struct BwdArgs {
  const float *r, *k, *e, *v, *dout, *u, *St;
  float *Gt, *dr, *dk, *dw, *du, *dv;
  float dc, cc;
  int64_t K, V;
};

// NK > 0: K = 16 NK, with r, k, e and the three sums held in AVX-512 registers; NK == 0: any K.
template <int NK>
static void bwd_step(const BwdArgs& p) {
  const int64_t K = p.K, V = p.V;
  if constexpr (NK > 0) {
    __m512 rv[NK], kv[NK], ev[NK], a[NK], bb[NK], d[NK];
    _Pragma("GCC unroll 4") for (int n = 0; n < NK; ++n) {
      rv[n] = _mm512_loadu_ps(p.r + 16 * n);
      kv[n] = _mm512_loadu_ps(p.k + 16 * n);
      ev[n] = _mm512_loadu_ps(p.e + 16 * n);
      a[n] = bb[n] = d[n] = _mm512_setzero_ps();
    }
    const float* __restrict dout = p.dout;
    const float* __restrict vt = p.v;
    const float* __restrict St = p.St;
    float* __restrict Gt = p.Gt;
    float* __restrict dv = p.dv;
    const float cc = p.cc;
    for (int64_t j = 0; j < V; ++j) {
      const __m512 dj = _mm512_set1_ps(dout[j]), vj = _mm512_set1_ps(vt[j]);
      float* Gj = Gt + j * K;
      const float* Sj = St + j * K;
      __m512 dva = _mm512_setzero_ps();
      _Pragma("GCC unroll 4") for (int n = 0; n < NK; ++n) {
        const __m512 g = _mm512_loadu_ps(Gj + 16 * n), sv = _mm512_loadu_ps(Sj + 16 * n);
        a[n] = _mm512_fmadd_ps(dj, sv, a[n]);
        bb[n] = _mm512_fmadd_ps(vj, g, bb[n]);
        d[n] = _mm512_fmadd_ps(g, sv, d[n]);
        dva = _mm512_fmadd_ps(kv[n], g, dva);
        _mm512_storeu_ps(Gj + 16 * n, _mm512_fmadd_ps(ev[n], g, _mm512_mul_ps(dj, rv[n])));
      }
      dv[j] = cc * dout[j] + _mm512_reduce_add_ps(dva);
    }
    const __m512 dc = _mm512_set1_ps(p.dc);
    _Pragma("GCC unroll 4") for (int n = 0; n < NK; ++n) {
      const __m512 un = _mm512_mul_ps(dc, _mm512_loadu_ps(p.u + 16 * n));  // dc u
      _mm512_storeu_ps(p.dr + 16 * n, _mm512_fmadd_ps(un, kv[n], a[n]));
      _mm512_storeu_ps(p.dk + 16 * n, _mm512_fmadd_ps(un, rv[n], bb[n]));
      _mm512_storeu_ps(p.dw + 16 * n, _mm512_mul_ps(ev[n], d[n]));
      _mm512_storeu_ps(p.du + 16 * n, _mm512_fmadd_ps(_mm512_mul_ps(dc, rv[n]), kv[n], _mm512_loadu_ps(p.du + 16 * n)));
    }
  } else {
    for (int64_t i = 0; i < K; ++i) p.dr[i] = p.dk[i] = p.dw[i] = 0.f;
    for (int64_t j = 0; j < V; ++j) {
      const float dj = p.dout[j], vj = p.v[j];
      float* __restrict Gj = p.Gt + j * K;
      const float* __restrict Sj = p.St + j * K;
      float* __restrict dr = p.dr;
      float* __restrict dk = p.dk;
      float* __restrict dw = p.dw;
      float dva = 0.f;
#pragma omp simd reduction(+ : dva)
      for (int64_t i = 0; i < K; ++i) {
        const float g = Gj[i], sv = Sj[i];
        dr[i] += dj * sv;
        dk[i] += vj * g;
        dw[i] += g * sv;
        dva += p.k[i] * g;
        Gj[i] = p.e[i] * g + dj * p.r[i];
      }
      p.dv[j] = p.cc * dj + dva;
    }
    for (int64_t i = 0; i < K; ++i) {
      const float un = p.dc * p.u[i];
      p.dr[i] += un * p.k[i];
      p.dk[i] += un * p.r[i];
      p.dw[i] *= p.e[i];
      p.du[i] += p.dc * p.r[i] * p.k[i];
    }
  }
}

using StateStep = void (*)(const float*, float*, const float*, const float*, const float*, int64_t, int64_t);
using BwdStep = void (*)(const BwdArgs&);


// ds: gradient of the final state in, gradient of the initial state out. du: [B,H,K] (summed
// over B by the caller). Backward, t = T-1 .. 0, with S the state before step t, G the gradient
// of the state after it, do = dL/do_t, dc = do . v_t, c = r_t . (u * k_t):
//   dr_t[i] = do . S[i,:] + dc u[i] k_t[i]       dk_t[i] = G[i,:] . v_t + dc r_t[i] u[i]
//   dv_t    = c do + k_t G                        dw_t[i] = e[i] (G[i,:] . S[i,:])
//   du[i]  += dc r_t[i] k_t[i]                    G <- diag(e) G + r_t^T do
void wkv6_backward(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor e, torch::Tensor u,
                   torch::Tensor saved, torch::Tensor dout, torch::Tensor ds, torch::Tensor dr, torch::Tensor dk,
                   torch::Tensor dv, torch::Tensor dw, torch::Tensor du, int64_t L, int64_t LS) {
  check_wkv(r, k, v, e, u);
  TORCH_CHECK(dout.scalar_type() == torch::kFloat && dout.is_contiguous(), "wkv6 cpu: fp32 contiguous grad");
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), K = r.size(3), V = v.size(3);
  TORCH_CHECK(LS % L == 0, "wkv6 cpu: the save stride must be a multiple of the chunk");
  const int64_t NS = saved.size(2), CPS = LS / L, KV = K * V;  // segments; chunks per segment
  const float *rp = r.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *ep = e.data_ptr<float>(), *up = u.data_ptr<float>(), *savp = saved.data_ptr<float>();
  const float* dop = dout.data_ptr<float>();
  float *dsp = ds.data_ptr<float>(), *drp = dr.data_ptr<float>(), *dkp = dk.data_ptr<float>();
  float *dvp = dv.data_ptr<float>(), *dwp = dw.data_ptr<float>(), *dup = du.data_ptr<float>();
  // one step of the value-major state: Snt[j, :] = e_t * St[j, :] + v_t[j] k_t
  const auto sstep = by_width(K, [](auto nk) -> StateStep { return state_step<decltype(nk)::value>; });
  auto step = [&](const float* St, float* Snt, int64_t b, int64_t h, int64_t t) {
    const int64_t ik = ((b * T + t) * H + h) * K, iv = ((b * T + t) * H + h) * V;
    sstep(St, Snt, kp + ik, ep + ik, vp + iv, K, V);
  };
  const auto bstep = by_width(K, [](auto nk) -> BwdStep { return bwd_step<decltype(nk)::value>; });
  at::parallel_for(0, B * H, 1, [&](int64_t bh0, int64_t bh1) {
    std::vector<float> sbuf(L * KV), cbuf(CPS * KV), gbuf(KV);
    float* Gt = gbuf.data();
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      transpose_kv(dsp + bh * KV, Gt, K, V);
      const float* uh = up + h * K;
      float* duh = dup + bh * K;
      for (int64_t sg = NS - 1; sg >= 0; --sg) {
        const int64_t s0 = sg * LS, s1 = std::min(T, s0 + LS), nc = (s1 - s0 + L - 1) / L;
        // the states at this segment's chunk starts, recomputed from the saved segment start
        transpose_kv(savp + (bh * NS + sg) * KV, cbuf.data(), K, V);
        for (int64_t c = 1; c < nc; ++c) {
          std::memcpy(sbuf.data(), cbuf.data() + (c - 1) * KV, sizeof(float) * KV);
          for (int64_t t = s0 + (c - 1) * L; t < s0 + c * L; ++t) {
            float* S = sbuf.data() + ((t - s0) % 2) * KV;
            float* Sn = (t + 1 == s0 + c * L) ? cbuf.data() + c * KV : sbuf.data() + ((t - s0 + 1) % 2) * KV;
            step(S, Sn, b, h, t);
          }
        }
        for (int64_t c = nc - 1; c >= 0; --c) {
          const int64_t t0 = s0 + c * L, t1 = std::min(s1, t0 + L);
          // the states before each step of this chunk, recomputed from its start
          std::memcpy(sbuf.data(), cbuf.data() + c * KV, sizeof(float) * KV);
          for (int64_t t = t0; t + 1 < t1; ++t)
            step(sbuf.data() + (t - t0) * KV, sbuf.data() + (t - t0 + 1) * KV, b, h, t);
          for (int64_t t = t1 - 1; t >= t0; --t) {
            const int64_t ik = ((b * T + t) * H + h) * K, iv = ((b * T + t) * H + h) * V;
            const float *rt = rp + ik, *kt = kp + ik, *et = ep + ik, *vt = vp + iv, *dot = dop + iv;
            float dc = 0.f, cc = 0.f;
#pragma omp simd reduction(+ : dc)
            for (int64_t j = 0; j < V; ++j) dc += dot[j] * vt[j];
#pragma omp simd reduction(+ : cc)
            for (int64_t i = 0; i < K; ++i) cc += rt[i] * uh[i] * kt[i];
            bstep(BwdArgs{rt, kt, et, vt, dot, uh, sbuf.data() + (t - t0) * KV, Gt, drp + ik, dkp + ik, dwp + ik,
                          duh, dvp + iv, dc, cc, K, V});
          }
        }
      }
      transpose_kv(Gt, dsp + bh * KV, V, K);
    }
  });
}


// ------------------------------------------------------------------- fused elementwise parts
// Rows r = b * T + t of [B*T, C] tensors; the token before row (b, 0) is shift[b].

// exp(x) for 16 floats: x = n ln2 + f, |f| <= ln2/2, exp(f) by Cephes' degree-6 polynomial
// (relative error ~1e-7), scaled by 2^n with scalef (which also gives 0 for very negative x).
static inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f));
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

static inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

static void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.device().is_cpu(),
              "cpu kernels: ", name, " must be a contiguous fp32 CPU tensor");
}

// Partial sums of a [n] vector per block of rows, merged in double (reductions over B*T rows).
struct Accum {
  std::vector<double> total;
  std::mutex mu;
  explicit Accum(int64_t n) : total(n, 0.0) {}
  void add(const std::vector<float>& part) {
    std::lock_guard<std::mutex> g(mu);
    for (size_t i = 0; i < part.size(); ++i) total[i] += part[i];
  }
};
constexpr int64_t kBlockRows = 64;  // rows summed in float before a partial sum is merged

// The mean and 1 / sqrt(variance + eps) of x[0 .. n) (n % 16 == 0), broadcast: the statistics of
// a layer norm row or a group norm group (two passes, the variance about the mean).
struct NormStats {
  __m512 mean, rstd;
};
static inline NormStats norm_stats(const float* x, int64_t n, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + i));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / n);
  acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), m);
    acc = _mm512_fmadd_ps(d, d, acc);
  }
  return {m, _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(acc) / n + eps))};
}

// x060's decay factors exp(-exp(w)) for 16 lanes of w = decay + y.
static inline __m512 decay16(__m512 w) { return exp16(_mm512_sub_ps(_mm512_setzero_ps(), exp16(w))); }

// x060's decay factors e = exp(-exp(y + decay)) from the decay LoRA's output y [R, A] (decay [A],
// A % 16 == 0): one pass where torch takes an add, an exp, a negation and the WKV's own exp.
void decay_factors(torch::Tensor y, torch::Tensor decay, torch::Tensor e) {
  for (auto* t : {&y, &decay, &e}) check_f32(*t, "decay_factors input");
  const int64_t A = decay.numel(), R = y.numel() / A;
  TORCH_CHECK(A % 16 == 0 && y.numel() == R * A && e.numel() == R * A, "decay_factors: bad shapes");
  const float *yp = y.data_ptr<float>(), *dp = decay.data_ptr<float>();
  float* ep = e.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t a = 0; a < A; a += 16) {
        _mm512_storeu_ps(ep + r * A + a, decay16(_mm512_add_ps(_mm512_loadu_ps(yp + r * A + a), _mm512_loadu_ps(dp + a))));
      }
  });
}

// One row of gn_gate_forward: z = (GroupNorm(y) * w + b) * silu(gp) over G groups of N (N % 16 == 0).
static void gn_gate_row(const float* yp, const float* gpp, const float* wp, const float* bp, float* zp, int64_t G,
                        int64_t N, float eps) {
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * N;
    const NormStats st = norm_stats(yp + o, N, eps);
    for (int64_t i = 0; i < N; i += 16) {
      const __m512 yh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(yp + o + i), st.mean), st.rstd);
      const __m512 a = _mm512_fmadd_ps(yh, _mm512_loadu_ps(wp + o + i), _mm512_loadu_ps(bp + o + i));
      const __m512 x = _mm512_loadu_ps(gpp + o + i);
      _mm512_storeu_ps(zp + o + i, _mm512_mul_ps(a, _mm512_mul_ps(x, sigmoid16(x))));
    }
  }
}

// z = (GroupNorm(y) * w + b) * silu(gp): y, gp, z [R, A]; w, b [A]; G groups of N = A / G, N % 16 == 0.
void gn_gate_forward(torch::Tensor y, torch::Tensor gp, torch::Tensor w, torch::Tensor b, int64_t G, double eps,
                     torch::Tensor z) {
  for (auto* t : {&y, &gp, &w, &b, &z}) check_f32(*t, "gn_gate input");
  const int64_t R = y.size(0), A = y.size(1), N = A / G;
  TORCH_CHECK(N * G == A && N % 16 == 0 && gp.numel() == R * A && z.numel() == R * A, "gn_gate: bad shapes");
  const float *yp = y.data_ptr<float>(), *gpp = gp.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) gn_gate_row(yp + r * A, gpp + r * A, wp, bp, zp + r * A, G, N, (float)eps);
  });
}

// Gradients of gn_gate_forward given dz: dy, dgp [R, A]; dwb [2, A] (dw, db); also z itself (the
// forward's output, which the caller's weight gradient needs).
void gn_gate_backward(torch::Tensor y, torch::Tensor gp, torch::Tensor w, torch::Tensor b, torch::Tensor dz,
                      int64_t G, double eps, torch::Tensor dy, torch::Tensor dgp, torch::Tensor z, torch::Tensor dwb) {
  for (auto* t : {&y, &gp, &w, &b, &dz, &dy, &dgp, &z}) check_f32(*t, "gn_gate_backward input");
  TORCH_CHECK(dwb.scalar_type() == torch::kDouble && dwb.is_contiguous(), "gn_gate_backward: dwb must be fp64");
  const int64_t R = y.size(0), A = y.size(1), N = A / G;
  TORCH_CHECK(N * G == A && N % 16 == 0 && dwb.numel() == 2 * A, "gn_gate_backward: bad shapes");
  const float *yp = y.data_ptr<float>(), *gpp = gp.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  const float* dzp = dz.data_ptr<float>();
  float *dyp = dy.data_ptr<float>(), *dgpp = dgp.data_ptr<float>(), *zp = z.data_ptr<float>();
  Accum acc_wb(2 * A);
  at::parallel_for(0, R, kBlockRows, [&](int64_t r0, int64_t r1) {
    std::vector<float> part(2 * A);
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t rb = r0; rb < r1; rb += kBlockRows) {
      std::fill(part.begin(), part.end(), 0.f);
      for (int64_t r = rb; r < std::min(r1, rb + kBlockRows); ++r)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t o = r * A + g * N, c0 = g * N;
          const NormStats st = norm_stats(yp + o, N, (float)eps);
          const __m512 m = st.mean, rs = st.rstd;
          __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
          for (int64_t i = 0; i < N; i += 16) {
            const __m512 yh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(yp + o + i), m), rs);
            const __m512 wv = _mm512_loadu_ps(wp + c0 + i);
            const __m512 a = _mm512_fmadd_ps(yh, wv, _mm512_loadu_ps(bp + c0 + i));
            const __m512 x = _mm512_loadu_ps(gpp + o + i), sg = sigmoid16(x), gv = _mm512_mul_ps(x, sg);
            const __m512 dzv = _mm512_loadu_ps(dzp + o + i);
            _mm512_storeu_ps(zp + o + i, _mm512_mul_ps(a, gv));
            // d silu(x)/dx = s (1 + x (1 - s))
            const __m512 dsilu = _mm512_mul_ps(sg, _mm512_fmadd_ps(x, _mm512_sub_ps(one, sg), one));
            _mm512_storeu_ps(dgpp + o + i, _mm512_mul_ps(_mm512_mul_ps(dzv, a), dsilu));
            const __m512 da = _mm512_mul_ps(dzv, gv);
            _mm512_storeu_ps(part.data() + c0 + i, _mm512_fmadd_ps(da, yh, _mm512_loadu_ps(part.data() + c0 + i)));
            _mm512_storeu_ps(part.data() + A + c0 + i, _mm512_add_ps(da, _mm512_loadu_ps(part.data() + A + c0 + i)));
            const __m512 dyh = _mm512_mul_ps(da, wv);
            _mm512_storeu_ps(dyp + o + i, dyh);
            s1 = _mm512_add_ps(s1, dyh);
            s2 = _mm512_fmadd_ps(dyh, yh, s2);
          }
          const __m512 c1 = _mm512_set1_ps(_mm512_reduce_add_ps(s1) / N), c2 = _mm512_set1_ps(_mm512_reduce_add_ps(s2) / N);
          for (int64_t i = 0; i < N; i += 16) {
            const __m512 yh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(yp + o + i), m), rs);
            const __m512 t = _mm512_fnmadd_ps(yh, c2, _mm512_sub_ps(_mm512_loadu_ps(dyp + o + i), c1));
            _mm512_storeu_ps(dyp + o + i, _mm512_mul_ps(t, rs));
          }
        }
      acc_wb.add(part);
    }
  });
  std::copy(acc_wb.total.begin(), acc_wb.total.end(), dwb.data_ptr<double>());
}

// The data pointers of n [B*T, C] fp32 tensors (none if the list is empty).
static std::vector<float*> row_tensors(const std::vector<torch::Tensor>& ts, int64_t n, int64_t R, int64_t C,
                                       const char* name) {
  std::vector<float*> ps;
  if (ts.empty()) return ps;
  TORCH_CHECK((int64_t)ts.size() == n, "cpu kernels: ", name, " must hold ", n, " tensors");
  for (const auto& t : ts) {
    check_f32(t, name);
    TORCH_CHECK(t.numel() == R * C, "cpu kernels: ", name, " tensors must have ", R * C, " elements");
    ps.push_back(t.data_ptr<float>());
  }
  return ps;
}

// Token-shift mixing: out[i][r] = x[r] + (prev[r] - x[r]) * (mu[i] + off[i][r]), i < n; prev[r] is
// x[r - 1] or, at t = 0, shift[b]. x [B, T, C], shift [B, C], mu [n, C]; off: n tensors [B*T, C] or
// none; out: n tensors [B*T, C] (each may be the corresponding off tensor: updated in place).
void mix_forward(torch::Tensor x, torch::Tensor shift, torch::Tensor mu, std::vector<torch::Tensor> off,
                 std::vector<torch::Tensor> out) {
  for (auto* t : {&x, &shift, &mu}) check_f32(*t, "mix input");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), n = mu.size(0), R = B * T;
  TORCH_CHECK(shift.numel() == B * C && mu.numel() == n * C && !out.empty(), "mix: bad shapes");
  const auto offp = row_tensors(off, n, R, C, "mix offsets");
  const auto outp = row_tensors(out, n, R, C, "mix outputs");
  const bool has_off = !offp.empty();
  const float *xp = x.data_ptr<float>(), *sp = shift.data_ptr<float>(), *mp = mu.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * C;
      const float* pr = r % T == 0 ? sp + (r / T) * C : xr - C;
      for (int64_t i = 0; i < n; ++i) {
        const float* mi = mp + i * C;
        float* o = outp[i] + r * C;
        if (has_off) {
          const float* f = offp[i] + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = xr[c] + (pr[c] - xr[c]) * (mi[c] + f[c]);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = xr[c] + (pr[c] - xr[c]) * mi[c];
        }
      }
    }
  });
}

// ddlerp's mixing with its LoRA offsets computed in registers: out[i][r] = x[r] + (prev[r] - x[r]) *
// (mu[i] + th[r, i*R:(i+1)*R] @ w2[i]), i < n. th [B*T, n*R] (tanh of the first LoRA product);
// w2 [n, R, C]. The offsets' rank R is small (32/64): as n separate products they run far below
// the GEMM peak and write n [B*T, C] buffers that the mixing reads back; here each tile of MR rows
// x 16*NB columns is summed over R in registers and mixed on the spot. C % 16 == 0.
template <int MR, int NB>
static void mix_lora_tile(const float* th, int64_t ldth, const float* w, int64_t C, int64_t R, const float* const* xr,
                          const float* const* pr, const float* mu, float* const* o) {
  __m512 acc[MR][NB];
  _Pragma("GCC unroll 8") for (int m = 0; m < MR; ++m)
    _Pragma("GCC unroll 4") for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t q = 0; q < R; ++q) {
    __m512 wv[NB];
    _Pragma("GCC unroll 4") for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_ps(w + q * C + 16 * j);
    _Pragma("GCC unroll 8") for (int m = 0; m < MR; ++m) {
      const __m512 a = _mm512_set1_ps(th[m * ldth + q]);
      _Pragma("GCC unroll 4") for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_ps(a, wv[j], acc[m][j]);
    }
  }
  _Pragma("GCC unroll 8") for (int m = 0; m < MR; ++m)
    _Pragma("GCC unroll 4") for (int j = 0; j < NB; ++j) {
      const __m512 xv = _mm512_loadu_ps(xr[m] + 16 * j), pv = _mm512_loadu_ps(pr[m] + 16 * j);
      const __m512 f = _mm512_add_ps(_mm512_loadu_ps(mu + 16 * j), acc[m][j]);
      _mm512_storeu_ps(o[m] + 16 * j, _mm512_fmadd_ps(_mm512_sub_ps(pv, xv), f, xv));
    }
}

// The instance of a register-tile kernel for mr rows (1..6) and nb vectors of 16 columns (1..4):
// pick gets both as compile-time constants.
template <int MR, typename Pick>
static auto by_tile_cols(int nb, Pick pick) {
  switch (nb) {
    case 1: return pick(std::integral_constant<int, MR>{}, std::integral_constant<int, 1>{});
    case 2: return pick(std::integral_constant<int, MR>{}, std::integral_constant<int, 2>{});
    case 3: return pick(std::integral_constant<int, MR>{}, std::integral_constant<int, 3>{});
    default: return pick(std::integral_constant<int, MR>{}, std::integral_constant<int, 4>{});
  }
}
template <typename Pick>
static auto by_tile(int mr, int nb, Pick pick) {
  switch (mr) {
    case 1: return by_tile_cols<1>(nb, pick);
    case 2: return by_tile_cols<2>(nb, pick);
    case 3: return by_tile_cols<3>(nb, pick);
    case 4: return by_tile_cols<4>(nb, pick);
    case 5: return by_tile_cols<5>(nb, pick);
    default: return by_tile_cols<6>(nb, pick);
  }
}

using MixLoraTile = void (*)(const float*, int64_t, const float*, int64_t, int64_t, const float* const*,
                             const float* const*, const float*, float* const*);
static MixLoraTile mix_lora_tile_for(int mr, int nb) {
  return by_tile(mr, nb, [](auto m, auto n) -> MixLoraTile { return mix_lora_tile<m.value, n.value>; });
}

void mix_lora_forward(torch::Tensor x, torch::Tensor shift, torch::Tensor mu, torch::Tensor th, torch::Tensor w2,
                      std::vector<torch::Tensor> out) {
  for (auto* t : {&x, &shift, &mu, &th, &w2}) check_f32(*t, "mix_lora input");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), n = mu.size(0), rows = B * T;
  TORCH_CHECK(w2.dim() == 3 && w2.size(0) == n && w2.size(2) == C && C % 16 == 0, "mix_lora: bad w2 shape");
  const int64_t R = w2.size(1);
  TORCH_CHECK(shift.numel() == B * C && mu.numel() == n * C && th.numel() == rows * n * R, "mix_lora: bad shapes");
  const auto outp = row_tensors(out, n, rows, C, "mix_lora outputs");
  const float *xp = x.data_ptr<float>(), *sp = shift.data_ptr<float>(), *mp = mu.data_ptr<float>();
  const float *thp = th.data_ptr<float>(), *wp = w2.data_ptr<float>();
  constexpr int64_t MR = 6;
  at::parallel_for(0, (rows + MR - 1) / MR, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * MR, mr = std::min(MR, rows - r0);
      const float* xr[MR];
      const float* pr[MR];
      float* o[MR];
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c0 = 0; c0 < C; c0 += 64) {
          const int nb = (int)std::min<int64_t>(4, (C - c0) / 16);
          for (int64_t m = 0; m < mr; ++m) {
            const int64_t r = r0 + m;
            xr[m] = xp + r * C + c0;
            pr[m] = (r % T == 0 ? sp + (r / T) * C : xp + (r - 1) * C) + c0;
            o[m] = outp[i] + r * C + c0;
          }
          mix_lora_tile_for((int)mr, nb)(thp + r0 * n * R + i * R, n * R, wp + i * R * C + c0, C, R, xr, pr,
                                         mp + i * C + c0, o);
        }
    }
  });
}

// Gradients of mix_forward given d: n tensors [B*T, C] (of the outputs): dx [B, T, C] and dshift
// [B, C] (written, or added to when accumulate), dmu [n, C] (fp64), and doff[i] = d[i] * (prev - x)
// when doff holds n tensors. With xx = prev - x and dxx[r] = sum_i d[i][r] (mu[i] + off[i][r]):
// dx[r] = sum_i d[i][r] - dxx[r] + dxx[r + 1] (the next row of the same sequence), dshift[b] = dxx[b, 0].
void mix_backward(std::vector<torch::Tensor> d, torch::Tensor x, torch::Tensor shift, torch::Tensor mu,
                  std::vector<torch::Tensor> off, torch::Tensor dx, torch::Tensor dshift, torch::Tensor dmu,
                  std::vector<torch::Tensor> doff, bool accumulate) {
  for (auto* t : {&x, &shift, &mu, &dx, &dshift}) check_f32(*t, "mix_backward input");
  TORCH_CHECK(dmu.scalar_type() == torch::kDouble && dmu.is_contiguous(), "mix_backward: dmu must be fp64");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), n = mu.size(0), R = B * T;
  TORCH_CHECK(dx.numel() == R * C && dshift.numel() == B * C && dmu.numel() == n * C && !d.empty(),
              "mix_backward: bad shapes");
  const auto dpp = row_tensors(d, n, R, C, "mix output gradients");
  const auto offp = row_tensors(off, n, R, C, "mix offsets");
  const auto dop = row_tensors(doff, n, R, C, "mix offset gradients");
  const bool has_off = !offp.empty(), want_doff = !dop.empty();
  const float *xp = x.data_ptr<float>(), *sp = shift.data_ptr<float>(), *mp = mu.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *dsp = dshift.data_ptr<float>();
  Accum acc_mu(n * C);
  auto dxx_row = [&](int64_t r, float* out) {  // dxx[r] into out[C]
    std::fill(out, out + C, 0.f);
    for (int64_t i = 0; i < n; ++i) {
      const float *di = dpp[i] + r * C, *mi = mp + i * C, *f = has_off ? offp[i] + r * C : nullptr;
      if (has_off) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] += di[c] * (mi[c] + f[c]);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] += di[c] * mi[c];
      }
    }
  };
  at::parallel_for(0, R, kBlockRows, [&](int64_t r0, int64_t r1) {
    std::vector<float> part(n * C), cur(C), nxt(C), xx(C);
    for (int64_t rb = r0; rb < r1; rb += kBlockRows) {
      std::fill(part.begin(), part.end(), 0.f);
      const int64_t re = std::min(r1, rb + kBlockRows);
      dxx_row(rb, cur.data());
      for (int64_t r = rb; r < re; ++r) {
        const int64_t t = r % T;
        const float* xr = xp + r * C;
        const float* pr = t == 0 ? sp + (r / T) * C : xr - C;
        const bool same_seq = t + 1 < T;  // the next row's dxx flows into this row's dx
        if (same_seq || r + 1 < re) dxx_row(r + 1, nxt.data());  // (and is the next iteration's cur)
        const float keep = same_seq ? 1.f : 0.f;
        float* o = dxp + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          xx[c] = pr[c] - xr[c];
          const float v = keep * nxt[c] - cur[c];
          o[c] = accumulate ? o[c] + v : v;
        }
        for (int64_t i = 0; i < n; ++i) {
          const float* di = dpp[i] + r * C;
          float* pi = part.data() + i * C;
          float* fo = want_doff ? dop[i] + r * C : nullptr;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            o[c] += di[c];
            pi[c] += di[c] * xx[c];
          }
          if (want_doff) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) fo[c] = di[c] * xx[c];
          }
        }
        if (t == 0) {
          float* ds = dsp + (r / T) * C;
          for (int64_t c = 0; c < C; ++c) ds[c] = accumulate ? ds[c] + cur[c] : cur[c];
        }
        std::swap(cur, nxt);
      }
      acc_mu.add(part);
    }
  });
  std::copy(acc_mu.total.begin(), acc_mu.total.end(), dmu.data_ptr<double>());
}

// Cross-entropy over rows of logits x [N, V] with targets t [N] (ignore_index: no loss, no grad).
// Forward: lse[n] = log sum_v exp(x[n, v]) and loss[n] = lse[n] - x[n, t[n]] (0 where ignored).
// The row's maximum, or NaN if the row holds a NaN (max_ps alone would skip it).
static inline float row_max(const float* x, int64_t V) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  int64_t v = 0;
  for (; v + 16 <= V; v += 16) {
    const __m512 xv = _mm512_loadu_ps(x + v);
    nan |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, xv);
  }
  float r = _mm512_reduce_max_ps(m);
  for (; v < V; ++v) {
    if (std::isnan(x[v])) nan = 1;
    r = std::max(r, x[v]);
  }
  return nan ? NAN : r;
}

void ce_forward(torch::Tensor x, torch::Tensor t, int64_t ignore_index, torch::Tensor lse, torch::Tensor loss) {
  check_f32(x, "cross_entropy logits");
  check_f32(lse, "cross_entropy lse");
  check_f32(loss, "cross_entropy loss");
  TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous(), "cross_entropy: int64 targets");
  const int64_t N = x.size(0), V = x.size(1);
  TORCH_CHECK(t.numel() == N && lse.numel() == N && loss.numel() == N, "cross_entropy: bad shapes");
  const float* xp = x.data_ptr<float>();
  const int64_t* tp = t.data_ptr<int64_t>();
  float *lp = lse.data_ptr<float>(), *op = loss.data_ptr<float>();
  at::parallel_for(0, N, 4, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* xr = xp + n * V;
      const float m = row_max(xr, V);
      const int64_t tn = tp[n];
      TORCH_CHECK(tn == ignore_index || (tn >= 0 && tn < V), "cross_entropy: target ", tn, " out of range [0, ", V, ")");
      if (!std::isfinite(m)) {  // a NaN or an infinite logit: NaN / +-inf as log-sum-exp itself gives
        lp[n] = m;
        op[n] = tn == ignore_index ? 0.f : m - xr[tn];
        continue;
      }
      const __m512 mv = _mm512_set1_ps(m);
      __m512 acc = _mm512_setzero_ps();
      int64_t v = 0;
      for (; v + 16 <= V; v += 16) acc = _mm512_add_ps(acc, exp16(_mm512_sub_ps(_mm512_loadu_ps(xr + v), mv)));
      float s = _mm512_reduce_add_ps(acc);
      for (; v < V; ++v) s += std::exp(xr[v] - m);
      lp[n] = m + std::log(s);
      op[n] = tn == ignore_index ? 0.f : lp[n] - xr[tn];
    }
  });
}

// Backward: g[n, v] = scale[n] * (exp(x[n, v] - lse[n]) - [v == t[n]]); rows with t == ignore_index are 0.
void ce_backward(torch::Tensor x, torch::Tensor t, int64_t ignore_index, torch::Tensor lse, torch::Tensor scale,
                 torch::Tensor g) {
  for (auto* a : {&x, &lse, &scale, &g}) check_f32(*a, "cross_entropy backward input");
  const int64_t N = x.size(0), V = x.size(1);
  const float *xp = x.data_ptr<float>(), *lp = lse.data_ptr<float>(), *sp = scale.data_ptr<float>();
  const int64_t* tp = t.data_ptr<int64_t>();
  float* gp = g.data_ptr<float>();
  at::parallel_for(0, N, 4, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* xr = xp + n * V;
      float* gr = gp + n * V;
      const int64_t tn = tp[n];
      if (tn == ignore_index) {
        std::fill(gr, gr + V, 0.f);
        continue;
      }
      const __m512 l = _mm512_set1_ps(lp[n]), sc = _mm512_set1_ps(sp[n]);
      int64_t v = 0;
      for (; v + 16 <= V; v += 16)
        _mm512_storeu_ps(gr + v, _mm512_mul_ps(sc, exp16(_mm512_sub_ps(_mm512_loadu_ps(xr + v), l))));
      for (; v < V; ++v) gr[v] = sp[n] * std::exp(xr[v] - lp[n]);
      gr[tn] -= sp[n];
    }
  });
}

// Channel mixing's elementwise backward. out = sigmoid(rr) * vo; given dout:
// dvo = dout * s, drr = dout * vo * s * (1 - s) with s = sigmoid(rr). All [N] contiguous fp32.
void sigmoid_gate_backward(torch::Tensor dout, torch::Tensor rr, torch::Tensor vo, torch::Tensor dvo,
                           torch::Tensor drr) {
  for (auto* t : {&dout, &rr, &vo, &dvo, &drr}) check_f32(*t, "sigmoid_gate_backward input");
  const int64_t N = dout.numel();
  TORCH_CHECK(rr.numel() == N && vo.numel() == N && dvo.numel() == N && drr.numel() == N && N % 16 == 0,
              "sigmoid_gate_backward: bad shapes");
  const float *dp = dout.data_ptr<float>(), *rp = rr.data_ptr<float>(), *vp = vo.data_ptr<float>();
  float *dvp = dvo.data_ptr<float>(), *drp = drr.data_ptr<float>();
  at::parallel_for(0, N / 16, 1024, [&](int64_t i0, int64_t i1) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t i = i0 * 16; i < i1 * 16; i += 16) {
      const __m512 sg = sigmoid16(_mm512_loadu_ps(rp + i)), d = _mm512_loadu_ps(dp + i);
      const __m512 dv = _mm512_mul_ps(d, sg);
      _mm512_storeu_ps(dvp + i, dv);
      _mm512_storeu_ps(drp + i, _mm512_mul_ps(_mm512_mul_ps(dv, _mm512_loadu_ps(vp + i)), _mm512_sub_ps(one, sg)));
    }
  });
}

// d(relu(h)^2)/dh applied in place: g *= 2 sqrt(q), with q = relu(h)^2 (so sqrt(q) = relu(h)).
void relu_square_backward_(torch::Tensor g, torch::Tensor q) {
  check_f32(g, "relu_square_backward gradient");
  check_f32(q, "relu_square_backward input");
  const int64_t N = g.numel();
  TORCH_CHECK(q.numel() == N && N % 16 == 0, "relu_square_backward: bad shapes");
  float* gp = g.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  at::parallel_for(0, N / 16, 1024, [&](int64_t i0, int64_t i1) {
    const __m512 two = _mm512_set1_ps(2.f);
    for (int64_t i = i0 * 16; i < i1 * 16; i += 16)
      _mm512_storeu_ps(gp + i, _mm512_mul_ps(_mm512_loadu_ps(gp + i),
                                             _mm512_mul_ps(two, _mm512_sqrt_ps(_mm512_loadu_ps(qp + i)))));
  });
}

// dst [C, R] (contiguous) = src [R, C] (unit column stride, any row stride), in 64x64 blocks.
void transpose(torch::Tensor src, torch::Tensor dst) {
  TORCH_CHECK(src.scalar_type() == torch::kFloat && src.device().is_cpu() && src.dim() == 2 &&
                  (src.size(1) <= 1 || src.stride(1) == 1),
              "transpose: fp32 [R, C] source with unit column stride");
  check_f32(dst, "transpose destination");
  const int64_t R = src.size(0), C = src.size(1), ls = src.stride(0);
  TORCH_CHECK(dst.dim() == 2 && dst.size(0) == C && dst.size(1) == R, "transpose: destination must be [C, R]");
  const float* s = src.data_ptr<float>();
  float* d = dst.data_ptr<float>();
  constexpr int64_t BLK = 64;
  const int64_t nrb = (R + BLK - 1) / BLK, ncb = (C + BLK - 1) / BLK;
  at::parallel_for(0, nrb * ncb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = (b / ncb) * BLK, j0 = (b % ncb) * BLK;
      transpose_block(s, ls, d, R, i0, std::min(R, i0 + BLK), j0, std::min(C, j0 + BLK));
    }
  });
}

// ------------------------------------------------------------------------------ decode block
// One RWKV-6 (x060) or RWKV-5 (x052) block for one token in each of B <= 16 rows (decoding) in one
// call. Run through torch, a decoded token costs ~40 small ops per block besides its eight weight
// products, each with its dispatch and output buffer: on the 2-core box about 10 of a 12x768
// model's 25 ms per token. Here the small parts (norms, the token-shift mixing with x060's LoRA,
// the decay, the WKV step, the gated group norm, the channel mix's elementwise parts) run from
// cache, and the eight products go through the few-rows kernel (each weight read once for all
// rows, split across threads). The formulas are modeling.py's Block (the twin in the tests).

// y = x rounded to bf16 (to nearest, ties to even, as torch rounds; NaN stays NaN).
static void to_bf16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    y[i] = std::isnan(x[i]) ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
}

// LayerNorm of one row of C (C % 16 == 0): y = (x - mean) / sqrt(var + eps) * w + b.
static void layer_norm_row(const float* x, const float* w, const float* b, float* y, int64_t C, float eps) {
  const NormStats st = norm_stats(x, C, eps);
  for (int64_t i = 0; i < C; i += 16) {
    const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), st.mean), st.rstd);
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(xh, _mm512_loadu_ps(w + i), _mm512_loadu_ps(b + i)));
  }
}

// Y[m, n0 : n0 + 16 NV] = X[m, :K] @ M[:K, n0 : n0 + 16 NV] for MR rows, summed in registers.
template <int MR, int NV>
static void mat_mat_tile(const float* X, int64_t ldx, const float* M, int64_t N, float* Y, int64_t ldy, int64_t K,
                         int64_t n0) {
  __m512 acc[MR][NV];
  _Pragma("GCC unroll 4") for (int m = 0; m < MR; ++m)
    _Pragma("GCC unroll 4") for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[NV];
    _Pragma("GCC unroll 4") for (int j = 0; j < NV; ++j) w[j] = _mm512_loadu_ps(M + k * N + n0 + 16 * j);
    _Pragma("GCC unroll 4") for (int m = 0; m < MR; ++m) {
      const __m512 a = _mm512_set1_ps(X[m * ldx + k]);
      _Pragma("GCC unroll 4") for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_fmadd_ps(a, w[j], acc[m][j]);
    }
  }
  _Pragma("GCC unroll 4") for (int m = 0; m < MR; ++m)
    _Pragma("GCC unroll 4") for (int j = 0; j < NV; ++j) _mm512_storeu_ps(Y + m * ldy + n0 + 16 * j, acc[m][j]);
}

using MatMatTile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t);

// Y[B, N] = X[B, K] @ M[K, N] (rows ldx / ldy floats apart, M row-major, N % 16 == 0): the small
// LoRA products of the decoded rows. Column panels (64 wide, 32 for a narrow N) split across threads;
// each panel of M is read from memory once for all rows (4 rows at a time in registers). epi(y, n0,
// n1) then finishes columns n0..n1 of an output row y on the thread that made them.
template <class Epi>
static void mat_mat(const float* X, int64_t ldx, const float* M, float* Y, int64_t ldy, int64_t B, int64_t K,
                    int64_t N, Epi epi) {
  const int64_t width = N >= 256 ? 64 : 32;
  at::parallel_for(0, (N + width - 1) / width, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * width, nv = std::min<int64_t>(width / 16, (N - n0) / 16);
      for (int64_t m = 0; m < B; m += 4) {
        const int64_t mr = std::min<int64_t>(4, B - m);
        const MatMatTile tile = by_tile((int)mr, (int)nv, [](auto r, auto c) -> MatMatTile {
          return mat_mat_tile<r.value, c.value>;
        });
        tile(X + m * ldx, ldx, M, N, Y + m * ldy, ldy, K, n0);
        for (int64_t i = 0; i < mr; ++i) epi(Y + (m + i) * ldy, n0, n0 + 16 * nv);
      }
    }
  });
}

static void tanh_cols(float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) y[n] = std::tanh(y[n]);
}

// p (30 tensors): ln1 w, b; time_maa_x, _w, _k, _v, _r, _g [C]; time_maa_w1 [C, 5R];
// time_maa_w2 [5, R, C]; time_decay [A]; time_decay_w1 [C, D]; time_decay_w2 [D, A]; receptance, key,
// value, gate [A, C]; time_faaaa [H, N]; ln_x w, b [A]; output [C, A]; ln2 w, b; channel mix time_maa_k,
// _r [C]; its key [F, C], receptance [C, C], value [C, F]; ln0 w, b (empty tensors: no ln0).
// x052 (v6 false): time_mix_k, _v, _r, _g in the places of time_maa_k.._g, its static time_decay
// [H, N], the channel mix's time_mix_k, _r; the other x060-only places empty; gn_eps with the
// head-size divisor folded in (GroupNorm(y / d, eps) == GroupNorm(y, eps d^2)).
// x [B, C] the block input; att_in, ffn_in [B, C] the token shifts and wkv_in [B, H, N, N] the
// state before the token (read only); xo [B, C], att_out, ffn_out, wkv_out the results.
// Returns false, computing nothing, where the kernel does not apply: a tensor that is not
// contiguous fp32 on the CPU, or a size that is not a multiple of 16.
bool decode_block(torch::Tensor x, std::vector<torch::Tensor> p, torch::Tensor att_in, torch::Tensor wkv_in,
                  torch::Tensor ffn_in, torch::Tensor xo, torch::Tensor att_out, torch::Tensor wkv_out,
                  torch::Tensor ffn_out, double ln_eps, double gn_eps, bool v6) {
  TORCH_CHECK(p.size() == 30, "decode_block: 30 parameter tensors");
  // the eight weight matrices: all fp32, or all bf16 (on a CPU with AVX512-BF16); the rest fp32
  constexpr int kWeights[8] = {13, 14, 15, 16, 20, 25, 26, 27};
  const auto wtype = p[13].scalar_type();
  const bool bf16 = wtype == torch::kBFloat16;
  if (bf16 && !has_avx512_bf16()) return false;
  auto fits = [](const torch::Tensor& t, torch::ScalarType st) {
    return t.scalar_type() == st && t.is_contiguous() && t.device().is_cpu();
  };
  for (int i = 0; i < 30; ++i) {
    const bool weight = std::find(std::begin(kWeights), std::end(kWeights), i) != std::end(kWeights);
    if (!fits(p[i], weight ? wtype : torch::kFloat)) return false;
  }
  for (auto* t : {&x, &att_in, &wkv_in, &ffn_in, &xo, &att_out, &wkv_out, &ffn_out})
    if (!fits(*t, torch::kFloat)) return false;
  TORCH_CHECK(x.dim() == 2 && p[13].dim() == 2 && p[17].dim() == 2 && p[25].dim() == 2 &&
              (!v6 || (p[8].dim() == 2 && p[9].dim() == 3 && p[11].dim() == 2)), "decode_block: parameter ranks");
  const int64_t B = x.size(0), C = x.size(1), A = p[13].size(0);
  const int64_t R5 = v6 ? p[8].size(1) : 16, R = v6 ? p[9].size(1) : 0, D = v6 ? p[11].size(1) : 16;
  const int64_t H = p[17].size(0), N = p[17].size(1), F = p[25].size(0);
  TORCH_CHECK(B >= 1 && B <= 16, "decode_block: 1 to 16 rows");
  if (C % 16 || A % 16 || F % 16 || N % 16 || R5 % 16 || D % 16) return false;
  if (bf16 && (C % 32 || A % 32 || F % 32)) return false;
  TORCH_CHECK(H * N == A && p[10].numel() == A && p[20].size(0) == C && p[20].size(1) == A &&
              p[26].size(0) == C && p[27].size(1) == F, "decode_block: parameter shapes");
  TORCH_CHECK(!v6 || (R5 == 5 * R && p[8].size(0) == C && p[9].size(0) == 5 && p[9].size(2) == C &&
                      p[11].size(0) == C && p[12].size(0) == D && p[12].size(1) == A),
              "decode_block: LoRA shapes");
  TORCH_CHECK(wkv_in.numel() == B * H * N * N && wkv_out.numel() == B * H * N * N && att_in.numel() == B * C &&
              ffn_in.numel() == B * C, "decode_block: state shapes");
  const float* P[30];  // (the bf16 weights' pointers go to the products only, cast back)
  for (int i = 0; i < 30; ++i) P[i] = static_cast<const float*>(p[i].data_ptr());
  auto f = [&P](int i) { return P[i]; };
  // the weight products; bf16 weights take the AVX512-BF16 rows on inputs rounded to bf16, as the
  // model's own bf16 forward has them
  std::vector<uint16_t> xb16[kMaxRowsJobs];
  auto products = [&](std::initializer_list<RowsJob<F32>> jobs) {
    if (!bf16) return rows_for<F32>(B, jobs.begin(), (int)jobs.size());
    RowsJob<BF16> j16[kMaxRowsJobs];
    int n = 0;
    for (const auto& J : jobs) {
      xb16[n].resize(B * J.K);
      to_bf16(J.x, xb16[n].data(), B * J.K);
      j16[n] = {xb16[n].data(), reinterpret_cast<const uint16_t*>(J.w), J.y, J.K, J.N};
      ++n;
    }
    rows_for<BF16>(B, j16, n);
  };
  const float eps = (float)ln_eps;
  const bool has_ln0 = p[28].numel() > 0;
  const float* xp = x.data_ptr<float>();
  float *xa = att_out.data_ptr<float>(), *xf = ffn_out.data_ptr<float>();
  // scratch, every element written before it is read (no zero fill)
  struct Buf {
    std::unique_ptr<float[]> p;
    explicit Buf(int64_t n) : p(new float[n]) {}
    float* data() { return p.get(); }
    float& operator[](int64_t i) { return p[i]; }
  };
  Buf x0(has_ln0 ? B * C : 1), xs(5 * B * C), e(B * A), rkvg(4 * B * A), y(B * A), z(B * A);
  Buf x1(B * C), xkr(2 * B * C), h(B * F), vo(B * C), rr(B * C);
  float *r = rkvg.data(), *k = r + B * A, *v = k + B * A, *g = v + B * A;
  if (has_ln0) {
    for (int64_t b = 0; b < B; ++b) layer_norm_row(xp + b * C, f(28), f(29), x0.data() + b * C, C, eps);
    xp = x0.data();
  }
  // time mix, up to the products: ln1, the token-shift mixing (x060: ddlerp with its LoRA), the decay
  const float *ain = att_in.data_ptr<float>(), *maa_x = f(2);
  if (v6) {
    Buf xxx(B * C), th(B * R5), tb(B * D);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        layer_norm_row(xp + b * C, f(0), f(1), xa + b * C, C, eps);
        for (int64_t c = 0; c < C; ++c) xxx[b * C + c] = xa[b * C + c] + (ain[b * C + c] - xa[b * C + c]) * maa_x[c];
      }
    });
    mat_mat(xxx.data(), C, f(8), th.data(), R5, B, C, R5, tanh_cols);
    // x_i = x + (prev - x) * (maa_i + th_i @ w2[i]) (mix_lora_forward's tiles), by column panels across threads
    at::parallel_for(0, (C + 63) / 64, 1, [&](int64_t p0, int64_t p1) {
      const float* xr[6];
      const float* pr[6];
      float* o[6];
      for (int64_t c0 = p0 * 64; c0 < std::min(C, p1 * 64); c0 += 64)
        for (int64_t i = 0; i < 5; ++i)
          for (int64_t b0 = 0; b0 < B; b0 += 6) {
            const int64_t mr = std::min<int64_t>(6, B - b0);
            for (int64_t m = 0; m < mr; ++m) {
              xr[m] = xa + (b0 + m) * C + c0;
              pr[m] = ain + (b0 + m) * C + c0;
              o[m] = xs.data() + i * B * C + (b0 + m) * C + c0;
            }
            mix_lora_tile_for((int)mr, (int)std::min<int64_t>(4, (C - c0) / 16))(
                th.data() + b0 * R5 + i * R, R5, f(9) + i * R * C + c0, C, R, xr, pr, f(3 + i) + c0, o);
          }
    });
    mat_mat(xs.data(), C, f(11), tb.data(), D, B, C, D, tanh_cols);  // the decay's LoRA, on x_w
    const float* decay = f(10);
    mat_mat(tb.data(), D, f(12), e.data(), A, B, D, A, [decay](float* y, int64_t n0, int64_t n1) {
      for (int64_t a = n0; a < n1; a += 16)  // e = exp(-exp(decay + tanh(x_w @ dw1) @ dw2))
        _mm512_storeu_ps(y + a, decay16(_mm512_add_ps(_mm512_loadu_ps(decay + a), _mm512_loadu_ps(y + a))));
    });
  } else {  // x052: x_i = x + (prev - x) * (1 - time_mix_i) for k, v, r, g; a static decay
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        layer_norm_row(xp + b * C, f(0), f(1), xa + b * C, C, eps);
        for (int64_t i = 1; i < 5; ++i) {
          const float* mix = f(3 + i);
          float* o = xs.data() + i * B * C + b * C;
          for (int64_t c = 0; c < C; ++c) o[c] = xa[b * C + c] + (ain[b * C + c] - xa[b * C + c]) * (1.f - mix[c]);
        }
      }
    });
    for (int64_t a = 0; a < A; ++a) e[a] = std::exp(-std::exp(f(10)[a]));
    for (int64_t b = 1; b < B; ++b) std::copy(e.data(), e.data() + A, e.data() + b * A);
  }
  // r, k, v, gate (slots r = 3, k = 1, v = 2, g = 4 of the mixed inputs)
  products({{xs.data() + 3 * B * C, f(13), r, C, A}, {xs.data() + 1 * B * C, f(14), k, C, A},
            {xs.data() + 2 * B * C, f(15), v, C, A}, {xs.data() + 4 * B * C, f(16), g, C, A}});
  // the WKV step of each (row, head), then the gated group norm
  // the new states with streaming stores (not read again this token; 1-3% of an 8-stream step)
  const bool stream = reinterpret_cast<uintptr_t>(wkv_out.data_ptr()) % 64 == 0;
  const auto fstep = stream ? by_width(N, [](auto nv) -> FwdStep { return fwd_step<decltype(nv)::value, true>; })
                            : by_width(N, [](auto nv) -> FwdStep { return fwd_step<decltype(nv)::value>; });
  const float *u = f(17), *sin = wkv_in.data_ptr<float>();
  float* sout = wkv_out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t o = (i / H) * A + (i % H) * N;
      float c = 0.f;
      for (int64_t j = 0; j < N; ++j) c += r[o + j] * u[(i % H) * N + j] * k[o + j];
      fstep(r + o, k + o, e.data() + o, v + o, c, sin + i * N * N, sout + i * N * N, y.data() + o, N, N);
    }
    if (stream) _mm_sfence();  // the streamed stores ordered before the threads join
  });
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      gn_gate_row(y.data() + b * A, g + b * A, f(18), f(19), z.data() + b * A, H, N, (float)gn_eps);
  });
  products({{z.data(), f(20), x1.data(), A, C}});  // the time mix's output ...
  // ... added to the block input; ln2 and the channel mix's token shift
  const float *fin = ffn_in.data_ptr<float>(), *mk = f(23), *mr = f(24);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* x1b = x1.data() + b * C;
      for (int64_t c = 0; c < C; ++c) x1b[c] += xp[b * C + c];
      layer_norm_row(x1b, f(21), f(22), xf + b * C, C, eps);
      const float *xb = xf + b * C, *prev = fin + b * C;
      float *ok = xkr.data() + b * C, *orr = xkr.data() + (B + b) * C;
      for (int64_t c = 0; c < C; ++c) {
        const float d = prev[c] - xb[c];
        ok[c] = xb[c] + d * (v6 ? mk[c] : 1.f - mk[c]);  // x052: mu = 1 - time_mix
        orr[c] = xb[c] + d * (v6 ? mr[c] : 1.f - mr[c]);
      }
    }
  });
  products({{xkr.data(), f(25), h.data(), C, F}, {xkr.data() + B * C, f(26), rr.data(), C, C}});
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0 * F; i < b1 * F; ++i) h[i] = h[i] > 0.f ? h[i] * h[i] : 0.f;  // relu(.)^2
  });
  products({{h.data(), f(27), vo.data(), F, C}});
  float* out = xo.data_ptr<float>();
  for (int64_t i = 0; i < B * C; i += 16) {  // x1 + sigmoid(rr) * vo
    const __m512 s = sigmoid16(_mm512_loadu_ps(rr.data() + i));
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(s, _mm512_loadu_ps(vo.data() + i), _mm512_loadu_ps(x1.data() + i)));
  }
  return true;
}


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("few_rows_linear", &few_rows_linear, "x[M,K] @ w[N,K].T for 1..16 rows (fp32 or bf16; fp32 result)");
  m.def("has_avx512_bf16", &has_avx512_bf16, "whether this CPU has the AVX512-BF16 dot products");
  m.def("wkv6_forward", &wkv6_forward, "WKV-6 forward (step by step, fp32)");
  m.def("wkv6_backward", &wkv6_backward, "WKV-6 backward (chunked recomputation, fp32)");
  m.def("decay_factors", &decay_factors, "exp(-exp(y + decay)) (x060's decay factors)");
  m.def("gn_gate_forward", &gn_gate_forward, "(GroupNorm(y) * w + b) * silu(gp)");
  m.def("gn_gate_backward", &gn_gate_backward, "gradients of gn_gate_forward");
  m.def("mix_forward", &mix_forward, "token-shift mixing x + (prev - x) * (mu + off)");
  m.def("mix_backward", &mix_backward, "gradients of mix_forward");
  m.def("mix_lora_forward", &mix_lora_forward, "ddlerp mixing with its LoRA offsets computed in registers");
  m.def("sigmoid_gate_backward", &sigmoid_gate_backward, "gradients of sigmoid(rr) * vo");
  m.def("relu_square_backward_", &relu_square_backward_, "g *= 2 sqrt(q), q = relu(h)^2");
  m.def("ce_forward", &ce_forward, "cross-entropy per row (log-sum-exp kept for backward)");
  m.def("ce_backward", &ce_backward, "gradient of ce_forward");
  m.def("transpose", &transpose, "dst[C, R] = src[R, C].T");
  m.def("decode_block", &decode_block, "one RWKV-6/5 block for one token per row (decoding)");
}
