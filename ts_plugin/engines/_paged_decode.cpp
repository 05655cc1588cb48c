// Attention of decode rows (one new token each) straight from the paged KV pool: no gather of the rows' keys and
// values into a padded batch first. Float32 on CPU; ts_plugin/engines/_paged.py falls back to gather + sdpa
// elsewhere.
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode); }
