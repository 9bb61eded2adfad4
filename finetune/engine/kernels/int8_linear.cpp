// finetune::int8_linear(x, w, scale): out[m, n] = sum_k x[m, k] * (w[n, k] * scale[n, k / G]), with
// fp32 activations, int8 weights [N, K], fp32 scales [N, K / G] (G, the group, a multiple of 16)
// and fp32 sums. The engine decodes through it (a row a request) and, off AVX-512, prefills prompts
// (many rows) through it too; on AVX-512 prompts keep the fp32 weight, where MKL's GEMM is as fast
// at a short prompt's rows and faster at long ones (quant.py's prefills_quantized).
//
// Why our own: decoding one token reads every weight once, so it is bound by how fast the weights
// stream from memory. torch's aten::_weight_int8pack_mm streamed int8 weights at ~12 GB/s on the
// project's 2-core CPU against fp32 MKL's ~25 GB/s; this loop with software prefetch streams them
// at ~24 GB/s (bench/kernels.py measures it). And each output is computed the same way whatever
// the number of rows and wherever a row falls in the batch, so a request's result does not depend
// on what else is decoded with it, and a prompt's rows get the bits each would get alone.
//
// Many rows (a prompt): as many rows of x as the L2 cache holds (rows_per_pass) go past each block
// of NB weight rows, MC of them per pass over the block while it sits in the L1 cache, so the
// weights stream from memory once per such block of rows, not once per row. The blocking only
// decides which outputs are computed when, never how: the same bits at any row count.
//
// Two ways to the sum, by CPU:
// - AVX-512: each weight widened to fp32, scaled and multiplied with the fp32 activation.
// - AVX2 and any other CPU: each activation row is first rounded to int8 per group of G
//   (quantize_rows: scale = the group's largest |x| / 127, half a step off at most; llama.cpp's
//   q8_0 activations, with the weight's groups), so a group's products are exact integer sums and
//   only its total meets the two scales, one fp32 multiply-add a group, in group order. On AVX2
//   the products are _mm256_maddubs_epi16 on the bytes as loaded (no widening of weights or
//   activations to 16 or 32 bits); generic C++ computes the same integers and the same fp32 sums,
//   so the two give the same bits (tests compare them). A VNNI (_mm512_dpbusd_epi32) variant was
//   considered and not built: with groups of 64 weights a group is one 512-bit vector, and the
//   per-group reduction and scale multiply-add cost as much as the 4 fp32 FMAs they replace.
//
// Off AVX-512 the engine's int8 copies are packed at quantize time for int8_lanes_linear (below):
// the same integer path with 8 rows of w side by side in the lanes of a vector, 7-41 % faster at 2
// to 40 rows of x (bench/kernels.py) and level at one. int8_linear's [N, K] layout stays for
// AVX-512, for layers whose outputs are not a multiple of 8, and as the reference the tests hold
// the lanes to.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "isa.h"
#include "rows.h"

namespace {

using namespace finetune_kernels;

constexpr int64_t LANE_ROWS = 8;  // rows of w a block of lanes holds: one 32-bit lane each

// Any CPU: a group's exact integer dot, then an fp32 sum over groups in order (fused multiply-add,
// as the AVX2 path).
void rows_generic(const int8_t* xq, const float* xs, const int8_t* w, const float* scale, float* out, int64_t M,
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
  const int64_t MB = rows_per_pass(K, sizeof(float));
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t m1 = std::min(M, m0 + MB);
    for (int64_t n = n0; n < n1; n += NB) {
      const int64_t nb = std::min(NB, n1 - n);
      int64_t m = m0;
      for (; m + 4 <= m1; m += 4) chunk_avx512<4>(x + m * K, w, scale, out + m * N, N, K, G, n, nb);
      switch (m1 - m) {
        case 3: chunk_avx512<3>(x + m * K, w, scale, out + m * N, N, K, G, n, nb); break;
        case 2: chunk_avx512<2>(x + m * K, w, scale, out + m * N, N, K, G, n, nb); break;
        case 1: chunk_avx512<1>(x + m * K, w, scale, out + m * N, N, K, G, n, nb); break;
        default: break;
      }
    }
  }
}

// AVX2 + FMA (most laptop CPUs: no AVX-512). x comes rounded to int8 per group (quantize_rows), so
// a group's products are exact integers, 32 a vector: _mm256_maddubs_epi16 multiplies unsigned by
// signed bytes and adds pairs into int16, so it takes |w| and x with w's sign (_mm256_sign_epi8;
// a pair stays within 2 * 128 * 127, no saturation), and _mm256_madd_epi16 with ones adds pairs of
// those into int32. Each group's exact dot then joins an fp32 sum in group order, as in
// rows_generic: the two paths give the same bits.
// Exact int32 dots of the 4 rows of a block (lanes folded exactly, any order), as 4 floats.
__attribute__((target("avx2,fma"), always_inline)) inline __m128 dots4_avx2(const __m256i* acc) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0], acc[1]), _mm256_hadd_epi32(acc[2], acc[3]));
  return _mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

// x (int8) times w (int8) in int32 lanes: |w| * (x with w's sign), pairs summed twice.
__attribute__((target("avx2,fma"), always_inline)) inline __m256i dot32_avx2(__m256i aw, __m256i wv, __m256i xv,
                                                                            __m256i ones) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones);
}

__attribute__((target("avx2,fma"), always_inline)) inline __m256i dot16_avx2(__m128i aw, __m128i wv, __m128i xv,
                                                                            __m128i ones) {
  return _mm256_zextsi128_si256(_mm_madd_epi16(_mm_maddubs_epi16(aw, _mm_sign_epi8(xv, wv)), ones));
}

template <int MC>
__attribute__((target("avx2,fma"))) void chunk_avx2(const int8_t* xq, const float* xs, const int8_t* w,
                                                    const float* scale, float* out, int64_t N, int64_t K,
                                                    int64_t G, int64_t n, int64_t nb) {
  const int64_t groups = K / G;
  const __m256i ones = _mm256_set1_epi16(1);
  __m128 sum[MC];
  for (int m = 0; m < MC; ++m) sum[m] = _mm_setzero_ps();
  int64_t row[NB];
  const int8_t* wr[NB];
  for (int j = 0; j < NB; ++j) {
    row[j] = n + (j < nb ? j : 0);  // a short last block repeats a row it does not store
    wr[j] = w + row[j] * K;
  }
  const int8_t* ahead = w + std::min(n + PREFETCH_ROWS, N - 1) * K;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[MC][NB];
    for (int m = 0; m < MC; ++m)
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_si256();
    const int64_t end = (g + 1) * G;
    int64_t k = g * G;
    for (; k + 32 <= end; k += 32) {
      for (int j = 0; j < NB; ++j) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[j] + k));
        const __m256i aw = _mm256_sign_epi8(wv, wv);
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * K + k), PREFETCH_HINT);
        for (int m = 0; m < MC; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k));
          acc[m][j] = _mm256_add_epi32(acc[m][j], dot32_avx2(aw, wv, xv, ones));
        }
      }
    }
    if (k < end) {  // a group of 16, or 16 left after pairs of 16
      for (int j = 0; j < NB; ++j) {
        const __m128i wv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[j] + k));
        const __m128i aw = _mm_sign_epi8(wv, wv);
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * K + k), PREFETCH_HINT);
        for (int m = 0; m < MC; ++m) {
          const __m128i xv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + m * K + k));
          acc[m][j] = _mm256_add_epi32(acc[m][j], dot16_avx2(aw, wv, xv, _mm256_castsi256_si128(ones)));
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

// int8_lanes_linear's product: MC rows of x against 8 rows of w packed in lane order (wb: [K / 4][8
// rows x 4 bytes], sb: [groups][8 rows]). Each 32-bit lane of a vector is one row's 4 weights, so
// x's 4 matching bytes, broadcast to every lane, meet all 8 rows at once: a group's 8 dots come out
// side by side, with no horizontal sums (chunk_avx2 spends about a third of its operations folding
// lanes at each group). The same integers and the same fp32 sums, fma(dot, xs * scale, sum) in group
// order, so the same bits as chunk_avx2 and rows_generic. The first pass over a block prefetches
// `ahead` bytes past what it reads, up to wend: a block's lanes are one contiguous run of memory.
template <int MC>
__attribute__((target("avx2,fma"))) void lanes_avx2(const int8_t* xq, const float* xs, const int8_t* wb,
                                                    const float* sb, float* out, int64_t N, int64_t K, int64_t G,
                                                    int64_t n, int64_t ahead, const int8_t* wend) {
  const int64_t groups = K / G;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 sum[MC];
  for (int m = 0; m < MC; ++m) sum[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[MC];
    for (int m = 0; m < MC; ++m) acc[m] = _mm256_setzero_si256();
    for (int64_t c = g * G / 4; c < (g + 1) * G / 4; ++c) {
      const int8_t* p = wb + c * 32;
      if (ahead && (c & 1) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(std::min(p + ahead, wend - 64)), PREFETCH_HINT);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i aw = _mm256_sign_epi8(wv, wv);
      for (int m = 0; m < MC; ++m) acc[m] = _mm256_add_epi32(acc[m], dot32_avx2(aw, wv, x4(xq + m * K + c * 4), ones));
    }
    const __m256 ws = _mm256_loadu_ps(sb + g * LANE_ROWS);
    for (int m = 0; m < MC; ++m)
      sum[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_mul_ps(_mm256_set1_ps(xs[m * groups + g]), ws), sum[m]);
  }
  for (int m = 0; m < MC; ++m) _mm256_storeu_ps(out + m * N + n, sum[m]);
}

// Rows [n0, n1) of w against all M rows of x, MB rows of x at a time (rows_per_pass): a block of
// weight rows is read from memory once per MB rows of x (and from the L1 cache for each MC of
// them), so a prompt's rows stream the weights M / MB times, not M times.
__attribute__((target("avx2,fma"))) void rows_avx2(const int8_t* xq, const float* xs, const int8_t* w,
                                                   const float* scale, float* out, int64_t M, int64_t N,
                                                   int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t groups = K / G, MB = rows_per_pass(K, sizeof(int8_t));
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t m1 = std::min(M, m0 + MB);
    for (int64_t n = n0; n < n1; n += NB) {
      const int64_t nb = std::min(NB, n1 - n);
      int64_t m = m0;
      for (; m + 2 <= m1; m += 2)
        chunk_avx2<2>(xq + m * K, xs + m * groups, w, scale, out + m * N, N, K, G, n, nb);
      if (m < m1) chunk_avx2<1>(xq + m * K, xs + m * groups, w, scale, out + m * N, N, K, G, n, nb);
    }
  }
}
#endif

void rows(const float* x, const int8_t* xq, const float* xs, const int8_t* w, const float* scale, float* out,
          int64_t M, int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {
#if defined(__x86_64__)
  const Isa isa = active_isa();
  if (isa == Isa::avx512) return rows_avx512(x, w, scale, out, M, N, K, G, n0, n1);
  if (isa == Isa::avx2) return rows_avx2(xq, xs, w, scale, out, M, N, K, G, n0, n1);
#endif
  rows_generic(xq, xs, w, scale, out, M, N, K, G, n0, n1);
}

// Both ops' operands, contiguous, and the [M, N] fp32 output they fill.
struct Operands {
  at::Tensor x, w, scale, out;
  Operands(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scale_, int64_t N)
      : x(x_.contiguous()), w(w_.contiguous()), scale(scale_.contiguous()), out(at::empty({x_.size(0), N}, x_.options())) {}
};

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_linear: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar, "int8_linear: fp32 x, int8 w");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == w.size(0) && scale.scalar_type() == at::kFloat,
              "int8_linear: fp32 scales [N, groups]");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  TORCH_CHECK(scale.size(1) > 0 && K % scale.size(1) == 0 && (K / scale.size(1)) % LANES == 0,
              "int8_linear: K must split into groups of a multiple of 16");
  const int64_t G = K / scale.size(1);
  const Operands o(x, w, scale, N);
  const float *xp = o.x.data_ptr<float>(), *sp = o.scale.data_ptr<float>();
  const int8_t* wp = o.w.data_ptr<int8_t>();
  float* op = o.out.data_ptr<float>();
  std::vector<int8_t> xq;
  std::vector<float> xs;
  if (active_isa() != Isa::avx512) {
    xq.resize(M * K);
    xs.resize(M * (K / G));
    const bool avx2 = active_isa() == Isa::avx2;
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      quantize_rows(xp, xq.data(), xs.data(), m0, m1, K, G, avx2);
    });
  }
  // Tasks of at least 16 blocks (64 rows of w): smaller ones cost more to hand out than they share.
  at::parallel_for(0, (N + NB - 1) / NB, 16, [&](int64_t b0, int64_t b1) {
    rows(xp, xq.data(), xs.data(), wp, sp, op, M, N, K, G, b0 * NB, std::min(N, b1 * NB));
  });
  return o.out;
}

// finetune::int8_lanes_linear(x, w, scale): int8_linear's product with w packed once, at quantize
// time, in lane order (quant.py's _pack_int8_lanes): w [N / 8, K / 4, 32], block b holding rows
// 8b..8b+7 as [K / 4][8 rows x 4 bytes], and scale [N / 8, groups, 8]. Every row count then meets 8 rows of w at once
// with no copy and no horizontal sums, one row of x included. The same integer dots and fp32 sums
// as int8_linear's generic and AVX2 code (the same bits); CPUs with AVX-512 run the AVX2 code here
// (quant.py packs lanes only off AVX-512, where int8_linear widens weights to fp32 instead).
void lanes_generic(const int8_t* xq, const float* xs, const int8_t* w, const float* scale, float* out, int64_t M,
                   int64_t N, int64_t K, int64_t G, int64_t b0, int64_t b1) {
  const int64_t groups = K / G;
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t j = 0; j < LANE_ROWS; ++j)
      for (int64_t m = 0; m < M; ++m) {
        float sum = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          int32_t dot = 0;
          for (int64_t k = g * G; k < (g + 1) * G; ++k)
            dot += int32_t{xq[m * K + k]} * int32_t{w[b * K * LANE_ROWS + k / 4 * 32 + j * 4 + k % 4]};
          sum = std::fma(static_cast<float>(dot), xs[m * groups + g] * scale[(b * groups + g) * LANE_ROWS + j], sum);
        }
        out[m * N + b * LANE_ROWS + j] = sum;
      }
}

#if defined(__x86_64__)
constexpr int64_t LANES_AHEAD = 8192;  // bytes prefetched ahead: 2048 and 4096 streamed one row 5-10 % slower

__attribute__((target("avx2,fma"))) void lanes_rows_avx2(const int8_t* xq, const float* xs, const int8_t* w,
                                                         const float* scale, float* out, int64_t M, int64_t N,
                                                         int64_t K, int64_t G, int64_t b0, int64_t b1) {
  const int64_t groups = K / G, MB = rows_per_pass(K, sizeof(int8_t));
  const int8_t* wend = w + (N / LANE_ROWS) * K * LANE_ROWS;
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t m1 = std::min(M, m0 + MB);
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* wb = w + b * K * LANE_ROWS;
      const float* sb = scale + b * groups * LANE_ROWS;
      const int64_t n = b * LANE_ROWS;
      int64_t m = m0;
      // The first pass over the block streams it: prefetch ahead there.
      for (; m + 8 <= m1; m += 8)
        lanes_avx2<8>(xq + m * K, xs + m * groups, wb, sb, out + m * N, N, K, G, n, m == m0 ? LANES_AHEAD : 0, wend);
      for (; m + 4 <= m1; m += 4)
        lanes_avx2<4>(xq + m * K, xs + m * groups, wb, sb, out + m * N, N, K, G, n, m == m0 ? LANES_AHEAD : 0, wend);
      for (; m + 2 <= m1; m += 2)
        lanes_avx2<2>(xq + m * K, xs + m * groups, wb, sb, out + m * N, N, K, G, n, m == m0 ? LANES_AHEAD : 0, wend);
      for (; m < m1; ++m)
        lanes_avx2<1>(xq + m * K, xs + m * groups, wb, sb, out + m * N, N, K, G, n, m == m0 ? LANES_AHEAD : 0, wend);
    }
  }
}
#endif

at::Tensor int8_lanes_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_lanes_linear: fp32 x [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kChar && w.size(1) * 4 == K && w.size(2) == 4 * LANE_ROWS,
              "int8_lanes_linear: packed int8 w [N / 8, K / 4, 32]");
  TORCH_CHECK(scale.dim() == 3 && scale.scalar_type() == at::kFloat && scale.size(0) == w.size(0) &&
                  scale.size(2) == LANE_ROWS,
              "int8_lanes_linear: fp32 scales [N / 8, groups, 8]");
  const int64_t groups = scale.size(1);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % LANES == 0,
              "int8_lanes_linear: K must split into groups of a multiple of 16");
  const int64_t G = K / groups, blocks = w.size(0), N = blocks * LANE_ROWS;
  const Operands o(x, w, scale, N);
  const float *xp = o.x.data_ptr<float>(), *sp = o.scale.data_ptr<float>();
  const int8_t* wp = o.w.data_ptr<int8_t>();
  float* op = o.out.data_ptr<float>();
  const bool avx2 = active_isa() != Isa::generic;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M * groups);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) { quantize_rows(xp, xq.data(), xs.data(), m0, m1, K, G, avx2); });
  // Tasks of at least 8 blocks (64 rows of w), as int8_linear's.
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
#if defined(__x86_64__)
    if (avx2) return lanes_rows_avx2(xq.data(), xs.data(), wp, sp, op, M, N, K, G, b0, b1);
#endif
    lanes_generic(xq.data(), xs.data(), wp, sp, op, M, N, K, G, b0, b1);
  });
  return o.out;
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
  m.def("int8_lanes_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int8_isa() -> str", &int8_isa);  // the vector code int8_linear runs here
}

TORCH_LIBRARY_IMPL(finetune, CPU, m) {
  m.impl("int8_linear", int8_linear);
  m.impl("int8_lanes_linear", int8_lanes_linear);
}
