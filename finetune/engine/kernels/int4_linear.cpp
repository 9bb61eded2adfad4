// finetune::int4_linear(x, w, scales): out[m, n] = sum_k x[m, k] * (code[n, k] * s[n, g] + low[n, g]),
// g = k / 32, with 4-bit codes 0..15 and a bf16 scale and offset per group of 32 weights (the
// asymmetric scheme of llama.cpp's q4_1, our own layout and code). Half of int8's bytes a weight
// (0.625 with the scales, against 1.0625), so a memory-bound decode step reads 0.59x the bytes.
//
// Layout, kept in blocks of 4 output rows (NB) so that one block streams from one place:
// - w [N / 4, groups * 64] uint8: block b, group g holds its 4 rows' 16 bytes one after another;
//   byte i of a row's 16 holds code i in its low nibble and code 16 + i in its high one.
// - scales [N / 4, groups * 8] bf16: block b, group g holds the 4 rows' scales, then their offsets.
// quant.py's _pack_int4 writes it.
//
// Activations are rounded to int8 per group of 32 (rows.h: quantize_rows, with each group's integer
// sum), so a group's products are exact: sum_k w x = xs * (s * sum_k code xq + low * sum_k xq), the
// integer dot from _mm256_maddubs_epi16 on the unsigned codes as they unpack (no sign trick: a
// pair stays within 2 * 15 * 127) and _mm256_madd_epi16. Then fp32, in group order, as
// t = fma(dot, s, low * xsum), sum = fma(t, xs, sum) on every path, so the AVX2 and generic code
// give the same bits and a row gives the same bits in any batch and at any place in a prompt.
// CPUs with AVX-512 run the AVX2 code: 32 codes fill a 256-bit vector.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "isa.h"
#include "rows.h"

namespace {

using namespace finetune_kernels;

constexpr int64_t G4 = 32;           // weights a group: one scale and offset
constexpr int64_t BLOCK_BYTES = 64;  // a group of a block: 4 rows x 16 bytes of codes
// Bytes ahead of the one being read that are prefetched: a few blocks of the narrowest layer.
constexpr int64_t PREFETCH_BYTES = 2048;

inline float bf16(uint16_t v) {
  const uint32_t bits = uint32_t{v} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void rows_generic(const int8_t* xq, const float* xs, const float* xsum, const uint8_t* w, const uint16_t* sc,
                  float* out, int64_t M, int64_t N, int64_t K, int64_t b0, int64_t b1) {
  const int64_t groups = K / G4;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t j = 0; j < NB; ++j) {
      for (int64_t m = 0; m < M; ++m) {
        float sum = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t* codes = w + (b * groups + g) * BLOCK_BYTES + j * 16;
          const int8_t* x = xq + m * K + g * G4;
          int32_t dot = 0;
          for (int64_t i = 0; i < 16; ++i) dot += int32_t{codes[i] & 15} * x[i] + int32_t{codes[i] >> 4} * x[16 + i];
          const uint16_t* s = sc + (b * groups + g) * 8;
          const float t = std::fma(static_cast<float>(dot), bf16(s[j]), bf16(s[4 + j]) * xsum[m * groups + g]);
          sum = std::fma(t, xs[m * groups + g], sum);
        }
        out[m * N + b * NB + j] = sum;
      }
    }
  }
}

#if defined(__x86_64__)
// 4 bf16 values as fp32.
__attribute__((target("avx2,fma"), always_inline)) inline __m128 bf16x4(const uint16_t* p) {
  const __m128i v = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm_castsi128_ps(_mm_slli_epi32(v, 16));
}

// MC rows of x against the block's 4 rows of w.
template <int MC>
__attribute__((target("avx2,fma"))) void chunk_avx2(const int8_t* xq, const float* xs, const float* xsum,
                                                    const uint8_t* wb, const uint16_t* sb, const uint8_t* wend,
                                                    float* out, int64_t N, int64_t K, int64_t n) {
  const int64_t groups = K / G4;
  const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(15);
  __m128 sum[MC];
  for (int m = 0; m < MC; ++m) sum[m] = _mm_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = wb + g * BLOCK_BYTES;
    const uint8_t* ahead = std::min(wg + PREFETCH_BYTES, wend - BLOCK_BYTES);
    _mm_prefetch(reinterpret_cast<const char*>(ahead), PREFETCH_HINT);
    if ((g & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(sb + g * 8) + PREFETCH_BYTES / 4, PREFETCH_HINT);
    // Each half of x's group in both 128-bit halves: a row's codes 0-15 meet the first, 16-31 the
    // second, two rows a vector.
    __m256i xlo[MC], xhi[MC];
    for (int m = 0; m < MC; ++m) {
      const int8_t* xg = xq + m * K + g * G4;
      xlo[m] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg)));
      xhi[m] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xg + 16)));
    }
    __m256i acc[MC][2];  // rows 0 and 1, rows 2 and 3: four int32 lanes each
    for (int pair = 0; pair < 2; ++pair) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + pair * 32));
      const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      // two products of at most 2 * 15 * 127 each: their int16 sum cannot overflow
      for (int m = 0; m < MC; ++m)
        acc[m][pair] = _mm256_madd_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo[m]), _mm256_maddubs_epi16(hi, xhi[m])), ones);
    }
    const __m128 s = bf16x4(sb + g * 8), low = bf16x4(sb + g * 8 + 4);
    for (int m = 0; m < MC; ++m) {
      // [r0 r0 r2 r2 | r1 r1 r3 r3] pairs summed, then [r0 r2 . . | r1 r3 . .]: interleaved in row order
      __m256i h = _mm256_hadd_epi32(acc[m][0], acc[m][1]);
      h = _mm256_hadd_epi32(h, h);
      const __m128 dots = _mm_cvtepi32_ps(_mm_unpacklo_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
      const __m128 t = _mm_fmadd_ps(dots, s, _mm_mul_ps(low, _mm_set1_ps(xsum[m * groups + g])));
      sum[m] = _mm_fmadd_ps(t, _mm_set1_ps(xs[m * groups + g]), sum[m]);
    }
  }
  for (int m = 0; m < MC; ++m) _mm_storeu_ps(out + m * N + n, sum[m]);
}

// Blocks [b0, b1) of w against all M rows of x, as many rows at a time as the L2 cache holds
// (rows_per_pass): a block is read from memory once per such pass.
__attribute__((target("avx2,fma"))) void rows_avx2(const int8_t* xq, const float* xs, const float* xsum,
                                                   const uint8_t* w, const uint16_t* sc, float* out, int64_t M,
                                                   int64_t N, int64_t K, int64_t b0, int64_t b1) {
  const int64_t groups = K / G4, MB = rows_per_pass(K, sizeof(int8_t));
  const uint8_t* wend = w + (N / NB) * groups * BLOCK_BYTES;
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t m1 = std::min(M, m0 + MB);
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* wb = w + b * groups * BLOCK_BYTES;
      const uint16_t* sb = sc + b * groups * 8;
      int64_t m = m0;
      for (; m + 2 <= m1; m += 2)
        chunk_avx2<2>(xq + m * K, xs + m * groups, xsum + m * groups, wb, sb, wend, out + m * N, N, K, b * NB);
      if (m < m1)
        chunk_avx2<1>(xq + m * K, xs + m * groups, xsum + m * groups, wb, sb, wend, out + m * N, N, K, b * NB);
    }
  }
}
#endif

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int4_linear: fp32 x [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K > 0 && K % G4 == 0, "int4_linear: K must be a multiple of 32");
  const int64_t groups = K / G4;
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(1) == groups * BLOCK_BYTES,
              "int4_linear: packed uint8 w [N / 4, K * 2]");
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kBFloat16 && scales.size(0) == w.size(0) &&
                  scales.size(1) == groups * 8,
              "int4_linear: bf16 scales [N / 4, K / 4]");
  const int64_t blocks = w.size(0), N = blocks * NB;
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), sc = scales.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const bool avx2 = active_isa() != Isa::generic;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M * groups), xsum(M * groups);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    quantize_rows(xp, xq.data(), xs.data(), m0, m1, K, G4, avx2, xsum.data());
  });
  // Tasks of at least 16 blocks (64 rows of w), as int8_linear's.
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
#if defined(__x86_64__)
    if (avx2) return rows_avx2(xq.data(), xs.data(), xsum.data(), wp, sp, op, M, N, K, b0, b1);
#endif
    rows_generic(xq.data(), xs.data(), xsum.data(), wp, sp, op, M, N, K, b0, b1);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(finetune, m) { m.def("int4_linear(Tensor x, Tensor w, Tensor scales) -> Tensor"); }

TORCH_LIBRARY_IMPL(finetune, CPU, m) { m.impl("int4_linear", int4_linear); }
