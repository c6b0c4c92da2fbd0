// CUDA kernels of the fused last-token pooling + reward head + Bradley-Terry op: launchers over
// raw device pointers, sizes and strides. No PyTorch headers: the glue (bt_cuda.cpp) turns
// tensors into these structs, and `nvcc -c bt_kernels.cu` compiles on any machine.
//
// Semantics are those of csrc/cpu/bt_cpu.cpp (the reference): an invalid pooled row gets
// pooled_pos = -1 and NaN rewards, an out-of-range pair NaN loss and zero pair_grad, and the
// backward skips rows with pooled_pos < 0. Every launcher returns cudaGetLastError().
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../bt_layout.h"

namespace prefkernels {
namespace gpu {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Hidden states: their layout (csrc/bt_layout.h) plus data pointer and element type.
struct HiddenArgs : HiddenLayout {
  const void* data;
  DType dtype;  // float32, bfloat16 or float16
};

// Reward head: weight [K, D] contiguous, bias [K] or null; both float32 or hidden's dtype.
struct HeadArgs {
  const void* weight;
  const void* bias;
  bool weight_f32;  // false: weight/bias have hidden's dtype
  int64_t heads;    // K
};

// Rewards [N, K] f32 and pooled_pos [N] i64: one block per row.
cudaError_t launch_pool_forward(const HiddenArgs& hidden, const HeadArgs& head, const PoolSpec& pool,
                                float* rewards, int64_t* pooled_pos, cudaStream_t stream);

// bt_forward: rewards, pooled_pos, loss [P, K] and pair_grad [2, P, K] (all f32 but pooled_pos),
// ONE launch (the glue reduces loss when asked). explicit_pairs false: default pairs (p, p + P),
// P = N / 2 (chosen, rejected and `pairs` are not read), one block per pair. explicit_pairs true:
// int64 [P] chosen/rejected (null when P = 0), one block per row, then one per pair. margin: f32
// [P] or null.
cudaError_t launch_bt_forward(const HiddenArgs& hidden, const HeadArgs& head, const PoolSpec& pool,
                              bool explicit_pairs, const int64_t* chosen, const int64_t* rejected, const float* margin,
                              int64_t pairs, float label_smoothing, float center_coef, float* rewards,
                              int64_t* pooled_pos, float* loss, float* pair_grad, cudaStream_t stream);

// Coefficients of the backward: coef[n, k] = entry_coef(n, k) (row_ptr null, grad_coef [N, K]),
// or the sum of entry_coef(row_entry[j], k) for j in [row_ptr[n], row_ptr[n+1]) in that order;
// entry_coef (csrc/bt_layout.h) is grad_coef[e, k], times the loss's gradient when one is given.
struct CoefArgs {
  const float* grad_coef;    // [M, K] contiguous f32
  LossGrad loss;             // loss.grad null: grad_coef as given
  int64_t coef_rows;         // M
  const int64_t* row_ptr;    // [N + 1] or null
  const int64_t* row_entry;  // [entries] rows of grad_coef, or null
  int64_t entries;           // length of row_entry (segments are clamped to it)
};

// How pool_backward gets a zeroed grad_hidden.
enum class GradFill : int {
  kAuto = 0,    // the fill kernel where plan_pool_backward expects it to be faster, else a memset
  kKernel = 1,  // the fill kernel wherever the layout allows it
  kMemset = 2,  // a memset by the caller before the launch
};

// The shape of one launch_pool_backward, from plan_pool_backward; the caller allocates by it and
// passes it back unchanged.
struct PoolBackwardPlan {
  int64_t rows_per_block;  // the reduction's row blocks: this many rows each
  int64_t row_blocks;      // 0: no row (grad_weight and grad_bias are cleared with memsets)
  int64_t tiles;           // D tiles
  int64_t fill_rows;       // > 0: the launch writes every element of grad_hidden (allocate it
                           // uncleared, 16-byte aligned), this many rows per fill block; 0: the
                           // caller zeroes grad_hidden before the launch
  int64_t scratch_floats;  // weight- and bias-gradient partials, [row_blocks, K, D] then
                           // [row_blocks, K] (0 with one row block)
  int64_t tickets;         // length of tile_done, zeroed by the caller (0 with one row block)
};

// grad_hidden: whether it is wanted; grad_stride_n as for launch_pool_backward. The fill kernel
// needs the padded layout (grad_stride_n = T*D) and 16-byte vectors (D a multiple of the width).
PoolBackwardPlan plan_pool_backward(const HiddenArgs& hidden, const HeadArgs& head, bool grad_hidden,
                                    int64_t grad_stride_n, GradFill fill);

// pool_backward, ONE launch (rows with pos_n = pooled_pos[n] outside [0, T) are skipped):
//   grad_hidden (contiguous like hidden; null: not needed): element n*grad_stride_n + pos_n*D + d
//     = sum_k coef[n, k] * weight[k, d] (grad_stride_n = T*D padded, 0 packed), every other
//     element 0: written whole by the launch when plan.fill_rows > 0, else ALREADY ZEROED by the
//     caller and only the pooled rows written;
//   grad_weight [K, D] in weight's dtype = sum_n coef[n, k] * hidden[n, pos_n, :] and grad_bias
//     [K] f32 = sum_n coef[n, k]: with one row block, summed by the block of each D tile; else
//     per-row-block fp32 partials in `scratch`, summed in row-block order by the last block of
//     each D tile, found with the tile's ticket counter in tile_done (ALREADY ZEROED by the
//     caller). Deterministic: no floating-point atomics. head.bias is not used.
cudaError_t launch_pool_backward(const PoolBackwardPlan& plan, const CoefArgs& coef, const HiddenArgs& hidden,
                                 const HeadArgs& head, const int64_t* pooled_pos, void* grad_hidden,
                                 int64_t grad_stride_n, float* scratch, unsigned* tile_done, void* grad_weight,
                                 float* grad_bias, cudaStream_t stream);

// rows_csr (csrc/ops.cpp): row_ptr [rows + 1] and row_entry [2P] int64 from chosen/rejected
// int64 [P] (null when P = 0), ONE launch of one block. `counters`: rows_csr_scratch_ints(rows)
// int32 scratch (any contents; null when 0). P < kCsrMaxPairs: the 2P slots are int32.
constexpr int64_t kCsrMaxPairs = int64_t(1) << 30;
int64_t rows_csr_scratch_ints(int64_t rows);
cudaError_t launch_rows_csr(const int64_t* chosen, const int64_t* rejected, int64_t pairs, int64_t rows, int* counters,
                            int64_t* row_ptr, int64_t* row_entry, cudaStream_t stream);

}  // namespace gpu
}  // namespace prefkernels
