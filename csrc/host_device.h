// PK_HOST_DEVICE marks the small functions shared by the CPU and CUDA kernels: host and device
// code under nvcc, plain inline functions in the C++ build. No PyTorch headers.
#pragma once

#if defined(__CUDACC__)
#define PK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PK_HOST_DEVICE inline
#endif
