// csrc/cuda built for the CPU: the kernels (bt_kernels.cu), their glue (bt_cuda.cpp) and the op
// schemas (ops.cpp), compiled as plain C++ against cuda_emu.h, under the op namespace
// prefkernels_emu and the CPU dispatch key. torch.ops.prefkernels_emu.* on CPU tensors thus run
// the CUDA code as written, each launch on pk_emu's fibers (tests/test_cuda_emulated.py).
#include <torch/extension.h>

#include <cstring>

#include "cuda_emu.h"

cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) {
  std::memset(dst, value, bytes);
  return cudaSuccess;
}

// After every system header: rename the op namespace (and the C++ one with it), register the
// "CUDA" implementations for CPU tensors.
#define prefkernels prefkernels_emu
#define is_cuda is_cpu
#define CUDA CPU
#include "../../csrc/ops.cpp"
#include "../../csrc/cuda/bt_kernels.cu"
#include "../../csrc/cuda/bt_cuda.cpp"
