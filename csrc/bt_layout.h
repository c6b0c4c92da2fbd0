// How the kernels see the op's inputs, shared by the CPU kernels, the CUDA kernels and the glue
// that fills these structs from tensors (csrc/op_args.h). No PyTorch headers: compiles under nvcc -c.
#pragma once
#include <cstdint>

#include "host_device.h"

namespace prefkernels {

// How the pooled token of each row is found.
enum PoolMode : int { kPoolMask = 0, kPoolLastIndex = 1, kPoolCuSeqlens = 2 };

// Element type of attention_mask.
enum MaskKind : int { kMaskBool = 0, kMaskInt32 = 1, kMaskInt64 = 2 };

// Hidden viewed as rows of D elements: row (n, pos) starts at n*stride_n + pos*stride_t (in
// elements; last dimension contiguous). Packed [total, D] hidden is one sequence of `total`
// positions with stride_n = 0.
struct HiddenLayout {
  int64_t rows;       // N, pooled rows
  int64_t positions;  // T (padded) or total (packed)
  int64_t dim;        // D
  int64_t stride_n;
  int64_t stride_t;
};

// The pooled token of each row: exactly one of mask / index is used, as `mode` says.
struct PoolSpec {
  int mode;              // PoolMode
  const void* mask;      // [N, T] contiguous, kPoolMask
  int mask_kind;         // MaskKind
  const int64_t* index;  // last_index [N] or cu_seqlens [N+1], int64 contiguous
};

// Row n's pooled position under an index spec: last_index[n], or the last row of sequence n of
// cu_seqlens (-1 for an empty sequence).
PK_HOST_DEVICE int64_t indexed_position(const PoolSpec& spec, int64_t n) {
  if (spec.mode == kPoolLastIndex) return spec.index[n];
  return spec.index[n + 1] > spec.index[n] ? spec.index[n + 1] - 1 : -1;
}

// The loss's gradient, applied by pool_backward to each entry of grad_coef (the pair entries
// [2P, K]: chosen then rejected) so that no separate kernel scales them. grad null: the entries
// are used as given (pool_forward's backward).
struct LossGrad {
  const float* grad;  // [] (one value for every entry: a mean or sum) or [P, K] (entry e: pair e mod P)
  int64_t pairs;      // P when grad is [P, K]; 0 when it is one value
  float scale;        // 1/(P*K) for a mean, else 1
};

// Coefficient of entry e (< 2P when loss.pairs > 0), head k: grad_coef[e, k] times the loss's
// gradient of its pair, grad * scale.
PK_HOST_DEVICE float entry_coef(const float* grad_coef, const LossGrad& loss, int64_t heads, int64_t e, int64_t k) {
  const float c = grad_coef[e * heads + k];
  if (loss.grad == nullptr) return c;
  const int64_t pair = e < loss.pairs ? e : e - loss.pairs;
  return c * (loss.grad[loss.pairs > 0 ? pair * heads + k : 0] * loss.scale);
}

// sum over j in [begin, end) of entry_coef(row_entry[j], k) (grad_coef [M, K] float32), in order:
// the CSR segment of one row. Bounds outside [0, entries) and entries outside [0, coef_rows) are
// skipped, so a direct call of pool_backward with a bad CSR reads nothing out of bounds.
PK_HOST_DEVICE float csr_segment_sum(const float* grad_coef, const LossGrad& loss, int64_t coef_rows,
                                     int64_t heads, const int64_t* row_entry, int64_t entries, int64_t begin,
                                     int64_t end, int64_t k) {
  float acc = 0.f;
  for (int64_t j = begin > 0 ? begin : 0; j < (end < entries ? end : entries); ++j) {
    const int64_t e = row_entry[j];
    if (e >= 0 && e < coef_rows) acc += entry_coef(grad_coef, loss, heads, e, k);
  }
  return acc;
}

// rows_csr's bucket of a pair entry whose row is `row`: 0 below row 0, row + 1 for a row in
// [0, rows), rows + 1 past the last. The entries in bucket order, each bucket's in entry order,
// are row_entry; row_ptr[n] is the first slot of bucket n + 1 (the count of entries of rows < n).
PK_HOST_DEVICE int64_t csr_bucket(int64_t row, int64_t rows) {
  return row < 0 ? 0 : (row < rows ? row + 1 : rows + 1);
}

// pos if it is a position of hidden, [0, positions); else -1: the row is invalid (NaN rewards).
PK_HOST_DEVICE int64_t valid_position(int64_t pos, int64_t positions) {
  return (pos >= 0 && pos < positions) ? pos : -1;
}

}  // namespace prefkernels
