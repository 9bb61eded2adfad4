// finetune::int4_linear(x, w, scales): out[m, n] = sum_k x[m, k] * (code[n, k] * s[n, g] + low[n, g]),
// g = k / 32, with 4-bit codes 0..15 and a bf16 scale and offset per group of 32 weights (the
// asymmetric scheme of llama.cpp's q4_1, our own layout and code). Half of int8's bytes a weight
// (0.625 with the scales, against 1.0625), so a memory-bound decode step reads 0.59x the bytes.
//
// Layout, kept in blocks of 8 output rows (NB4) so that one block streams from one place, and so
// that each 32-bit lane of a vector belongs to one row of the block:
// - w [N / 8, groups * 128] uint8: block b, group g holds 4 vectors of 32 bytes; in vector v, lane j
//   (4 bytes) is row j's, and its byte t holds code 4v + t in its low nibble and code 16 + 4v + t
//   in its high one.
// - scales [N / 8, groups * 16] bf16: block b, group g holds the 8 rows' scales, then their offsets.
// quant.py's _pack_int4 writes it.
//
// Activations are rounded to int8 per group of 32 (rows.h: quantize_rows, with each group's integer
// sum), so a group's products are exact: sum_k w x = xs * (s * sum_k code xq + low * sum_k xq). The
// integer dot is _mm256_maddubs_epi16 of the unsigned codes as they unpack against 4 of x's bytes
// broadcast to every lane, 8 of them added in int16 (each at most 2 * 15 * 127: 8 stay within
// int16), then _mm256_madd_epi16: one int32 lane a row, so the 8 rows' dots come out side by side
// with no horizontal sums (an earlier layout of 4-row blocks spent 8 of its ~17 operations a group
// and row of x folding lanes). Then fp32, in group order, as t = fma(dot, s, low * xsum),
// sum = fma(t, xs, sum) on every path, so the AVX2 and generic code give the same bits, and a row
// gives the same bits in any batch and at any place in a prompt.
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

constexpr int64_t G4 = 32;            // weights a group: one scale and offset
constexpr int64_t NB4 = 8;            // output rows a block: one 32-bit lane each
constexpr int64_t BLOCK_BYTES = 128;  // a group of a block: 8 rows x 16 bytes of codes
constexpr int64_t BLOCK_SCALES = 16;  // bf16 values a group of a block: 8 scales, 8 offsets
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
    for (int64_t j = 0; j < NB4; ++j) {
      for (int64_t m = 0; m < M; ++m) {
        float sum = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t* codes = w + (b * groups + g) * BLOCK_BYTES + j * 4;
          const int8_t* x = xq + m * K + g * G4;
          int32_t dot = 0;
          for (int64_t v = 0; v < 4; ++v)
            for (int64_t t = 0; t < 4; ++t) {
              const int32_t byte = codes[v * 32 + t];
              dot += (byte & 15) * x[4 * v + t] + (byte >> 4) * x[16 + 4 * v + t];
            }
          const uint16_t* s = sc + (b * groups + g) * BLOCK_SCALES;
          const float t = std::fma(static_cast<float>(dot), bf16(s[j]), bf16(s[NB4 + j]) * xsum[m * groups + g]);
          sum = std::fma(t, xs[m * groups + g], sum);
        }
        out[m * N + b * NB4 + j] = sum;
      }
    }
  }
}

#if defined(__x86_64__)
// 8 bf16 values as fp32.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 bf16x8(const uint16_t* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// MC rows of x against the block's 8 rows of w.
template <int MC>
__attribute__((target("avx2,fma"))) void chunk_avx2(const int8_t* xq, const float* xs, const float* xsum,
                                                    const uint8_t* wb, const uint16_t* sb, const uint8_t* wend,
                                                    float* out, int64_t N, int64_t K, int64_t n) {
  const int64_t groups = K / G4;
  const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(15);
  __m256 sum[MC];
  for (int m = 0; m < MC; ++m) sum[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = wb + g * BLOCK_BYTES;
    const uint8_t* ahead = std::min(wg + PREFETCH_BYTES, wend - BLOCK_BYTES);
    _mm_prefetch(reinterpret_cast<const char*>(ahead), PREFETCH_HINT);
    _mm_prefetch(reinterpret_cast<const char*>(ahead) + 64, PREFETCH_HINT);
    if ((g & 1) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(sb + g * BLOCK_SCALES) + PREFETCH_BYTES / 4, PREFETCH_HINT);
    // One vector of codes at a time against every row of x: 16 registers hold no more than that
    // (holding all 4 unpacked spilled them to the stack).
    __m256i p[MC];
    for (int v = 0; v < 4; ++v) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + v * 32));
      const __m256i lo = _mm256_and_si256(raw, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
      for (int m = 0; m < MC; ++m) {
        const int8_t* xg = xq + m * K + g * G4 + 4 * v;
        const __m256i q = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x4(xg)), _mm256_maddubs_epi16(hi, x4(xg + 16)));
        p[m] = v == 0 ? q : _mm256_add_epi16(p[m], q);
      }
    }
    const __m256 s = bf16x8(sb + g * BLOCK_SCALES), low = bf16x8(sb + g * BLOCK_SCALES + NB4);
    for (int m = 0; m < MC; ++m) {
      const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(p[m], ones));
      const __m256 t = _mm256_fmadd_ps(dots, s, _mm256_mul_ps(low, _mm256_set1_ps(xsum[m * groups + g])));
      sum[m] = _mm256_fmadd_ps(t, _mm256_set1_ps(xs[m * groups + g]), sum[m]);
    }
  }
  for (int m = 0; m < MC; ++m) _mm256_storeu_ps(out + m * N + n, sum[m]);
}

// Blocks [b0, b1) of w against all M rows of x, as many rows at a time as the L2 cache holds
// (rows_per_pass): a block is read from memory once per such pass.
__attribute__((target("avx2,fma"))) void rows_avx2(const int8_t* xq, const float* xs, const float* xsum,
                                                   const uint8_t* w, const uint16_t* sc, float* out, int64_t M,
                                                   int64_t N, int64_t K, int64_t b0, int64_t b1) {
  const int64_t groups = K / G4, MB = rows_per_pass(K, sizeof(int8_t));
  const uint8_t* wend = w + (N / NB4) * groups * BLOCK_BYTES;
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t m1 = std::min(M, m0 + MB);
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* wb = w + b * groups * BLOCK_BYTES;
      const uint16_t* sb = sc + b * groups * BLOCK_SCALES;
      int64_t m = m0;
      for (; m + 4 <= m1; m += 4)
        chunk_avx2<4>(xq + m * K, xs + m * groups, xsum + m * groups, wb, sb, wend, out + m * N, N, K, b * NB4);
      if (m + 2 <= m1) {
        chunk_avx2<2>(xq + m * K, xs + m * groups, xsum + m * groups, wb, sb, wend, out + m * N, N, K, b * NB4);
        m += 2;
      }
      if (m < m1)
        chunk_avx2<1>(xq + m * K, xs + m * groups, xsum + m * groups, wb, sb, wend, out + m * N, N, K, b * NB4);
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
              "int4_linear: packed uint8 w [N / 8, K * 4]");
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kBFloat16 && scales.size(0) == w.size(0) &&
                  scales.size(1) == groups * BLOCK_SCALES,
              "int4_linear: bf16 scales [N / 8, K / 2]");
  const int64_t blocks = w.size(0), N = blocks * NB4;
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
  // Tasks of at least 8 blocks (64 rows of w), as int8_linear's.
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
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
