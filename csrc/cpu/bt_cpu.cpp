// CPU kernels for the fused last-token pooling + reward head + Bradley-Terry op.
//
// Forward: one parallel pass over the N pooled rows (find the pooled token, K dot products in
// fp32), then the per-pair loss and gradient coefficients over the [P, K] rewards, and the
// loss's mean or sum when asked.
// Backward: the per-row coefficients (the pair entries times the loss's gradient), one
// zero-filled grad buffer, one parallel scatter of the N pooled rows, and the weight gradient
// reduced over rows per D-slice, and the bias gradient summed over the valid rows
// (deterministic: no atomics, fixed order).
// rows_csr: the explicit pairs' entries grouped by row, for the backward (a counting sort).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "../bt_math.h"
#include "../op_args.h"

namespace prefkernels {
namespace {

template <typename mask_t>
int64_t last_set_position(const mask_t* row, int64_t positions) {
  for (int64_t t = positions - 1; t >= 0; --t) {
    if (row[t] != 0) return t;
  }
  return -1;
}

// Pooled position of row n, or -1 when the spec gives none in range (or an empty sequence).
int64_t pooled_position(const PoolSpec& spec, const HiddenLayout& l, int64_t n) {
  int64_t pos;
  if (spec.mode == kPoolMask) {
    const int64_t offset = n * l.positions;
    switch (spec.mask_kind) {
      case kMaskBool: pos = last_set_position(static_cast<const bool*>(spec.mask) + offset, l.positions); break;
      case kMaskInt32: pos = last_set_position(static_cast<const int32_t*>(spec.mask) + offset, l.positions); break;
      default: pos = last_set_position(static_cast<const int64_t*>(spec.mask) + offset, l.positions); break;
    }
  } else {
    pos = indexed_position(spec, n);
  }
  return valid_position(pos, l.positions);
}

// rewards[n, k] = <hidden[n, pos_n, :], weight[k, :]> + bias[k] in fp32; NaN for invalid rows.
template <typename hidden_t, typename weight_t>
void score_rows(const hidden_t* hidden, const weight_t* weight, const weight_t* bias, const HiddenLayout& l,
                const PoolSpec& spec, int64_t heads, float* rewards, int64_t* pooled_pos) {
  at::parallel_for(0, l.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t pos = pooled_position(spec, l, n);
      pooled_pos[n] = pos;
      if (pos < 0) {
        for (int64_t k = 0; k < heads; ++k) rewards[n * heads + k] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const hidden_t* row = hidden + n * l.stride_n + pos * l.stride_t;
      for (int64_t k = 0; k < heads; ++k) {
        const weight_t* w = weight + k * l.dim;
        float acc = 0.f;
        for (int64_t d = 0; d < l.dim; ++d) acc += static_cast<float>(row[d]) * static_cast<float>(w[d]);
        rewards[n * heads + k] = acc + (bias ? static_cast<float>(bias[k]) : 0.f);
      }
    }
  });
}

void pair_losses(const float* rewards, int64_t rows, int64_t heads, int64_t pairs, const int64_t* chosen,
                 const int64_t* rejected, const float* margin, float label_smoothing, float center_coef,
                 float* loss, float* pair_grad) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t c = chosen ? chosen[p] : p;
    const int64_t r = rejected ? rejected[p] : p + pairs;
    const bool valid = c >= 0 && c < rows && r >= 0 && r < rows;
    const float m = margin ? margin[p] : 0.f;
    for (int64_t k = 0; k < heads; ++k) {
      const int64_t i = p * heads + k;
      if (!valid) {
        loss[i] = nan;
        pair_grad[i] = pair_grad[pairs * heads + i] = 0.f;
        continue;
      }
      const PairLossResult res = bt_pair_loss(rewards[c * heads + k], rewards[r * heads + k], m, label_smoothing, center_coef);
      loss[i] = res.loss;
      pair_grad[i] = res.grad_chosen;
      pair_grad[pairs * heads + i] = res.grad_rejected;
    }
  }
}

template <typename F>
void dispatch_hidden_weight(const at::Tensor& hidden, const at::Tensor& weight, F&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "prefkernels_cpu", [&] {
    using hidden_t = scalar_t;
    if (weight.scalar_type() == at::kFloat) {
      fn(hidden_t{}, float{});
    } else {
      fn(hidden_t{}, hidden_t{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pool_forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    const c10::optional<at::Tensor>& attention_mask,
                                                    const c10::optional<at::Tensor>& last_index,
                                                    const c10::optional<at::Tensor>& cu_seqlens) {
  const HiddenLayout l = hidden_layout(hidden, cu_seqlens);
  const PoolSpec spec = pool_spec(l, attention_mask, last_index, cu_seqlens);
  check_head(hidden, weight, bias, l.dim);
  const int64_t heads = weight.size(0);
  auto rewards = at::empty({l.rows, heads}, hidden.options().dtype(at::kFloat));
  auto pooled_pos = at::empty({l.rows}, hidden.options().dtype(at::kLong));
  dispatch_hidden_weight(hidden, weight, [&](auto h, auto w) {
    using hidden_t = decltype(h);
    using weight_t = decltype(w);
    score_rows<hidden_t, weight_t>(hidden.data_ptr<hidden_t>(), weight.data_ptr<weight_t>(), optional_ptr<weight_t>(bias),
                                   l, spec, heads, rewards.data_ptr<float>(), pooled_pos.data_ptr<int64_t>());
  });
  return {rewards, pooled_pos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bt_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& attention_mask, const c10::optional<at::Tensor>& last_index,
    const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& chosen_index,
    const c10::optional<at::Tensor>& rejected_index, const c10::optional<at::Tensor>& margin,
    double label_smoothing, double center_coef, int64_t reduction) {
  check_reduction(reduction);
  auto [rewards, pooled_pos] = pool_forward_cpu(hidden, weight, bias, attention_mask, last_index, cu_seqlens);
  const int64_t rows = rewards.size(0), heads = rewards.size(1);
  const int64_t pairs = num_pairs(rows, chosen_index, rejected_index);
  check_margin(margin, pairs);
  auto loss = at::empty({pairs, heads}, rewards.options());
  auto pair_grad = at::empty({2, pairs, heads}, rewards.options());
  pair_losses(rewards.data_ptr<float>(), rows, heads, pairs, optional_ptr<int64_t>(chosen_index),
              optional_ptr<int64_t>(rejected_index), optional_ptr<float>(margin), static_cast<float>(label_smoothing),
              static_cast<float>(center_coef), loss.data_ptr<float>(), pair_grad.data_ptr<float>());
  return {reduce_loss(loss, reduction), rewards, pair_grad, pooled_pos};
}

// coef[n, k] = entry_coef(n, k), or the sum over the row's CSR segment (csr_segment_sum).
void row_coefficients(const float* grad_coef, const LossGrad& loss, int64_t coef_rows, const int64_t* row_ptr,
                      const int64_t* row_entry, int64_t entries, int64_t rows, int64_t heads, float* coef) {
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < heads; ++k) {
        coef[n * heads + k] = row_ptr == nullptr ? entry_coef(grad_coef, loss, heads, n, k)
                                                 : csr_segment_sum(grad_coef, loss, coef_rows, heads, row_entry,
                                                                   entries, row_ptr[n], row_ptr[n + 1], k);
      }
    }
  });
}

template <typename hidden_t, typename weight_t>
void scatter_rows(const float* coef, const weight_t* weight, const int64_t* pooled_pos, const HiddenLayout& l,
                  int64_t heads, int64_t grad_row_stride, hidden_t* grad_hidden) {
  at::parallel_for(0, l.rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(l.dim);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t pos = valid_position(pooled_pos[n], l.positions);
      if (pos < 0) continue;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k = 0; k < heads; ++k) {
        const float c = coef[n * heads + k];
        const weight_t* w = weight + k * l.dim;
        for (int64_t d = 0; d < l.dim; ++d) acc[d] += c * static_cast<float>(w[d]);
      }
      hidden_t* out = grad_hidden + n * grad_row_stride + pos * l.dim;
      for (int64_t d = 0; d < l.dim; ++d) out[d] = static_cast<hidden_t>(acc[d]);
    }
  });
}

// grad_weight[k, d] = sum_n coef[n, k] * hidden[n, pos_n, d]; each thread owns a D-slice.
template <typename hidden_t, typename weight_t>
void weight_gradient(const float* coef, const hidden_t* hidden, const int64_t* pooled_pos, const HiddenLayout& l,
                     int64_t heads, weight_t* grad_weight) {
  at::parallel_for(0, l.dim, 256, [&](int64_t d0, int64_t d1) {
    std::vector<float> acc((d1 - d0) * heads, 0.f);
    for (int64_t n = 0; n < l.rows; ++n) {
      const int64_t pos = valid_position(pooled_pos[n], l.positions);
      if (pos < 0) continue;
      const hidden_t* row = hidden + n * l.stride_n + pos * l.stride_t;
      for (int64_t k = 0; k < heads; ++k) {
        const float c = coef[n * heads + k];
        float* a = acc.data() + k * (d1 - d0);
        for (int64_t d = d0; d < d1; ++d) a[d - d0] += c * static_cast<float>(row[d]);
      }
    }
    for (int64_t k = 0; k < heads; ++k) {
      for (int64_t d = d0; d < d1; ++d) grad_weight[k * l.dim + d] = static_cast<weight_t>(acc[k * (d1 - d0) + d - d0]);
    }
  });
}

// The zeroed grad buffer. A large one (>= 32 MiB, where glibc's malloc itself would hand out a
// fresh mapping whose every page faults on first write) is a fresh anonymous mapping that is
// never memset: the kernel zero-fills pages on first touch, so only the pages the scatter writes
// are faulted in and a later reader of the rest maps the shared zero page. A smaller one comes
// from PyTorch's allocator (at::zeros): glibc reuses warm heap blocks there, which a memset
// clears faster than first-touch faults. With THP_MEM_ALLOC_ENABLE=1 the user asked PyTorch's
// allocator for huge pages (512x fewer faults), so every size comes from it.
constexpr size_t kMappedBufferBytes = size_t(32) << 20;

bool torch_allocates_huge_pages() {
  const char* env = std::getenv("THP_MEM_ALLOC_ENABLE");
  return env != nullptr && std::string(env) == "1";
}

at::Tensor zeroed_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kMappedBufferBytes || torch_allocates_huge_pages()) return at::zeros(sizes, options);
  void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(data != MAP_FAILED, "prefkernels: out of memory mapping a ", bytes, "-byte grad buffer");
  return at::from_blob(data, sizes, [bytes](void* p) { munmap(p, bytes); }, options);
}

// grad_bias[k] = sum over rows n with a valid pooled position of coef[n, k], n ascending.
void bias_gradient(const float* coef, const int64_t* pooled_pos, const HiddenLayout& l, int64_t heads,
                   float* grad_bias) {
  std::fill(grad_bias, grad_bias + heads, 0.f);
  for (int64_t n = 0; n < l.rows; ++n) {
    if (valid_position(pooled_pos[n], l.positions) < 0) continue;
    for (int64_t k = 0; k < heads; ++k) grad_bias[k] += coef[n * heads + k];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_backward_cpu(
    const at::Tensor& grad_coef, const c10::optional<at::Tensor>& grad_loss, double loss_scale,
    const c10::optional<at::Tensor>& row_ptr, const c10::optional<at::Tensor>& row_entry, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& pooled_pos, bool need_grad_hidden) {
  const HiddenLayout l = backward_layout(grad_coef, row_ptr, row_entry, hidden, weight, pooled_pos);
  const LossGrad loss = loss_grad_of(grad_loss, loss_scale, grad_coef);
  const int64_t heads = weight.size(0);
  auto coef = at::empty({l.rows, heads}, grad_coef.options());
  row_coefficients(grad_coef.data_ptr<float>(), loss, grad_coef.size(0), optional_ptr<int64_t>(row_ptr),
                   optional_ptr<int64_t>(row_entry), row_entry.has_value() ? row_entry->size(0) : 0, l.rows, heads,
                   coef.data_ptr<float>());
  auto grad_hidden = need_grad_hidden ? zeroed_buffer(hidden.sizes(), hidden.options()) : at::empty({0}, hidden.options());
  auto grad_weight = at::empty_like(weight);
  auto grad_bias = at::empty({heads}, grad_coef.options());
  bias_gradient(coef.data_ptr<float>(), pooled_pos.data_ptr<int64_t>(), l, heads, grad_bias.data_ptr<float>());
  dispatch_hidden_weight(hidden, weight, [&](auto h, auto w) {
    using hidden_t = decltype(h);
    using weight_t = decltype(w);
    if (need_grad_hidden) {
      scatter_rows<hidden_t, weight_t>(coef.data_ptr<float>(), weight.data_ptr<weight_t>(), pooled_pos.data_ptr<int64_t>(), l,
                                       heads, grad_stride_n(hidden, l), grad_hidden.data_ptr<hidden_t>());
    }
    weight_gradient<hidden_t, weight_t>(coef.data_ptr<float>(), hidden.data_ptr<hidden_t>(), pooled_pos.data_ptr<int64_t>(), l,
                                        heads, grad_weight.data_ptr<weight_t>());
  });
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace

// Counting sort of the 2P entries by csr_bucket: counts, their running sum (each bucket's first
// slot), then the entries placed in entry order: O(P + rows), stable.
std::tuple<at::Tensor, at::Tensor> rows_csr_cpu(const at::Tensor& chosen_index, const at::Tensor& rejected_index,
                                                int64_t rows) {
  TORCH_CHECK(rejected_index.device().is_cpu(), "rejected_index: expected a CPU tensor like chosen_index, got one on ",
              rejected_index.device());
  const int64_t pairs = csr_pairs(chosen_index, rejected_index, rows);
  auto row_ptr = at::empty({rows + 1}, chosen_index.options());
  auto row_entry = at::empty({2 * pairs}, chosen_index.options());
  const int64_t* chosen = chosen_index.data_ptr<int64_t>();
  const int64_t* rejected = rejected_index.data_ptr<int64_t>();
  const auto bucket = [&](int64_t e) { return csr_bucket(e < pairs ? chosen[e] : rejected[e - pairs], rows); };
  std::vector<int64_t> slot(rows + 2, 0);
  for (int64_t e = 0; e < 2 * pairs; ++e) ++slot[bucket(e)];
  int64_t first = 0;
  for (int64_t& s : slot) {
    const int64_t count = s;
    s = first;
    first += count;
  }
  int64_t* ptr = row_ptr.data_ptr<int64_t>();
  for (int64_t n = 0; n <= rows; ++n) ptr[n] = slot[n + 1];
  int64_t* entry = row_entry.data_ptr<int64_t>();
  for (int64_t e = 0; e < 2 * pairs; ++e) entry[slot[bucket(e)]++] = e;
  return {row_ptr, row_entry};
}

TORCH_LIBRARY_IMPL(prefkernels, CPU, m) {
  m.impl("bt_forward", &bt_forward_cpu);
  m.impl("pool_forward", &pool_forward_cpu);
  m.impl("pool_backward", &pool_backward_cpu);
  m.impl("rows_csr", &rows_csr_cpu);
}

}  // namespace prefkernels
