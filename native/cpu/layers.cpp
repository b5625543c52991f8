// The CPU table's fused elementwise and MoE-routing kernels, and the module's bindings.
//
// Numerics follow the torch table (native/model/ops.py) step for step, rounding to the model's
// dtype wherever it rounds: RMSNorm in fp32 cast back before the weight multiply; silu(gate)
// rounded before the multiply by up; the router in fp32 (softmax, correction bias for selection
// only, renormalisation clamped at norm_min, weights rounded to the model dtype); routed outputs
// summed in fp32 with the shared expert, then rounded once.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

void paged_attention(torch::Tensor qkv, torch::Tensor cis, torch::Tensor slots, torch::Tensor k_cache,
                     torch::Tensor v_cache, torch::Tensor tables, torch::Tensor qsl, torch::Tensor ctx_lens,
                     torch::Tensor rows, int64_t nh, int64_t kvh, int64_t hd, double scale, torch::Tensor out);

namespace {

template <typename T>
inline T rnd(float x) { return static_cast<T>(x); }

#define PDBUS_DISPATCH(dtype, NAME, ...)                                                          \
  [&] {                                                                                           \
    if ((dtype) == torch::kFloat32) {                                                             \
      using scalar_t = float;                                                                     \
      return __VA_ARGS__();                                                                       \
    }                                                                                             \
    TORCH_CHECK((dtype) == torch::kBFloat16, NAME ": float32 or bfloat16 only, got ", (dtype));   \
    using scalar_t = c10::BFloat16;                                                               \
    return __VA_ARGS__();                                                                         \
  }()

}  // namespace

// (RMSNorm(residual + delta) * weight, residual + delta); delta may be empty (no add).
std::tuple<torch::Tensor, torch::Tensor> add_rmsnorm(torch::Tensor delta, torch::Tensor residual, torch::Tensor weight,
                                                     double eps) {
  TORCH_CHECK(residual.dim() == 2, "residual must be [rows, hidden]");
  residual = residual.contiguous();
  const bool add = delta.numel() > 0;
  if (add) {
    TORCH_CHECK(delta.sizes() == residual.sizes() && delta.scalar_type() == residual.scalar_type(),
                "delta must match the residual");
    delta = delta.contiguous();
  }
  TORCH_CHECK(weight.scalar_type() == residual.scalar_type() && weight.numel() == residual.size(1),
              "weight must be [hidden] in the residual's dtype");
  weight = weight.contiguous();
  auto out = torch::empty_like(residual);
  auto res = add ? torch::empty_like(residual) : residual;
  const int64_t n = residual.size(0), h = residual.size(1);
  PDBUS_DISPATCH(residual.scalar_type(), "add_rmsnorm", [&] {
    const scalar_t* r = residual.data_ptr<scalar_t>();
    const scalar_t* d = add ? delta.data_ptr<scalar_t>() : nullptr;
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* s = res.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
      std::vector<float> row(h);
      for (int64_t i = lo; i < hi; ++i) {
        float ss = 0.f;
        for (int64_t j = 0; j < h; ++j) {
          float v = static_cast<float>(r[i * h + j]);
          if (d) {
            const scalar_t sum = rnd<scalar_t>(v + static_cast<float>(d[i * h + j]));
            s[i * h + j] = sum;
            v = static_cast<float>(sum);
          }
          row[j] = v;
          ss += v * v;
        }
        const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
        for (int64_t j = 0; j < h; ++j)
          o[i * h + j] = rnd<scalar_t>(static_cast<float>(w[j]) * static_cast<float>(rnd<scalar_t>(row[j] * inv)));
      }
    });
  });
  return {out, res};
}

// x [rows, 2I] (gate columns first) -> silu(gate) * up [rows, I]
torch::Tensor silu_mul(torch::Tensor x) {
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) % 2 == 0, "silu_mul: last dimension must be even");
  x = x.contiguous();
  auto sizes = x.sizes().vec();
  const int64_t two_i = sizes.back(), inter = two_i / 2, n = x.numel() / two_i;
  sizes.back() = inter;
  auto out = torch::empty(sizes, x.options());
  PDBUS_DISPATCH(x.scalar_type(), "silu_mul", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t* g = p + i * two_i;
        const scalar_t* u = g + inter;
        for (int64_t j = 0; j < inter; ++j) {
          const float gv = static_cast<float>(g[j]);
          const float sv = static_cast<float>(rnd<scalar_t>(gv / (1.f + std::exp(-gv))));
          o[i * inter + j] = rnd<scalar_t>(sv * static_cast<float>(u[j]));
        }
      }
    });
  });
  return out;
}

// Router and grouping in one pass. logits fp32 [T, E] (x @ gate^T), bias fp32 [E].
// Returns (weights fp32 [T, k] rounded to x's dtype, dest int64 [T, k], xs [T * k, H], counts
// int64 [E]): the rows of x sorted by expert (expert-major, tokens in order within an expert),
// so that expert e's rows are the counts[e] rows after those of experts < e, and assignment
// (t, j) is row dest[t, j] of xs.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> moe_route(torch::Tensor x, torch::Tensor logits,
                                                                                 torch::Tensor bias, int64_t k,
                                                                                 double norm_min) {
  TORCH_CHECK(logits.scalar_type() == torch::kFloat32 && logits.dim() == 2, "logits must be fp32 [T, E]");
  TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.numel() == logits.size(1), "bias must be fp32 [E]");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == logits.size(0), "x must be [T, H]");
  logits = logits.contiguous();
  bias = bias.contiguous();
  x = x.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), H = x.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "top-k must be within the experts");
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  auto weights = torch::empty({T, k}, f32);
  auto dest = torch::empty({T, k}, i64);
  auto counts = torch::zeros({E}, i64);
  const float* lg = logits.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  float* w = weights.data_ptr<float>();
  int64_t* dp = dest.data_ptr<int64_t>();
  int64_t* count = counts.data_ptr<int64_t>();
  std::vector<float> probs(E), score(E);
  std::vector<char> taken(E);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  for (int64_t t = 0; t < T; ++t) {
    const float* l = lg + t * E;
    float mx = l[0];
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (probs[e] = std::exp(l[e] - mx));
    for (int64_t e = 0; e < E; ++e) {
      probs[e] /= sum;
      score[e] = probs[e] + b[e];
      taken[e] = 0;
    }
    float wsum = 0.f;
    for (int64_t j = 0; j < k; ++j) {  // top-k by score; ties to the lower id
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || score[e] > score[best])) best = e;
      taken[best] = 1;
      dp[t * k + j] = best;  // the expert for now; its row below
      w[t * k + j] = probs[best];
      wsum += probs[best];
      ++count[best];
    }
    const float denom = std::max(wsum, static_cast<float>(norm_min));
    for (int64_t j = 0; j < k; ++j) {
      const float v = w[t * k + j] / denom;
      w[t * k + j] = bf16 ? static_cast<float>(c10::BFloat16(v)) : v;
    }
  }
  std::vector<int64_t> next(E, 0);
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + count[e - 1];
  auto xs = torch::empty({T * k, H}, x.options());
  const int64_t row_bytes = H * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(xs.data_ptr());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = next[dp[t * k + j]]++;
      dp[t * k + j] = row;
      std::memcpy(dst + row * row_bytes, src + t * row_bytes, row_bytes);
    }
  return {weights, dest, xs, counts};
}

// out [T, H] = round(sum_j weights[t, j] * y[dest[t, j]] + shared[t]) in fp32; y [T * k, H]
// the expert outputs of moe_route's rows, shared [T, H] or empty.
torch::Tensor moe_combine(torch::Tensor y, torch::Tensor dest, torch::Tensor weights, torch::Tensor shared) {
  y = y.contiguous();
  TORCH_CHECK(dest.scalar_type() == torch::kInt64 && weights.scalar_type() == torch::kFloat32, "dest int64, weights fp32");
  dest = dest.contiguous();
  weights = weights.contiguous();
  const int64_t T = dest.size(0), k = dest.size(1), H = y.size(-1);
  const bool with_shared = shared.numel() > 0;
  if (with_shared) {
    TORCH_CHECK(shared.scalar_type() == y.scalar_type() && shared.numel() == T * H, "shared must be [T, H] in y's dtype");
    shared = shared.contiguous();
  }
  auto out = torch::empty({T, H}, y.options());
  PDBUS_DISPATCH(y.scalar_type(), "moe_combine", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* sp = with_shared ? shared.data_ptr<scalar_t>() : nullptr;
    const int64_t* dp = dest.data_ptr<int64_t>();
    const float* wp = weights.data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t lo, int64_t hi) {
      std::vector<float> acc(H);
      for (int64_t t = lo; t < hi; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* row = yp + dp[t * k + j] * H;
          const float wv = wp[t * k + j];
          for (int64_t i = 0; i < H; ++i) acc[i] += static_cast<float>(row[i]) * wv;
        }
        for (int64_t i = 0; i < H; ++i) {
          const float v = sp ? acc[i] + static_cast<float>(sp[t * H + i]) : acc[i];
          op[t * H + i] = rnd<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

// A whole MoE block with float experts in one call (ATen from C++: no Python between the ~30
// small ops of a decode step): router linear, moe_route, each expert's gate/up GEMM + SiLU-mul +
// down GEMM over its own rows (written in place), the shared expert, moe_combine.
// x [T, H]; gate_w fp32 [E, H]; w13 [E, 2I, H]; w2 [E, H, I]; shared_w13 [2S, H] and
// shared_w2 [H, S], or empty tensors for none.
torch::Tensor moe_block(torch::Tensor x, torch::Tensor gate_w, torch::Tensor bias, int64_t k, double norm_min,
                        torch::Tensor w13, torch::Tensor w2, torch::Tensor shared_w13, torch::Tensor shared_w2) {
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(0) == w2.size(0) && w13.size(0) == gate_w.size(0),
              "moe_block: w13 [E, 2I, H], w2 [E, H, I] and gate [E, H] must agree");
  TORCH_CHECK(w13.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "moe_block: experts must be in x's dtype");
  x = x.contiguous();
  auto logits = at::linear(x.to(torch::kFloat32), gate_w);
  auto [weights, dest, xs, counts] = moe_route(x, logits, bias, k, norm_min);
  const int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t e = 0; e < w13.size(0); ++e) {
    const int64_t n = cnt[e];
    if (n == 0) continue;
    auto rows = xs.narrow(0, start, n);
    auto h = silu_mul(at::linear(rows, w13[e]));
    at::mm_out(rows, h, w2[e].t());  // in place: rows are read by the first GEMM only
    start += n;
  }
  torch::Tensor shared = torch::empty({0});
  if (shared_w13.numel() > 0) shared = at::linear(silu_mul(at::linear(x, shared_w13)), shared_w2);
  return moe_combine(xs, dest, weights, shared);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moe_block", &moe_block, "a MoE block with float experts: route, experts, shared expert, combine");
  m.def("paged_attention", &paged_attention, "RoPE + K/V store + causal paged attention");
  m.def("add_rmsnorm", &add_rmsnorm, "(RMSNorm(residual + delta) * weight, residual + delta)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [.., 2I] projection");
  m.def("moe_route", &moe_route, "router softmax + bias + top-k + renormalisation, rows sorted by expert");
  m.def("moe_combine", &moe_combine, "weighted sum of the grouped expert outputs, plus the shared expert");
}
