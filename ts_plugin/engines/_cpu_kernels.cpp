// ts_plugin's CPU kernels, float32, built at first use for this CPU's vector width (engines/_cpu_kernels.py):
// - paged_decode: attention of decode rows (one new token each) straight from the paged KV pool, with no gather
//   of the rows' keys and values into a padded batch first (engines/_paged.py falls back to gather + sdpa);
// - small_linear: a linear over a decode step's few rows, streaming the weight once at memory speed where MKL's
//   sgemm reads it at about half that;
// - ts_plugin::paged_attention_cpu: the compiled step's attention, paged_decode with the pool's writes in C++.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

// q [rows, heads, dim]; keys, values [kv heads, slots, dim]; tables [rows, blocks]; lengths [rows]
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor tables,
                           torch::Tensor lengths, int64_t block_size, double scale, int64_t window) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && keys.scalar_type() == torch::kFloat, "float32 only");
  q = q.contiguous();
  tables = tables.contiguous();
  lengths = lengths.contiguous();
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "the pool must be contiguous");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = keys.size(0), slots = keys.size(1), blocks = tables.size(1);
  const int64_t group = heads / kv_heads;
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(group * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / kv_heads, kv = task % kv_heads;
      const int64_t length = lp[row];
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      const int64_t span = length - first;
      scores.assign(group * span, 0.f);
      const float* k_head = kp + kv * slots * dim;
      const float* v_head = vp + kv * slots * dim;
      const float* q_row = qp + (row * heads + kv * group) * dim;
      for (int64_t p = first; p < length; ++p) {
        const int64_t slot = tp[row * blocks + p / block_size] * block_size + p % block_size;
        const float* k = k_head + slot * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qh = q_row + g * dim;
          float dot = 0.f;
          for (int64_t i = 0; i < dim; ++i) dot += qh[i] * k[i];
          scores[g * span + (p - first)] = dot * s;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * span;
        const float top = *std::max_element(sc, sc + span);
        float total = 0.f;
        for (int64_t j = 0; j < span; ++j) {
          sc[j] = std::exp(sc[j] - top);
          total += sc[j];
        }
        const float inv = 1.f / total;
        for (int64_t j = 0; j < span; ++j) sc[j] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = first; p < length; ++p) {
        const int64_t slot = tp[row * blocks + p / block_size] * block_size + p % block_size;
        const float* v = v_head + slot * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float w = scores[g * span + (p - first)];
          float* a = acc.data() + g * dim;
          for (int64_t i = 0; i < dim; ++i) a[i] += w * v[i];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        std::copy(acc.begin() + g * dim, acc.begin() + (g + 1) * dim, op + (row * heads + kv * group + g) * dim);
      }
    }
  });
  return out;
}


#if defined(__AVX512F__)
constexpr int kLanes = 16, kRowsAtOnce = 8;  // accumulators: 2 x rows, of 32 registers
#else
constexpr int kLanes = 8, kRowsAtOnce = 4;  // of 16 registers
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
typedef int Lanes __attribute__((vector_size(kLanes * sizeof(int))));
static_assert(kLanes == 2 * kRowsAtOnce, "one accumulator per row of x and weight row, one lane sum each");
constexpr int kLevels = kLanes == 16 ? 4 : 3;  // log2(kLanes)

// The lane sums of kLanes accumulators at once: each level adds the two halves of every pair of vectors, so the
// kLanes vectors become one whose lane p holds the sum of accumulator order[p] (instead of a horizontal sum each).
struct LaneSums {
  Lanes low[kLevels], high[kLevels];
  int order[kLanes];

  LaneSums() {
    for (int level = 0, half = kLanes / 2; level < kLevels; ++level, half /= 2) {
      for (int p = 0; p < kLanes; ++p) {
        const int base = p / (2 * half) * 2 * half, q = p % (2 * half);
        low[level][p] = q < half ? base + q : kLanes + base + q - half;
        high[level][p] = q < half ? base + half + q : kLanes + base + q;
      }
    }
    Vec probe[kLanes];
    for (int i = 0; i < kLanes; ++i) probe[i] = Vec{} + static_cast<float>(i);
    const Vec sums = reduce(probe);
    for (int p = 0; p < kLanes; ++p) order[p] = static_cast<int>(sums[p] / kLanes + 0.5f);
  }

  Vec reduce(Vec* acc) const {  // overwrites acc
    for (int level = 0, count = kLanes; level < kLevels; ++level, count /= 2) {
      for (int j = 0; j < count / 2; ++j) {
        acc[j] = __builtin_shuffle(acc[2 * j], acc[2 * j + 1], low[level]) +
                 __builtin_shuffle(acc[2 * j], acc[2 * j + 1], high[level]);
      }
    }
    return acc[0];
  }
};
static const LaneSums kLaneSums;

// out[m, n..n+2) += x[m, k0..k1) . w[n..n+2, k0..k1) for MB rows of x (w[n + 1] only where `pair`)
template <int MB>
static void rows_of_x(const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t n, bool pair,
                      int64_t k0, int64_t k1) {
  const int64_t vec_end = k0 + (k1 - k0) / kLanes * kLanes;
  const float* w0 = w + n * K;
  const float* w1 = w + (pair ? n + 1 : n) * K;
  Vec acc[kLanes];  // acc[2m + c]: row m of x against weight row n + c
  for (int i = 0; i < kLanes; ++i) acc[i] = Vec{};
  for (int64_t k = k0; k < vec_end; k += kLanes) {
    __builtin_prefetch(w0 + 2 * K + k);
    __builtin_prefetch(w1 + 2 * K + k);
    Vec v0 = *reinterpret_cast<const Vec*>(w0 + k), v1 = *reinterpret_cast<const Vec*>(w1 + k);
    for (int m = 0; m < MB; ++m) {
      Vec xv = *reinterpret_cast<const Vec*>(x + m * K + k);
      acc[2 * m] += v0 * xv;
      acc[2 * m + 1] += v1 * xv;
    }
  }
  const Vec sums = kLaneSums.reduce(acc);
  for (int p = 0; p < kLanes; ++p) {
    const int m = kLaneSums.order[p] / 2, column = kLaneSums.order[p] % 2;
    if (m >= MB || (column == 1 && !pair)) continue;
    const float* weight_row = column == 0 ? w0 : w1;
    float total = sums[p];
    for (int64_t k = vec_end; k < k1; ++k) total += weight_row[k] * x[m * K + k];
    out[m * N + n + column] += total;
  }
}

template <int MB>
static void rows_dispatch(int mb, const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t n,
                          bool pair, int64_t k0, int64_t k1) {
  if (mb == MB) return rows_of_x<MB>(x, w, out, K, N, n, pair, k0, k1);
  if constexpr (MB > 1) rows_dispatch<MB - 1>(mb, x, w, out, K, N, n, pair, k0, k1);
}

// x [M, K] @ w[N, K]^T (+ bias), float32: streams w once at memory speed where M is a decode step's few rows
torch::Tensor small_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K]");
  x = x.contiguous();
  TORCH_CHECK(w.is_contiguous(), "the weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options());  // a copy: an expanded bias of one row would alias it
  if (bias.has_value()) out.copy_(bias->expand({M, N})); else out.zero_();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // even blocks of whole vectors, x's rows of a block within 32 KiB of L1: one lane sum per output and block
  const int64_t most_depth = std::max<int64_t>(kLanes, 8192 / std::max<int64_t>(M, 1));
  const int64_t blocks = (K + most_depth - 1) / most_depth;
  const int64_t depth = ((K + blocks - 1) / blocks + kLanes - 1) / kLanes * kLanes;
  at::parallel_for(0, (N + 1) / 2, 8, [&](int64_t p0, int64_t p1) {
    const int64_t n0 = 2 * p0, n1 = std::min(N, 2 * p1);
    for (int64_t k0 = 0; k0 < K; k0 += depth) {
      const int64_t k1 = std::min(K, k0 + depth);
      for (int64_t n = n0; n < n1; n += 2) {
        for (int64_t m = 0; m < M; m += kRowsAtOnce) {
          rows_dispatch<kRowsAtOnce>(std::min<int64_t>(kRowsAtOnce, M - m), xp + m * K, wp, op + m * N, K, N, n,
                                     n + 1 < n1, k0, k1);
        }
      }
    }
  });
  return out;
}

// the rows one pass of small_linear holds in registers; more take further passes over each pair of weight rows,
// read from memory once
int64_t small_linear_rows_at_once() { return kRowsAtOnce; }

// ts_plugin::small_linear's choice, set at load for this CPU by engines/_cpu_kernels.py's linear_plan: the rows
// small_linear takes, and whether more rows go to oneDNN's linear rather than aten's (MKL's)
static int64_t fewest_rows = 3, most_rows = kRowsAtOnce;
static bool onednn_past = false;

void set_linear_plan(int64_t fewest, int64_t most, bool onednn) {
  fewest_rows = fewest;
  most_rows = most;
  onednn_past = onednn;
}

// oneDNN's float32 linear on the plain weight (no packed copy): x [M, K], w [N, K]
static torch::Tensor onednn_linear(const torch::Tensor& x, const torch::Tensor& w,
                                   const c10::optional<torch::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::string_view, c10::List<std::optional<at::Scalar>>,
                                               std::optional<c10::string_view>)>();
  return op.call(x, w, bias, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// ts_plugin::small_linear, the compiled step's linear (engines/_compiled.py): small_linear where `hidden` holds a
// decode step's rows, oneDNN's or aten's linear otherwise (a prefill's), by the plan. An op of the dispatcher's, so
// that the graph calls it with no Python between; the eager step decides the same in `linear` (_cpu_kernels.py).
torch::Tensor linear_op(const torch::Tensor& hidden, const torch::Tensor& weight,
                        const c10::optional<torch::Tensor>& bias) {
  const int64_t K = hidden.size(-1);
  const int64_t rows = K ? hidden.numel() / K : 0;
  const bool float32 = hidden.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat &&
                       weight.is_contiguous() && (!bias.has_value() || bias->scalar_type() == torch::kFloat);
  if (float32 && rows >= fewest_rows && (rows <= most_rows || onednn_past)) {
    auto sizes = hidden.sizes().vec();
    sizes.back() = weight.size(0);
    const auto flat = hidden.reshape({rows, K});
    return (rows <= most_rows ? small_linear(flat, weight, bias) : onednn_linear(flat.contiguous(), weight, bias))
        .view(sizes);
  }
  return at::linear(hidden, weight, bias);
}

// The step that the calling thread's compiled forward runs, where every row decodes (engines/_paged.py sets it):
// the layers' pools (empty: a layer this rank's pool lacks), where the new keys and values go, the block tables.
struct DecodeStep {
  std::vector<torch::Tensor> keys, values;
  torch::Tensor slots, tables, lengths;
  int64_t block_size = 0;
};
static thread_local std::unique_ptr<DecodeStep> decode_step;
// the Python attention of any other step (rows that prefill): _paged.py's, set at load; never freed, as the
// interpreter may be gone when static objects are
static py::object* attention_fallback = nullptr;

void set_decode_step(std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values, torch::Tensor slots,
                     torch::Tensor tables, torch::Tensor lengths, int64_t block_size) {
  decode_step.reset(new DecodeStep{std::move(keys), std::move(values), std::move(slots), tables.contiguous(),
                                   lengths.contiguous(), block_size});
}

void clear_decode_step() { decode_step.reset(); }

void set_attention_fallback(py::object attend) {
  if (attention_fallback == nullptr) attention_fallback = new py::object();
  *attention_fallback = std::move(attend);
}

// query [1, heads, tokens, dim], key and value [1, kv heads, tokens, dim] -> [1, tokens, heads, dim]. One op of the
// dispatcher's, so that a decode step's graph attends with no Python between (about 25 us a layer saved).
torch::Tensor paged_attention_op(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                                 int64_t layer, double scaling, int64_t window) {
  DecodeStep* step = decode_step.get();
  if (step != nullptr && layer >= 0 && layer < static_cast<int64_t>(step->keys.size()) &&
      step->keys[layer].dim() == 3 && query.scalar_type() == torch::kFloat &&
      step->keys[layer].scalar_type() == torch::kFloat && key.scalar_type() == torch::kFloat &&
      query.size(1) % step->keys[layer].size(0) == 0 && query.size(2) == step->slots.size(0)) {
    step->keys[layer].index_copy_(1, step->slots, key[0]);
    step->values[layer].index_copy_(1, step->slots, value[0]);
    const double scale = scaling != 0.0 ? scaling : 1.0 / std::sqrt(static_cast<double>(query.size(3)));
    return paged_decode(query[0].transpose(0, 1), step->keys[layer], step->values[layer], step->tables, step->lengths,
                        step->block_size, scale, window)
        .unsqueeze(0);
  }
  TORCH_CHECK(attention_fallback != nullptr, "ts_plugin::paged_attention_cpu: no attention set for this step");
  py::gil_scoped_acquire gil;
  return (*attention_fallback)(query, key, value, layer, scaling, window).cast<torch::Tensor>();
}

TORCH_LIBRARY_FRAGMENT(ts_plugin, m) {
  m.def("small_linear(Tensor hidden, Tensor weight, Tensor? bias) -> Tensor");
  m.def("paged_attention_cpu(Tensor query, Tensor key, Tensor value, int layer, float scaling, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(ts_plugin, CPU, m) {
  m.impl("small_linear", &linear_op);
  m.impl("paged_attention_cpu", &paged_attention_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode);
  m.def("small_linear", &small_linear);
  m.def("small_linear_rows_at_once", &small_linear_rows_at_once);
  m.def("set_linear_plan", &set_linear_plan);
  m.def("set_decode_step", &set_decode_step);
  m.def("clear_decode_step", &clear_decode_step);
  m.def("set_attention_fallback", &set_attention_fallback);
}
