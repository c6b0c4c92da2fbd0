// CUDA implementations of the prefkernels ops (schemas in csrc/ops.cpp): argument checks
// (shared with the CPU glue through csrc/op_args.h), output allocation, and the launches of
// csrc/cuda/bt_kernels.cu on the current stream. Semantics are those of csrc/cpu/bt_cpu.cpp.
// Compiled only in CUDA builds (setup.py adds csrc/cuda/*.cpp in its CUDA branch only).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdlib>
#include <string>

#include "../op_args.h"
#include "bt_kernels.cuh"

namespace prefkernels {
namespace {

void check_device(const char* name, const at::Tensor& t, const at::Tensor& hidden) {
  TORCH_CHECK(t.is_cuda() && t.device() == hidden.device(), name, ": expected a CUDA tensor on ", hidden.device(),
              ", got one on ", t.device());
}

void check_device(const char* name, const c10::optional<at::Tensor>& t, const at::Tensor& hidden) {
  if (t.has_value()) check_device(name, *t, hidden);
}

gpu::HiddenArgs hidden_args(const at::Tensor& hidden, const HiddenLayout& l) {
  gpu::DType dtype;
  switch (hidden.scalar_type()) {
    case at::kFloat: dtype = gpu::DType::kFloat32; break;
    case at::kBFloat16: dtype = gpu::DType::kBFloat16; break;
    case at::kHalf: dtype = gpu::DType::kFloat16; break;
    default: TORCH_CHECK(false, "hidden: the CUDA kernels take float32, bfloat16 or float16, got ", hidden.scalar_type());
  }
  return {l, hidden.data_ptr(), dtype};
}

// weight/bias already checked by check_head (contiguous, float32 or hidden's dtype).
gpu::HeadArgs head_args(const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  gpu::HeadArgs w;
  w.weight = weight.data_ptr();
  w.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  w.weight_f32 = weight.scalar_type() == at::kFloat;
  w.heads = weight.size(0);
  return w;
}

// How the backward clears grad_hidden: PREFKERNELS_GRAD_FILL = auto (unset: the default),
// kernel or memset (see gpu::GradFill); read on every call, so a benchmark can compare them.
gpu::GradFill grad_fill() {
  const char* value = std::getenv("PREFKERNELS_GRAD_FILL");
  const std::string mode = value == nullptr ? "" : value;
  if (mode.empty() || mode == "auto") return gpu::GradFill::kAuto;
  if (mode == "kernel") return gpu::GradFill::kKernel;
  if (mode == "memset") return gpu::GradFill::kMemset;
  TORCH_CHECK(false, "PREFKERNELS_GRAD_FILL: expected auto, kernel or memset, got '", mode, "'");
}

// Device checks (hidden is on CUDA), then the layout/pooling/head checks shared with the CPU glue.
struct Forward {
  HiddenLayout layout;
  PoolSpec spec;
};

Forward check_forward(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& attention_mask, const c10::optional<at::Tensor>& last_index,
                      const c10::optional<at::Tensor>& cu_seqlens) {
  check_device("weight", weight, hidden);
  check_device("bias", bias, hidden);
  check_device("attention_mask", attention_mask, hidden);
  check_device("last_index", last_index, hidden);
  check_device("cu_seqlens", cu_seqlens, hidden);
  Forward f;
  f.layout = hidden_layout(hidden, cu_seqlens);
  f.spec = pool_spec(f.layout, attention_mask, last_index, cu_seqlens);
  check_head(hidden, weight, bias, f.layout.dim);
  return f;
}

std::tuple<at::Tensor, at::Tensor> pool_forward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias,
                                                     const c10::optional<at::Tensor>& attention_mask,
                                                     const c10::optional<at::Tensor>& last_index,
                                                     const c10::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(hidden.is_cuda(), "hidden: expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const Forward f = check_forward(hidden, weight, bias, attention_mask, last_index, cu_seqlens);
  const int64_t heads = weight.size(0);
  auto rewards = at::empty({f.layout.rows, heads}, hidden.options().dtype(at::kFloat));
  auto pooled_pos = at::empty({f.layout.rows}, hidden.options().dtype(at::kLong));
  C10_CUDA_CHECK(gpu::launch_pool_forward(hidden_args(hidden, f.layout), head_args(weight, bias), f.spec,
                                          rewards.data_ptr<float>(), pooled_pos.data_ptr<int64_t>(),
                                          c10::cuda::getCurrentCUDAStream().stream()));
  return {rewards, pooled_pos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bt_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& attention_mask, const c10::optional<at::Tensor>& last_index,
    const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& chosen_index,
    const c10::optional<at::Tensor>& rejected_index, const c10::optional<at::Tensor>& margin,
    double label_smoothing, double center_coef, int64_t reduction) {
  TORCH_CHECK(hidden.is_cuda(), "hidden: expected a CUDA tensor");
  check_reduction(reduction);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const Forward f = check_forward(hidden, weight, bias, attention_mask, last_index, cu_seqlens);
  check_device("chosen_index", chosen_index, hidden);
  check_device("rejected_index", rejected_index, hidden);
  check_device("margin", margin, hidden);
  const int64_t rows = f.layout.rows, heads = weight.size(0);
  const int64_t pairs = num_pairs(rows, chosen_index, rejected_index);
  check_margin(margin, pairs);
  const auto f32 = hidden.options().dtype(at::kFloat);
  auto rewards = at::empty({rows, heads}, f32);
  auto pooled_pos = at::empty({rows}, hidden.options().dtype(at::kLong));
  auto loss = at::empty({pairs, heads}, f32);
  auto pair_grad = at::empty({2, pairs, heads}, f32);
  // One launch for the whole forward (default or explicit pairs): a block per pair, or per row then per pair.
  const bool explicit_pairs = chosen_index.has_value();
  C10_CUDA_CHECK(gpu::launch_bt_forward(
      hidden_args(hidden, f.layout), head_args(weight, bias), f.spec, explicit_pairs, optional_ptr<int64_t>(chosen_index),
      optional_ptr<int64_t>(rejected_index), optional_ptr<float>(margin), pairs, static_cast<float>(label_smoothing),
      static_cast<float>(center_coef), rewards.data_ptr<float>(), pooled_pos.data_ptr<int64_t>(), loss.data_ptr<float>(),
      pair_grad.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {reduce_loss(loss, reduction), rewards, pair_grad, pooled_pos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_backward_cuda(
    const at::Tensor& grad_coef, const c10::optional<at::Tensor>& grad_loss, double loss_scale,
    const c10::optional<at::Tensor>& row_ptr, const c10::optional<at::Tensor>& row_entry, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& pooled_pos, bool need_grad_hidden) {
  TORCH_CHECK(hidden.is_cuda(), "hidden: expected a CUDA tensor");
  check_device("grad_coef", grad_coef, hidden);
  check_device("grad_loss", grad_loss, hidden);
  check_device("row_ptr", row_ptr, hidden);
  check_device("row_entry", row_entry, hidden);
  check_device("weight", weight, hidden);
  check_device("pooled_pos", pooled_pos, hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());

  const HiddenLayout l = backward_layout(grad_coef, row_ptr, row_entry, hidden, weight, pooled_pos);
  const LossGrad loss = loss_grad_of(grad_loss, loss_scale, grad_coef);
  const int64_t heads = weight.size(0);

  // ONE allocation: the big grad buffer, padded to 16 bytes, then the backward kernel's D-tile
  // tickets. The fill kernel writes the whole grad buffer (zeros and the pooled rows) in the one
  // launch, with no memset (plan.fill_rows > 0, then no tickets either); otherwise ONE memset
  // clears what the launch needs cleared (zero bits are 0.0 in every float type; a memset runs at
  // write bandwidth whatever the dtype, at::zeros' fill kernel is slower on 2-byte types) and the
  // kernel writes only the N pooled rows. grad_hidden is a contiguous view of its head.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const gpu::HiddenArgs h = hidden_args(hidden, l);
  const gpu::HeadArgs head = head_args(weight, c10::nullopt);
  const int64_t stride_n = grad_stride_n(hidden, l);
  const gpu::PoolBackwardPlan plan = gpu::plan_pool_backward(h, head, need_grad_hidden, stride_n, grad_fill());
  const int64_t grad_bytes = need_grad_hidden ? hidden.numel() * hidden.element_size() : 0;
  const int64_t tickets_at = (grad_bytes + 15) / 16 * 16;
  auto buffer = at::empty({tickets_at + plan.tickets * int64_t(sizeof(unsigned))}, hidden.options().dtype(at::kByte));
  const int64_t clear_from = plan.fill_rows > 0 ? tickets_at : 0;
  if (buffer.numel() > clear_from) {
    C10_CUDA_CHECK(cudaMemsetAsync(buffer.data_ptr<uint8_t>() + clear_from, 0, buffer.numel() - clear_from, stream));
  }
  auto grad_hidden = need_grad_hidden
                         ? buffer.narrow(0, 0, grad_bytes).view(hidden.scalar_type()).view(hidden.sizes())
                         : at::empty({0}, hidden.options());
  auto* tile_done = reinterpret_cast<unsigned*>(buffer.data_ptr<uint8_t>() + tickets_at);
  auto grad_weight = at::empty_like(weight);  // contiguous: check_head requires a contiguous weight
  auto grad_bias = at::empty({heads}, hidden.options().dtype(at::kFloat));
  auto scratch = at::empty({plan.scratch_floats}, hidden.options().dtype(at::kFloat));

  gpu::CoefArgs coef;
  coef.grad_coef = grad_coef.data_ptr<float>();
  coef.loss = loss;
  coef.coef_rows = grad_coef.size(0);
  coef.row_ptr = optional_ptr<int64_t>(row_ptr);
  coef.row_entry = optional_ptr<int64_t>(row_entry);
  coef.entries = row_entry.has_value() ? row_entry->size(0) : 0;
  C10_CUDA_CHECK(gpu::launch_pool_backward(plan, coef, h, head, pooled_pos.data_ptr<int64_t>(),
                                           need_grad_hidden ? grad_hidden.data_ptr() : nullptr, stride_n,
                                           scratch.data_ptr<float>(), tile_done, grad_weight.data_ptr(),
                                           grad_bias.data_ptr<float>(), stream));
  return {grad_hidden, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> rows_csr_cuda(const at::Tensor& chosen_index, const at::Tensor& rejected_index,
                                                 int64_t rows) {
  TORCH_CHECK(chosen_index.is_cuda(), "chosen_index: expected a CUDA tensor");
  check_device("rejected_index", rejected_index, chosen_index);
  const int64_t pairs = csr_pairs(chosen_index, rejected_index, rows);
  TORCH_CHECK(pairs < gpu::kCsrMaxPairs, "chosen_index: the CUDA rows_csr takes fewer than 2^30 pairs (its 2P slots "
              "are int32), got ", pairs);
  const c10::cuda::CUDAGuard guard(chosen_index.device());
  auto row_ptr = at::empty({rows + 1}, chosen_index.options());
  auto row_entry = at::empty({2 * pairs}, chosen_index.options());
  auto counters = at::empty({gpu::rows_csr_scratch_ints(rows)}, chosen_index.options().dtype(at::kInt));
  C10_CUDA_CHECK(gpu::launch_rows_csr(chosen_index.data_ptr<int64_t>(), rejected_index.data_ptr<int64_t>(), pairs,
                                      rows, counters.data_ptr<int>(), row_ptr.data_ptr<int64_t>(),
                                      row_entry.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {row_ptr, row_entry};
}

}  // namespace

TORCH_LIBRARY_IMPL(prefkernels, CUDA, m) {
  m.impl("bt_forward", &bt_forward_cuda);
  m.impl("pool_forward", &pool_forward_cuda);
  m.impl("pool_backward", &pool_backward_cuda);
  m.impl("rows_csr", &rows_csr_cuda);
}

}  // namespace prefkernels
