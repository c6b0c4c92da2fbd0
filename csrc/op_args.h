// Host-side helpers shared by the CPU and CUDA glue: turn op arguments (tensors) into the raw
// layout the kernels take. The Python layer has already validated everything with clear
// messages; the TORCH_CHECKs here only guard direct calls of torch.ops.prefkernels.*.
#pragma once
#include <torch/extension.h>

#include "bt_layout.h"

namespace prefkernels {

// Hidden as rows of D elements with `rows` pooled rows: padded [N, T, D], or packed [total, D]
// as one sequence of `total` positions (stride_n = 0).
inline HiddenLayout layout_of(const at::Tensor& hidden, int64_t rows) {
  TORCH_CHECK(hidden.dim() == 2 || hidden.dim() == 3, "hidden: expected [N, T, D] or packed [total, D]");
  TORCH_CHECK(hidden.stride(-1) == 1, "hidden: last dimension must be contiguous");
  const bool packed = hidden.dim() == 2;
  HiddenLayout l;
  l.rows = rows;
  l.positions = hidden.size(packed ? 0 : 1);
  l.dim = hidden.size(-1);
  l.stride_n = packed ? 0 : hidden.stride(0);
  l.stride_t = hidden.stride(packed ? 0 : 1);
  return l;
}

// The forward's layout: N = rows of padded hidden, or the sequences of cu_seqlens when packed.
inline HiddenLayout hidden_layout(const at::Tensor& hidden, const c10::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(hidden.dim() != 2 || cu_seqlens.has_value(), "hidden: a 2-D (packed) hidden needs cu_seqlens");
  HiddenLayout l = layout_of(hidden, 0);
  l.rows = hidden.dim() == 2 ? cu_seqlens->size(0) - 1 : hidden.size(0);
  return l;
}

inline PoolSpec pool_spec(const HiddenLayout& l, const c10::optional<at::Tensor>& attention_mask,
                          const c10::optional<at::Tensor>& last_index,
                          const c10::optional<at::Tensor>& cu_seqlens) {
  PoolSpec p{};
  const int given = int(attention_mask.has_value()) + int(last_index.has_value()) + int(cu_seqlens.has_value());
  TORCH_CHECK(given == 1, "pass exactly one of attention_mask, last_index, cu_seqlens");
  if (attention_mask.has_value()) {
    const auto& m = *attention_mask;
    TORCH_CHECK(m.dim() == 2 && m.size(0) == l.rows && m.size(1) == l.positions && m.is_contiguous(),
                "attention_mask: expected contiguous [N, T]");
    p.mode = kPoolMask;
    p.mask = m.data_ptr();
    if (m.scalar_type() == at::kBool) p.mask_kind = kMaskBool;
    else if (m.scalar_type() == at::kInt) p.mask_kind = kMaskInt32;
    else if (m.scalar_type() == at::kLong) p.mask_kind = kMaskInt64;
    else TORCH_CHECK(false, "attention_mask: expected bool, int32 or int64");
  } else {
    const auto& idx = last_index.has_value() ? *last_index : *cu_seqlens;
    TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.dim() == 1,
                "pooling index: expected contiguous int64");
    TORCH_CHECK(idx.size(0) == l.rows + (cu_seqlens.has_value() ? 1 : 0), "pooling index: wrong length");
    p.mode = last_index.has_value() ? kPoolLastIndex : kPoolCuSeqlens;
    p.index = idx.data_ptr<int64_t>();
  }
  return p;
}

inline void check_head(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t dim) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == dim && weight.is_contiguous(), "weight: expected contiguous [K, D]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == hidden.scalar_type(),
              "weight: expected float32 or hidden's dtype");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == weight.scalar_type(),
                "bias: expected contiguous [K] in weight's dtype");
  }
}

// Pairs: explicit int64 index tensors, or the default halves when both are absent.
inline int64_t num_pairs(int64_t rows, const c10::optional<at::Tensor>& chosen, const c10::optional<at::Tensor>& rejected) {
  TORCH_CHECK(chosen.has_value() == rejected.has_value(), "pass both chosen_index and rejected_index or neither");
  if (!chosen.has_value()) return rows / 2;
  TORCH_CHECK(chosen->scalar_type() == at::kLong && rejected->scalar_type() == at::kLong &&
                  chosen->is_contiguous() && rejected->is_contiguous() && chosen->dim() == 1 &&
                  chosen->sizes() == rejected->sizes(),
              "chosen_index/rejected_index: expected contiguous int64 [P]");
  return chosen->size(0);
}

// rows_csr's arguments: P, the length of both index tensors.
inline int64_t csr_pairs(const at::Tensor& chosen_index, const at::Tensor& rejected_index, int64_t rows) {
  TORCH_CHECK(chosen_index.scalar_type() == at::kLong && chosen_index.dim() == 1 && chosen_index.is_contiguous(),
              "chosen_index: expected contiguous int64 [P], got ", chosen_index.scalar_type(), " ",
              chosen_index.sizes());
  TORCH_CHECK(rejected_index.scalar_type() == at::kLong && rejected_index.dim() == 1 && rejected_index.is_contiguous() &&
                  rejected_index.size(0) == chosen_index.size(0),
              "rejected_index: expected contiguous int64 [P] with P = ", chosen_index.size(0), " (chosen_index), got ",
              rejected_index.scalar_type(), " ", rejected_index.sizes());
  TORCH_CHECK(rows >= 0, "rows: expected >= 0, got ", rows);
  return chosen_index.size(0);
}

template <typename T>
const T* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

inline void check_margin(const c10::optional<at::Tensor>& margin, int64_t pairs) {
  if (margin.has_value()) {
    TORCH_CHECK(margin->scalar_type() == at::kFloat && margin->is_contiguous() && margin->numel() == pairs,
                "margin: expected contiguous float32 [P]");
  }
}

// bt_forward's `reduction`: the loss per pair [P, K], or its mean or sum (a float32 scalar).
enum Reduction : int64_t { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= kReduceNone && reduction <= kReduceSum,
              "reduction: expected 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// loss [P, K] reduced as `reduction` asks (ATen's mean and sum: the values of loss.mean()/sum()).
inline at::Tensor reduce_loss(const at::Tensor& loss, int64_t reduction) {
  if (reduction == kReduceMean) return loss.mean();
  if (reduction == kReduceSum) return loss.sum();
  return loss;
}

// pool_backward's grad_loss and loss_scale as the kernels take them, checked against grad_coef [M, K].
inline LossGrad loss_grad_of(const c10::optional<at::Tensor>& grad_loss, double loss_scale,
                             const at::Tensor& grad_coef) {
  if (!grad_loss.has_value()) return {nullptr, 0, 1.f};
  const at::Tensor& g = *grad_loss;
  const bool per_pair = g.dim() == 2 && 2 * g.size(0) == grad_coef.size(0) && g.size(1) == grad_coef.size(1);
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.is_contiguous() && (g.dim() == 0 || per_pair),
              "grad_loss: expected a contiguous float32 [] or [P, K] with grad_coef [2P, K], got ",
              g.scalar_type(), " ", g.sizes(), " with grad_coef ", grad_coef.sizes());
  return {g.data_ptr<float>(), per_pair ? g.size(0) : 0, static_cast<float>(loss_scale)};
}

// pool_backward's arguments: checks, and hidden's layout with rows = N pooled positions.
inline HiddenLayout backward_layout(const at::Tensor& grad_coef, const c10::optional<at::Tensor>& row_ptr,
                                    const c10::optional<at::Tensor>& row_entry, const at::Tensor& hidden,
                                    const at::Tensor& weight, const at::Tensor& pooled_pos) {
  TORCH_CHECK(pooled_pos.dim() == 1, "pooled_pos: expected [N]");
  const HiddenLayout l = layout_of(hidden, pooled_pos.size(0));
  TORCH_CHECK(hidden.dim() == 2 || hidden.size(0) == l.rows, "pooled_pos: expected one position per row of hidden");
  const int64_t heads = weight.size(0);
  TORCH_CHECK(grad_coef.scalar_type() == at::kFloat && grad_coef.is_contiguous() && grad_coef.dim() == 2 &&
                  grad_coef.size(1) == heads,
              "grad_coef: expected contiguous float32 [M, K]");
  TORCH_CHECK(row_ptr.has_value() == row_entry.has_value(), "row_ptr and row_entry go together");
  TORCH_CHECK(row_ptr.has_value() || grad_coef.size(0) == l.rows, "grad_coef: expected [N, K] without row_ptr");
  if (row_ptr.has_value()) {
    TORCH_CHECK(row_ptr->scalar_type() == at::kLong && row_ptr->is_contiguous() && row_ptr->dim() == 1 &&
                    row_ptr->size(0) == l.rows + 1,
                "row_ptr: expected contiguous int64 [N + 1]");
    TORCH_CHECK(row_entry->scalar_type() == at::kLong && row_entry->is_contiguous() && row_entry->dim() == 1,
                "row_entry: expected contiguous int64 [M]");
  }
  TORCH_CHECK(pooled_pos.scalar_type() == at::kLong && pooled_pos.is_contiguous() && pooled_pos.dim() == 1,
              "pooled_pos: expected contiguous int64 [N]");
  check_head(hidden, weight, c10::nullopt, l.dim);
  return l;
}

// Row stride of the contiguous grad_hidden buffer (0 for packed hidden: one sequence).
inline int64_t grad_stride_n(const at::Tensor& hidden, const HiddenLayout& l) {
  return hidden.dim() == 3 ? l.positions * l.dim : 0;
}

}  // namespace prefkernels
