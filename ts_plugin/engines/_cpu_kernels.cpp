// ts_plugin's CPU kernels, float32, built at first use for this CPU's vector width (engines/_cpu_kernels.py):
// - paged_decode: attention of decode rows (one new token each) straight from the paged KV pool, with no gather
//   of the rows' keys and values into a padded batch first (engines/_paged.py falls back to gather + sdpa);
// - small_linear: a linear over a decode step's few rows, streaming the weight once at memory speed where MKL's
//   sgemm reads it at about half that.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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
constexpr int64_t kDepth = 512;  // columns of x kept in L1 while two weight rows stream past

static inline float lane_sum(Vec v) {
  float total = 0.f;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
}

// out[m, n0..n1) += x[m, k0..k1) . w[n, k0..k1) for MB rows of x, two weight rows at a time
template <int MB>
static void rows_of_x(const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t n0, int64_t n1,
                      int64_t k0, int64_t k1) {
  const int64_t vec_end = k0 + (k1 - k0) / kLanes * kLanes;
  for (int64_t n = n0; n < n1; n += 2) {
    const bool pair = n + 1 < n1;
    const float* w0 = w + n * K;
    const float* w1 = w + (pair ? n + 1 : n) * K;
    Vec a0[MB], a1[MB];
    for (int m = 0; m < MB; ++m) a0[m] = a1[m] = Vec{};
    for (int64_t k = k0; k < vec_end; k += kLanes) {
      __builtin_prefetch(w0 + 2 * K + k);
      __builtin_prefetch(w1 + 2 * K + k);
      Vec v0 = *reinterpret_cast<const Vec*>(w0 + k), v1 = *reinterpret_cast<const Vec*>(w1 + k);
      for (int m = 0; m < MB; ++m) {
        Vec xv = *reinterpret_cast<const Vec*>(x + m * K + k);
        a0[m] += v0 * xv;
        a1[m] += v1 * xv;
      }
    }
    for (int m = 0; m < MB; ++m) {
      float s0 = lane_sum(a0[m]), s1 = lane_sum(a1[m]);
      for (int64_t k = vec_end; k < k1; ++k) {
        s0 += w0[k] * x[m * K + k];
        s1 += w1[k] * x[m * K + k];
      }
      out[m * N + n] += s0;
      if (pair) out[m * N + n + 1] += s1;
    }
  }
}

template <int MB>
static void rows_dispatch(int mb, const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t n0,
                          int64_t n1, int64_t k0, int64_t k1) {
  if (mb == MB) return rows_of_x<MB>(x, w, out, K, N, n0, n1, k0, k1);
  if constexpr (MB > 1) rows_dispatch<MB - 1>(mb, x, w, out, K, N, n0, n1, k0, k1);
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
  at::parallel_for(0, (N + 1) / 2, 8, [&](int64_t p0, int64_t p1) {
    const int64_t n0 = 2 * p0, n1 = std::min(N, 2 * p1);
    for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
      const int64_t k1 = std::min(K, k0 + kDepth);
      for (int64_t m = 0; m < M; m += kRowsAtOnce) {
        rows_dispatch<kRowsAtOnce>(std::min<int64_t>(kRowsAtOnce, M - m), xp + m * K, wp, op + m * N, K, N, n0, n1,
                                   k0, k1);
      }
    }
  });
  return out;
}

// the most rows small_linear runs in one pass over the weight (more rows: MKL reads it as fast)
int64_t small_linear_rows() { return kRowsAtOnce; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode);
  m.def("small_linear", &small_linear);
  m.def("small_linear_rows", &small_linear_rows);
}
