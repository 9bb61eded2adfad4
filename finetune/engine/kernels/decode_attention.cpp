// finetune::decode_attention(q, past_k, past_v, k, v, mask, scale): attention of one new token per row
// over the row's cached keys/values (time-major [length, rows, kv heads, head dim], as decoder.KV keeps
// them) and its own new key/value, with grouped query heads: out [rows, heads x head dim].
//
// Why our own: a row's result must not depend on the batch it is decoded in. A batch left-pads its
// shorter rows, and SDPA (eager, or the compiled step's lowering of it) sums over the padded length
// in vector lanes and blocks, so a padded row's real positions fall in other lanes than alone and its
// sums come out in another order: last-bit differences that the int8 kernel's rounding of
// activations can turn into another greedy token. Here each row sums over its own unmasked positions
// only, one after another from its first, with vectors only across the head dimension: the same
// operations on the same numbers, whatever the batch. It also reads the cache in place (the compiled
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

struct GenericOps {
  static float dot(const float* a, const float* b, int64_t n) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s = std::fma(a[i], b[i], s);
    return s;
  }
  static void axpy(float p, const float* v, float* acc, int64_t n) {
    for (int64_t i = 0; i < n; ++i) acc[i] = std::fma(p, v[i], acc[i]);
  }
};

#if defined(__x86_64__)
// n a multiple of 8: lanes summed in a fixed order at the end. Four accumulators where n allows
// (a head of 64 is 8 vectors): one chain of 8 dependent FMAs cost about as much as the rest of a
// position's work.
struct Avx2Ops {
  __attribute__((target("avx2,fma"))) static inline float dot(const float* a, const float* b, int64_t n) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * j), _mm256_loadu_ps(b + i + 8 * j), acc[j]);
    for (; i < n; i += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[0]);
    const __m256 all = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
    const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
  }
  __attribute__((target("avx2,fma"))) static inline void axpy(float p, const float* v, float* acc,
                                                                             int64_t n) {
    const __m256 pv = _mm256_set1_ps(p);
    for (int64_t i = 0; i < n; i += 8)
      _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
  }
};
#endif

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

// The query heads of kv head g in row r, over the row's unmasked positions in order (t == length is
// the new token): scores, then exp(score - max) summed and multiplied into the values one position
// after another, divided by that sum at the end. Inlined into each path's function, so that the
// vector code's dot and axpy inline too.
template <class Ops>
__attribute__((always_inline)) inline void attend(const Inputs& in, const Shapes& s, int64_t r, int64_t g,
                                                  Scratch& w) {
  const float *q = in.q, *past_k = in.past_k, *past_v = in.past_v, *k = in.k, *v = in.v;
  const bool* mask = in.mask;
  float* out = in.out;
  const float scale = in.scale;
  w.keys.clear();
  w.values.clear();
  for (int64_t t = 0; t <= s.length; ++t) {
    if (!mask[r * (s.length + 1) + t]) continue;
    const int64_t at = t < s.length ? ((t * s.rows + r) * s.kv_heads + g) * s.dim : -1;
    w.keys.push_back(at < 0 ? k + (r * s.kv_heads + g) * s.dim : past_k + at);
    w.values.push_back(at < 0 ? v + (r * s.kv_heads + g) * s.dim : past_v + at);
  }
  const int64_t group = s.heads / s.kv_heads, n = static_cast<int64_t>(w.keys.size());
  w.scores.resize(n);
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    const float* qh = q + (r * s.heads + h) * s.dim;
    float* o = out + (r * s.heads + h) * s.dim;
    std::fill(o, o + s.dim, 0.f);
    if (n == 0) {  // every position masked: NaN, as SDPA's softmax over nothing
      std::fill(o, o + s.dim, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) {
      w.scores[i] = Ops::dot(qh, w.keys[i], s.dim) * scale;
      top = std::max(top, w.scores[i]);
    }
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float p = std::exp(w.scores[i] - top);
      sum += p;
      Ops::axpy(p, w.values[i], o, s.dim);
    }
    for (int64_t d = 0; d < s.dim; ++d) o[d] /= sum;
  }
}

void items_generic(const Inputs& in, const Shapes& s, int64_t b, int64_t e) {
  Scratch w;
  for (int64_t i = b; i < e; ++i) attend<GenericOps>(in, s, i / s.kv_heads, i % s.kv_heads, w);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void items_avx2(const Inputs& in, const Shapes& s, int64_t b, int64_t e) {
  Scratch w;
  for (int64_t i = b; i < e; ++i) attend<Avx2Ops>(in, s, i / s.kv_heads, i % s.kv_heads, w);
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
