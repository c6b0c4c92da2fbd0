// csrc/cuda built for the CPU: the kernels (bt_kernels.cu), their glue (bt_cuda.cpp) and the op
// schemas (ops.cpp), compiled as plain C++ against cuda_emu.h, under the op namespace
// prefkernels_emu and the CPU dispatch key. torch.ops.prefkernels_emu.* on CPU tensors thus run
// the CUDA code as written, each launch on pk_emu's fibers (tests/test_cuda_emulated.py).
#include <torch/extension.h>

#include <cstring>

#include "cuda_emu.h"

// The CUDA runtime calls of csrc/cuda, renamed to the emulation's (a definition under the real
// names could be interposed by a CUDA runtime another loaded library brings).
namespace pk_emu {
inline cudaError_t get_last_error() { return cudaSuccess; }
inline cudaError_t memset_async(void* dst, int value, size_t bytes, cudaStream_t) {
  ++counts().memsets;
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
}  // namespace pk_emu
#define cudaGetLastError pk_emu::get_last_error
#define cudaMemsetAsync pk_emu::memset_async

// prefkernels_emu::device_work() -> [kernel launches, memsets] since the process started;
// prefkernels_emu::run_threads_in_reverse(bool): between two barriers, run a block's threads last
// to first (a missing barrier then shows for the reader and writer in the other order).
TORCH_LIBRARY_FRAGMENT(prefkernels_emu, m) {
  m.def("device_work() -> int[]", [] {
    return std::vector<int64_t>{pk_emu::counts().launches, pk_emu::counts().memsets};
  });
  m.def("run_threads_in_reverse(bool reverse) -> ()", [](bool reverse) { pk_emu::state().reverse = reverse; });
}

// After every system header: rename the op namespace (and the C++ one with it), register the
// "CUDA" implementations for CPU tensors.
#define prefkernels prefkernels_emu
#define is_cuda is_cpu
#define CUDA CPU
#include "../../csrc/ops.cpp"
#include "../../csrc/cuda/bt_kernels.cu"
#include "../../csrc/cuda/bt_cuda.cpp"

// prefkernels_emu::fill_rows_of_plan(rows, positions, dim, heads, fp32, fill) -> int: the
// backward plan's fill_rows (0: the memset path) for padded [rows, positions, dim] hidden with
// 16-byte aligned rows, at sizes too large to allocate in a test (the pointers are never read).
TORCH_LIBRARY_FRAGMENT(prefkernels, m) {
  m.def("fill_rows_of_plan(int rows, int positions, int dim, int heads, bool fp32, int fill) -> int",
        [](int64_t rows, int64_t positions, int64_t dim, int64_t heads, bool fp32, int64_t fill) {
          alignas(16) static const char aligned[16] = {};
          prefkernels::gpu::HiddenArgs hidden{};
          hidden.rows = rows;
          hidden.positions = positions;
          hidden.dim = dim;
          hidden.stride_t = dim;
          hidden.stride_n = positions * dim;
          hidden.data = aligned;
          hidden.dtype = fp32 ? prefkernels::gpu::DType::kFloat32 : prefkernels::gpu::DType::kBFloat16;
          prefkernels::gpu::HeadArgs head{aligned, nullptr, true, heads};
          return prefkernels::gpu::plan_pool_backward(hidden, head, true, positions * dim,
                                                      static_cast<prefkernels::gpu::GradFill>(fill))
              .fill_rows;
        });
}
