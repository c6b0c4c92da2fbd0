// CUDA kernels of the fused last-token pooling + reward head + Bradley-Terry op.
//
// Forward (reads only the N pooled rows, never the whole hidden tensor), ONE launch:
//   score_kernel         one block per pooled row: find the pooled token (block-parallel mask
//                        scan or index) and compute K fp32 dot products with the head. Default
//                        pairs: one block per pair (rows p and p + P, their mask scans
//                        together) that also writes the pair's loss and gradient coefficients.
//                        Explicit pairs: a block per row, then a block per pair that pools its two
//                        rows again (the same code, so the same rewards) rather than wait for
//                        theirs.
// Backward, ONE launch of either kernel (plan_pool_backward picks; PREFKERNELS_GRAD_FILL overrides):
//   pool_backward_fill_kernel  (padded hidden, 16-byte rows; no memset before it) blocks 0 ..
//                        tiles-1 reduce one D tile each over all rows, as the one-row-block case
//                        below; the other blocks write grad_hidden whole, a warp per [D] row:
//                        zeros, then the pooled rows' gradients over theirs.
//   pool_backward_kernel (grad_hidden and the tile tickets zeroed by the caller)
//                        grid (row blocks of 32 rows, D tiles of 32 x 16 bytes): the block first
//                        stages its rows' pooled positions and coefficients in shared memory (a
//                        thread per row, every row's loads in flight at once), then each of its
//                        8 warps takes 4 rows at a time, hidden loads in flight together;
//                        it scatters the pooled rows of grad_hidden and writes the row block's
//                        partial weight gradient [K, D-tile] (fp32; the warps' sums added in
//                        order in shared memory); the blocks of D tile 0 also its partial bias
//                        gradient [K]. The last block of each D tile to finish (an atomic ticket)
//                        sums the partials of every row block (its warps over row blocks, then
//                        in order) -> grad_weight in weight's dtype and grad_bias.
// Explicit pairs' entries by row, ONE launch of one block:
//   rows_csr_kernel      counts the entries of each row (integer atomics), turns the counts into
//                        row_ptr, then warp 0 places the entries in entry order, 32 at a time.
// Determinism: no floating-point atomics; every sum runs in an order fixed by the launch shape,
// so two runs give bitwise equal results.
#include "bt_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include "../bt_math.h"

// kernel<<<grid, block, 0, stream>>>, as a macro that tests/cuda_emu redefines to run the kernels
// on CPU fibers; `kernel` is a plain name (a function pointer for a template instantiation).
#ifndef PK_LAUNCH
#define PK_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#endif

namespace prefkernels {
namespace gpu {
namespace {

constexpr int kWarp = 32;
constexpr int kForwardThreads = 256;
constexpr int kBackwardThreads = 256;
constexpr int kBackwardWarps = kBackwardThreads / kWarp;
constexpr int kRowsPerPass = 4;  // backward: rows of one warp whose loads are in flight together
constexpr int kHeadChunk = 4;    // heads accumulated in registers per pass over D
constexpr int kScanUnroll = 4;   // mask positions each thread tests per scan step

// Backward planning: row blocks of kBackwardWarps * kRowsPerPass = 32 rows (every warp's loads
// in one pass), at most 256 row blocks (then more rows each), scratch <= 16M floats.
constexpr int64_t kRowsPerBlock = int64_t(kBackwardWarps) * kRowsPerPass;
constexpr int64_t kMaxRowBlocks = 256;
constexpr int64_t kScratchBudgetFloats = int64_t(16) << 20;
// Fill kernel (pool_backward_fill_kernel): grad bytes per fill block, and, for GradFill::kAuto,
// the grad bytes it takes per pass of its one-row-block reduction (a pass of 32 rows x 4 heads,
// a dependent load of about 2 us under the fill's traffic) for that reduction to take at most
// half of the fill's time at 3 TB/s; and the most grad bytes it takes: on an H200 it writes about
// 4.2 TB/s against the memset's 4.5, 22 ps a byte more, while it saves the memset path's backward
// kernel and a launch, about 17 us, so the two cross near 750 MiB (measured: the fill kernel
// 12 and 8 us ahead at 256 and 512 MiB, 5 and 7 us behind at 1 GiB).
constexpr int64_t kFillBlockBytes = int64_t(64) << 10;
constexpr int64_t kFillBytesPerPass = int64_t(12) << 20;
constexpr int64_t kFillMaxBytes = int64_t(768) << 20;

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

// One weak 16-byte store (st.global.v4.b32: STG.E.128 in the SASS), as PyTorch's fills and
// Triton's stores are. An aggregate assignment may be split by nvcc into 4-byte stores, and
// __stwb (st.global.wb) is a strong store (STG.E.128.STRONG.SM). Volatile, so a lane's stores to
// one address keep their order (the fill kernel's zeros, then a pooled row's gradient).
__device__ __forceinline__ void store_16_bytes(uint4* p, uint4 v) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
#else
  *p = v;  // the host pass and tests/cuda_emu
#endif
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  constexpr int kPerWord = int(4 / sizeof(T));
  static_assert(N % (4 * kPerWord) == 0, "whole 16-byte accesses only");
#pragma unroll
  for (int q = 0; q < N / (4 * kPerWord); ++q) {
    const float* i = in + q * 4 * kPerWord;
    store_16_bytes(reinterpret_cast<uint4*>(p) + q, make_uint4(pack_word<T>(i), pack_word<T>(i + kPerWord),
                                                               pack_word<T>(i + 2 * kPerWord),
                                                               pack_word<T>(i + 3 * kPerWord)));
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
// pos[r] = last t with rows[r][t] != 0, or -1 (also for rows[r] null), the kRows rows scanned
// together so that their loads are in flight at once. Steps of blockDim*kScanUnroll positions
// from the end: in a step thread i tests hi-1-i, hi-1-i-blockDim, ... of each row not yet found
// (coalesced; its first hit is its largest), and a row is found at the first step where any
// thread hit (usually the first: the pooled token sits near the end of left-padded rows; right
// padding costs (T - length) / 1024 steps).
template <int kRows, typename M>
__device__ void last_set_positions(const M* const (&rows)[kRows], int64_t positions, int64_t* smem,
                                   int64_t (&pos)[kRows]) {
  const int64_t step = int64_t(blockDim.x) * kScanUnroll;
  bool open[kRows];  // block-uniform: row r still to find
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    pos[r] = -1;
    open[r] = rows[r] != nullptr;
  }
  for (int64_t hi = positions; hi > 0; hi -= step) {
    const int64_t top = hi - 1 - int64_t(threadIdx.x);
    unsigned hits[kRows];  // bit u: position top - u*blockDim of row r is set (independent loads)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      hits[r] = 0;
#pragma unroll
      for (int u = 0; u < kScanUnroll; ++u) {
        const int64_t t = top - int64_t(u) * blockDim.x;
        hits[r] |= unsigned(open[r] && t >= 0 && __ldg(rows[r] + t) != M(0)) << u;
      }
    }
    bool any_open = false;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (!open[r]) continue;  // uniform branch
      const int64_t found = hits[r] != 0 ? top - int64_t(__ffs(int(hits[r])) - 1) * blockDim.x : -1;
      if (__syncthreads_or(found >= 0)) {
        pos[r] = block_max(found, smem);
        open[r] = false;
      }
      any_open |= open[r];
    }
    if (!any_open) return;
  }
}

// last_set_positions of the rows n[r] (-1: none) of an [N, positions] mask of element type M.
template <int kRows, typename M>
__device__ void scan_mask_rows(const void* mask, const int64_t (&n)[kRows], int64_t positions, int64_t* smem,
                               int64_t (&pos)[kRows]) {
  const M* rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) rows[r] = n[r] >= 0 ? static_cast<const M*>(mask) + n[r] * positions : nullptr;
  last_set_positions<kRows, M>(rows, positions, smem, pos);
}

// pos[r] = pooled position of row n[r], or -1 (no row: n[r] < 0, or the spec gives none in
// [0, positions), the CPU rule); the rows' mask scans run together. Block-uniform; every thread
// must call it (the mask scan synchronizes).
template <int kRows>
__device__ void pooled_positions(const PoolSpec& pool, const int64_t (&n)[kRows], int64_t positions, int64_t* smem,
                                 int64_t (&pos)[kRows]) {
  if (pool.mode == kPoolMask) {
    switch (pool.mask_kind) {
      case kMaskBool:  // torch bool is one byte; test it as a byte
        scan_mask_rows<kRows, uint8_t>(pool.mask, n, positions, smem, pos);
        break;
      case kMaskInt32:
        scan_mask_rows<kRows, int32_t>(pool.mask, n, positions, smem, pos);
        break;
      default:
        scan_mask_rows<kRows, int64_t>(pool.mask, n, positions, smem, pos);
        break;
    }
  } else {
#pragma unroll
    for (int r = 0; r < kRows; ++r) pos[r] = n[r] >= 0 ? indexed_position(pool, n[r]) : -1;
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) pos[r] = valid_position(pos[r], positions);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
// What the blocks of one score_kernel launch do (see the kernel).
enum class Pairs : int { kNone = 0, kDefault = 1, kExplicit = 2 };

struct ForwardParams {
  HiddenArgs hidden;
  HeadArgs head;
  PoolSpec pool;
  int64_t pairs;             // P (default pairs p, p + P; or explicit)
  const int64_t* chosen;     // [P] (explicit pairs)
  const int64_t* rejected;   // [P] (explicit pairs)
  const float* margin;       // [P] or null
  float label_smoothing;
  float center_coef;
  float* rewards;            // [N, K]
  int64_t* pooled_pos;       // [N]
  float* loss;               // [P, K] (pairs)
  float* pair_grad;          // [2, P, K] (pairs)
};

// kNone: block b pools row b.
// kDefault: block b < P pools rows b (chosen) and b + P (rejected) and writes their rewards and
// the loss and pair_grad of pair b; block P (odd N only) pools the last row 2P alone.
// kExplicit: block b < N pools row b; block N + q pools rows chosen[q] and rejected[q] again and
// writes only pair q's loss and pair_grad (NaN and 0 when an index is outside [0, N)). Both
// compute a row's rewards with the same code, so the pair's loss uses the rewards written.
// Per head chunk of kHeadChunk heads: each thread accumulates its D-slice in fp32 registers
// (16-byte loads when kVec), then warp shuffles + one smem round reduce the block's sums.
// (Launch bounds with min 1 block/SM: the grid is small, and ptxas' default occupancy target
// spilled 4 bytes in the pair variants.)
template <typename H, typename W, bool kVec, Pairs kPairs>
__global__ void __launch_bounds__(kForwardThreads, 1) score_kernel(const ForwardParams p) {
  constexpr int kRows = kPairs == Pairs::kNone ? 1 : 2;
  constexpr int kV = vec_width<H>();
  constexpr int kWarps = kForwardThreads / kWarp;
  __shared__ int64_t s_pos[kWarps];
  __shared__ float s_sum[kWarps][kRows * kHeadChunk];

  const HiddenArgs& hs = p.hidden;
  const int64_t heads = p.head.heads, dim = hs.dim;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;

  // Rows of this block (-1: none), its pair (-1: none), and the rows' pooled hidden rows (null:
  // invalid row). Explicit pair blocks do not write the rows' rewards and positions: the rows'
  // own blocks do.
  int64_t row[kRows];
  const H* src[kRows];
  int64_t pair = -1;
  bool writes_rows = true;
  if constexpr (kPairs == Pairs::kDefault) {
    row[0] = b < p.pairs ? b : 2 * p.pairs;
    row[1] = b < p.pairs ? b + p.pairs : -1;
    pair = b < p.pairs ? b : -1;
  } else if constexpr (kPairs == Pairs::kExplicit) {
    row[0] = b < hs.rows ? b : -1;
    row[1] = -1;
    if (b >= hs.rows) {
      pair = b - hs.rows;
      writes_rows = false;
      const int64_t c = p.chosen[pair], r = p.rejected[pair];
      if (!(c >= 0 && c < hs.rows && r >= 0 && r < hs.rows)) {  // block-uniform: no sync below
        for (int64_t k = threadIdx.x; k < heads; k += kForwardThreads) {
          p.loss[pair * heads + k] = quiet_nan();
          p.pair_grad[pair * heads + k] = 0.f;
          p.pair_grad[(p.pairs + pair) * heads + k] = 0.f;
        }
        return;
      }
      row[0] = c;
      row[1] = r;
    }
  } else {
    row[0] = b;
  }
  int64_t pos[kRows];
  pooled_positions(p.pool, row, hs.positions, s_pos, pos);
  bool any_valid = false;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (writes_rows && row[r] >= 0 && threadIdx.x == 0) p.pooled_pos[row[r]] = pos[r];
    src[r] = pos[r] >= 0 ? static_cast<const H*>(hs.data) + row[r] * hs.stride_n + pos[r] * hs.stride_t : nullptr;
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
        if (writes_rows && row[r] >= 0) p.rewards[row[r] * heads + k] = reward[r];
      }
      if constexpr (kPairs != Pairs::kNone) {
        if (pair >= 0) {
          const float m = p.margin != nullptr ? p.margin[pair] : 0.f;
          const PairLossResult res = bt_pair_loss(reward[0], reward[1], m, p.label_smoothing, p.center_coef);
          const int64_t i = pair * heads + k;
          p.loss[i] = res.loss;
          p.pair_grad[i] = res.grad_chosen;
          p.pair_grad[p.pairs * heads + i] = res.grad_rejected;
        }
      }
    }
    __syncthreads();  // s_sum is rewritten by the next head chunk
  }
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
  void* grad_hidden;      // null: not wanted (no scatter, no fill)
  int64_t grad_stride_n;  // T*D (padded) or 0 (packed); grad_hidden is contiguous
  void* grad_weight;      // [K, D] in weight's dtype
  float* grad_bias;       // [K]
  float* partial;         // [row_blocks, K, D]
  float* bias_partial;    // [row_blocks, K]
  unsigned* tile_done;    // [D tiles], zeroed: row blocks of the tile that have written their partials
  int64_t rows_per_block;
  int64_t tiles;          // D tiles
  int64_t fill_rows;      // pool_backward_fill_kernel: grad_hidden rows per fill block
};

// The kV columns of one lane within a D tile of kWarp * kV columns, as offsets in the tile:
// kVec: kV consecutive columns from lane * kV (all in range or none, as D % kV == 0); scalar:
// lane, lane + 32, ... each checked against D.
template <bool kVec, int kV>
__device__ __forceinline__ int tile_col(int lane, int i) {
  return kVec ? lane * kV + i : lane + i * kWarp;
}

template <bool kVec, int kV, typename T>
__device__ __forceinline__ void load_lane_cols(const T* __restrict__ row, int64_t tile, int lane, int64_t dim,
                                               float (&out)[kV]) {
  if constexpr (kVec) {
    const int64_t first = tile + tile_col<kVec, kV>(lane, 0);
    if (first < dim) {
      load_vec<kV>(row + first, out);
    } else {
#pragma unroll
      for (int i = 0; i < kV; ++i) out[i] = 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int64_t d = tile + tile_col<kVec, kV>(lane, i);
      out[i] = d < dim ? to_float(row[d]) : 0.f;
    }
  }
}

// load_lane_cols for the fp32 partials other blocks wrote: through L2 (ld.global.cg), never a
// stale L1 line and never the read-only path.
template <bool kVec, int kV>
__device__ __forceinline__ void load_partial_lane_cols(const float* row, int64_t tile, int lane, int64_t dim,
                                                       float (&out)[kV]) {
  if constexpr (kVec) {
    const int64_t first = tile + tile_col<kVec, kV>(lane, 0);
#pragma unroll
    for (int q = 0; q < kV / 4; ++q) {
      const float4 v =
          first < dim ? __ldcg(reinterpret_cast<const float4*>(row + first) + q) : float4{0.f, 0.f, 0.f, 0.f};
      out[4 * q] = v.x;
      out[4 * q + 1] = v.y;
      out[4 * q + 2] = v.z;
      out[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int64_t d = tile + tile_col<kVec, kV>(lane, i);
      out[i] = d < dim ? __ldcg(row + d) : 0.f;
    }
  }
}

template <bool kVec, int kV, typename T>
__device__ __forceinline__ void store_lane_cols(T* __restrict__ row, int64_t tile, int lane, int64_t dim,
                                                const float (&in)[kV]) {
  if constexpr (kVec) {
    const int64_t first = tile + tile_col<kVec, kV>(lane, 0);
    if (first < dim) store_vec<kV>(row + first, in);
  } else {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int64_t d = tile + tile_col<kVec, kV>(lane, i);
      if (d < dim) from_float(in[i], row[d]);
    }
  }
}

// kRows pooled rows: their indices (-1: no row, past the row block), pooled positions (-1: no row
// or invalid) and CSR segments.
template <int kRows>
struct RowSet {
  int64_t n[kRows];
  int64_t pos[kRows];
  int64_t seg_begin[kRows];
  int64_t seg_end[kRows];
};
using PassRows = RowSet<kRowsPerPass>;

// Row i of a RowSet: row n (-1: none) with pooled position pos, and its CSR segment when the row
// has one. The segment's loads do not wait for pos: it may come from a load still in flight.
template <int kRows>
__device__ __forceinline__ void set_row(const BackwardParams& p, RowSet<kRows>& r, int i, int64_t n, int64_t pos) {
  r.n[i] = n;
  r.pos[i] = pos;
  const bool csr = p.coef.row_ptr != nullptr && n >= 0;
  r.seg_begin[i] = csr ? p.coef.row_ptr[n] : 0;
  r.seg_end[i] = csr ? p.coef.row_ptr[n + 1] : 0;
}

// kRowsPerPass rows first, first + stride, ... (those from n_end on: none), loaded together.
__device__ __forceinline__ PassRows pass_rows(const BackwardParams& p, int64_t first, int64_t stride, int64_t n_end) {
  PassRows r;
#pragma unroll
  for (int i = 0; i < kRowsPerPass; ++i) {
    const int64_t n = first + int64_t(i) * stride;
    set_row(p, r, i, n < n_end ? n : -1, n < n_end ? valid_position(p.pooled_pos[n], p.hidden.positions) : -1);
  }
  return r;
}

// coef[i][j], j < kc: row i's coefficient of head k0 + j (0 for a row without a valid position):
// entry_coef of entry n_i, or the sum of entry_coef over the row's CSR segment in segment order
// (csr_segment_sum's bounds; the CPU's functions in the CPU's order, so bitwise the CPU's). The
// rows walk their segments together, an entry of each row per step: a step's loads (row_entry,
// then grad_coef and the loss's gradient) are in flight for all the rows at once, rather than a
// chain of dependent loads per entry, row after row.
template <int kRows>
__device__ __forceinline__ void rows_coefs(const BackwardParams& p, const RowSet<kRows>& r, int64_t k0, int kc,
                                           float (&coef)[kRows][kHeadChunk]) {
  const CoefArgs& c = p.coef;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int j = 0; j < kHeadChunk; ++j) coef[i][j] = 0.f;
  }
  if (c.row_ptr == nullptr) {  // loaded for every row, then kept where pos is valid: no wait for pos
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (r.n[i] < 0) continue;
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j) {
        if (j >= kc) continue;
        const float e = entry_coef(c.grad_coef, c.loss, p.heads, r.n[i], k0 + j);
        coef[i][j] = r.pos[i] < 0 ? 0.f : e;
      }
    }
    return;
  }
  int64_t begin[kRows], end[kRows], steps = 0;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    begin[i] = max64(r.seg_begin[i], 0);
    end[i] = r.pos[i] < 0 ? begin[i] : min64(r.seg_end[i], c.entries);
    steps = max64(steps, end[i] - begin[i]);
  }
  for (int64_t s = 0; s < steps; ++s) {
    int64_t e[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) e[i] = begin[i] + s < end[i] ? c.row_entry[begin[i] + s] : -1;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (e[i] < 0 || e[i] >= c.coef_rows) continue;
#pragma unroll
      for (int j = 0; j < kHeadChunk; ++j) {
        if (j < kc) coef[i][j] += entry_coef(c.grad_coef, c.loss, p.heads, e[i], k0 + j);
      }
    }
  }
}

// The rows of one stage of a row block: row first + i's pooled position (-1: none or invalid) and
// coefficients of heads k0 .. k0 + kc - 1 (rows_coefs; 0 for j >= kc), written by thread i, so that
// every row's loads (pooled_pos, its CSR segment, grad_coef) are in flight at once and the warps'
// passes over the stage read them from shared memory.
constexpr int kStageRows = kBackwardThreads;
struct StagedRows {
  int64_t pos[kStageRows];
  float coef[kHeadChunk][kStageRows];
};

__device__ __forceinline__ void stage_rows(const BackwardParams& p, int64_t first, int64_t end, int64_t k0, int kc,
                                           StagedRows& s) {
  const int i = int(threadIdx.x);
  const int64_t n = first + i;
  RowSet<1> row;
  set_row(p, row, 0, n < end ? n : -1, n < end ? valid_position(p.pooled_pos[n], p.hidden.positions) : -1);
  float coef[1][kHeadChunk];
  rows_coefs(p, row, k0, kc, coef);
  s.pos[i] = row.pos[0];
#pragma unroll
  for (int j = 0; j < kHeadChunk; ++j) s.coef[j][i] = coef[0][j];
}

// The lane's kV columns of D tile `tile` of each valid row's gradient, grad[i] = sum_k coef[n_i, k]
// * weight[k, cols] (k ascending, one weight load per head for all the rows): the scatter's
// values, and the fill kernel's for its pooled rows (so both write the same bits).
template <bool kVec, int kV, typename W, int kRows>
__device__ __forceinline__ void pooled_row_grads(const BackwardParams& p, const RowSet<kRows>& r, int64_t tile,
                                                 int lane, float (&grad)[kRows][kV]) {
  const W* __restrict__ weight = static_cast<const W*>(p.weight);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int v = 0; v < kV; ++v) grad[i][v] = 0.f;
  }
  for (int64_t k0 = 0; k0 < p.heads; k0 += kHeadChunk) {
    const int kc = int(min64(kHeadChunk, p.heads - k0));
    float coef[kRows][kHeadChunk];
    rows_coefs(p, r, k0, kc, coef);
#pragma unroll
    for (int j = 0; j < kHeadChunk; ++j) {
      if (j >= kc) continue;
      float w[kV];
      load_lane_cols<kVec, kV>(weight + (k0 + j) * p.hidden.dim, tile, lane, p.hidden.dim, w);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (r.pos[i] < 0) continue;
#pragma unroll
        for (int v = 0; v < kV; ++v) grad[i][v] = fmaf(coef[i][j], w[v], grad[i][v]);
      }
    }
  }
}

// One block of the backward's reduction: row block `row_block` (of `row_blocks`) x D tile
// `tile_index` (kWarp * kV columns), kBackwardWarps warps, kHeadChunk heads at a time. The block
// stages up to kStageRows rows at once (stage_rows: a thread per row, so every row's coefficient
// loads are in flight together), then warp w takes the staged rows w, w + kBackwardWarps, ...,
// kRowsPerPass at a time with their hidden loads in flight together, and each lane kV columns
// of the tile:
//   partial[row_block, k, cols] = sum_n coef[n, k] * hidden[n, pos_n, cols]: each warp's rows in
//     ascending order, then the warps' sums added warp 0 first (shared memory)
//   scatter (when asked): grad_hidden[n, pos_n, cols] = sum_k coef[n, k] * weight[k, cols]
//     (k ascending): in the same passes when the heads are one chunk, else in passes of their own
//     (pooled_row_grads over every chunk)
//   D tile 0: bias_partial[row_block, k] = sum_n coef[n, k] (warp j head k0 + j: lanes over the
//     staged rows, then a fixed shuffle tree)
// (n over the rows with a valid pooled position). Every element of partial and bias_partial is
// written exactly once (zeros for a block with no valid row): neither needs initialization.
// With a single row block (N <= 32) those sums are the gradients: the block writes grad_weight
// and grad_bias directly and stops. Otherwise it takes a ticket of its D tile
// (threadfence-reduction pattern: the partial stores are fenced before the ticket); the block
// that takes the last one sums the tile's partials: warp w the row blocks w, w + kBackwardWarps,
// ... in ascending order, then the warps' sums warp 0 first, into grad_weight (and, tile 0,
// grad_bias). Every order is fixed by the launch shape: two runs give bitwise equal results.
template <typename H, typename W, bool kVec>
__device__ __forceinline__ void reduce_row_block(const BackwardParams& p, int64_t row_block, int64_t tile_index,
                                                 int64_t row_blocks, bool scatter) {
  constexpr int kV = vec_width<H>();
  constexpr int kTileCols = kWarp * kV;
  __shared__ float s_red[kBackwardWarps][kHeadChunk][kTileCols];  // each warp's sums, then added in order
  __shared__ StagedRows s_rows;
  __shared__ bool s_last;
  const HiddenArgs& hs = p.hidden;
  const int64_t heads = p.heads, dim = hs.dim;
  const int warp = int(threadIdx.x) / kWarp, lane = int(threadIdx.x) % kWarp;
  const int64_t n_begin = row_block * p.rows_per_block;
  const int64_t n_end = min64(hs.rows, n_begin + p.rows_per_block);
  const int64_t tile = tile_index * kTileCols;
  const H* __restrict__ hidden = static_cast<const H*>(hs.data);
  H* __restrict__ grad_hidden = static_cast<H*>(p.grad_hidden);
  const W* __restrict__ weight = static_cast<const W*>(p.weight);
  W* __restrict__ grad_weight = static_cast<W*>(p.grad_weight);
  const bool one_block = row_blocks == 1;  // one row block: its sums are the gradients, no partials
  const bool scatter_in_passes = scatter && heads <= kHeadChunk;

  // Scatter of the pooled rows over several head chunks.
  if (scatter && !scatter_in_passes) {
    const int64_t pass_step = int64_t(kBackwardWarps) * kRowsPerPass;
    for (int64_t first = n_begin + warp; first < n_end; first += pass_step) {
      const PassRows r = pass_rows(p, first, kBackwardWarps, n_end);
      float acc[kRowsPerPass][kV];
      pooled_row_grads<kVec, kV, W>(p, r, tile, lane, acc);
#pragma unroll
      for (int i = 0; i < kRowsPerPass; ++i) {
        if (r.pos[i] < 0) continue;
        store_lane_cols<kVec, kV>(grad_hidden + r.n[i] * p.grad_stride_n + r.pos[i] * dim, tile, lane, dim, acc[i]);
      }
    }
  }

  // Partial weight and bias gradients of this row block (and the one-chunk scatter).
  float* __restrict__ partial = p.partial + row_block * heads * dim;
  for (int64_t k0 = 0; k0 < heads; k0 += kHeadChunk) {
    const int kc = int(min64(kHeadChunk, heads - k0));
    float head_w[kHeadChunk][kV];  // the scatter's weights
#pragma unroll
    for (int j = 0; j < kHeadChunk; ++j) {
      if (scatter_in_passes && j < kc) load_lane_cols<kVec, kV>(weight + (k0 + j) * dim, tile, lane, dim, head_w[j]);
    }
    float acc[kHeadChunk][kV] = {};
    float bias = 0.f;  // tile 0, warp j < kc: head k0 + j over the lane's rows in ascending order
    for (int64_t first = n_begin; first < n_end; first += kStageRows) {
      const int staged = int(min64(kStageRows, n_end - first));
      __syncthreads();  // every warp is done with the previous stage
      stage_rows(p, first, n_end, k0, kc, s_rows);
      __syncthreads();
      if (tile_index == 0 && warp < kc) {
        for (int i = lane; i < staged; i += kWarp) {
          if (s_rows.pos[i] >= 0) bias += s_rows.coef[warp][i];
        }
      }
      for (int row0 = warp; row0 < staged; row0 += kBackwardWarps * kRowsPerPass) {
        int64_t pos[kRowsPerPass];
        float h[kRowsPerPass][kV];
#pragma unroll
        for (int i = 0; i < kRowsPerPass; ++i) {
          const int row = row0 + i * kBackwardWarps;
          pos[i] = row < staged ? s_rows.pos[row] : -1;
          if (pos[i] >= 0) {
            const H* __restrict__ src = hidden + (first + row) * hs.stride_n + pos[i] * hs.stride_t;
            load_lane_cols<kVec, kV>(src, tile, lane, dim, h[i]);
          } else {
#pragma unroll
            for (int v = 0; v < kV; ++v) h[i][v] = 0.f;
          }
        }
#pragma unroll
        for (int i = 0; i < kRowsPerPass; ++i) {
          if (pos[i] < 0) continue;
          const int row = row0 + i * kBackwardWarps;
          float grad[kV] = {};
#pragma unroll
          for (int j = 0; j < kHeadChunk; ++j) {
            if (j >= kc) continue;
            const float coef = s_rows.coef[j][row];
#pragma unroll
            for (int v = 0; v < kV; ++v) {
              acc[j][v] = fmaf(coef, h[i][v], acc[j][v]);
              if (scatter_in_passes) grad[v] = fmaf(coef, head_w[j][v], grad[v]);
            }
          }
          if (scatter_in_passes) {
            H* __restrict__ dst = grad_hidden + (first + row) * p.grad_stride_n + pos[i] * dim;
            store_lane_cols<kVec, kV>(dst, tile, lane, dim, grad);
          }
        }
      }
    }
    if (tile_index == 0 && warp < kc) {  // warp-uniform: the whole warp shuffles
      bias = warp_sum(bias);
      if (lane == 0) (one_block ? p.grad_bias[k0 + warp] : p.bias_partial[row_block * heads + k0 + warp]) = bias;
    }
#pragma unroll
    for (int j = 0; j < kHeadChunk; ++j) {
#pragma unroll
      for (int v = 0; v < kV; ++v) s_red[warp][j][tile_col<kVec, kV>(lane, v)] = acc[j][v];
    }
    __syncthreads();
    for (int idx = int(threadIdx.x); idx < kc * kTileCols; idx += kBackwardThreads) {
      const int j = idx / kTileCols, c = idx % kTileCols;
      if (tile + c >= dim) continue;
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kBackwardWarps; ++w) sum += s_red[w][j][c];
      if (one_block) {
        from_float(sum, grad_weight[(k0 + j) * dim + tile + c]);
      } else {
        partial[(k0 + j) * dim + tile + c] = sum;
      }
    }
    __syncthreads();  // s_red is rewritten by the next head chunk
  }
  if (one_block) return;

  // Ticket of this D tile; the last block of the tile sums every row block's partials.
  __threadfence();  // release: this thread's partial stores, before the ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned ticket = atomicAdd(p.tile_done + tile_index, 1u);
    __threadfence();  // acquire: the other blocks' partials, before the block reads them
    s_last = ticket == row_blocks - 1;
  }
  __syncthreads();
  if (!s_last) return;
  if (tile_index == 0) {
    for (int64_t k0 = 0; k0 < heads; k0 += kWarp) {  // lanes over heads
      const int64_t k = k0 + lane;
      float sum = 0.f;
      for (int64_t b = warp; k < heads && b < row_blocks; b += kBackwardWarps) {
        sum += __ldcg(p.bias_partial + b * heads + k);
      }
      s_red[warp][0][lane] = sum;
      __syncthreads();
      if (threadIdx.x < kWarp && k0 + threadIdx.x < heads) {
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < kBackwardWarps; ++w) total += s_red[w][0][threadIdx.x];
        p.grad_bias[k0 + threadIdx.x] = total;
      }
      __syncthreads();
    }
  }
  for (int64_t k = 0; k < heads; ++k) {
    float acc[kV] = {};
    for (int64_t b = warp; b < row_blocks; b += kBackwardWarps) {
      float part[kV];
      load_partial_lane_cols<kVec, kV>(p.partial + (b * heads + k) * dim, tile, lane, dim, part);
#pragma unroll
      for (int v = 0; v < kV; ++v) acc[v] += part[v];
    }
#pragma unroll
    for (int v = 0; v < kV; ++v) s_red[warp][0][tile_col<kVec, kV>(lane, v)] = acc[v];
    __syncthreads();
    for (int c = int(threadIdx.x); c < kTileCols; c += kBackwardThreads) {
      if (tile + c >= dim) continue;
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kBackwardWarps; ++w) total += s_red[w][0][c];
      from_float(total, grad_weight[k * dim + tile + c]);
    }
    __syncthreads();  // s_red is rewritten by the next head
  }
}

// Rows [fill_block * fill_rows, ...) of grad_hidden viewed as [N * T, D] rows (padded layout,
// contiguous; 16-byte vectors), warp w the rows first + w, first + w + kBackwardWarps, ...: every
// row gets zeros, and row (n, t) where t is row n's valid pooled position then gets its gradient
// over them (pooled_row_grads, as the scatter; each lane rewrites the columns it zeroed, so its
// own stores keep their order). So no zero waits on the load of pooled_pos[n]: the load is in
// flight while the zeros go out. Every element of grad_hidden is written over the fill blocks
// (the N pooled rows twice): the buffer needs no clearing.
template <typename H, typename W>
__device__ __forceinline__ void fill_grad_rows(const BackwardParams& p, int64_t fill_block) {
  constexpr int kV = vec_width<H>();
  constexpr int kTileCols = kWarp * kV;
  const HiddenArgs& hs = p.hidden;
  const int64_t dim = hs.dim, positions = hs.positions;
  const int warp = int(threadIdx.x) / kWarp, lane = int(threadIdx.x) % kWarp;
  const int64_t first = fill_block * p.fill_rows;
  const int64_t end = min64(hs.rows * positions, first + p.fill_rows);
  H* __restrict__ grad_hidden = static_cast<H*>(p.grad_hidden);
  for (int64_t r = first + warp; r < end; r += kBackwardWarps) {
    const int64_t n = r / positions, t = r - n * positions;
    H* __restrict__ row = grad_hidden + r * dim;
    const int64_t pooled_pos = p.pooled_pos[n];  // first used after the zeros
    const float zeros[kV] = {};
#pragma unroll 4
    for (int64_t tile = 0; tile < dim; tile += kTileCols) store_lane_cols<true, kV>(row, tile, lane, dim, zeros);
    if (valid_position(pooled_pos, positions) != t) continue;
    RowSet<1> pooled;
    set_row(p, pooled, 0, n, t);
    for (int64_t tile = 0; tile < dim; tile += kTileCols) {
      float grad[1][kV];
      pooled_row_grads<true, kV, W>(p, pooled, tile, lane, grad);
      store_lane_cols<true, kV>(row, tile, lane, dim, grad[0]);
    }
  }
}

// Grid (row blocks, D tiles): grad_hidden zeroed by the caller (or null), then scattered.
template <typename H, typename W, bool kVec>
__global__ void __launch_bounds__(kBackwardThreads, 1) pool_backward_kernel(const BackwardParams p) {
  reduce_row_block<H, W, kVec>(p, blockIdx.x, blockIdx.y, gridDim.x, p.grad_hidden != nullptr);
}

// Grid p.tiles + fill blocks, one row block (no partials, no tickets): blocks b < p.tiles reduce D
// tile b over every row, the others write the whole of grad_hidden (fill_grad_rows), so no memset
// precedes the launch and the small reduction runs alongside the fill's writes.
template <typename H, typename W>
__global__ void __launch_bounds__(kBackwardThreads, 2) pool_backward_fill_kernel(const BackwardParams p) {
  if (blockIdx.x < p.tiles) {
    reduce_row_block<H, W, true>(p, 0, blockIdx.x, 1, false);
  } else {
    fill_grad_rows<H, W>(p, int64_t(blockIdx.x) - p.tiles);
  }
}

// ---------------------------------------------------------------------------------------------
// Pair entries grouped by row (rows_csr)
// ---------------------------------------------------------------------------------------------
constexpr int kCsrThreads = 256;
constexpr int kCsrUnroll = 4;                // placement: chunks of 32 entries whose rows load together
constexpr int64_t kCsrSharedBuckets = 8192;  // bucket counters in shared memory up to this many

struct CsrParams {
  const int64_t* chosen;    // [P]
  const int64_t* rejected;  // [P]
  int64_t pairs;
  int64_t rows;
  int* counters;            // [rows + 2] when they do not fit in shared memory
  int64_t* row_ptr;         // [rows + 1]
  int64_t* row_entry;       // [2P]
};

__device__ __forceinline__ int64_t entry_bucket(const CsrParams& p, int64_t e) {
  return csr_bucket(e < p.pairs ? __ldg(p.chosen + e) : __ldg(p.rejected + e - p.pairs), p.rows);
}

// The sum of v over the block's threads before this one (blockDim.x == kCsrThreads; every thread
// calls it). smem: a slot per warp.
__device__ __forceinline__ int block_exclusive_sum(int v, int* smem) {
  const int lane = int(threadIdx.x) % kWarp, warp = int(threadIdx.x) / kWarp;
  int inclusive = v;
#pragma unroll
  for (int off = 1; off < kWarp; off <<= 1) {
    const int below = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += below;
  }
  if (lane == kWarp - 1) smem[warp] = inclusive;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += smem[w];
  __syncthreads();  // smem may be reused right after
  return before + inclusive - v;
}

// One block. The entries of each csr_bucket are counted (exact: integer atomics); thread t turns
// its run of consecutive buckets into their first slots (the block's exclusive sum of the runs'
// counts, then the run in order), row_ptr[n] being bucket n + 1's. Then warp 0 places the entries
// in entry order, 32 at a time: the lanes of one bucket (__match_any_sync) take consecutive slots
// in lane order from the bucket's cursor, which their lowest lane advances. So each row lists its
// entries in ascending order, the order of a stable sort by row, whatever order the counting ran.
__global__ void __launch_bounds__(kCsrThreads) rows_csr_kernel(const CsrParams p) {
  __shared__ int s_counters[kCsrSharedBuckets];
  __shared__ int s_warp[kCsrThreads / kWarp];
  const int64_t buckets = p.rows + 2, entries = 2 * p.pairs;
  int* counters = buckets <= kCsrSharedBuckets ? s_counters : p.counters;
  for (int64_t b = threadIdx.x; b < buckets; b += kCsrThreads) counters[b] = 0;
  __syncthreads();
  for (int64_t e = threadIdx.x; e < entries; e += kCsrThreads) atomicAdd(counters + entry_bucket(p, e), 1);
  __syncthreads();
  const int64_t run = ceil_div(buckets, kCsrThreads);
  const int64_t lo = min64(buckets, int64_t(threadIdx.x) * run), hi = min64(buckets, lo + run);
  int count = 0;
  for (int64_t b = lo; b < hi; ++b) count += counters[b];
  int slot = block_exclusive_sum(count, s_warp);
  for (int64_t b = lo; b < hi; ++b) {
    const int c = counters[b];
    counters[b] = slot;
    slot += c;
  }
  __syncthreads();
  for (int64_t n = threadIdx.x; n <= p.rows; n += kCsrThreads) p.row_ptr[n] = counters[n + 1];
  __syncthreads();  // from here the counters are warp 0's cursors
  if (threadIdx.x >= kWarp) return;
  const int lane = int(threadIdx.x);
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t first = 0; first < entries; first += int64_t(kWarp) * kCsrUnroll) {
    int64_t bucket[kCsrUnroll];  // -1: past the last entry
#pragma unroll
    for (int u = 0; u < kCsrUnroll; ++u) {
      const int64_t e = first + u * kWarp + lane;
      bucket[u] = e < entries ? entry_bucket(p, e) : -1;
    }
#pragma unroll
    for (int u = 0; u < kCsrUnroll; ++u) {
      const unsigned peers = __match_any_sync(0xffffffffu, bucket[u]);
      const int leader = __ffs(int(peers)) - 1;
      int base = lane == leader && bucket[u] >= 0 ? counters[bucket[u]] : 0;
      base = __shfl_sync(0xffffffffu, base, leader);
      if (bucket[u] >= 0) {
        p.row_entry[base + __popc(peers & lanes_below)] = first + u * kWarp + lane;
        if (lane == leader) counters[bucket[u]] = base + __popc(peers);
      }
      __syncwarp();  // the cursor's update before the next chunk reads it
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

// One score_kernel launch over `blocks` blocks (see the kernel for what each block does).
template <Pairs kPairs>
cudaError_t launch_score(const ForwardParams& params, int64_t blocks, cudaStream_t stream) {
  if (blocks <= 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  return dispatch_types(params.hidden.dtype, params.head.weight_f32, [&](auto h, auto w) {
    using H = typename decltype(h)::type;
    using W = typename decltype(w)::type;
    const dim3 grid{unsigned(blocks)};
    const auto kernel = can_vectorize(params.hidden, vec_width<H>(), params.head.weight)
                            ? &score_kernel<H, W, true, kPairs>
                            : &score_kernel<H, W, false, kPairs>;
    PK_LAUNCH(kernel, grid, kForwardThreads, stream)(params);
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

}  // namespace

cudaError_t launch_pool_forward(const HiddenArgs& hidden, const HeadArgs& head, const PoolSpec& pool,
                                float* rewards, int64_t* pooled_pos, cudaStream_t stream) {
  return launch_score<Pairs::kNone>(forward_params(hidden, head, pool, rewards, pooled_pos), hidden.rows, stream);
}

cudaError_t launch_bt_forward(const HiddenArgs& hidden, const HeadArgs& head, const PoolSpec& pool,
                              bool explicit_pairs, const int64_t* chosen, const int64_t* rejected, const float* margin,
                              int64_t pairs, float label_smoothing, float center_coef, float* rewards,
                              int64_t* pooled_pos, float* loss, float* pair_grad, cudaStream_t stream) {
  ForwardParams p = forward_params(hidden, head, pool, rewards, pooled_pos);
  p.margin = margin;
  p.label_smoothing = label_smoothing;
  p.center_coef = center_coef;
  p.loss = loss;
  p.pair_grad = pair_grad;
  if (!explicit_pairs) {
    // Default pairs (p, p + P), P = N / 2; one extra block pools the last row of an odd N.
    p.pairs = hidden.rows / 2;
    return launch_score<Pairs::kDefault>(p, p.pairs + (hidden.rows % 2), stream);
  }
  p.pairs = pairs;
  p.chosen = chosen;
  p.rejected = rejected;
  return launch_score<Pairs::kExplicit>(p, hidden.rows + pairs, stream);
}

PoolBackwardPlan plan_pool_backward(const HiddenArgs& hidden, const HeadArgs& head, bool grad_hidden,
                                    int64_t grad_stride_n, GradFill fill) {
  PoolBackwardPlan plan{};
  const int64_t rows = hidden.rows, heads = head.heads, dim = hidden.dim;
  const int64_t width = hidden.dtype == DType::kFloat32 ? vec_width<float>() : vec_width<__half>();
  plan.tiles = max64(1, ceil_div(dim, int64_t(kWarp) * width));  // >= 1: the bias needs one
  if (rows <= 0) return plan;
  // The fill kernel: padded grad_hidden of 16-byte vectors, and (auto) its bytes at least
  // kFillBytesPerPass per pass of the one-row-block reduction beside it and at most kFillMaxBytes.
  const int64_t grad_rows = rows * hidden.positions, row_bytes = dim * (width == 4 ? 4 : 2);
  const int64_t grad_bytes = grad_rows * row_bytes;
  const int64_t passes = ceil_div(rows, kRowsPerBlock) * ceil_div(heads, kHeadChunk);
  const bool fillable = grad_hidden && grad_rows > 0 && grad_stride_n == hidden.positions * dim &&
                        can_vectorize(hidden, int(width), head.weight);
  const bool fill_pays = grad_bytes >= passes * kFillBytesPerPass && grad_bytes <= kFillMaxBytes;
  if (fillable && (fill == GradFill::kKernel || (fill == GradFill::kAuto && fill_pays))) {
    plan.rows_per_block = rows;
    plan.row_blocks = 1;
    plan.fill_rows = max64(kBackwardWarps, ceil_div(kFillBlockBytes, row_bytes));
    return plan;
  }
  // Row blocks of 32 rows, capped at 256 and by the scratch budget (large K*D).
  int64_t blocks = min64(ceil_div(rows, kRowsPerBlock), kMaxRowBlocks);
  blocks = max64(1, min64(blocks, kScratchBudgetFloats / max64(1, heads * dim)));
  plan.rows_per_block = ceil_div(rows, blocks);
  plan.row_blocks = ceil_div(rows, plan.rows_per_block);
  if (plan.row_blocks > 1) {
    plan.scratch_floats = plan.row_blocks * (heads * dim + heads);
    plan.tickets = plan.tiles;
  }
  return plan;
}

cudaError_t launch_pool_backward(const PoolBackwardPlan& plan, const CoefArgs& coef, const HiddenArgs& hidden,
                                 const HeadArgs& head, const int64_t* pooled_pos, void* grad_hidden,
                                 int64_t grad_stride_n, float* scratch, unsigned* tile_done, void* grad_weight,
                                 float* grad_bias, cudaStream_t stream) {
  const int64_t size = head.heads * hidden.dim;
  if (plan.row_blocks == 0) {  // no row: zero gradients (zero bits are 0.0 in every float type)
    const size_t weight_bytes = size_t(size) * (head.weight_f32 || hidden.dtype == DType::kFloat32 ? 4 : 2);
    const cudaError_t err = cudaMemsetAsync(grad_weight, 0, weight_bytes, stream);
    if (err != cudaSuccess) return err;
    return cudaMemsetAsync(grad_bias, 0, size_t(head.heads) * sizeof(float), stream);
  }
  BackwardParams p{};
  p.coef = coef;
  p.hidden = hidden;
  p.weight = head.weight;
  p.heads = head.heads;
  p.pooled_pos = pooled_pos;
  p.grad_hidden = grad_hidden;
  p.grad_stride_n = grad_stride_n;
  p.grad_weight = grad_weight;
  p.grad_bias = grad_bias;
  p.partial = scratch;  // weight partials first: their rows keep scratch's alignment
  p.bias_partial = scratch + plan.row_blocks * size;
  p.tile_done = tile_done;
  p.rows_per_block = plan.rows_per_block;
  p.tiles = plan.tiles;
  p.fill_rows = plan.fill_rows;
  return dispatch_types(hidden.dtype, head.weight_f32, [&](auto h, auto w) {
    using H = typename decltype(h)::type;
    using W = typename decltype(w)::type;
    constexpr int kV = vec_width<H>();
    if (plan.fill_rows > 0) {
      const int64_t blocks = plan.tiles + ceil_div(hidden.rows * hidden.positions, plan.fill_rows);
      if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
      if (!aligned(grad_hidden, 16)) return cudaErrorInvalidValue;  // the plan's vectors need it
      const auto kernel = &pool_backward_fill_kernel<H, W>;
      PK_LAUNCH(kernel, unsigned(blocks), kBackwardThreads, stream)(p);
      return cudaGetLastError();
    }
    if (plan.tiles > 65535 || plan.row_blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    const dim3 grid(unsigned(plan.row_blocks), unsigned(plan.tiles));
    // grad_hidden rows (n*grad_stride_n + pos*D) and partial rows (K*D multiples) keep the base
    // alignment when D % width == 0, which can_vectorize requires (grad_weight is written by
    // element).
    const bool vec = can_vectorize(hidden, kV, head.weight) && grad_stride_n % kV == 0 &&
                     aligned(grad_hidden, 16) && aligned(scratch, 16);
    const auto kernel = vec ? &pool_backward_kernel<H, W, true> : &pool_backward_kernel<H, W, false>;
    PK_LAUNCH(kernel, grid, kBackwardThreads, stream)(p);
    return cudaGetLastError();
  });
}

int64_t rows_csr_scratch_ints(int64_t rows) { return rows + 2 > kCsrSharedBuckets ? rows + 2 : 0; }

cudaError_t launch_rows_csr(const int64_t* chosen, const int64_t* rejected, int64_t pairs, int64_t rows, int* counters,
                            int64_t* row_ptr, int64_t* row_entry, cudaStream_t stream) {
  if (pairs >= kCsrMaxPairs) return cudaErrorInvalidValue;  // 2P slots must fit int32
  const CsrParams p{chosen, rejected, pairs, rows, counters, row_ptr, row_entry};
  PK_LAUNCH(rows_csr_kernel, 1, kCsrThreads, stream)(p);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace prefkernels
