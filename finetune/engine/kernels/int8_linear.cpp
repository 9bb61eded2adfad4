// finetune::int8_linear(x, w, scale): out[m, n] = sum_k x[m, k] * (w[n, k] * scale[n, k / G]), with
// fp32 activations, int8 weights [N, K], fp32 scales [N, K / G] (G, the group, a multiple of 16)
// and fp32 sums.
//
// Why our own: decoding one token reads every weight once, so it is bound by how fast the weights
// stream from memory. torch's aten::_weight_int8pack_mm streamed int8 weights at ~12 GB/s on the
// project's 2-core CPU against fp32 MKL's ~25 GB/s; this loop with software prefetch streams them
// at ~24 GB/s (bench/kernels.py measures it). And each output is computed the same way whatever
// the number of rows and wherever a row falls in the batch, so a request's result does not depend
// on what else is decoded with it.
//
// Two ways to the same sum, by CPU:
// - AVX-512: each weight widened to fp32, scaled and multiplied with the fp32 activation.
// - AVX2 and any other CPU: the activations are first rounded to 16-bit integers per group
//   (round_rows: at most 1/65534 of the group's largest |x| off, against bf16's 1/512 of each
//   value), so a group's products are exact integer sums and only its total meets the scales. On
//   AVX2, widening int8 weights to int16 and _mm256_madd_epi16 is a third of the vector work of
//   widening them to fp32: the loop was compute-bound there (2 GHz Zen, measured 1.7-2x the
//   fp32-widening loop by bench/kernels.py), not memory-bound as on AVX-512 CPUs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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
// Weights are prefetched into L2, not L1: on the 2-core EPYC (bench/kernels.py, one row, 30 layers)
// that streamed 28-30 GB/s against 15-16 with L1 prefetches on the AVX2 path and 22 against 15 on
// the AVX-512 one. A weight is read once a step, so L1 gains nothing by holding it early, and L2
// can track more lines in flight.
#if defined(__x86_64__)
constexpr auto PREFETCH_HINT = _MM_HINT_T1;
#endif

// x [M, K] rounded to integers per group of G: x ~ xq * xs[m, g], the group's largest |x| mapping to
// qmax (32767 for groups up to 512 weights, less for wider ones so that a group's dot stays within
// int32), an error of at most 1/65534 of that largest value (bf16 activations err 1/512). A pure
// function of the row: a request's activations round the same in any batch.
int32_t int16_range(int64_t G) {
  return static_cast<int32_t>(std::min<int64_t>(32767, INT32_MAX / (128 * G)));
}

#if defined(__x86_64__)
// 8 values times scale, clamped to [lo, hi], rounded to the nearest int32 (ties to even).
__attribute__((target("avx2,fma"), always_inline)) inline __m256i round8_avx2(const float* p, __m256 scale,
                                                                             __m256 lo, __m256 hi) {
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(p), scale), lo), hi));
}

// round_rows' rounding of one group, 16 at a time: the same bits (cvtps rounds to nearest even, as
// nearbyint does in the default rounding mode).
__attribute__((target("avx2,fma"))) void round_group_avx2(const float* v, int16_t* q, int64_t G, float inv,
                                                          float qmax) {
  const __m256 scale = _mm256_set1_ps(inv), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
  for (int64_t k = 0; k < G; k += LANES) {
    // packs works within 128-bit lanes: put the four 64-bit quarters back in order
    const __m256i packed =
        _mm256_packs_epi32(round8_avx2(v + k, scale, lo, hi), round8_avx2(v + k + 8, scale, lo, hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permute4x64_epi64(packed, 0xD8));
  }
}
#endif

void round_rows(const float* x, int16_t* xq, float* xs, int64_t M, int64_t K, int64_t G, bool avx2) {
  const float qmax = static_cast<float>(int16_range(G));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k0 = 0; k0 < K; k0 += G) {
      const float* v = x + m * K + k0;
      int16_t* q = xq + m * K + k0;
      float amax = 0.f;
      bool finite = true;
      for (int64_t k = 0; k < G; ++k) {
        finite = finite && std::isfinite(v[k]);
        amax = std::max(amax, std::fabs(v[k]));
      }
      float& s = xs[m * (K / G) + k0 / G];
      if (!finite) {  // inf or NaN in the group: its outputs are NaN, as fp32 would make them
        std::fill(q, q + G, int16_t{0});
        s = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const float inv = amax > 0.f ? qmax / amax : 0.f;
#if defined(__x86_64__)
      if (avx2) {
        round_group_avx2(v, q, G, inv, qmax);
      } else
#endif
        for (int64_t k = 0; k < G; ++k)
          q[k] = static_cast<int16_t>(std::nearbyint(std::clamp(v[k] * inv, -qmax, qmax)));
      s = amax / qmax;
    }
  }
}

// Any CPU: a group's exact integer dot, then an fp32 sum over groups in order (fused multiply-add,
// as the vector paths).
void rows_generic(const int16_t* xq, const float* xs, const int8_t* w, const float* scale, float* out, int64_t M,
                  int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float sum = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) dot += int32_t{xq[m * K + k]} * int32_t{w[n * K + k]};
        sum = std::fma(static_cast<float>(dot), xs[m * groups + g] * scale[n * groups + g], sum);
      }
      out[m * N + n] = sum;
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
      if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (ahead + j) * K + k), PREFETCH_HINT);
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

// AVX2 + FMA (most laptop CPUs: no AVX-512). x comes rounded to int16 per group (round_rows), so a
// group's products are exact integers: 16 weights widen to int16 in one instruction and
// _mm256_madd_epi16 multiplies and adds them in pairs into int32, a third of the vector work of
// widening to fp32 and scaling. Each group's exact dot then joins an fp32 sum in group order, as
// in rows_generic: the two paths give the same bits.
// Exact int32 dots of the 4 rows of a block (lanes folded exactly, any order), as 4 floats.
__attribute__((target("avx2,fma"), always_inline)) inline __m128 dots4_avx2(const __m256i* acc) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
  return _mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

template <int MC>
__attribute__((target("avx2,fma"))) void chunk_avx2(const int16_t* xq, const float* xs, const int8_t* w,
                                                    const float* scale, float* out, int64_t N, int64_t K,
                                                    int64_t G, int64_t n, int64_t nb) {
  const int64_t groups = K / G;
  __m128 sum[MC];
  for (int m = 0; m < MC; ++m) sum[m] = _mm_setzero_ps();
  int64_t row[NB];
  for (int j = 0; j < NB; ++j) row[j] = n + (j < nb ? j : 0);  // a short last block repeats a row
  const int64_t ahead = std::min(n + PREFETCH_ROWS, N - 1);
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[MC][NB];
    for (int m = 0; m < MC; ++m)
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_si256();
    for (int64_t k = g * G; k < (g + 1) * G; k += LANES) {
      for (int j = 0; j < NB; ++j) {
        const auto* p = reinterpret_cast<const __m128i*>(w + row[j] * K + k);
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(p));
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (ahead + j) * K + k), PREFETCH_HINT);
        for (int m = 0; m < MC; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k));
          acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(xv, wv));
        }
      }
    }
    const __m128 ws = _mm_setr_ps(scale[row[0] * groups + g], scale[row[1] * groups + g],
                                  scale[row[2] * groups + g], scale[row[3] * groups + g]);
    for (int m = 0; m < MC; ++m)
      sum[m] = _mm_fmadd_ps(dots4_avx2(acc[m]), _mm_mul_ps(_mm_set1_ps(xs[m * groups + g]), ws), sum[m]);
  }
  for (int m = 0; m < MC; ++m) {
    alignas(16) float o[NB];
    _mm_store_ps(o, sum[m]);
    for (int j = 0; j < nb; ++j) out[m * N + n + j] = o[j];
  }
}

__attribute__((target("avx2,fma"))) void rows_avx2(const int16_t* xq, const float* xs, const int8_t* w,
                                                   const float* scale, float* out, int64_t M, int64_t N,
                                                   int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; n += NB) {
    const int64_t nb = std::min(NB, n1 - n);
    int64_t m = 0;
    for (; m + 2 <= M; m += 2)
      chunk_avx2<2>(xq + m * K, xs + m * groups, w, scale, out + m * N, N, K, G, n, nb);
    if (m < M) chunk_avx2<1>(xq + m * K, xs + m * groups, w, scale, out + m * N, N, K, G, n, nb);
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

void rows(const float* x, const int16_t* xq, const float* xs, const int8_t* w, const float* scale, float* out,
          int64_t M, int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {
#if defined(__x86_64__)
  const Isa isa = active_isa();
  if (isa == Isa::avx512) return rows_avx512(x, w, scale, out, M, N, K, G, n0, n1);
  if (isa == Isa::avx2) return rows_avx2(xq, xs, w, scale, out, M, N, K, G, n0, n1);
#endif
  rows_generic(xq, xs, w, scale, out, M, N, K, G, n0, n1);
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
  std::vector<int16_t> xq;
  std::vector<float> xs;
  if (active_isa() != Isa::avx512) {
    xq.resize(M * K);
    xs.resize(M * (K / G));
    round_rows(xp, xq.data(), xs.data(), M, K, G, active_isa() == Isa::avx2);
  }
  // Tasks of at least 16 blocks (64 rows of w): smaller ones cost more to hand out than they share.
  at::parallel_for(0, (N + NB - 1) / NB, 16, [&](int64_t b0, int64_t b1) {
    rows(xp, xq.data(), xs.data(), wp, sp, op, M, N, K, G, b0 * NB, std::min(N, b1 * NB));
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
