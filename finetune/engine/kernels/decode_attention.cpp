// finetune::decode_attention(q, past_k, past_v, k, v, mask, scale): attention of one new token per row
// over the row's cached keys/values (time-major [length, rows, kv heads, head dim], as decoder.KV keeps
// them) and its own new key/value, with grouped query heads: out [rows, heads x head dim].
//
// Why our own: a row's result must not depend on the batch it is decoded in. A batch left-pads its
// shorter rows, and SDPA (eager, or the compiled step's lowering of it) sums over the padded length
// in vector lanes and blocks, so a padded row's real positions fall in other lanes than alone and its
// sums come out in another order: last-bit differences that the int8 kernel's rounding of
// activations can turn into another greedy token. Here each row sums over its own unmasked positions
// only, in their order from its first (vectors across the head dimension, and on the vector path
// across 8 positions, each by its index among the row's own): the same operations on the same
// numbers, whatever the batch. It also reads the cache in place (the compiled
// step concatenated the new token to it and SDPA expanded the grouped heads, per layer and step).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "isa.h"

namespace {

// Vectors where the CPU has AVX2 and FMA, unless FINETUNE_INT8_ISA=generic (the tests' cap) asks for
// plain C++ (isa.h, as the int8 kernel decides). Either way one process uses one path for every row.
bool vectors() { return finetune_kernels::active_isa() != finetune_kernels::Isa::generic; }

struct Shapes {
  int64_t rows, length, heads, kv_heads, dim;
};

struct Inputs {
  const float *q, *past_k, *past_v, *k, *v;
  const bool* mask;
  float* out;
  float scale;
};

// Per thread, reused from one (row, kv head) to the next: no allocation per item.
struct Scratch {
  std::vector<const float*> keys, values;
  std::vector<float> scores;
};

// Row r's unmasked positions in order (t == length is the new token): where their keys and values
// for kv head g are.
inline void gather(const Inputs& in, const Shapes& s, int64_t r, int64_t g, Scratch& w) {
  w.keys.clear();
  w.values.clear();
  for (int64_t t = 0; t <= s.length; ++t) {
    if (!in.mask[r * (s.length + 1) + t]) continue;
    const int64_t at = t < s.length ? ((t * s.rows + r) * s.kv_heads + g) * s.dim : -1;
    w.keys.push_back(at < 0 ? in.k + (r * s.kv_heads + g) * s.dim : in.past_k + at);
    w.values.push_back(at < 0 ? in.v + (r * s.kv_heads + g) * s.dim : in.past_v + at);
  }
}

// Any CPU: the query heads of kv head g in row r, over the row's positions in order: scores, then
// exp(score - max) summed and multiplied into the values one position after another, divided by
// that sum at the end.
void attend_generic(const Inputs& in, const Shapes& s, int64_t r, int64_t g, Scratch& w) {
  gather(in, s, r, g, w);
  const int64_t group = s.heads / s.kv_heads, n = static_cast<int64_t>(w.keys.size());
  w.scores.resize(n);
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    const float* qh = in.q + (r * s.heads + h) * s.dim;
    float* o = in.out + (r * s.heads + h) * s.dim;
    std::fill(o, o + s.dim, 0.f);
    if (n == 0) {  // every position masked: NaN, as SDPA's softmax over nothing
      std::fill(o, o + s.dim, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) {
      float dot = 0.f;
      for (int64_t d = 0; d < s.dim; ++d) dot = std::fma(qh[d], w.keys[i][d], dot);
      w.scores[i] = dot * in.scale;
      top = std::max(top, w.scores[i]);
    }
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float p = std::exp(w.scores[i] - top);
      sum += p;
      for (int64_t d = 0; d < s.dim; ++d) o[d] = std::fma(p, w.values[i][d], o[d]);
    }
    for (int64_t d = 0; d < s.dim; ++d) o[d] /= sum;
  }
}

void items_generic(const Inputs& in, const Shapes& s, int64_t b, int64_t e) {
  Scratch w;
  for (int64_t i = b; i < e; ++i) attend_generic(in, s, i / s.kv_heads, i % s.kv_heads, w);
}

#if defined(__x86_64__)
// The vector path (head dim a multiple of 8). The cache is time-major, so one row's keys for one kv
// head are 256 bytes every rows x kv heads x dim x 4 bytes: too far apart for the hardware
// prefetcher, and a step's caches (8 rows of 128 tokens: 1.5 MB a layer) are not in the CPU's
// caches when their layer comes. So each block of 8 positions prefetches the keys and values of the
// next, and the work is laid out to use what arrives: a block's 8 keys meet each query head with 8
// accumulators side by side (one horizontal fold for 8 scores), exp runs 8 scores at a time, and a
// head's output stays in registers while the values go past. Every sum still runs over the row's
// own positions in the same order (a score's lane is its index among them), so a row's bits do not
// depend on the batch.
constexpr int64_t BLOCK = 8;  // positions a block: a vector of scores

// exp(x) for x <= 0 (scores minus their maximum), within 2 ulp: x = n ln2 + r, |r| <= ln2 / 2, a
// degree-6 polynomial for exp(r), times 2^n through the exponent bits. Below -87 it gives about
// 1e-38 for 0, negligible beside the largest term's 1; NaN stays NaN.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.f), x);  // NaN is max_ps's second operand: kept
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 8 vectors' lane sums as one vector, a's in lane 0 ... h's in lane 7 (a fixed order of adds).
__attribute__((target("avx2,fma"), always_inline)) inline __m256 fold8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

__attribute__((target("avx2,fma"), always_inline)) inline void prefetch_block(const std::vector<const float*>& keys,
                                                                                const std::vector<const float*>& values,
                                                                                int64_t from, int64_t n, int64_t dim) {
  for (int64_t i = from; i < std::min(n, from + BLOCK); ++i)
    for (int64_t d = 0; d < dim; d += 16) {  // a 64-byte line holds 16 floats
      _mm_prefetch(reinterpret_cast<const char*>(keys[i] + d), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(values[i] + d), _MM_HINT_T1);
    }
}

// V vectors of a head's output (dims d0 .. d0 + 8V) over positions [0, n): held in registers.
template <int V>
__attribute__((target("avx2,fma"), always_inline)) inline void weigh_values(const float* p,
                                                                             const std::vector<const float*>& values,
                                                                             int64_t n, int64_t d0, float inv, float* o) {
  __m256 acc[V];
  for (int j = 0; j < V; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const __m256 pi = _mm256_broadcast_ss(p + i);
    for (int j = 0; j < V; ++j) acc[j] = _mm256_fmadd_ps(pi, _mm256_loadu_ps(values[i] + d0 + 8 * j), acc[j]);
  }
  const __m256 scale = _mm256_set1_ps(inv);
  for (int j = 0; j < V; ++j) _mm256_storeu_ps(o + d0 + 8 * j, _mm256_mul_ps(acc[j], scale));
}

__attribute__((target("avx2,fma"))) void attend_avx2(const Inputs& in, const Shapes& s, int64_t r, int64_t g,
                                                     Scratch& w) {
  gather(in, s, r, g, w);
  const int64_t group = s.heads / s.kv_heads, n = static_cast<int64_t>(w.keys.size()), dim = s.dim;
  const int64_t padded = (n + BLOCK - 1) / BLOCK * BLOCK;
  w.scores.resize(group * padded);
  if (n == 0) {  // every position masked: NaN, as SDPA's softmax over nothing
    for (int64_t h = g * group; h < (g + 1) * group; ++h)
      std::fill_n(in.out + (r * s.heads + h) * dim, dim, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  prefetch_block(w.keys, w.values, 0, n, dim);
  // Scores, a block of 8 positions at a time for every head of the group.
  for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
    prefetch_block(w.keys, w.values, i0 + BLOCK, n, dim);
    const float* key[BLOCK];
    for (int j = 0; j < BLOCK; ++j) key[j] = w.keys[std::min(i0 + j, n - 1)];  // past n: a real key, masked below
    for (int64_t hh = 0; hh < group; ++hh) {
      const float* qh = in.q + (r * s.heads + g * group + hh) * dim;
      __m256 acc[BLOCK];
      for (int j = 0; j < BLOCK; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < dim; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qh + d);
        for (int j = 0; j < BLOCK; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key[j] + d), acc[j]);
      }
      _mm256_storeu_ps(w.scores.data() + hh * padded + i0, _mm256_mul_ps(fold8(acc), _mm256_set1_ps(in.scale)));
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i last = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - (padded - BLOCK))), lane);
  for (int64_t hh = 0; hh < group; ++hh) {
    float* p = w.scores.data() + hh * padded;
    // The maximum over real positions (the last block's extra lanes hold a repeated real score).
    __m256 top = _mm256_loadu_ps(p);
    for (int64_t i = BLOCK; i < padded; i += BLOCK) top = _mm256_max_ps(top, _mm256_loadu_ps(p + i));
    __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    t4 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
    t4 = _mm_max_ss(t4, _mm_movehdup_ps(t4));
    const __m256 vmax = _mm256_set1_ps(_mm_cvtss_f32(t4));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < padded; i += BLOCK) {
      __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p + i), vmax));
      if (i + BLOCK == padded) e = _mm256_and_ps(e, _mm256_castsi256_ps(last));
      _mm256_storeu_ps(p + i, e);
      sum = _mm256_add_ps(sum, e);
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const float total = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
    float* o = in.out + (r * s.heads + g * group + hh) * dim;
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
      switch (std::min<int64_t>(8, (dim - d0) / 8)) {
        case 8: weigh_values<8>(p, w.values, n, d0, 1.f / total, o); break;
        case 7: weigh_values<7>(p, w.values, n, d0, 1.f / total, o); break;
        case 6: weigh_values<6>(p, w.values, n, d0, 1.f / total, o); break;
        case 5: weigh_values<5>(p, w.values, n, d0, 1.f / total, o); break;
        case 4: weigh_values<4>(p, w.values, n, d0, 1.f / total, o); break;
        case 3: weigh_values<3>(p, w.values, n, d0, 1.f / total, o); break;
        case 2: weigh_values<2>(p, w.values, n, d0, 1.f / total, o); break;
        default: weigh_values<1>(p, w.values, n, d0, 1.f / total, o); break;
      }
    }
  }
}

__attribute__((target("avx2,fma"))) void items_avx2(const Inputs& in, const Shapes& s, int64_t b, int64_t e) {
  Scratch w;
  for (int64_t i = b; i < e; ++i) attend_avx2(in, s, i / s.kv_heads, i % s.kv_heads, w);
}
#endif

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& past_k, const at::Tensor& past_v,
                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && past_k.dim() == 4 && k.dim() == 3,
              "decode_attention: q [rows, heads, dim], past_k/v [length, rows, kv heads, dim], k/v [rows, kv heads, dim]");
  const Shapes s{q.size(0), past_k.size(0), q.size(1), k.size(1), q.size(2)};
  TORCH_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, "decode_attention: heads must be a multiple of kv heads");
  TORCH_CHECK(past_k.sizes() == past_v.sizes() && past_k.size(1) == s.rows && past_k.size(2) == s.kv_heads &&
                  past_k.size(3) == s.dim && k.sizes() == v.sizes() && k.size(0) == s.rows && k.size(2) == s.dim,
              "decode_attention: shapes of q, keys and values disagree");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == s.rows && mask.size(1) == s.length + 1 &&
                  mask.scalar_type() == at::kBool,
              "decode_attention: mask [rows, length + 1] of bools");
  for (const at::Tensor* t : {&q, &past_k, &past_v, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "decode_attention: fp32 q, keys and values");
  const at::Tensor qc = q.contiguous(), pk = past_k.contiguous(), pv = past_v.contiguous();
  const at::Tensor kc = k.contiguous(), vc = v.contiguous(), mc = mask.contiguous();
  at::Tensor out = at::empty({s.rows, s.heads * s.dim}, q.options());
  const float *qp = qc.data_ptr<float>(), *pkp = pk.data_ptr<float>(), *pvp = pv.data_ptr<float>();
  const float *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  const bool* mp = mc.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const Inputs in{qp, pkp, pvp, kp, vp, mp, op, static_cast<float>(scale)};
  const bool vec = vectors() && s.dim % 8 == 0;
  // Items of less than ~32K multiply-adds together: a short context's few rows are cheaper on one
  // thread than handed out (one row, 48 tokens: 5 us against 8).
  const int64_t work = (s.length + 1) * s.dim * (s.heads / s.kv_heads);
  at::parallel_for(0, s.rows * s.kv_heads, std::max<int64_t>(1, (32 << 10) / work), [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
    if (vec) return items_avx2(in, s, b, e);
#endif
    items_generic(in, s, b, e);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(finetune, m) {
  m.def("decode_attention(Tensor q, Tensor past_k, Tensor past_v, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(finetune, CPU, m) { m.impl("decode_attention", decode_attention); }
