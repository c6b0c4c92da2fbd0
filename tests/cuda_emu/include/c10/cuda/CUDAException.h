// tests/cuda_emu stand-in: an emulated CUDA call reports failure like C10_CUDA_CHECK.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulated CUDA call failed: " #expr)
