// The CUDA emulator's scheduler and host API (see include/cuda_runtime.h). Fibers switch with a
// hand-written x86-64 routine (ucontext elsewhere): swapcontext makes a signal-mask syscall per
// switch, and the attention kernels switch a few times per shuffle.
#include <cuda_runtime.h>

#include <sys/mman.h>

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SK_ASAN 1
#else
#define SK_ASAN 0
#endif

// SK_EMU_UCONTEXT forces the portable switch (to test it on x86-64)
#if defined(__x86_64__) && !defined(SK_EMU_UCONTEXT)
#define SK_ASM_SWITCH 1
#else
#define SK_ASM_SWITCH 0
#include <ucontext.h>
#endif

namespace sk_emu {

Fiber* g_cur = nullptr;
dim3 g_grid, g_block;

namespace {
constexpr size_t kStack = SK_ASAN ? (512u << 10) : (128u << 10);
constexpr int kSms = 132, kSmemOptin = 227 * 1024, kSmemPerSm = 228 * 1024;

struct Warp {
  int arrived = 0, kind = 0, line = 0, size = 0, members = 0;  // members: lanes not exited
  unsigned mask = 0;
  uint64_t gen = 0;
  uint64_t post[32] = {}, result[32] = {}, ballot = 0;
};
}  // namespace

struct Block {
  dim3 idx;
  int nthreads = 0, arrived = 0, alive = 0, line = 0;
  int64_t count = 0, counted = 0;  // __syncthreads_count: running, and of the last completed barrier
  uint64_t gen = 0;
  std::vector<Warp> warps;
  unsigned char* smem = nullptr;
};

namespace {
std::vector<Fiber> g_fibers;
std::vector<char*> g_stacks;
#if SK_ASM_SWITCH
void* g_sched_sp = nullptr;
#endif
Block* g_cur_block = nullptr;
std::string g_fail;
bool g_failed = false;
uint64_t g_together = 1;  // blocks resident at once
// Order in which a pass of the scheduler resumes the threads (and a normal launch runs its blocks):
// 0 ascending, 1 descending, 2 shuffled. Threads run from one barrier/collective to the next without interruption, so code that
// reads what another thread writes between two barriers sees the write or not depending on the
// order: a result that changes with the order is a race on the GPU.
int g_order = 0;
std::mt19937 g_rng(0);
long g_spins = 0;
int64_t g_grid_cap = 0;  // sk_emu_set_grid_cap; 0: the launchers' own caps
cudaError_t g_last = cudaSuccess;
void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;
std::map<const void*, int> g_max_dyn;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
#if SK_ASAN
void* g_sched_fake = nullptr;
const void* g_sched_bottom = nullptr;
size_t g_sched_size = 0;
#endif
#if !SK_ASM_SWITCH
std::vector<ucontext_t> g_uctx;
ucontext_t g_sched_uctx;
#endif
}  // namespace

}  // namespace sk_emu


#if SK_ASM_SWITCH
// sk_emu_switch(void** save, void* to): saves the callee-saved registers and the fp control words on
// the current stack, stores its pointer in *save and resumes the stack `to`.
asm(R"(
.text
.globl sk_emu_switch
.type sk_emu_switch,@function
sk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size sk_emu_switch,.-sk_emu_switch
.globl sk_emu_entry
.type sk_emu_entry,@function
sk_emu_entry:
  call sk_emu_fiber_main@PLT
  ud2
.size sk_emu_entry,.-sk_emu_entry
)");
extern "C" void sk_emu_switch(void** save, void* to);
extern "C" void sk_emu_entry();
#endif

namespace sk_emu {
namespace {


// from the scheduler into fiber f, back when it yields
void enter(Fiber& f) {
  g_cur = &f;
#if SK_ASAN
  __sanitizer_start_switch_fiber(&g_sched_fake, f.stack, kStack);
#endif
#if SK_ASM_SWITCH
  sk_emu_switch(&g_sched_sp, f.sp);
#else
  swapcontext(&g_sched_uctx, &g_uctx[&f - g_fibers.data()]);
#endif
#if SK_ASAN
  __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);
#endif
  g_cur = nullptr;
}

// from the current fiber back to the scheduler; `dying` when it never resumes
void leave(bool dying) {
  Fiber& f = *g_cur;
#if SK_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.asan_fake, g_sched_bottom, g_sched_size);
#endif
#if SK_ASM_SWITCH
  sk_emu_switch(&f.sp, g_sched_sp);
#else
  swapcontext(&g_uctx[&f - g_fibers.data()], &g_sched_uctx);
#endif
#if SK_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake, &g_sched_bottom, &g_sched_size);
#endif
  (void)dying;
}

void release(Block& b) {
  b.arrived = 0;
  b.counted = b.count;
  b.count = 0;
  ++b.gen;
  g_spins = 0;
}

void wait_for(const uint64_t* gen, uint64_t value) {
  g_cur->state = 1;
  g_cur->wait_on = gen;
  g_cur->wait_gen = value;
  g_spins = 0;
  leave(false);
}

}  // namespace

[[noreturn]] void fail(const char* what) {
  if (!g_failed) {
    char where[160];
    std::snprintf(where, sizeof where, " (block %u,%u,%u thread %u,%u,%u)", g_cur_block->idx.x, g_cur_block->idx.y,
                  g_cur_block->idx.z, g_cur->tid.x, g_cur->tid.y, g_cur->tid.z);
    g_fail = std::string(what) + where;
    g_failed = true;
  }
  g_cur->state = 2;
  leave(true);
  std::abort();  // never resumed
}

const dim3& g_cur_block_idx() { return g_cur->blk->idx; }

void* dynamic_smem() { return g_cur->blk->smem; }

void static_shared() {
  if (g_together > 1) fail("static __shared__ variable in a cooperative kernel: not modelled (blocks run together)");
}

void syncthreads(int line) { syncthreads_reduce(0, line); }

int syncthreads_reduce(int pred, int line) {
  Block& b = *g_cur->blk;
  if (b.arrived == 0) b.line = line;
  else if (b.line != line) fail("__syncthreads reached at different lines by threads of one block");
  b.count += pred != 0;
  if (++b.arrived == b.alive) {
    release(b);
  } else {
    wait_for(&b.gen, b.gen);
  }
  // b.counted changes only when every thread has arrived again, so after this thread has read it
  return static_cast<int>(b.counted);
}

unsigned warp_full_mask() {
  const Warp& w = g_cur->blk->warps[g_cur->warp];
  return w.size == 32 ? 0xffffffffu : ((1u << w.size) - 1u);
}

long long clock() {
  static long long ticks = 0;
  return ticks += 1000;  // strictly increasing; nothing else about timing is modelled
}

uint64_t warp_exchange(int kind, unsigned mask, uint64_t bits, int src, int line) {
  Fiber& f = *g_cur;
  Warp& w = f.blk->warps[f.warp];
  const unsigned full = w.size == 32 ? 0xffffffffu : ((1u << w.size) - 1u);
  if (mask != full) fail("warp collective with a mask other than every lane of the warp: not modelled");
  if (w.members != w.size) fail("warp collective with a full mask after lanes of the warp exited");
  if (w.arrived == 0) {
    w.kind = kind;
    w.line = line;
    w.mask = mask;
    w.ballot = 0;
  } else if (w.kind != kind || w.line != line) {
    fail("divergent warp collective: lanes of one warp at different shuffles/syncs");
  }
  w.post[f.lane] = bits;
  if (kind == kBallot && bits) w.ballot |= 1ull << f.lane;
  if (++w.arrived == w.members) {
    std::memcpy(w.result, w.post, sizeof w.post);
    if (kind == kBallot) w.result[0] = w.ballot;
    w.arrived = 0;
    ++w.gen;
    g_spins = 0;
  } else {
    wait_for(&w.gen, w.gen);
  }
  if (kind == kBallot) return w.result[0];
  if (kind == kShfl && (src < 0 || src >= w.size)) {
    char msg[96];
    std::snprintf(msg, sizeof msg, "shuffle from lane %d of a warp of %d lanes", src, w.size);
    fail(msg);
  }
  return kind == kShfl ? w.result[src] : 0;
}

void spin_yield() {
  if (++g_spins > 20000000L) fail("spin loop that never ends (no other thread makes progress)");
  leave(false);
}

void set_error(cudaError_t e) {
  if (g_last == cudaSuccess) g_last = e;
}

}  // namespace sk_emu

extern "C" void sk_emu_fiber_main() {
  using namespace sk_emu;
#if SK_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
  g_body(g_ctx);
  Fiber& f = *g_cur;
  Block& b = *f.blk;
  Warp& w = b.warps[f.warp];
  if (w.arrived > 0) fail("thread exited while lanes of its warp wait at a collective");
  --w.members;
  // exited threads no longer count at __syncthreads, as on the hardware
  if (--b.alive == b.arrived && b.arrived > 0) release(b);
  f.state = 2;
  leave(true);
  std::abort();
}

namespace sk_emu {
namespace {

char* stack_for(size_t i) {
  while (g_stacks.size() <= i) {
    void* m = mmap(nullptr, kStack + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) { std::fprintf(stderr, "sk_emu: mmap of a fiber stack failed\n"); std::abort(); }
    mprotect(m, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting a neighbour
    g_stacks.push_back(static_cast<char*>(m) + 4096);
  }
  return g_stacks[i];
}

void init_fiber(Fiber& f, size_t i) {
  f.stack = stack_for(i);
#if SK_ASAN
  __asan_unpoison_memory_region(f.stack, kStack);  // frames of abandoned fibers leave poison behind
#endif
#if SK_ASM_SWITCH
  uint64_t* top = reinterpret_cast<uint64_t*>(f.stack + kStack);
  *--top = reinterpret_cast<uint64_t>(&sk_emu_entry);  // `ret` lands there with rsp 16-byte aligned
  for (int r = 0; r < 6; ++r) *--top = 0;
  uint32_t csr[2] = {0, 0};
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
  --top;
  std::memcpy(top, csr, 8);
  f.sp = top;
#else
  ucontext_t& u = g_uctx[i];
  getcontext(&u);
  u.uc_stack.ss_sp = f.stack;
  u.uc_stack.ss_size = kStack;
  u.uc_link = nullptr;
  makecontext(&u, reinterpret_cast<void (*)()>(&sk_emu_fiber_main), 0);
#endif
  f.state = 0;
  f.asan_fake = nullptr;
}

// Runs the fibers of `blocks` together until all are done (or one fails).
void schedule() {
  std::vector<size_t> order(g_fibers.size());
  std::iota(order.begin(), order.end(), size_t(0));
  if (g_order == 1) std::reverse(order.begin(), order.end());
  for (;;) {
    bool ran = false, live = false;
    if (g_order == 2) std::shuffle(order.begin(), order.end(), g_rng);
    for (size_t idx : order) {
      Fiber& f = g_fibers[idx];
      if (g_failed) return;
      if (f.state == 2) continue;
      live = true;
      if (f.state == 1) {
        if (*f.wait_on == f.wait_gen) continue;
        f.state = 0;
      }
      g_cur_block = f.blk;
      enter(f);
      ran = true;
    }
    if (g_failed || !live) return;
    if (!ran) {
      g_fail = "deadlock: every live thread waits at a barrier or warp collective that others never reach";
      g_failed = true;
      return;
    }
  }
}

}  // namespace

cudaError_t run(dim3 grid, dim3 block, size_t smem, const void* fn, bool cooperative, void (*body)(void*), void* ctx) {
  if (g_cur != nullptr) { std::fprintf(stderr, "sk_emu: launch from inside a kernel\n"); std::abort(); }
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  cudaError_t err = cudaSuccess;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || nblocks == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535)
    err = cudaErrorInvalidConfiguration;
  else {
    auto it = g_max_dyn.find(fn);
    const int limit = it == g_max_dyn.end() ? 48 * 1024 : it->second;
    if (smem > static_cast<size_t>(limit)) err = cudaErrorInvalidValue;
  }
  if (err == cudaSuccess && cooperative) {
    int per_sm = 0;
    occupancy(&per_sm, fn, static_cast<int>(nthreads), smem);
    if (nblocks > static_cast<uint64_t>(per_sm) * kSms) err = cudaErrorCooperativeLaunchTooLarge;
  }
  if (err != cudaSuccess) {
    if (!cooperative) set_error(err);
    return err;
  }
  g_grid = grid;
  g_block = block;
  g_body = body;
  g_ctx = ctx;
  g_failed = false;
  g_fail.clear();
  g_spins = 0;
  const int nwarps = static_cast<int>((nthreads + 31) / 32);
  // a normal launch runs its blocks one after another; a cooperative one runs them all together
  const uint64_t together = cooperative ? nblocks : 1;
  g_together = together;
  // the blocks of a normal launch run one after another in the same order as the threads of a pass:
  // a block that reads what another block of the same launch writes shows as a different result
  std::vector<uint64_t> perm;
  if (!cooperative && g_order == 2) {
    perm.resize(nblocks);
    std::iota(perm.begin(), perm.end(), uint64_t(0));
    std::shuffle(perm.begin(), perm.end(), g_rng);
  }
  for (uint64_t first = 0; first < nblocks && !g_failed; first += together) {
    std::vector<Block> blocks(together);
    g_fibers.assign(together * nthreads, Fiber{});
#if !SK_ASM_SWITCH
    g_uctx.resize(g_fibers.size());
#endif
    for (uint64_t k = 0; k < together; ++k) {
      const uint64_t id = cooperative || g_order == 0 ? first + k : (g_order == 1 ? nblocks - 1 - first : perm[first]);
      Block& b = blocks[k];
      b.idx = dim3(static_cast<unsigned>(id % grid.x), static_cast<unsigned>(id / grid.x % grid.y),
                   static_cast<unsigned>(id / grid.x / grid.y));
      b.nthreads = b.alive = static_cast<int>(nthreads);
      b.warps.assign(nwarps, Warp{});
      for (int w = 0; w < nwarps; ++w)
        b.warps[w].size = b.warps[w].members = static_cast<int>(std::min<uint64_t>(32, nthreads - 32 * w));
      // exactly the launch's bytes, from the heap (AddressSanitizer sees overruns); 0xff bytes are
      // NaN as floats, so reads of never-written shared memory show in the results
      b.smem = static_cast<unsigned char*>(std::malloc(smem ? smem : 1));
      std::memset(b.smem, 0xff, smem ? smem : 1);
      for (uint64_t t = 0; t < nthreads; ++t) {
        Fiber& f = g_fibers[k * nthreads + t];
        f.blk = &b;
        f.tid = dim3(static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                     static_cast<unsigned>(t / block.x / block.y));
        f.lane = static_cast<int>(t % 32);
        f.warp = static_cast<int>(t / 32);
        init_fiber(f, k * nthreads + t);
      }
    }
    schedule();
    for (Block& b : blocks) std::free(b.smem);
  }
  g_fibers.clear();
  if (g_failed) {
    std::fprintf(stderr, "sk_emu: kernel failed: %s\n", g_fail.c_str());
    if (!cooperative) set_error(cudaErrorLaunchFailure);
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

int64_t grid_cap(int64_t cap) { return g_grid_cap > 0 && g_grid_cap < cap ? g_grid_cap : cap; }

cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > kSmemOptin) return cudaErrorInvalidValue;
  g_max_dyn[fn] = value;
  return cudaSuccess;
}

cudaError_t occupancy(int* blocks, const void*, int threads, size_t smem) {
  if (threads <= 0 || threads > 1024) return cudaErrorInvalidValue;
  const int warps = (threads + 31) / 32;
  int n = std::min(32, 64 / warps);
  const int by_smem = static_cast<int>(kSmemPerSm / (smem + 1024));
  *blocks = std::min(n, by_smem);
  return cudaSuccess;
}

}  // namespace sk_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = sk_emu::g_last;
  sk_emu::g_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return sk_emu::g_last; }
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}
cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (dev != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = sk_emu::kSms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = sk_emu::kSmemPerSm; return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = 1; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = sk_emu::kSmemOptin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

extern "C" const char* sk_emu_last_failure() { return sk_emu::g_fail.c_str(); }
extern "C" void sk_emu_set_schedule(int order, unsigned seed) {
  sk_emu::g_order = order;
  sk_emu::g_rng.seed(seed);
}
extern "C" void sk_emu_set_grid_cap(int64_t n) { sk_emu::g_grid_cap = n; }
// the grid of the last launch that ran: the tests check that a lowered cap took effect
extern "C" void sk_emu_last_grid(int64_t* xyz) {
  xyz[0] = sk_emu::g_grid.x, xyz[1] = sk_emu::g_grid.y, xyz[2] = sk_emu::g_grid.z;
}
