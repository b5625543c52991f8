// Paged attention for the CPU, fused with RoPE and the K/V store: one call per layer and step.
//
// qkv [T, (nh + 2 kvh) * hd] (one row per token, sequences back to back as in AttnMeta) ->
// out [T, nh * hd]. For every token: q and k rotated by interleaved RoPE at the token's position
// (pairs (2i, 2i+1), cos / sin from the model's fp32 table [P, hd/2, 2]); k and v stored at
// slot_mapping[t] in the caches [NB, kvh, bs, hd] (slot < 0: not stored); then every query
// attends causally over its sequence's context through the block table. Math in fp32; the
// caches and qkv are float or bfloat16. Rows are independent: they split over torch's threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

template <typename T>
void rope_store(const T* qkv, int64_t row_stride, int64_t tok, int64_t pos, const float* cis, int nh, int kvh,
                int hd, int64_t slot, int64_t bs, T* kc, T* vc, float* qrot) {
  const T* src = qkv + tok * row_stride;
  const float* cs = cis + pos * hd;  // [hd/2, 2] for this position
  for (int h = 0; h < nh; ++h) {
    const T* x = src + h * hd;
    float* y = qrot + h * hd;
    for (int i = 0; i < hd; i += 2) {
      float a = to_f(x[i]), b = to_f(x[i + 1]), c = cs[i], s = cs[i + 1];
      y[i] = a * c - b * s;
      y[i + 1] = a * s + b * c;
    }
  }
  if (slot < 0) return;
  const int64_t block = slot / bs, off = slot % bs;
  for (int h = 0; h < kvh; ++h) {
    const T* k = src + (nh + h) * hd;
    const T* v = src + (nh + kvh + h) * hd;
    T* kd = kc + ((block * kvh + h) * bs + off) * hd;
    T* vd = vc + ((block * kvh + h) * bs + off) * hd;
    for (int i = 0; i < hd; i += 2) {
      float a = to_f(k[i]), b = to_f(k[i + 1]), c = cs[i], s = cs[i + 1];
      kd[i] = static_cast<T>(a * c - b * s);
      kd[i + 1] = static_cast<T>(a * s + b * c);
    }
    for (int i = 0; i < hd; ++i) vd[i] = v[i];
  }
}

// f(j, row) for keys j = 0..ctx-1 of kv head h: row is that key's [hd] in the paged cache, walked
// block by block through the table (no division per key)
template <typename T, typename F>
inline void for_each_key(const T* cache, const int64_t* table, int kvh, int h, int64_t bs, int64_t hd, int64_t ctx,
                         F&& f) {
  for (int64_t j0 = 0, n = 0; j0 < ctx; j0 += bs, ++n) {
    const int64_t len = std::min(bs, ctx - j0);
    const T* block = cache + (table[n] * kvh + h) * bs * hd;
    for (int64_t o = 0; o < len; ++o) f(j0 + o, block + o * hd);
  }
}

template <typename T, int HD>
void attend(const float* q, int g, int64_t ctx, const int64_t* table, const T* kc, const T* vc, int kvh, int h,
            int64_t bs, int hd_rt, float scale, float* scores, float* acc, T* out) {
  const int hd = HD > 0 ? HD : hd_rt;
  // the g query heads q [g, hd] of kv head h over keys 0..ctx-1: scores [g, ctx], softmax,
  // weighted sum of the values; out [g, hd]
  for_each_key(kc, table, kvh, h, bs, hd, ctx, [&](int64_t j, const T* k) {
    for (int x = 0; x < g; ++x) {
      const float* qx = q + x * hd;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int i = 0; i < hd; ++i) s += qx[i] * to_f(k[i]);
      scores[x * ctx + j] = s * scale;
    }
  });
  for (int x = 0; x < g; ++x) {
    float* sx = scores + x * ctx;
    float mx = -INFINITY, sum = 0.f;
    for (int64_t j = 0; j < ctx; ++j) mx = std::max(mx, sx[j]);
    for (int64_t j = 0; j < ctx; ++j) {
      sx[j] = std::exp(sx[j] - mx);
      sum += sx[j];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < ctx; ++j) sx[j] *= inv;
  }
  std::fill(acc, acc + g * hd, 0.f);
  for_each_key(vc, table, kvh, h, bs, hd, ctx, [&](int64_t j, const T* v) {
    for (int x = 0; x < g; ++x) {
      const float p = scores[x * ctx + j];
      float* ax = acc + x * hd;
#pragma omp simd
      for (int i = 0; i < hd; ++i) ax[i] += p * to_f(v[i]);
    }
  });
  for (int x = 0; x < g; ++x)
    for (int i = 0; i < hd; ++i) out[x * hd + i] = static_cast<T>(acc[x * hd + i]);
}

#ifdef __AVX512F__
// The same as attend() for head sizes that are multiples of 16, on AVX-512 registers: a key or
// value row is loaded once for the g queries of its kv head, the g query rows and the g output
// accumulators live in registers, and the softmax's exp is vectorised (exp_ps).

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32: the 16 bits become the high half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// e^x for x <= 0 (softmax arguments after the max is subtracted): 2^n * p(r), r in [-ln2/2, ln2/2],
// a degree-6 polynomial (relative error ~2e-7); x below -87 gives 0.
inline __m512 exp_ps(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), ln2 = _mm512_set1_ps(0.693147180559945309f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, ln2, x);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

template <typename T, int HD, int G>
void attend_avx512(const float* q, int64_t ctx, const int64_t* table, const T* kc, const T* vc, int kvh, int h,
                   int64_t bs, float scale, float* scores, T* out) {
  constexpr int C = HD / 16;
  __m512 qv[G][C];
  for (int x = 0; x < G; ++x)
    for (int c = 0; c < C; ++c) qv[x][c] = _mm512_mul_ps(_mm512_loadu_ps(q + x * HD + 16 * c), _mm512_set1_ps(scale));
  const int64_t stride = (ctx + 15) & ~int64_t(15);  // scores rows padded to whole vectors
  float mx[G];
  for (int x = 0; x < G; ++x) mx[x] = -INFINITY;
  for_each_key(kc, table, kvh, h, bs, HD, ctx, [&](int64_t j, const T* k) {
    __m512 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = load16(k + 16 * c);
    for (int x = 0; x < G; ++x) {
      __m512 acc = _mm512_mul_ps(qv[x][0], kv[0]);
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[x][c], kv[c], acc);
      const float sc = _mm512_reduce_add_ps(acc);
      scores[x * stride + j] = sc;
      mx[x] = std::max(mx[x], sc);
    }
  });
  float inv[G];
  for (int x = 0; x < G; ++x) {
    float* sx = scores + x * stride;
    for (int64_t j = ctx; j < stride; ++j) sx[j] = -INFINITY;
    const __m512 m = _mm512_set1_ps(mx[x]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < stride; j += 16) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sx + j), m));
      _mm512_storeu_ps(sx + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[x] = 1.f / _mm512_reduce_add_ps(sum);
  }
  __m512 acc[G][C];
  for (int x = 0; x < G; ++x)
    for (int c = 0; c < C; ++c) acc[x][c] = _mm512_setzero_ps();
  for_each_key(vc, table, kvh, h, bs, HD, ctx, [&](int64_t j, const T* v) {
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load16(v + 16 * c);
    for (int x = 0; x < G; ++x) {
      const __m512 p = _mm512_set1_ps(scores[x * stride + j]);
      for (int c = 0; c < C; ++c) acc[x][c] = _mm512_fmadd_ps(p, vv[c], acc[x][c]);
    }
  });
  for (int x = 0; x < G; ++x) {
    alignas(64) float tmp[HD];
    for (int c = 0; c < C; ++c) _mm512_store_ps(tmp + 16 * c, _mm512_mul_ps(acc[x][c], _mm512_set1_ps(inv[x])));
    for (int i = 0; i < HD; ++i) out[x * HD + i] = static_cast<T>(tmp[i]);
  }
}

// attend() through the AVX-512 path when (HD, g) has an instance; false: not handled
template <typename T, int HD>
bool attend_fast(const float* q, int g, int64_t ctx, const int64_t* table, const T* kc, const T* vc, int kvh, int h,
                 int64_t bs, float scale, float* scores, T* out) {
  if constexpr (HD > 0 && HD % 16 == 0 && HD <= 128) {
    switch (g) {
      case 1: attend_avx512<T, HD, 1>(q, ctx, table, kc, vc, kvh, h, bs, scale, scores, out); return true;
      case 2: attend_avx512<T, HD, 2>(q, ctx, table, kc, vc, kvh, h, bs, scale, scores, out); return true;
      case 4: attend_avx512<T, HD, 4>(q, ctx, table, kc, vc, kvh, h, bs, scale, scores, out); return true;
      case 5: attend_avx512<T, HD, 5>(q, ctx, table, kc, vc, kvh, h, bs, scale, scores, out); return true;
      case 8: attend_avx512<T, HD, 8>(q, ctx, table, kc, vc, kvh, h, bs, scale, scores, out); return true;
      default: return false;
    }
  }
  return false;
}
#else
template <typename T, int HD>
bool attend_fast(const float*, int, int64_t, const int64_t*, const T*, const T*, int, int, int64_t, float, float*, T*) {
  return false;
}
#endif

template <typename T, int HD>
void run(const torch::Tensor& qkv, const torch::Tensor& cis, const torch::Tensor& slots, torch::Tensor& kc,
         torch::Tensor& vc, const torch::Tensor& tables, const torch::Tensor& qsl, const torch::Tensor& ctx_lens,
         const torch::Tensor& rows, int nh, int kvh, int hd, double scale, torch::Tensor& out) {
  const T* qkv_p = qkv.data_ptr<T>();
  const float* cis_p = cis.data_ptr<float>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t* tab_p = tables.data_ptr<int64_t>();
  const int64_t* qsl_p = qsl.data_ptr<int64_t>();
  const int64_t* ctx_p = ctx_lens.data_ptr<int64_t>();
  const int64_t* row_p = rows.data_ptr<int64_t>();
  T* kc_p = kc.data_ptr<T>();
  T* vc_p = vc.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  const int64_t row_stride = qkv.stride(0), nbmax = tables.size(1), bs = kc.size(2);
  const int64_t n = rows.numel();
  const int g = nh / kvh;
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> qrot, scores, acc(g * hd);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = row_p[r], start = qsl_p[b], qlen = qsl_p[b + 1] - start, ctx = ctx_p[b];
      const int64_t first = ctx - qlen;  // position of the row's first query
      qrot.resize(qlen * nh * hd);
      scores.resize(g * ((ctx + 15) & ~int64_t(15)));
      for (int64_t i = 0; i < qlen; ++i)
        rope_store<T>(qkv_p, row_stride, start + i, first + i, cis_p, nh, kvh, hd, slot_p[start + i], bs, kc_p,
                      vc_p, qrot.data() + i * nh * hd);
      const int64_t* table = tab_p + b * nbmax;
      for (int64_t i = 0; i < qlen; ++i)
        for (int h = 0; h < kvh; ++h) {  // query heads h*g .. h*g+g-1 share kv head h
          const float* qh = qrot.data() + (i * nh + h * g) * hd;
          T* oh = out_p + (start + i) * nh * hd + h * g * hd;
          const int64_t n_keys = first + i + 1;
          if (!attend_fast<T, HD>(qh, g, n_keys, table, kc_p, vc_p, kvh, h, bs, static_cast<float>(scale),
                                  scores.data(), oh))
            attend<T, HD>(qh, g, n_keys, table, kc_p, vc_p, kvh, h, bs, hd, static_cast<float>(scale), scores.data(),
                          acc.data(), oh);
        }
    }
  });
}

}  // namespace

void paged_attention(torch::Tensor qkv, torch::Tensor cis, torch::Tensor slots, torch::Tensor k_cache,
                     torch::Tensor v_cache, torch::Tensor tables, torch::Tensor qsl, torch::Tensor ctx_lens,
                     torch::Tensor rows, int64_t nh, int64_t kvh, int64_t hd, double scale, torch::Tensor out) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [T, (nh + 2 kvh) * hd] with unit column stride");
  TORCH_CHECK(qkv.size(1) == (nh + 2 * kvh) * hd, "qkv width does not match the heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
              "caches and qkv must share a dtype");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == qkv.scalar_type(), "out must be contiguous, qkv's dtype");
  TORCH_CHECK(cis.scalar_type() == torch::kFloat32 && cis.is_contiguous() && cis.size(-1) == hd,
              "cis must be a contiguous fp32 [P, hd] table");
  TORCH_CHECK(nh > 0 && kvh > 0 && hd > 0 && hd % 2 == 0 && nh % kvh == 0,
              "head_dim must be even and heads a positive multiple of kv heads");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == qkv.size(0) && out.size(1) == nh * hd, "out must be [T, nh * hd]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == kvh && k_cache.size(3) == hd,
              "caches must be [blocks, kv heads, block size, head_dim]");
  for (const auto* t : {&slots, &tables, &qsl, &ctx_lens, &rows})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(), "index tensors must be contiguous int64");
  // every index the kernel follows, checked once (a bad one would read or write out of bounds)
  const int64_t B = ctx_lens.numel(), T = qkv.size(0), NB = k_cache.size(0), slots_max = NB * k_cache.size(2);
  TORCH_CHECK(qsl.numel() == B + 1 && tables.dim() == 2 && tables.size(0) == B && slots.numel() == T,
              "query_start_loc [B + 1], block_tables [B, n] and slot_mapping [T] must match the step");
  {
    const int64_t* q = qsl.data_ptr<int64_t>();
    const int64_t* c = ctx_lens.data_ptr<int64_t>();
    const int64_t* tb = tables.data_ptr<int64_t>();
    const int64_t* r = rows.data_ptr<int64_t>();
    const int64_t* sl = slots.data_ptr<int64_t>();
    const int64_t bs = k_cache.size(2), width = tables.size(1);
    TORCH_CHECK(q[0] == 0 && q[B] <= T, "query_start_loc out of range");
    for (int64_t i = 0; i < rows.numel(); ++i) {
      const int64_t b = r[i];
      TORCH_CHECK(b >= 0 && b < B, "row ", b, " out of range");
      const int64_t qlen = q[b + 1] - q[b];
      TORCH_CHECK(qlen >= 0 && q[b + 1] <= T && c[b] >= qlen && c[b] <= cis.size(0) && (c[b] + bs - 1) / bs <= width,
                  "row ", b, ": context ", c[b], " does not fit its queries, block table or RoPE table");
      for (int64_t n = 0; n < (c[b] + bs - 1) / bs; ++n)
        TORCH_CHECK(tb[b * width + n] >= 0 && tb[b * width + n] < NB, "row ", b, ": block ", tb[b * width + n],
                    " outside the cache's ", NB);
      for (int64_t t = q[b]; t < q[b + 1]; ++t)
        TORCH_CHECK(sl[t] < slots_max, "slot ", sl[t], " outside the cache");
    }
  }
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 || qkv.scalar_type() == torch::kBFloat16,
              "paged_attention: float32 or bfloat16 only, got ", qkv.scalar_type());
  const bool f32 = qkv.scalar_type() == torch::kFloat32;
  // the common head sizes get loops of a compile-time length (unrolled, no remainder)
  switch (hd) {
    case 64:
      return f32 ? run<float, 64>(qkv, cis, slots, k_cache, v_cache, tables, qsl, ctx_lens, rows, nh, kvh, hd, scale, out)
                 : run<c10::BFloat16, 64>(qkv, cis, slots, k_cache, v_cache, tables, qsl, ctx_lens, rows, nh, kvh, hd,
                                          scale, out);
    case 128:
      return f32 ? run<float, 128>(qkv, cis, slots, k_cache, v_cache, tables, qsl, ctx_lens, rows, nh, kvh, hd, scale, out)
                 : run<c10::BFloat16, 128>(qkv, cis, slots, k_cache, v_cache, tables, qsl, ctx_lens, rows, nh, kvh, hd,
                                           scale, out);
    case 32:
      return f32 ? run<float, 32>(qkv, cis, slots, k_cache, v_cache, tables, qsl, ctx_lens, rows, nh, kvh, hd, scale, out)
                 : run<c10::BFloat16, 32>(qkv, cis, slots, k_cache, v_cache, tables, qsl, ctx_lens, rows, nh, kvh, hd,
                                          scale, out);
    default:
      return f32 ? run<float, 0>(qkv, cis, slots, k_cache, v_cache, tables, qsl, ctx_lens, rows, nh, kvh, hd, scale, out)
                 : run<c10::BFloat16, 0>(qkv, cis, slots, k_cache, v_cache, tables, qsl, ctx_lens, rows, nh, kvh, hd,
                                         scale, out);
  }
}
