// What our int8 and int4 products share: the blocking constants, each activation row rounded to
// int8 per group (the integer products' left side), and its bytes broadcast against weights laid
// out one row a lane.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace finetune_kernels {

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
constexpr int64_t X_BLOCK = 256 << 10;  // bytes of x per pass over the weights: within the L2 cache

// Rows of x per pass over a block of weights: as many as X_BLOCK holds (a prompt's chunk of x stays
// in the L2 cache while the weights stream past it once), 16 at least.
inline int64_t rows_per_pass(int64_t K, int64_t bytes) { return std::max<int64_t>(16, X_BLOCK / (K * bytes)); }

// x [M, K] rounded to int8 per group of G: x ~ xq * xs[m, g], the group's largest |x| mapping to 127
// (half a step off at most: 1/254 of that largest value). A pure function of the row: a request's
// activations round the same in any batch. A group with inf or NaN gets a NaN scale (its outputs
// are NaN, as fp32 would make them) and zeros.
constexpr float QMAX = 127.f;

#if defined(__x86_64__)
// 8 values times scale, clamped to [-127, 127], rounded to the nearest int32 (ties to even).
__attribute__((target("avx2,fma"), always_inline)) inline __m256i round8_avx2(const float* p, __m256 scale) {
  const __m256 hi = _mm256_set1_ps(QMAX), lo = _mm256_set1_ps(-QMAX);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(p), scale), lo), hi));
}

// quantize_rows' rounding of one group, 16 at a time: the same bits (cvtps rounds to nearest even,
// as nearbyint does in the default rounding mode).
__attribute__((target("avx2,fma"))) inline void round_group_avx2(const float* v, int8_t* q, int64_t G, float inv) {
  const __m256 scale = _mm256_set1_ps(inv);
  for (int64_t k = 0; k < G; k += LANES) {
    // packs works within 128-bit lanes: 16-bit values 0-3 8-11 4-7 12-15, then bytes in order
    // once the two halves are packed together.
    const __m256i w16 = _mm256_packs_epi32(round8_avx2(v + k, scale), round8_avx2(v + k + 8, scale));
    const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
    // b holds 0-3 8-11 4-7 12-15 as 32-bit quarters: put them back in order
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm_shuffle_epi32(b, 0xD8));
  }
}
#endif

inline void quantize_rows(const float* x, int8_t* xq, float* xs, int64_t m0, int64_t m1, int64_t K,
                          int64_t G, bool avx2, float* xsum = nullptr) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t k0 = 0; k0 < K; k0 += G) {
      const float* v = x + m * K + k0;
      int8_t* q = xq + m * K + k0;
      float amax = 0.f;
      bool finite = true;
      for (int64_t k = 0; k < G; ++k) {
        finite = finite && std::isfinite(v[k]);
        amax = std::max(amax, std::fabs(v[k]));
      }
      float& s = xs[m * (K / G) + k0 / G];
      if (!finite) {
        std::fill(q, q + G, int8_t{0});
        s = std::numeric_limits<float>::quiet_NaN();
        if (xsum) xsum[m * (K / G) + k0 / G] = 0.f;
        continue;
      }
      const float inv = amax > 0.f ? QMAX / amax : 0.f;
#if defined(__x86_64__)
      if (avx2) {
        round_group_avx2(v, q, G, inv);
      } else
#endif
        for (int64_t k = 0; k < G; ++k)
          q[k] = static_cast<int8_t>(std::nearbyint(std::clamp(v[k] * inv, -QMAX, QMAX)));
      s = amax / QMAX;
      if (xsum) {  // the group's integers summed (exact in fp32: at most G * 127)
        int32_t total = 0;
        for (int64_t k = 0; k < G; ++k) total += q[k];
        xsum[m * (K / G) + k0 / G] = static_cast<float>(total);
      }
    }
  }
}

#if defined(__x86_64__)
// 4 bytes of x (a row's values k..k+3) in every 32-bit lane: against 8 rows of weights laid out one
// row a lane (int4's blocks, int8's lanes).
__attribute__((target("avx2,fma"), always_inline)) inline __m256i x4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}
#endif

}  // namespace finetune_kernels
