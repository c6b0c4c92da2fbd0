// CUDA kernels of the fused last-token pooling + reward head + Bradley-Terry op.
//
// Forward (reads only the N pooled rows, never the whole hidden tensor):
//   score_kernel         one block per pooled row, or with default pairs one block per pair
//                        (rows p and p + P): find the pooled token (block-parallel mask scan or
//                        index), K fp32 dot products with the head, and for pairs the loss and
//                        its gradient coefficients. Default pairs: the whole forward is 1 launch.
//   pair_loss_kernel     explicit pairs only: loss/pair_grad over the [P, K] grid (2nd launch).
// Backward (grad_hidden is zeroed by the caller; it is the one big buffer):
//   pool_backward_kernel grid (row blocks, D tiles): scatters the pooled rows of grad_hidden and
//                        writes the row block's partial weight gradient [K, D-tile] (fp32); the
//                        blocks of D tile 0 also its partial bias gradient [K].
//   reduce_partials_kernel  sums the partials over row blocks in fixed order -> grad_weight in
//                        weight's dtype and grad_bias (fp32).
// Determinism: no atomics anywhere; every sum runs in an order fixed by the launch shape, so
// two runs give bitwise equal results.
#include "bt_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include "../bt_math.h"

namespace prefkernels {
namespace gpu {
namespace {

constexpr int kWarp = 32;
constexpr int kForwardThreads = 256;
constexpr int kBackwardThreads = 128;
constexpr int kReduceThreads = 256;
constexpr int kHeadChunk = 4;   // heads accumulated in registers per pass over D
constexpr int kScanUnroll = 4;  // mask positions each thread tests per scan step

// Backward planning: rows per block >= 4, at most 256 row blocks, scratch <= 16M floats.
constexpr int64_t kMinRowsPerBlock = 4;
constexpr int64_t kMaxRowBlocks = 256;
constexpr int64_t kScratchBudgetFloats = int64_t(16) << 20;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }  // == CPU quiet_NaN

// ---------------------------------------------------------------------------------------------
// Element access. torch builds with __CUDA_NO_HALF/BFLOAT16_CONVERSIONS__: convert explicitly.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

__device__ __forceinline__ void from_float(float x, float& out) { out = x; }
__device__ __forceinline__ void from_float(float x, __nv_bfloat16& out) { out = __float2bfloat16_rn(x); }
__device__ __forceinline__ void from_float(float x, __half& out) { out = __float2half_rn(x); }

// Vector access: N elements as N*sizeof(T)/16 explicit 16-byte loads/stores (uint4), each
// 32-bit word holding 1 float or 2 16-bit values (low half = lower address).
template <typename T>
__device__ __forceinline__ void unpack_word(uint32_t w, float* out) {
  if constexpr (std::is_same_v<T, float>) {
    out[0] = __uint_as_float(w);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    out[0] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w & 0xffffu)));
    out[1] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w >> 16)));
  } else {
    out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack_word(const float* in) {
  if constexpr (std::is_same_v<T, float>) {
    return __float_as_uint(in[0]);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(in[0]))) |
           (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(in[1]))) << 16);
  } else {
    return uint32_t(__half_as_ushort(__float2half_rn(in[0]))) | (uint32_t(__half_as_ushort(__float2half_rn(in[1]))) << 16);
  }
}

// p must be 16-byte aligned and read-only for the kernel's lifetime (read-only cache path).
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  constexpr int kPerWord = int(4 / sizeof(T));
  static_assert(N % (4 * kPerWord) == 0, "whole 16-byte accesses only");
#pragma unroll
  for (int q = 0; q < N / (4 * kPerWord); ++q) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + q);
    float* o = out + q * 4 * kPerWord;
    unpack_word<T>(u.x, o);
    unpack_word<T>(u.y, o + kPerWord);
    unpack_word<T>(u.z, o + 2 * kPerWord);
    unpack_word<T>(u.w, o + 3 * kPerWord);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  constexpr int kPerWord = int(4 / sizeof(T));
  static_assert(N % (4 * kPerWord) == 0, "whole 16-byte accesses only");
#pragma unroll
  for (int q = 0; q < N / (4 * kPerWord); ++q) {
    const float* i = in + q * 4 * kPerWord;
    // __stwb (a plain write-back store) keeps it one 16-byte store: an aggregate assignment
    // may be split into 4-byte stores by the compiler.
    __stwb(reinterpret_cast<uint4*>(p) + q, make_uint4(pack_word<T>(i), pack_word<T>(i + kPerWord),
                                                       pack_word<T>(i + 2 * kPerWord), pack_word<T>(i + 3 * kPerWord)));
  }
}

// Elements per 16-byte load of hidden: the vector width of every kernel.
template <typename H>
__host__ __device__ constexpr int vec_width() {
  return int(16 / sizeof(H));
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0; }

// Vector path: every hidden row and weight row 16-byte aligned and D a multiple of the width
// (then every vector lies inside a row); otherwise (odd D such as 37 or 4099, odd strides,
// offset views) the kernels load scalars. A size-1 dimension's stride is never stepped over.
inline bool can_vectorize(const HiddenArgs& h, int width, const void* weight) {
  return h.dim % width == 0 && (h.rows <= 1 || h.stride_n % width == 0) &&
         (h.positions <= 1 || h.stride_t % width == 0) && aligned(h.data, 16) && aligned(weight, 16);
}

// ---------------------------------------------------------------------------------------------
// Block reductions (blockDim.x a multiple of 32; every thread of the block must call them).
// ---------------------------------------------------------------------------------------------
// Lane 0 gets the warp's sum (fixed shuffle-down tree).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Every thread gets the block's max. smem: one slot per warp.
__device__ __forceinline__ int64_t block_max(int64_t v, int64_t* smem) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v = max64(v, __shfl_down_sync(0xffffffffu, v, off));
  if (threadIdx.x % kWarp == 0) smem[threadIdx.x / kWarp] = v;
  __syncthreads();
  int64_t r = smem[0];
  for (int w = 1; w < int(blockDim.x / kWarp); ++w) r = max64(r, smem[w]);
  __syncthreads();  // smem may be reused right after
  return r;
}

// ---------------------------------------------------------------------------------------------
// Pooled position
// ---------------------------------------------------------------------------------------------
// Last t with row[t] != 0, or -1. Steps of blockDim*kScanUnroll positions from the end: in a
// step thread i tests hi-1-i, hi-1-i-blockDim, ... (coalesced; its first hit is its largest),
// and the block stops at the first step where any thread hit (usually the first: the pooled
// token sits near the end of left-padded rows; right padding costs (T - length) / 1024 steps).
template <typename M>
__device__ int64_t last_set_position(const M* __restrict__ row, int64_t positions, int64_t* smem) {
  const int64_t step = int64_t(blockDim.x) * kScanUnroll;
  for (int64_t hi = positions; hi > 0; hi -= step) {
    const int64_t top = hi - 1 - int64_t(threadIdx.x);
    unsigned hits = 0;  // bit u: position top - u*blockDim is set (independent loads)
#pragma unroll
    for (int u = 0; u < kScanUnroll; ++u) {
      const int64_t t = top - int64_t(u) * blockDim.x;
      hits |= unsigned(t >= 0 && __ldg(row + t) != M(0)) << u;
    }
    const int64_t found = hits != 0 ? top - int64_t(__ffs(int(hits)) - 1) * blockDim.x : -1;
    if (__syncthreads_or(found >= 0)) return block_max(found, smem);  // uniform branch
  }
  return -1;
}

// Pooled position of row n, or -1 when the spec gives none in [0, positions) (the CPU rule).
// Block-uniform; every thread must call it (the mask scan synchronizes).
__device__ int64_t pooled_position(const PoolSpec& pool, int64_t n, int64_t positions, int64_t* smem) {
  int64_t pos;
  if (pool.mode == kPoolMask) {
    const int64_t offset = n * positions;
    switch (pool.mask_kind) {
      case kMaskBool:  // torch bool is one byte; test it as a byte
        pos = last_set_position(static_cast<const uint8_t*>(pool.mask) + offset, positions, smem);
        break;
      case kMaskInt32:
        pos = last_set_position(static_cast<const int32_t*>(pool.mask) + offset, positions, smem);
        break;
      default:
        pos = last_set_position(static_cast<const int64_t*>(pool.mask) + offset, positions, smem);
        break;
    }
  } else {
    pos = indexed_position(pool, n);
  }
  return valid_position(pos, positions);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
struct ForwardParams {
  HiddenArgs hidden;
  HeadArgs head;
  PoolSpec pool;
  int64_t pairs;         // kPairs: P (default pairs p, p + P)
  const float* margin;   // [P] or null (kPairs)
  float label_smoothing;
  float center_coef;
  float* rewards;        // [N, K]
  int64_t* pooled_pos;   // [N]
  float* loss;           // [P, K] (kPairs)
  float* pair_grad;      // [2, P, K] (kPairs)
};

// kPairs = false: block b pools row b.
// kPairs = true: block b < P pools rows b (chosen) and b + P (rejected) and writes loss and
// pair_grad of pair b; block P (odd N only) pools the last row 2P alone.
// Per head chunk of kHeadChunk heads: each thread accumulates its D-slice in fp32 registers
// (16-byte loads when kVec), then warp shuffles + one smem round reduce the block's sums.
// (Launch bounds with min 1 block/SM: the grid is small, and ptxas' default occupancy target
// spilled 4 bytes in the pair variants.)
template <typename H, typename W, bool kVec, bool kPairs>
__global__ void __launch_bounds__(kForwardThreads, 1) score_kernel(const ForwardParams p) {
  constexpr int kRows = kPairs ? 2 : 1;
  constexpr int kV = vec_width<H>();
  constexpr int kWarps = kForwardThreads / kWarp;
  __shared__ int64_t s_pos[kWarps];
  __shared__ float s_sum[kWarps][kRows * kHeadChunk];

  const HiddenArgs& hs = p.hidden;
  const int64_t heads = p.head.heads, dim = hs.dim;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;

  // Rows of this block (-1: none) and their pooled hidden rows (null: invalid row).
  int64_t row[kRows];
  const H* src[kRows];
  if constexpr (kPairs) {
    row[0] = b < p.pairs ? b : 2 * p.pairs;
    row[1] = b < p.pairs ? b + p.pairs : -1;
  } else {
    row[0] = b;
  }
  bool any_valid = false;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    int64_t pos = -1;
    if (row[r] >= 0) {  // block-uniform
      pos = pooled_position(p.pool, row[r], hs.positions, s_pos);
      if (threadIdx.x == 0) p.pooled_pos[row[r]] = pos;
    }
    src[r] = pos >= 0 ? static_cast<const H*>(hs.data) + row[r] * hs.stride_n + pos * hs.stride_t : nullptr;
    any_valid |= src[r] != nullptr;
  }

  const W* __restrict__ weight = static_cast<const W*>(p.head.weight);
  const W* __restrict__ bias = static_cast<const W*>(p.head.bias);
  for (int64_t k0 = 0; k0 < heads; k0 += kHeadChunk) {
    const int kc = int(min64(kHeadChunk, heads - k0));
    float acc[kRows][kHeadChunk];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j) acc[r][j] = 0.f;
    }

    if (any_valid) {
      if constexpr (kVec) {
        for (int64_t d = int64_t(threadIdx.x) * kV; d < dim; d += int64_t(kForwardThreads) * kV) {
          float h[kRows][kV];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            if (src[r] != nullptr) load_vec<kV>(src[r] + d, h[r]);
          }
#pragma unroll
          for (int j = 0; j < kHeadChunk; ++j) {
            if (j < kc) {
              float w[kV];
              load_vec<kV>(weight + (k0 + j) * dim + d, w);
#pragma unroll
              for (int r = 0; r < kRows; ++r) {
                if (src[r] == nullptr) continue;
#pragma unroll
                for (int i = 0; i < kV; ++i) acc[r][j] = fmaf(h[r][i], w[i], acc[r][j]);
              }
            }
          }
        }
      } else {
        for (int64_t d = threadIdx.x; d < dim; d += kForwardThreads) {
          float h[kRows];
#pragma unroll
          for (int r = 0; r < kRows; ++r) h[r] = src[r] != nullptr ? to_float(src[r][d]) : 0.f;
#pragma unroll
          for (int j = 0; j < kHeadChunk; ++j) {
            if (j < kc) {
              const float w = to_float(weight[(k0 + j) * dim + d]);
#pragma unroll
              for (int r = 0; r < kRows; ++r) acc[r][j] = fmaf(h[r], w, acc[r][j]);
            }
          }
        }
      }
    }

    // Block reduction: warp trees, then thread j < kc sums head j over warps in fixed order.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j) {
        const float s = warp_sum(acc[r][j]);
        if (lane == 0) s_sum[warp][r * kHeadChunk + j] = s;
      }
    }
    __syncthreads();
    if (int(threadIdx.x) < kc) {
      const int j = threadIdx.x;
      const int64_t k = k0 + j;
      float reward[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += s_sum[w][r * kHeadChunk + j];
        reward[r] = src[r] != nullptr ? s + (bias != nullptr ? to_float(bias[k]) : 0.f) : quiet_nan();
        if (row[r] >= 0) p.rewards[row[r] * heads + k] = reward[r];
      }
      if constexpr (kPairs) {
        if (b < p.pairs) {
          const float m = p.margin != nullptr ? p.margin[b] : 0.f;
          const PairLossResult res = bt_pair_loss(reward[0], reward[1], m, p.label_smoothing, p.center_coef);
          const int64_t i = b * heads + k;
          p.loss[i] = res.loss;
          p.pair_grad[i] = res.grad_chosen;
          p.pair_grad[p.pairs * heads + i] = res.grad_rejected;
        }
      }
    }
    __syncthreads();  // s_sum is rewritten by the next head chunk
  }
}

// Explicit pairs: one thread per (p, k). Out-of-range indices: NaN loss, zero pair_grad.
__global__ void __launch_bounds__(kReduceThreads)
    pair_loss_kernel(const float* __restrict__ rewards, int64_t rows, int64_t heads, int64_t pairs,
                     const int64_t* __restrict__ chosen, const int64_t* __restrict__ rejected,
                     const float* __restrict__ margin, float label_smoothing, float center_coef,
                     float* __restrict__ loss, float* __restrict__ pair_grad) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs * heads) return;
  const int64_t pair = i / heads, k = i % heads;
  const int64_t c = chosen[pair], r = rejected[pair];
  if (!(c >= 0 && c < rows && r >= 0 && r < rows)) {
    loss[i] = quiet_nan();
    pair_grad[i] = 0.f;
    pair_grad[pairs * heads + i] = 0.f;
    return;
  }
  const float m = margin != nullptr ? margin[pair] : 0.f;
  const PairLossResult res = bt_pair_loss(rewards[c * heads + k], rewards[r * heads + k], m, label_smoothing, center_coef);
  loss[i] = res.loss;
  pair_grad[i] = res.grad_chosen;
  pair_grad[pairs * heads + i] = res.grad_rejected;
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
struct BackwardParams {
  CoefArgs coef;
  HiddenArgs hidden;
  const void* weight;
  int64_t heads;
  const int64_t* pooled_pos;
  void* grad_hidden;      // null: skip the scatter
  int64_t grad_stride_n;  // T*D (padded) or 0 (packed); grad_hidden is contiguous
  float* partial;         // [row_blocks, K, D]
  float* bias_partial;    // [row_blocks, K]
  int64_t rows_per_block;
};

// coef[n, k]: grad_coef[n, k], or the CSR segment [seg_begin, seg_end) of row n summed in order
// (the CPU's order, so the coefficients are bitwise the CPU's).
__device__ __forceinline__ float row_coef(const CoefArgs& c, int64_t heads, int64_t n, int64_t seg_begin,
                                          int64_t seg_end, int64_t k) {
  if (c.row_ptr == nullptr) return c.grad_coef[n * heads + k];
  return csr_segment_sum(c.grad_coef, c.coef_rows, heads, c.row_entry, c.entries, seg_begin, seg_end, k);
}

// The kV columns of one thread within a D tile: kVec: kV consecutive columns (all in range or
// none, as D % kV == 0); scalar: columns first, first + threads, ... each checked against D.
template <bool kVec, int kV, typename T>
__device__ __forceinline__ void load_cols(const T* __restrict__ row, int64_t first, int64_t dim, float (&out)[kV]) {
  if constexpr (kVec) {
    load_vec<kV>(row + first, out);
  } else {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int64_t d = first + int64_t(i) * kBackwardThreads;
      out[i] = d < dim ? to_float(row[d]) : 0.f;
    }
  }
}

template <bool kVec, int kV, typename T>
__device__ __forceinline__ void store_cols(T* __restrict__ row, int64_t first, int64_t dim, const float (&in)[kV]) {
  if constexpr (kVec) {
    store_vec<kV>(row + first, in);
  } else {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int64_t d = first + int64_t(i) * kBackwardThreads;
      if (d < dim) from_float(in[i], row[d]);
    }
  }
}

// Block (x: row block, y: D tile of kBackwardThreads*kV columns). No shared memory, no sync:
// each thread owns kV columns of the tile for all rows of the row block.
//   scatter: grad_hidden[n, pos_n, cols] = sum_k coef[n, k] * weight[k, cols]  (k ascending)
//   partial[row_block, k, cols] = sum_n coef[n, k] * hidden[n, pos_n, cols]     (n ascending)
//   D tile 0, thread k (k < K, strided): bias_partial[row_block, k] = sum_n coef[n, k]
// (n over the rows with a valid pooled position). Every element of partial and bias_partial is
// written exactly once (zeros for a block with no valid row): neither needs initialization.
template <typename H, typename W, bool kVec>
__global__ void __launch_bounds__(kBackwardThreads) pool_backward_kernel(const BackwardParams p) {
  constexpr int kV = vec_width<H>();
  const HiddenArgs& hs = p.hidden;
  const int64_t heads = p.heads, dim = hs.dim;
  const int64_t n_begin = int64_t(blockIdx.x) * p.rows_per_block;
  const int64_t n_end = min64(hs.rows, n_begin + p.rows_per_block);
  const int64_t* __restrict__ row_ptr = p.coef.row_ptr;

  if (blockIdx.y == 0) {  // before the column check below: every thread of the block may hold a head
    for (int64_t k = threadIdx.x; k < heads; k += kBackwardThreads) {
      float sum = 0.f;
      for (int64_t n = n_begin; n < n_end; ++n) {
        if (valid_position(p.pooled_pos[n], hs.positions) < 0) continue;
        const int64_t seg_begin = row_ptr != nullptr ? row_ptr[n] : 0;
        const int64_t seg_end = row_ptr != nullptr ? row_ptr[n + 1] : 0;
        sum += row_coef(p.coef, heads, n, seg_begin, seg_end, k);
      }
      p.bias_partial[int64_t(blockIdx.x) * heads + k] = sum;
    }
  }

  const int64_t tile = int64_t(blockIdx.y) * kBackwardThreads * kV;
  const int64_t first = kVec ? tile + int64_t(threadIdx.x) * kV : tile + threadIdx.x;
  if (first >= dim) return;  // no column of this thread is in range

  const H* __restrict__ hidden = static_cast<const H*>(hs.data);
  const W* __restrict__ weight = static_cast<const W*>(p.weight);

  // Scatter of the pooled rows.
  if (p.grad_hidden != nullptr) {
    H* __restrict__ grad_hidden = static_cast<H*>(p.grad_hidden);
    for (int64_t n = n_begin; n < n_end; ++n) {
      const int64_t pos = valid_position(p.pooled_pos[n], hs.positions);
      if (pos < 0) continue;
      const int64_t seg_begin = row_ptr != nullptr ? row_ptr[n] : 0;
      const int64_t seg_end = row_ptr != nullptr ? row_ptr[n + 1] : 0;
      float acc[kV];
#pragma unroll
      for (int i = 0; i < kV; ++i) acc[i] = 0.f;
      for (int64_t k = 0; k < heads; ++k) {
        const float c = row_coef(p.coef, heads, n, seg_begin, seg_end, k);
        float w[kV];
        load_cols<kVec, kV>(weight + k * dim, first, dim, w);
#pragma unroll
        for (int i = 0; i < kV; ++i) acc[i] = fmaf(c, w[i], acc[i]);
      }
      store_cols<kVec, kV>(grad_hidden + n * p.grad_stride_n + pos * dim, first, dim, acc);
    }
  }

  // Partial weight gradient of this row block, kHeadChunk heads per pass over its rows.
  float* __restrict__ partial = p.partial + int64_t(blockIdx.x) * heads * dim;
  for (int64_t k0 = 0; k0 < heads; k0 += kHeadChunk) {
    const int kc = int(min64(kHeadChunk, heads - k0));
    float acc[kHeadChunk][kV];
#pragma unroll
    for (int j = 0; j < kHeadChunk; ++j) {
#pragma unroll
      for (int i = 0; i < kV; ++i) acc[j][i] = 0.f;
    }
    for (int64_t n = n_begin; n < n_end; ++n) {
      const int64_t pos = valid_position(p.pooled_pos[n], hs.positions);
      if (pos < 0) continue;
      const int64_t seg_begin = row_ptr != nullptr ? row_ptr[n] : 0;
      const int64_t seg_end = row_ptr != nullptr ? row_ptr[n + 1] : 0;
      float h[kV];
      load_cols<kVec, kV>(hidden + n * hs.stride_n + pos * hs.stride_t, first, dim, h);
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j) {
        if (j < kc) {
          const float c = row_coef(p.coef, heads, n, seg_begin, seg_end, k0 + j);
#pragma unroll
          for (int i = 0; i < kV; ++i) acc[j][i] = fmaf(c, h[i], acc[j][i]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kHeadChunk; ++j) {
      if (j < kc) store_cols<kVec, kV>(partial + (k0 + j) * dim, first, dim, acc[j]);
    }
  }
}

// Sums over row blocks b = 0, 1, ... in that order: grad_weight[i] = sum_b partial[b, i] (i <
// size = K*D, cast to W), then grad_bias[k] = sum_b bias_partial[b, k] (k < K).
template <typename W>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_partials_kernel(const float* __restrict__ partial, const float* __restrict__ bias_partial,
                           int64_t row_blocks, int64_t size, int64_t heads, W* __restrict__ grad_weight,
                           float* __restrict__ grad_bias) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < size + heads;
       i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    if (i < size) {
      for (int64_t b = 0; b < row_blocks; ++b) s += partial[b * size + i];
      from_float(s, grad_weight[i]);
    } else {
      const int64_t k = i - size;
      for (int64_t b = 0; b < row_blocks; ++b) s += bias_partial[b * heads + k];
      grad_bias[k] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Tag {
  using type = T;
};

// fn(Tag<hidden_t>, Tag<weight_t>) for the 5 supported (hidden, weight) dtype pairs.
template <typename F>
cudaError_t dispatch_types(DType hidden, bool weight_f32, F&& fn) {
  switch (hidden) {
    case DType::kFloat32:
      return fn(Tag<float>{}, Tag<float>{});
    case DType::kBFloat16:
      return weight_f32 ? fn(Tag<__nv_bfloat16>{}, Tag<float>{}) : fn(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
    case DType::kFloat16:
      return weight_f32 ? fn(Tag<__half>{}, Tag<float>{}) : fn(Tag<__half>{}, Tag<__half>{});
  }
  return cudaErrorInvalidValue;
}

// One score_kernel launch over `blocks` blocks (rows, or pairs when kPairs).
template <bool kPairs>
cudaError_t launch_score(const ForwardParams& params, int64_t blocks, cudaStream_t stream) {
  if (blocks <= 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  return dispatch_types(params.hidden.dtype, params.head.weight_f32, [&](auto h, auto w) {
    using H = typename decltype(h)::type;
    using W = typename decltype(w)::type;
    const dim3 grid{unsigned(blocks)};
    if (can_vectorize(params.hidden, vec_width<H>(), params.head.weight)) {
      score_kernel<H, W, true, kPairs><<<grid, kForwardThreads, 0, stream>>>(params);
    } else {
      score_kernel<H, W, false, kPairs><<<grid, kForwardThreads, 0, stream>>>(params);
    }
    return cudaGetLastError();
  });
}

ForwardParams forward_params(const HiddenArgs& hidden, const HeadArgs& head, const PoolSpec& pool, float* rewards,
                             int64_t* pooled_pos) {
  ForwardParams p{};
  p.hidden = hidden;
  p.head = head;
  p.pool = pool;
  p.rewards = rewards;
  p.pooled_pos = pooled_pos;
  return p;
}

struct BackwardPlan {
  int64_t rows_per_block;
  int64_t row_blocks;
};

// Row blocks: ~rows/4 for parallelism, capped at 256 and by the scratch budget (large K*D).
BackwardPlan backward_plan(int64_t rows, int64_t heads, int64_t dim) {
  if (rows <= 0) return {1, 0};
  int64_t blocks = min64(ceil_div(rows, kMinRowsPerBlock), kMaxRowBlocks);
  blocks = max64(1, min64(blocks, kScratchBudgetFloats / max64(1, heads * dim)));
  const int64_t rows_per_block = ceil_div(rows, blocks);
  return {rows_per_block, ceil_div(rows, rows_per_block)};
}

}  // namespace

cudaError_t launch_pool_forward(const HiddenArgs& hidden, const HeadArgs& head, const PoolSpec& pool,
                                float* rewards, int64_t* pooled_pos, cudaStream_t stream) {
  return launch_score<false>(forward_params(hidden, head, pool, rewards, pooled_pos), hidden.rows, stream);
}

cudaError_t launch_bt_forward(const HiddenArgs& hidden, const HeadArgs& head, const PoolSpec& pool,
                              const int64_t* chosen, const int64_t* rejected, const float* margin, int64_t pairs,
                              float label_smoothing, float center_coef, float* rewards, int64_t* pooled_pos,
                              float* loss, float* pair_grad, cudaStream_t stream) {
  ForwardParams p = forward_params(hidden, head, pool, rewards, pooled_pos);
  p.margin = margin;
  p.label_smoothing = label_smoothing;
  p.center_coef = center_coef;
  p.loss = loss;
  p.pair_grad = pair_grad;
  if (chosen == nullptr || rejected == nullptr) {
    // Default pairs (p, p + P), P = N / 2; one extra block pools the last row of an odd N.
    p.pairs = hidden.rows / 2;
    return launch_score<true>(p, p.pairs + (hidden.rows % 2), stream);
  }
  const cudaError_t err = launch_score<false>(p, hidden.rows, stream);
  if (err != cudaSuccess) return err;
  const int64_t total = pairs * head.heads;
  if (total <= 0) return cudaSuccess;
  const int64_t blocks = ceil_div(total, kReduceThreads);
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  pair_loss_kernel<<<unsigned(blocks), kReduceThreads, 0, stream>>>(rewards, hidden.rows, head.heads, pairs, chosen,
                                                                    rejected, margin, label_smoothing, center_coef,
                                                                    loss, pair_grad);
  return cudaGetLastError();
}

int64_t pool_backward_scratch_floats(int64_t rows, int64_t heads, int64_t dim) {
  return backward_plan(rows, heads, dim).row_blocks * (heads * dim + heads);
}

cudaError_t launch_pool_backward(const CoefArgs& coef, const HiddenArgs& hidden, const HeadArgs& head,
                                 const int64_t* pooled_pos, void* grad_hidden, int64_t grad_stride_n, float* scratch,
                                 void* grad_weight, float* grad_bias, cudaStream_t stream) {
  const BackwardPlan plan = backward_plan(hidden.rows, head.heads, hidden.dim);
  const int64_t size = head.heads * hidden.dim;
  BackwardParams p{};
  p.coef = coef;
  p.hidden = hidden;
  p.weight = head.weight;
  p.heads = head.heads;
  p.pooled_pos = pooled_pos;
  p.grad_hidden = grad_hidden;
  p.grad_stride_n = grad_stride_n;
  p.partial = scratch;  // weight partials first: their rows keep scratch's alignment
  p.bias_partial = scratch + plan.row_blocks * size;
  p.rows_per_block = plan.rows_per_block;
  return dispatch_types(hidden.dtype, head.weight_f32, [&](auto h, auto w) {
    using H = typename decltype(h)::type;
    using W = typename decltype(w)::type;
    // 1) scatter + partial weight and bias gradients (one D tile at least: the bias needs one).
    if (plan.row_blocks > 0) {
      const int64_t tiles = max64(1, ceil_div(hidden.dim, int64_t(kBackwardThreads) * vec_width<H>()));
      if (tiles > 65535) return cudaErrorInvalidConfiguration;
      const dim3 grid(unsigned(plan.row_blocks), unsigned(tiles));
      // grad_hidden rows (n*grad_stride_n + pos*D) and partial rows (K*D multiples) keep the
      // base alignment when D % width == 0, which can_vectorize requires.
      constexpr int kV = vec_width<H>();
      if (can_vectorize(hidden, kV, head.weight) && grad_stride_n % kV == 0 && aligned(grad_hidden, 16) &&
          aligned(scratch, 16)) {
        pool_backward_kernel<H, W, true><<<grid, kBackwardThreads, 0, stream>>>(p);
      } else {
        pool_backward_kernel<H, W, false><<<grid, kBackwardThreads, 0, stream>>>(p);
      }
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    // 2) fixed-order reduction over row blocks (zeros when there is no row).
    if (size + head.heads > 0) {
      const int64_t blocks = min64(ceil_div(size + head.heads, kReduceThreads), int64_t(1) << 16);
      reduce_partials_kernel<W><<<unsigned(blocks), kReduceThreads, 0, stream>>>(
          p.partial, p.bias_partial, plan.row_blocks, size, head.heads, static_cast<W*>(grad_weight), grad_bias);
    }
    return cudaGetLastError();
  });
}

}  // namespace gpu
}  // namespace prefkernels
