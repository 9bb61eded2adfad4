// finetune::int8_linear(x, w, scale): out[m, n] = sum_k x[m, k] * (w[n, k] * scale[n, k / G]), with
// fp32 activations, int8 weights [N, K], fp32 scales [N, K / G] (G, the group, a multiple of 16)
// and fp32 sums.
//
// Why our own: decoding one token reads every weight once, so it is bound by how fast the weights
// stream from memory. torch's aten::_weight_int8pack_mm streamed int8 weights at ~12 GB/s on the
// project's 2-core CPU against fp32 MKL's ~25 GB/s; this loop with software prefetch streams them
// at ~24 GB/s (bench/kernels.py measures it). And each sum runs in the same order whatever the
// number of rows and wherever a row falls in the batch, so a request's result does not depend on
// what else is decoded with it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t LANES = 16;  // K is a multiple of this
constexpr int64_t NB = 4;      // output rows per block: independent sums in flight
constexpr int64_t PREFETCH_ROWS = 8;  // measured best of 8, 16, 32, 64 on the 2-core CPU

// Any CPU: 16 partial sums, folded in a fixed order.
void rows_generic(const float* x, const int8_t* w, const float* scale, float* out, int64_t M, int64_t N,
                  int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float acc[LANES] = {};
      for (int64_t k = 0; k < K; k += LANES) {
        const float s = scale[n * groups + k / G];
        for (int64_t l = 0; l < LANES; ++l)
          acc[l] += x[m * K + k + l] * (static_cast<float>(w[n * K + k + l]) * s);
      }
      float total = 0.f;
      for (int64_t l = 0; l < LANES; ++l) total += acc[l];
      out[m * N + n] = total;
    }
  }
}

#if defined(__x86_64__)
// MC rows of x against NB rows of w: each weight vector is widened once and used MC times.
template <int MC>
__attribute__((target("avx512f,avx512bw,fma"))) void chunk_avx512(const float* x, const int8_t* w,
                                                                   const float* scale, float* out, int64_t N,
                                                                   int64_t K, int64_t G, int64_t n, int64_t nb) {
  const int64_t groups = K / G;
  __m512 acc[NB][MC];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MC; ++m) acc[j][m] = _mm512_setzero_ps();
  const int64_t ahead = std::min(n + PREFETCH_ROWS, N - 1);
  for (int64_t k = 0; k < K; k += LANES) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) {
      const int64_t row = n + (j < nb ? j : 0);  // a short last block repeats a row it does not store
      const auto* p = reinterpret_cast<const __m128i*>(w + row * K + k);
      const __m512 s = _mm512_set1_ps(scale[row * groups + k / G]);
      wv[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p))), s);
      // The hardware prefetcher alone keeps too few lines in flight (measured 13 against 28 GB/s
      // with one scale per row).
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (ahead + j) * K + k), _MM_HINT_T0);
    }
    for (int m = 0; m < MC; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int j = 0; j < NB; ++j) acc[j][m] = _mm512_fmadd_ps(xv, wv[j], acc[j][m]);
    }
  }
  for (int j = 0; j < nb; ++j)
    for (int m = 0; m < MC; ++m) out[m * N + n + j] = _mm512_reduce_add_ps(acc[j][m]);
}

__attribute__((target("avx512f,avx512bw,fma"))) void rows_avx512(const float* x, const int8_t* w,
                                                                  const float* scale, float* out, int64_t M,
                                                                  int64_t N, int64_t K, int64_t G, int64_t n0,
                                                                  int64_t n1) {
  for (int64_t n = n0; n < n1; n += NB) {
    const int64_t nb = std::min(NB, n1 - n);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) chunk_avx512<4>(x + m * K, w, scale, out + m * N, N, K, G, n, nb);
    switch (M - m) {
      case 3: chunk_avx512<3>(x + m * K, w, scale, out + m * N, N, K, G, n, nb); break;
      case 2: chunk_avx512<2>(x + m * K, w, scale, out + m * N, N, K, G, n, nb); break;
      case 1: chunk_avx512<1>(x + m * K, w, scale, out + m * N, N, K, G, n, nb); break;
      default: break;
    }
  }
}

// 16 int8 weights widened to fp32 and scaled, as two 8-float halves: every AVX2 path widens
// through this, so all of them multiply by the same floats.
__attribute__((target("avx2,fma"), always_inline)) inline void widen16_avx2(const int8_t* p, float scale,
                                                                            __m256& lo, __m256& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 s = _mm256_set1_ps(scale);
  lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), s);
  hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), s);
}

// The 16 lanes of one output folded in one fixed order (the same in every AVX2 path).
__attribute__((target("avx2,fma"), always_inline)) inline float fold16_avx2(__m256 lo, __m256 hi) {
  const __m256 v = _mm256_add_ps(lo, hi);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// AVX2 + FMA (most laptop CPUs: no AVX-512): the same 16 lanes as two 8-float halves; at most 2 rows
// of x per pass, so the 16 accumulators fit the 16 vector registers.
template <int MC>
__attribute__((target("avx2,fma"))) void chunk_avx2(const float* x, const int8_t* w, const float* scale,
                                                    float* out, int64_t N, int64_t K, int64_t G, int64_t n,
                                                    int64_t nb) {
  const int64_t groups = K / G;
  __m256 lo[NB][MC], hi[NB][MC];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MC; ++m) lo[j][m] = hi[j][m] = _mm256_setzero_ps();
  const int64_t ahead = std::min(n + PREFETCH_ROWS, N - 1);
  for (int64_t k = 0; k < K; k += LANES) {
    for (int j = 0; j < NB; ++j) {
      const int64_t row = n + (j < nb ? j : 0);
      __m256 wl, wh;
      widen16_avx2(w + row * K + k, scale[row * groups + k / G], wl, wh);
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (ahead + j) * K + k), _MM_HINT_T0);
      for (int m = 0; m < MC; ++m) {
        lo[j][m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wl, lo[j][m]);
        hi[j][m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8), wh, hi[j][m]);
      }
    }
  }
  for (int j = 0; j < nb; ++j)
    for (int m = 0; m < MC; ++m) out[m * N + n + j] = fold16_avx2(lo[j][m], hi[j][m]);
}

// More than 2 rows of x: widen the block's NB weight rows once into a buffer (the same floats
// chunk_avx2 computes in registers) and run every row of x against it, so the widening is paid once,
// not once per pair of rows. Each sum keeps chunk_avx2's order: results match it bit for bit.
__attribute__((target("avx2,fma"))) void widen_avx2(const int8_t* w, const float* scale, float* wb, int64_t N,
                                                    int64_t K, int64_t G, int64_t n, int64_t nb) {
  const int64_t groups = K / G;
  const int64_t ahead = std::min(n + PREFETCH_ROWS, N - 1);
  for (int64_t k = 0; k < K; k += LANES) {
    for (int j = 0; j < NB; ++j) {
      const int64_t row = n + (j < nb ? j : 0);
      __m256 wl, wh;
      widen16_avx2(w + row * K + k, scale[row * groups + k / G], wl, wh);
      _mm256_storeu_ps(wb + j * K + k, wl);
      _mm256_storeu_ps(wb + j * K + k + 8, wh);
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (ahead + j) * K + k), _MM_HINT_T0);
    }
  }
}

// One row of x against a widened block: chunk_avx2<1>'s sums, the weights read from the buffer.
__attribute__((target("avx2,fma"))) void row_avx2_widened(const float* x, const float* wb, float* out, int64_t K,
                                                          int64_t n, int64_t nb) {
  __m256 lo[NB], hi[NB];
  for (int j = 0; j < NB; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += LANES) {
    const __m256 xl = _mm256_loadu_ps(x + k), xh = _mm256_loadu_ps(x + k + 8);
    for (int j = 0; j < NB; ++j) {
      lo[j] = _mm256_fmadd_ps(xl, _mm256_loadu_ps(wb + j * K + k), lo[j]);
      hi[j] = _mm256_fmadd_ps(xh, _mm256_loadu_ps(wb + j * K + k + 8), hi[j]);
    }
  }
  for (int j = 0; j < nb; ++j) out[n + j] = fold16_avx2(lo[j], hi[j]);
}

__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, const int8_t* w, const float* scale,
                                                   float* out, int64_t M, int64_t N, int64_t K, int64_t G,
                                                   int64_t n0, int64_t n1) {
  if (M <= 2) {
    for (int64_t n = n0; n < n1; n += NB) {
      const int64_t nb = std::min(NB, n1 - n);
      if (M == 2) chunk_avx2<2>(x, w, scale, out, N, K, G, n, nb);
      else chunk_avx2<1>(x, w, scale, out, N, K, G, n, nb);
    }
    return;
  }
  thread_local std::vector<float> buffer;
  buffer.resize(NB * K);
  float* wb = buffer.data();
  for (int64_t n = n0; n < n1; n += NB) {
    const int64_t nb = std::min(NB, n1 - n);
    widen_avx2(w, scale, wb, N, K, G, n, nb);
    for (int64_t m = 0; m < M; ++m) row_avx2_widened(x + m * K, wb, out + m * N, K, n, nb);
  }
}
#endif

enum class Isa { generic, avx2, avx512 };

// The widest vector code this CPU runs; FINETUNE_INT8_ISA=avx2|generic caps it, so that the tests
// check every path on a machine that has AVX-512.
Isa pick_isa() {
  const char* cap = std::getenv("FINETUNE_INT8_ISA");
  const std::string limit = cap ? cap : "avx512";
#if defined(__x86_64__)
  if (limit == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    return Isa::avx512;
  if (limit != "generic" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::generic;
}

// Decided once a process: int8_linear and int8_isa always name the same path.
Isa active_isa() {
  static const Isa isa = pick_isa();
  return isa;
}

void rows(const float* x, const int8_t* w, const float* scale, float* out, int64_t M, int64_t N, int64_t K,
          int64_t G, int64_t n0, int64_t n1) {
#if defined(__x86_64__)
  const Isa isa = active_isa();
  if (isa == Isa::avx512) return rows_avx512(x, w, scale, out, M, N, K, G, n0, n1);
  if (isa == Isa::avx2) return rows_avx2(x, w, scale, out, M, N, K, G, n0, n1);
#endif
  rows_generic(x, w, scale, out, M, N, K, G, n0, n1);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_linear: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar, "int8_linear: fp32 x, int8 w");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == w.size(0) && scale.scalar_type() == at::kFloat,
              "int8_linear: fp32 scales [N, groups]");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  TORCH_CHECK(scale.size(1) > 0 && K % scale.size(1) == 0 && (K / scale.size(1)) % LANES == 0,
              "int8_linear: K must split into groups of a multiple of 16");
  const int64_t G = K / scale.size(1);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), sc = scale.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Tasks of at least 16 blocks (64 rows of w): smaller ones cost more to hand out than they share.
  at::parallel_for(0, (N + NB - 1) / NB, 16, [&](int64_t b0, int64_t b1) {
    rows(xp, wp, sp, op, M, N, K, G, b0 * NB, std::min(N, b1 * NB));
  });
  return out;
}

std::string int8_isa() {
  switch (active_isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace

TORCH_LIBRARY(finetune, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int8_isa() -> str", &int8_isa);  // the vector code int8_linear runs here
}

TORCH_LIBRARY_IMPL(finetune, CPU, m) { m.impl("int8_linear", int8_linear); }
