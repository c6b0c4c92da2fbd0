// A CPU emulation of the few CUDA device features csrc/cuda uses, so the real kernels and their
// glue run in a test process without a GPU. Each CUDA thread of a block is a fiber (a stack of
// its own) on the calling OS thread; the blocks of a grid run one after another, the fibers of a
// block in turn (first to last, or last to first) until each reaches a barrier (__syncthreads, a
// warp shuffle), which releases when every thread of the block (warp) still running has reached
// it. Memory is the host's: "device" pointers are CPU tensors' pointers. What this cannot show:
// timing, races the emulation orders away, the weak memory model (fences are no-ops here),
// register or shared-memory limits.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#undef __shared__
#define __shared__ static  // one copy per kernel instantiation: the blocks run one at a time
#define __launch_bounds__(...)

namespace pk_emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = size_t(128) << 10;

// Fiber switch: on x86-64 a few instructions that save the callee-saved registers on the
// current stack and swap stack pointers (swapcontext would also make a signal-mask system call
// per switch, which dominated the tests' time); elsewhere ucontext's swapcontext.
#if defined(__x86_64__)
extern "C" void pk_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl pk_emu_switch
  .type pk_emu_switch, @function
pk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pk_emu_switch, .-pk_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
inline void start_context(Context& c, std::vector<char>& stack, void (*entry)()) {
  // entry's frame as pk_emu_switch's `ret` leaves it: the return address at a 16-byte boundary
  // (so rsp % 16 == 8 inside entry, as after a call), six zeroed registers below it.
  auto top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<void**>(top - 16);
  *slot = reinterpret_cast<void*>(entry);
  for (int r = 1; r <= 6; ++r) slot[-r] = nullptr;
  c.sp = slot - 6;
}
inline void switch_context(Context& from, Context& to) { pk_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void start_context(Context& c, std::vector<char>& stack, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack.data();
  c.uc.uc_stack.ss_size = stack.size();
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

enum class Wait : int { kNone, kBlock, kWarp };

struct Fiber {
  Context context;
  std::vector<char> stack = std::vector<char>(kStackBytes);
  bool done = false;
  Wait wait = Wait::kNone;
};

struct BlockState {
  std::vector<Fiber> fibers;
  Context scheduler;
  int current = 0;
  int block_or = 0, block_or_result = 0;     // __syncthreads_or
  std::vector<uint64_t> lanes;               // warp shuffles: each thread's value, by thread index
  bool reverse = false;                      // run the threads last to first between barriers
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
};

inline BlockState& state() {
  static BlockState s;
  return s;
}

// What the emulated device has run: kernel launches and memsets (the tests count them).
struct Counts {
  int64_t launches = 0;
  int64_t memsets = 0;
};

inline Counts& counts() {
  static Counts c;
  return c;
}

}  // namespace pk_emu

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace pk_emu {

inline void wait_at(Wait kind) {
  BlockState& s = state();
  s.fibers[s.current].wait = kind;
  switch_context(s.fibers[s.current].context, s.scheduler);
}

inline void fiber_entry() {
  BlockState& s = state();
  s.body(s.arg);
  s.fibers[s.current].done = true;
  switch_context(s.fibers[s.current].context, s.scheduler);
  std::abort();  // a finished fiber is never resumed
}

// Runs body(arg) as every thread of one block; returns when all have returned.
inline void run_block(void (*body)(void*), void* arg) {
  BlockState& s = state();
  const int threads = int(blockDim.x * blockDim.y * blockDim.z);
  s.fibers.resize(threads);
  s.lanes.assign(threads, 0);
  s.body = body;
  s.arg = arg;
  for (Fiber& f : s.fibers) {
    f.done = false;
    f.wait = Wait::kNone;
    start_context(f.context, f.stack, fiber_entry);
  }
  for (;;) {
    bool ran = false;
    for (int i = 0; i < threads; ++i) {
      const int t = s.reverse ? threads - 1 - i : i;
      Fiber& f = s.fibers[t];
      if (f.done || f.wait != Wait::kNone) continue;
      s.current = t;
      threadIdx = uint3{unsigned(t) % blockDim.x, 0, 0};
      switch_context(s.scheduler, f.context);
      ran = true;
    }
    if (ran) continue;
    bool any_left = false, released = false;
    for (int w0 = 0; w0 < threads; w0 += kWarpSize) {  // a warp whose running threads all wait at a shuffle
      bool all = true, any = false;
      for (int t = w0; t < w0 + kWarpSize && t < threads; ++t) {
        if (s.fibers[t].done) continue;
        any = true;
        all = all && s.fibers[t].wait == Wait::kWarp;
      }
      if (any && all) {
        for (int t = w0; t < w0 + kWarpSize && t < threads; ++t) s.fibers[t].wait = Wait::kNone;
        released = true;
      }
    }
    if (released) continue;
    bool all_block = true;
    for (const Fiber& f : s.fibers) {
      if (f.done) continue;
      any_left = true;
      all_block = all_block && f.wait == Wait::kBlock;
    }
    if (!any_left) return;
    if (!all_block) {
      std::fprintf(stderr, "pk_emu: deadlock: the threads of a block wait at different barriers\n");
      std::abort();
    }
    s.block_or_result = s.block_or;
    s.block_or = 0;
    for (Fiber& f : s.fibers) f.wait = Wait::kNone;
  }
}

template <typename Kernel, typename Params>
struct BlockCall {
  Kernel kernel;
  const Params* params;
  static void run(void* self) {
    auto* call = static_cast<BlockCall*>(self);
    call->kernel(*call->params);
  }
};

// kernel<<<grid, block, 0, stream>>>(params), block after block.
template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  template <typename Params>
  void operator()(const Params& params) const {
    ++counts().launches;
    blockDim = block;
    gridDim = grid;
    BlockCall<Kernel, Params> call{kernel, &params};
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = uint3{x, y, z};
          run_block(&BlockCall<Kernel, Params>::run, &call);
        }
  }
};

template <typename Kernel>
Launch<Kernel> launch(Kernel kernel, dim3 grid, dim3 block) {
  return {kernel, grid, block};
}

}  // namespace pk_emu

#define PK_LAUNCH(kernel, grid, block, stream) pk_emu::launch(kernel, dim3(grid), dim3(block))

inline void __syncthreads() { pk_emu::wait_at(pk_emu::Wait::kBlock); }

inline int __syncthreads_or(int predicate) {
  pk_emu::state().block_or |= predicate != 0;
  pk_emu::wait_at(pk_emu::Wait::kBlock);
  return pk_emu::state().block_or_result;
}

namespace pk_emu {
// A warp-wide exchange, every lane of the warp taking part: each lane publishes v, then
// read(lane_value, lane, lanes_in_warp) computes its result from the published values
// (lane_value(l): lane l's v).
template <typename T, typename Read>
auto warp_exchange(T v, Read read) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "exchange of a value wider than 8 bytes");
  BlockState& s = state();
  const int t = s.current, lane = t % kWarpSize, first = t - lane;
  const int width = std::min(kWarpSize, int(s.lanes.size()) - first);
  s.lanes[t] = 0;
  std::memcpy(&s.lanes[t], &v, sizeof(T));
  wait_at(Wait::kWarp);
  const auto lane_value = [&](int l) {
    T out;
    std::memcpy(&out, &s.lanes[first + l], sizeof(T));
    return out;
  };
  const auto out = read(lane_value, lane, width);
  wait_at(Wait::kWarp);  // every lane has read before the slots are rewritten
  return out;
}
}  // namespace pk_emu

// Lane l gets v of lane l + offset (its own v past the warp's end).
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned offset) {
  return pk_emu::warp_exchange(v, [&](auto lane_value, int lane, int width) {
    return lane + int(offset) < width ? lane_value(lane + int(offset)) : v;
  });
}

// Lane l gets v of lane l - offset (its own v for l < offset).
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned offset) {
  return pk_emu::warp_exchange(v, [&](auto lane_value, int lane, int) {
    return lane >= int(offset) ? lane_value(lane - int(offset)) : v;
  });
}

// Every lane gets v of lane src.
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return pk_emu::warp_exchange(v, [&](auto lane_value, int, int) { return lane_value(src % pk_emu::kWarpSize); });
}

// The lanes whose v equals this lane's, as a bit mask.
template <typename T>
unsigned __match_any_sync(unsigned, T v) {
  return pk_emu::warp_exchange(v, [&](auto lane_value, int, int width) {
    unsigned peers = 0;
    for (int l = 0; l < width; ++l) peers |= unsigned(lane_value(l) == v) << l;
    return peers;
  });
}

inline void __syncwarp() { pk_emu::warp_exchange(0, [](auto, int, int) { return 0; }); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}

inline void __threadfence() {}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T __ldg(const T* p) { return *p; }
template <typename T>
T __ldcg(const T* p) { return *p; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
