// The runtime of the CPU emulation (kernels/emu.h) and its cost counters. Compiled only for the
// emulation build (CAMEX_KERNEL_EMU=1), by the host C++ compiler and WITHOUT the ThreadSanitizer
// instrumentation of the kernel sources: nothing here is counted as kernel work.
//
// Execution: a launch runs on the calling OS thread, one block after another; each CUDA thread of
// a block is a fiber (its own stack, switched cooperatively), run in thread order until it waits
// at a barrier (__syncthreads, or the warp's mma.sync) or ends. So a thread runs as far ahead of
// the others as the barriers let it: a missing barrier after a cooperative load, or before a
// buffer is overwritten, gives wrong results every time rather than now and then. A barrier that
// some threads never reach is reported as a deadlock (naming the kernel) instead of hanging.
//
// What is counted, per launch (camex_emu_launch, camex.h), each block weighted by how many blocks
// of the grid it stands for (see `samples`):
// - mma_flop: 2*16*8*16 per warp-wide mma.sync m16n8k16, padded tiles included;
// - smem_wavefronts: each warp-wide shared-memory access split into phases (32 lanes for accesses of
//   up to 4 bytes, 16 for 8 bytes, 8 for 16 bytes: 128 bytes a phase, as the hardware serves them);
//   a phase costs the largest number of distinct 32-bit words any of the 32 banks holds (one word
//   read by many lanes is a broadcast), at least one;
// - gmem_bytes: 32 bytes per distinct 32-byte sector of each warp-wide global access (L2 <-> SM);
// - dram_bytes: 32 bytes per distinct sector the launch touches (the compulsory traffic); a sector
//   touched by several sampled blocks counts with the smallest of their weights (data shared by
//   every block is read once, a block's own tile as often as the blocks it stands for; see
//   `samples` for tiles narrower than a sector).
// Lanes are matched into warp-wide accesses by (instruction address, count of warp collectives so
// far, occurrence): exact for convergent code and for lanes leaving a loop early; a lane that skips
// an access inside a loop without a collective in between is matched with the other lanes' next
// occurrence (only at padded edges).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <sys/mman.h>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <vector>

#include <dlfcn.h>

#include <cuda_runtime.h>

#include "camex.h"

extern "C" char etext, end;  // the executable's static data lies between them (__shared__ statics)
extern "C" char __ehdr_start;  // the executable's first byte (GNU ld and lld both define it)

namespace emu {

namespace {

enum : uint32_t { SP_SHARED = 0, SP_GLOBAL = 1 };

struct Access {
  uintptr_t pc;
  uintptr_t addr;
  uint32_t epoch;
  uint16_t size;
  uint8_t space;
  uint8_t write;
};

// A barrier among fibers: arrivals are counted; waiters yield until the generation moves on.
struct FBar {
  unsigned expected = 0, arrived = 0;
  uint64_t gen = 0;
};

struct Warp {
  FBar bar;
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
  const char *rows[32];  // ldmatrix row addresses
  uint32_t d[32][4];     // ldmatrix results
  uint32_t coll[32];     // the warp collective each lane waits at (converged())
  uintptr_t pc[32];      // and its instruction, for the report
};

// A cp.async not yet executed: it lands at the wait that covers its group.
struct Pending {
  void *dst;
  const void *src;
  int bytes, src_bytes;
  uint32_t group;
};

struct Worker {
  uint3 tid;
  uint3 bid;
  dim3 bdim, gdim;
  unsigned lane = 0;
  Warp *warp = nullptr;
  FBar *bar = nullptr;
  uintptr_t stack_lo = 0, stack_hi = 0;
  bool count = false;
  uint64_t weight = 1;
  uint32_t epoch = 0;
  std::vector<Access> log;
  std::vector<Pending> pending;  // cp.async issued, not yet waited for
  uint32_t group = 0;            // cp.async groups committed so far
  // Fiber state.
  void *sp = nullptr;
  bool done = false;
  void (*body)(void *) = nullptr;
  void *ctx = nullptr;
};

thread_local Worker *t_worker = nullptr;

// One launch at a time in the whole process: __shared__ variables are statics, so two concurrent
// launches of one kernel (from parallel tests) would share them.
std::mutex launch_mutex;

alignas(16) char dyn_buf[256 * 1024];

// Counting state (guarded by launch_mutex while a launch runs; by rec_mutex for the records).
int g_mode = 0;  // 0 off, 1 every block, 2 sampled blocks
uintptr_t g_host_lo = 0, g_host_hi = 0;  // the launching thread's stack
std::mutex rec_mutex;

struct LaunchRec {
  std::string kernel;
  dim3 grid;
  unsigned threads = 0;
  int64_t smem = 0;
  uint64_t blocks = 0, sampled = 0, mma = 0, wavefronts = 0, smem_bytes = 0, gmem = 0, dram = 0;
  std::unordered_map<uintptr_t, uint64_t> sectors;  // sector -> smallest weight of a block touching it
};
std::vector<LaunchRec> g_records;

// Allocations registered by the caller (camex_emu_register): a launch's distinct bytes within one
// are at most its size, whatever the sampling estimated.
using Ranges = std::vector<std::pair<uintptr_t, uintptr_t>>;  // [lo, hi), sorted by lo, disjoint
Ranges g_allocs;
// The range of v that holds all of [a, a + n), or v.end().
inline Ranges::const_iterator range_holding(const Ranges &v, uintptr_t a, size_t n) {
  auto it = std::upper_bound(v.begin(), v.end(), std::make_pair(a, UINTPTR_MAX));
  return it != v.begin() && a + n <= std::prev(it)->second ? std::prev(it) : v.end();
}
LaunchRec *g_cur = nullptr;

// ---- fibers ----
// x86-64 System V context switch: saves the callee-saved registers on the current stack, stores
// the stack pointer in *save and continues on `to` (a stack saved the same way, or a new fiber's
// first frame, whose return address is camex_emu_fiber_start with the fiber in r12).
extern "C" void camex_emu_switch(void **save, void *to);
extern "C" void camex_emu_fiber_start();
asm(R"(
  .text
  .p2align 4
  .globl camex_emu_switch
  .type camex_emu_switch,@function
camex_emu_switch:
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
  .size camex_emu_switch,.-camex_emu_switch
  .p2align 4
  .globl camex_emu_fiber_start
  .type camex_emu_fiber_start,@function
camex_emu_fiber_start:
  movq %r12, %rdi
  call camex_emu_fiber_main
  ud2
  .size camex_emu_fiber_start,.-camex_emu_fiber_start
)");

constexpr size_t FIBER_STACK = 256 * 1024;
thread_local void *t_sched_sp = nullptr;  // the scheduler's stack while a fiber runs
uint64_t g_progress = 0;                  // arrivals and completions (deadlock detection)

// Fiber stacks, reused across launches (launches are serialised), each with a guard page below.
std::vector<char *> g_stacks;
char *fiber_stack(size_t k) {
  while (g_stacks.size() <= k) {
    const size_t page = 4096;
    void *m = mmap(nullptr, FIBER_STACK + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "camex emulation: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, page, PROT_NONE);
    g_stacks.push_back(static_cast<char *>(m) + page);
  }
  return g_stacks[k];
}

inline void yield() { camex_emu_switch(&t_worker->sp, t_sched_sp); }

// Arrives at b and waits until every expected fiber has arrived. The last arrival runs `last` first
// (before anyone is released), then yields too, so that threads resume in thread order.
template <class F> inline void fbar_wait(FBar &b, F &&last) {
  const uint64_t g = b.gen;
  ++g_progress;
  if (++b.arrived == b.expected) {
    last();
    b.arrived = 0;
    ++b.gen;
    yield();
    return;
  }
  while (b.gen == g) yield();
}

void stack_of_self(uintptr_t &lo, uintptr_t &hi) {
  pthread_attr_t at;
  void *addr = nullptr;
  size_t size = 0;
  lo = hi = 0;
  if (pthread_getattr_np(pthread_self(), &at) == 0) {
    if (pthread_attr_getstack(&at, &addr, &size) == 0) {
      lo = (uintptr_t)addr;
      hi = lo + size;
    }
    pthread_attr_destroy(&at);
  }
}

inline bool is_shared(uintptr_t a) {
  const uintptr_t d = (uintptr_t)dyn_buf;
  if (a >= d && a < d + sizeof(dyn_buf)) return true;
  return a >= (uintptr_t)&etext && a < (uintptr_t)&end;
}

// The launch's first access that a GPU would fault on (guarded by launch_mutex; a launch's fibers
// run on its thread): a vector or scalar access of n bytes whose address is not a multiple of n
// (the host's loads do not care; the SM raises cudaErrorMisalignedAddress), an ldmatrix row that is
// not 16-byte aligned shared memory, a cp.async of another size or alignment or between the wrong
// spaces. run() fails the launch with it.
cudaError_t g_fault = cudaSuccess;  // the launch's first fault, cudaSuccess if none
const char *g_kernel = "";          // the running launch's kernel
// Said at once (the host may itself fault on the access next: an aligned SSE load), the first of a
// launch only, and failed at the launch's end.
inline void fault(uintptr_t pc, const volatile void *p, size_t size, const char *what,
                  cudaError_t err = cudaErrorMisalignedAddress) {
  if (g_fault != cudaSuccess) return;
  g_fault = err;
  std::fprintf(stderr,
               "camex emulation: %s in %s: %zu bytes at %#lx (instruction %#lx); on a GPU the launch fails "
               "(%s)\n",
               what, g_kernel, size, (unsigned long)(uintptr_t)p, (unsigned long)pc,
               err == cudaErrorMisalignedAddress ? "cudaErrorMisalignedAddress" : "cudaErrorIllegalAddress");
}

// Global memory's bounds (camex_emu_track): the emulation tests' allocator reports every allocation
// and free, and while any is live a kernel thread's access to memory that is neither its own stack,
// the launching thread's (the kernel's arguments), shared memory nor inside one live allocation
// fails the launch (cudaErrorIllegalAddress). On a GPU a small overrun mostly reads or writes a
// neighbouring buffer silently (compute-sanitizer's memcheck reports it); here the host's heap
// would. tracked(): lo -> hi, guarded by track_mutex; g_bounds: its sorted copy for the running
// launch (under launch_mutex), refreshed at a launch's start when an allocation came or went.
std::mutex track_mutex;
std::map<uintptr_t, uintptr_t> &tracked() {
  static auto *m = new std::map<uintptr_t, uintptr_t>;  // never destroyed: frees may come at exit
  return *m;
}
uint64_t g_track_gen = 0;
bool g_bounds_on = false;
Ranges g_bounds;
uint64_t g_bounds_gen = ~0ull;
uintptr_t g_hit_lo = 0, g_hit_hi = 0;  // the allocation the last check found

void refresh_bounds() {
  std::lock_guard<std::mutex> lock(track_mutex);
  g_bounds_on = !tracked().empty();
  if (g_bounds_gen != g_track_gen) {
    g_bounds.assign(tracked().begin(), tracked().end());
    g_bounds_gen = g_track_gen;
  }
  g_hit_lo = g_hit_hi = 0;
}

// Warp collectives: mma and ldmatrix (.sync.aligned) must be reached by all 32 lanes at the same
// instruction, __syncwarp (the full mask) by all 32 at some __syncwarp (on sm_70 and later its lanes
// may wait at different call sites). The lanes share one barrier here, so lanes at different
// collectives would pair up and exchange garbage; on a GPU that is undefined behaviour (a hang, or
// wrong results). Each lane names the collective it waits at (kind: the instruction and variant)
// and its address, and the last to arrive checks them; a mismatch fails the launch. The addresses
// are the host compiler's: it could in principle duplicate one collective of the source into two
// branches (jump threading) and so split convergent lanes, but every emulation test runs without
// such a split (GCC 12, -O2), and two branches that each hold an mma or ldmatrix are a kernel bug.
enum : uint32_t { COLL_SYNCWARP = 1, COLL_MMA = 2, COLL_LDMATRIX = 16 /* + 2 num + trans */ };
inline const char *coll_name(uint32_t k) {
  static const char *const ld[] = {"ldmatrix.x1", "ldmatrix.x1.trans", "ldmatrix.x2", "ldmatrix.x2.trans",
                                   "ldmatrix.x3", "ldmatrix.x3.trans", "ldmatrix.x4", "ldmatrix.x4.trans"};
  if (k == COLL_SYNCWARP) return "__syncwarp";
  if (k == COLL_MMA) return "mma.sync";
  return k >= COLL_LDMATRIX + 2 && k < COLL_LDMATRIX + 10 ? ld[k - COLL_LDMATRIX - 2] : "?";
}
inline void arrive(Warp &w, unsigned lane, uint32_t kind, uintptr_t pc) {
  w.coll[lane] = kind;
  w.pc[lane] = pc;
}
inline bool converged(const Warp &w) {
  for (unsigned l = 1; l < 32; ++l) {
    if (w.coll[l] == w.coll[0] && (w.pc[l] == w.pc[0] || w.coll[0] == COLL_SYNCWARP)) continue;
    if (g_fault == cudaSuccess) {
      g_fault = cudaErrorLaunchFailure;
      std::fprintf(stderr,
                   "camex emulation: one warp's lanes at different warp collectives in %s: lane 0 at %s "
                   "(instruction %#lx), lane %u at %s (instruction %#lx); on a GPU that is undefined "
                   "(a hang or wrong results), here the launch fails (cudaErrorLaunchFailure)\n",
                   g_kernel, coll_name(w.coll[0]), (unsigned long)w.pc[0], l, coll_name(w.coll[l]),
                   (unsigned long)w.pc[l]);
    }
    return false;
  }
  return true;
}

// A kernel thread's naturally aligned access (the host compiler's __tsan_readN/__tsan_writeN: the
// type promises n-byte alignment, as nvcc's vector loads and stores require it); a thread's locals
// (its fiber stack) are registers or local memory on the GPU and are not checked.
inline void check_aligned(uintptr_t pc, const volatile void *p, size_t n) {
  const Worker *w = t_worker;
  const uintptr_t a = (uintptr_t)p;
  if (!w || a % n == 0 || (a >= w->stack_lo && a < w->stack_hi)) return;
  fault(pc, p, n, "misaligned access");
}

inline void record(uintptr_t pc, const volatile void *p, size_t size, bool write) {
  Worker *w = t_worker;
  if (!w || !w->count) return;
  const uintptr_t a = (uintptr_t)p;
  if ((a >= w->stack_lo && a < w->stack_hi) || (a >= g_host_lo && a < g_host_hi)) return;  // registers
  const uint8_t sp = is_shared(a) ? SP_SHARED : SP_GLOBAL;
  // A vector store built from registers (make_float2, a uint4 of four words) may reach the host
  // compiler's code as back-to-back scalar accesses from different instructions; nvcc makes one
  // vector access of it. Such a run (contiguous, same direction, no collective between, the merged
  // access within 16 bytes and aligned to 16, or to 8 up to 8 bytes) is logged as one access.
  if (!w->log.empty() && size < 16) {
    Access &p = w->log.back();
    const size_t merged = p.size + size;
    if (p.pc != pc && p.epoch == w->epoch && p.space == sp && p.write == (uint8_t)write && p.addr + p.size == a &&
        ((merged <= 16 && p.addr % 16 == 0) || (merged <= 8 && p.addr % 8 == 0))) {
      p.size = (uint16_t)merged;
      return;
    }
  }
  // Range accesses (aggregate copies) are logged as the 16-byte pieces a vector access would move.
  for (size_t off = 0; off < size; off += 16) {
    const size_t s = size - off < 16 ? size - off : 16;
    w->log.push_back(Access{pc, a + off, w->epoch, (uint16_t)s, sp, (uint8_t)write});
  }
}

// Dynamic shared memory past what the launch asked for fails it too (on a GPU: past the block's
// allocation, an illegal address), in every build and mode.
int64_t g_dyn_bytes = 0;
inline void check_bounds(uintptr_t pc, const volatile void *p, size_t n) {
  const Worker *w = t_worker;
  const uintptr_t a = (uintptr_t)p, d = (uintptr_t)dyn_buf;
  if (!w) return;
  if (a >= d && a < d + sizeof(dyn_buf)) {
    if (a + n > d + (uintptr_t)g_dyn_bytes)
      fault(pc, p, n, "access past the launch's dynamic shared memory", cudaErrorIllegalAddress);
    return;
  }
  if (!g_bounds_on || (a >= g_hit_lo && a + n <= g_hit_hi)) return;
  if ((a >= w->stack_lo && a < w->stack_hi) || (a >= g_host_lo && a < g_host_hi) || is_shared(a)) return;
  // The executable's own read-only data (a linker may put it before the text, outside is_shared's
  // range): a table a kernel reads by pointer.
  if (a >= (uintptr_t)&__ehdr_start && a < (uintptr_t)&end) return;
  const auto it = range_holding(g_bounds, a, n);
  if (it != g_bounds.end()) {
    g_hit_lo = it->first;
    g_hit_hi = it->second;
    return;
  }
  fault(pc, p, n, "access outside every live allocation", cudaErrorIllegalAddress);
}

// The naturally aligned hooks: checked for alignment and bounds, then logged.
inline void checked(uintptr_t pc, const volatile void *p, size_t n, bool write) {
  check_aligned(pc, p, n);
  check_bounds(pc, p, n);
  record(pc, p, n, write);
}
// Accesses that promise no alignment (the host compiler's unaligned and range hooks).
inline void bounded(uintptr_t pc, const volatile void *p, size_t n, bool write) {
  check_bounds(pc, p, n);
  record(pc, p, n, write);
}

// Per-instruction profile (CAMEX_EMU_PROFILE=FILE; scripts/emu-profile.sh): the weighted shared
// wavefronts, mma and global (L2 <-> SM) sector bytes of every instruction address, written at exit
// as "module offset wavefronts mma global_bytes" lines, offsets within the instruction's module,
// for addr2line to name the source lines.
struct Prof {
  uint64_t wf = 0, mma = 0, gmem = 0;
};
struct Profile {
  const char *path = std::getenv("CAMEX_EMU_PROFILE");
  std::mutex m;
  std::unordered_map<uintptr_t, Prof> at;
  void add(uintptr_t pc, uint64_t wf, uint64_t mma, uint64_t gmem = 0) {
    std::lock_guard<std::mutex> g(m);
    Prof &p = at[pc];
    p.wf += wf;
    p.mma += mma;
    p.gmem += gmem;
  }
  ~Profile() {
    if (!path || at.empty()) return;
    FILE *f = std::fopen(path, "w");
    if (!f) return;
    for (const auto &[pc, p] : at) {
      Dl_info info;
      const uintptr_t base = dladdr(reinterpret_cast<void *>(pc), &info) ? (uintptr_t)info.dli_fbase : 0;
      std::fprintf(f, "%s 0x%lx %llu %llu %llu\n", base ? info.dli_fname : "?", (unsigned long)(pc - base - 1),
                   (unsigned long long)p.wf, (unsigned long long)p.mma, (unsigned long long)p.gmem);
    }
    std::fclose(f);
  }
};
Profile g_profile;

// Grid dimensions of more blocks than this are sampled (camex_emu_sample_above).
int64_t g_sample_above = 8;

// Samples of one grid dimension of n blocks and the blocks each stands for: all of them when
// n <= g_sample_above, else the first, an even-numbered middle block m and its neighbour m + 1
// (together standing for the n - 2 interior ones, half each) and the last. Small grids run whole,
// so that kernels whose blocks do unequal work over a flat index space (the reductions of
// per-block partials) are counted exactly. The middle pair lets a sector that two neighbouring
// blocks share (tiles of 16 bytes, such as a slab of eight bf16 columns per row) count once per
// pair, as on the GPU, where a lone middle block would count it once per block; sectors the pair
// shares with its unsampled outer neighbours (wider sharing) still count with its weight, so
// distinct bytes err high (at most by the number of blocks sharing such a sector), never low.
std::vector<std::pair<unsigned, uint64_t>> samples(unsigned n, bool sample) {
  std::vector<std::pair<unsigned, uint64_t>> s;
  if (!sample || (int64_t)n <= g_sample_above || n < 4) {
    for (unsigned k = 0; k < n; ++k) s.push_back({k, 1});
  } else {
    const unsigned m = (n / 2) & ~1u;  // even, and m + 1 < n - 1 since n > 3
    s.push_back({0, 1});
    s.push_back({m, (n - 2) / 2});
    s.push_back({m + 1, n - 2 - (n - 2) / 2});
    s.push_back({n - 1, 1});
  }
  return s;
}

struct Lane {
  unsigned lane;
  uintptr_t addr;
  unsigned size;
};

// Wavefronts of one warp-wide shared access (see the file comment).
uint64_t wavefronts(const Lane *lanes, unsigned n) {
  unsigned size = 0;
  for (unsigned k = 0; k < n; ++k) size = lanes[k].size > size ? lanes[k].size : size;
  const unsigned per_phase = size >= 16 ? 8 : size >= 8 ? 16 : 32;
  uint64_t total = 0;
  uintptr_t words[160];
  for (unsigned ph = 0; ph < 32 / per_phase; ++ph) {
    unsigned m = 0;
    for (unsigned k = 0; k < n; ++k) {
      const Lane &l = lanes[k];
      if (l.lane / per_phase != ph) continue;
      for (uintptr_t wd = l.addr / 4; wd <= (l.addr + l.size - 1) / 4 && m < 160; ++wd) words[m++] = wd;
    }
    if (m == 0) continue;
    std::sort(words, words + m);
    m = (unsigned)(std::unique(words, words + m) - words);
    unsigned per_bank[32] = {};
    unsigned worst = 1;
    for (unsigned k = 0; k < m; ++k) worst = std::max(worst, ++per_bank[words[k] % 32]);
    total += worst;
  }
  return total;
}

// Adds one warp-wide access (its lanes) of weight w to the launch's record.
void count_access(LaunchRec &rec, uintptr_t pc, uint8_t space, const Lane *lanes, unsigned n, uint64_t w) {
  if (space == SP_SHARED) {
    uint64_t bytes = 0;
    for (unsigned k = 0; k < n; ++k) bytes += lanes[k].size;
    const uint64_t wf = w * wavefronts(lanes, n);
    rec.wavefronts += wf;
    if (g_profile.path) g_profile.add(pc, wf, 0);
    rec.smem_bytes += w * bytes;
    return;
  }
  uintptr_t secs[96];
  unsigned m = 0;
  for (unsigned k = 0; k < n; ++k)
    for (uintptr_t s = lanes[k].addr / 32; s <= (lanes[k].addr + lanes[k].size - 1) / 32 && m < 96; ++s) secs[m++] = s;
  std::sort(secs, secs + m);
  m = (unsigned)(std::unique(secs, secs + m) - secs);
  rec.gmem += w * 32 * m;
  if (g_profile.path) g_profile.add(pc, 0, 0, w * 32 * m);
  for (unsigned k = 0; k < m; ++k) {
    auto [it, fresh] = rec.sectors.try_emplace(secs[k], w);
    if (!fresh && w < it->second) it->second = w;
  }
}

// Matches the lanes of every warp of the block just run and adds its costs (weight w) to g_cur.
// Per stretch between warp collectives (an epoch): where every lane logged the same instructions
// in the same order (convergent code), the k-th entries form one access; otherwise the k-th
// execution of each instruction does (sorted by instruction, execution, lane).
void count_block(std::vector<std::unique_ptr<Worker>> &workers, unsigned nt, uint64_t w) {
  LaunchRec &rec = *g_cur;
  Lane buf[32];
  struct Tagged {
    uintptr_t pc;
    uint32_t occ;
    uint8_t space;
    unsigned lane;
    uintptr_t addr;
    unsigned size;
  };
  static std::vector<Tagged> all;
  for (unsigned w0 = 0; w0 < nt; w0 += 32) {
    const unsigned w1 = std::min(nt, w0 + 32), nl = w1 - w0;
    size_t pos[32] = {}, end[32] = {};
    const std::vector<Access> *log[32];
    for (unsigned l = 0; l < nl; ++l) log[l] = &workers[w0 + l]->log;
    for (;;) {
      // The next epoch any lane has entries in, and each lane's stretch of it.
      uint32_t e = UINT32_MAX;
      for (unsigned l = 0; l < nl; ++l)
        if (pos[l] < log[l]->size()) e = std::min(e, (*log[l])[pos[l]].epoch);
      if (e == UINT32_MAX) break;
      for (unsigned l = 0; l < nl; ++l) {
        end[l] = pos[l];
        while (end[l] < log[l]->size() && (*log[l])[end[l]].epoch == e) ++end[l];
      }
      const size_t len = end[0] - pos[0];
      bool same = true;
      for (unsigned l = 1; l < nl && same; ++l) {
        same = end[l] - pos[l] == len;
        for (size_t k = 0; same && k < len; ++k) {
          const Access &a = (*log[l])[pos[l] + k], &b = (*log[0])[pos[0] + k];
          same = a.pc == b.pc && a.space == b.space;
        }
      }
      if (same) {
        for (size_t k = 0; k < len; ++k) {
          for (unsigned l = 0; l < nl; ++l) {
            const Access &a = (*log[l])[pos[l] + k];
            buf[l] = Lane{l, a.addr, a.size};
          }
          count_access(rec, (*log[0])[pos[0] + k].pc, (*log[0])[pos[0] + k].space, buf, nl, w);
        }
      } else {
        all.clear();
        for (unsigned l = 0; l < nl; ++l) {
          const size_t first = all.size();
          for (size_t k = pos[l]; k < end[l]; ++k) {
            const Access &a = (*log[l])[k];
            all.push_back(Tagged{a.pc, 0, a.space, l, a.addr, a.size});
          }
          // Program order within the lane is kept by the stable sort; then count executions.
          std::stable_sort(all.begin() + first, all.end(), [](const Tagged &x, const Tagged &y) { return x.pc < y.pc; });
          for (size_t k = first + 1; k < all.size(); ++k)
            if (all[k].pc == all[k - 1].pc) all[k].occ = all[k - 1].occ + 1;
        }
        std::sort(all.begin(), all.end(), [](const Tagged &x, const Tagged &y) {
          if (x.pc != y.pc) return x.pc < y.pc;
          if (x.occ != y.occ) return x.occ < y.occ;
          if (x.space != y.space) return x.space < y.space;
          return x.lane < y.lane;
        });
        for (size_t k = 0; k < all.size();) {
          size_t j = k;
          unsigned n = 0;
          while (j < all.size() && all[j].pc == all[k].pc && all[j].occ == all[k].occ && all[j].space == all[k].space) {
            if (n < 32) buf[n++] = Lane{all[j].lane, all[j].addr, all[j].size};
            ++j;
          }
          count_access(rec, all[k].pc, all[k].space, buf, n, w);
          k = j;
        }
      }
      for (unsigned l = 0; l < nl; ++l) pos[l] = end[l];
    }
    for (unsigned l = 0; l < nl; ++l) workers[w0 + l]->log.clear();
  }
}

}  // namespace

uint3 thread_idx() { return t_worker->tid; }
uint3 block_idx() { return t_worker->bid; }
dim3 block_dim() { return t_worker->bdim; }
dim3 grid_dim() { return t_worker->gdim; }

void syncthreads() {
  Worker *w = t_worker;
  ++w->epoch;
  fbar_wait(*w->bar, [] {});
}

void syncwarp() {
  Worker *w = t_worker;
  ++w->epoch;
  Warp &wp = *w->warp;
  arrive(wp, w->lane, COLL_SYNCWARP, (uintptr_t)__builtin_return_address(0));
  fbar_wait(wp.bar, [&wp] { converged(wp); });
}

char *dyn_smem() { return dyn_buf; }

bool counting() { return g_mode != 0; }

unsigned atomic_add(unsigned *p, unsigned v) {
  checked((uintptr_t)__builtin_return_address(0), p, 4, true);
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}

inline float bf16_bits_to_f32(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Fragment layout of the PTX ISA (groupID g = lane / 4, t = lane % 4; the lower-indexed element of
// a pair in the low 16 bits): A a0:(g, 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8, 2t+8..);
// B b0:(k 2t..2t+1, n g) b1:(k 2t+8.., n g); C c0,c1:(g, 2t..2t+1) c2,c3:(g+8, 2t..2t+1).
void mma_bf16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  Worker *wk = t_worker;
  Warp &w = *wk->warp;
  const unsigned lane = wk->lane;
  ++wk->epoch;
  if (wk->count && lane == 0) {
    g_cur->mma += 2ull * 16 * 8 * 16 * wk->weight;
    if (g_profile.path) g_profile.add((uintptr_t)__builtin_return_address(0), 0, wk->weight);
  }
  for (int i = 0; i < 4; ++i) {
    w.a[lane][i] = a[i];
    w.c[lane][i] = c[i];
  }
  w.b[lane][0] = b[0];
  w.b[lane][1] = b[1];
  arrive(w, lane, COLL_MMA, (uintptr_t)__builtin_return_address(0));
  // The last lane to arrive multiplies for the whole warp; each lane then takes its accumulators
  // (no lane deposits the next mma's fragments before every lane has arrived at it).
  fbar_wait(w.bar, [&w] {
    converged(w);
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; ++l) {
      const unsigned g = l >> 2, t = l & 3;
      auto put = [&](float(*m)[16], unsigned r, unsigned col, uint32_t v) {
        m[r][col] = bf16_bits_to_f32((uint16_t)(v & 0xffff));
        m[r][col + 1] = bf16_bits_to_f32((uint16_t)(v >> 16));
      };
      put(A, g, 2 * t, w.a[l][0]);
      put(A, g + 8, 2 * t, w.a[l][1]);
      put(A, g, 2 * t + 8, w.a[l][2]);
      put(A, g + 8, 2 * t + 8, w.a[l][3]);
      B[2 * t][g] = bf16_bits_to_f32((uint16_t)(w.b[l][0] & 0xffff));
      B[2 * t + 1][g] = bf16_bits_to_f32((uint16_t)(w.b[l][0] >> 16));
      B[2 * t + 8][g] = bf16_bits_to_f32((uint16_t)(w.b[l][1] & 0xffff));
      B[2 * t + 9][g] = bf16_bits_to_f32((uint16_t)(w.b[l][1] >> 16));
    }
    for (unsigned l = 0; l < 32; ++l) {
      const unsigned g = l >> 2, t = l & 3;
      const unsigned rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
      for (int i = 0; i < 4; ++i) {
        float acc = w.c[l][i];
        for (int k = 0; k < 16; ++k) acc = std::fma(A[rows[i]][k], B[k][cols[i]], acc);
        w.c[l][i] = acc;
      }
    }
  });
  for (int i = 0; i < 4; ++i) c[i] = w.c[lane][i];
}

void ldmatrix(uint32_t *d, int num, bool trans, const void *row) {
  Worker *wk = t_worker;
  Warp &w = *wk->warp;
  const unsigned lane = wk->lane;
  // Lanes 8i..8i+7 address matrix i's rows: one 16-byte access each, served 8 lanes a phase; each
  // row 16-byte aligned shared memory, as the PTX ISA requires.
  if (lane < 8u * num) {
    const uintptr_t pc = (uintptr_t)__builtin_return_address(0);
    if ((uintptr_t)row % 16 != 0 || !is_shared((uintptr_t)row)) fault(pc, row, 16, "ldmatrix row not 16-byte aligned shared memory");
    bounded(pc, row, 16, false);
  }
  ++wk->epoch;
  w.rows[lane] = static_cast<const char *>(row);
  arrive(w, lane, COLL_LDMATRIX + 2 * (uint32_t)num + (trans ? 1 : 0), (uintptr_t)__builtin_return_address(0));
  fbar_wait(w.bar, [&w, num, trans] {
    if (!converged(w)) return;  // some lanes' row addresses were never given
    auto elem = [&w](int m, int r, int c) {
      uint16_t v;
      std::memcpy(&v, w.rows[8 * m + r] + 2 * c, 2);
      return (uint32_t)v;
    };
    for (int m = 0; m < num; ++m)
      for (unsigned l = 0; l < 32; ++l) {
        const int r = (int)(l / 4), c = 2 * (int)(l % 4);
        w.d[l][m] = trans ? elem(m, c, r) | elem(m, c + 1, r) << 16 : elem(m, r, c) | elem(m, r, c + 1) << 16;
      }
  });
  for (int m = 0; m < num; ++m) d[m] = w.d[lane][m];
}

void cp_async(void *dst, const void *src, int bytes, int src_bytes) {
  Worker *wk = t_worker;
  const uintptr_t pc = (uintptr_t)__builtin_return_address(0);
  // cp.async.ca/.cg: 4, 8 or 16 bytes from global to shared memory, both addresses aligned to it.
  if ((bytes != 4 && bytes != 8 && bytes != 16) || (uintptr_t)dst % (unsigned)bytes != 0 ||
      (uintptr_t)src % (unsigned)bytes != 0 || !is_shared((uintptr_t)dst) || is_shared((uintptr_t)src))
    fault(pc, dst, (size_t)bytes, "cp.async of another size, alignment or direction than global to shared");
  src_bytes = src_bytes < 0 ? 0 : (src_bytes > bytes ? bytes : src_bytes);
  if (src_bytes > 0) bounded(pc, src, (size_t)src_bytes, false);
  bounded(pc, dst, (size_t)bytes, true);
  wk->pending.push_back(Pending{dst, src, bytes, src_bytes, wk->group});
}

void cp_async_commit() { ++t_worker->group; }

void cp_async_wait(int n) {
  Worker *wk = t_worker;
  // Committed groups older than the newest n land now, in issue order; the rest stay pending.
  std::vector<Pending> keep;
  for (const Pending &p : wk->pending) {
    if (p.group + (uint32_t)n < wk->group) {
      if (p.src_bytes > 0) std::memcpy(p.dst, p.src, (size_t)p.src_bytes);
      std::memset(static_cast<char *>(p.dst) + p.src_bytes, 0, (size_t)(p.bytes - p.src_bytes));
    } else {
      keep.push_back(p);
    }
  }
  wk->pending.swap(keep);
}

// Opt-in shared memory per block of the emulated device, per calling thread (camex_emu_smem_limit;
// 0: sm_90's 227 KiB), and the thread's last launch error.
constexpr int64_t SM90_SMEM_OPTIN = 227 * 1024;
thread_local int64_t t_smem_limit = 0;
thread_local cudaError_t t_launch_error = cudaSuccess;
thread_local bool t_reverse_blocks = false;  // camex_emu_reverse_blocks
// The order in which a block's threads take their turns between barriers (camex_emu_thread_order):
// 0 thread 0 first, 1 the last thread first, 2 (the default) the two alternately, launch by launch.
// A GPU runs the warps of a block in any order, so a kernel whose result depends on it has a race
// (a missing __syncthreads or __syncwarp) that one fixed order could hide. The cost counters always
// use order 0 (the counts do not depend on it; the baselines stay comparable).
int thread_order_from_env() {
  const char *v = std::getenv("CAMEX_EMU_THREAD_ORDER");
  if (!v) return 2;
  return std::strcmp(v, "forward") == 0 ? 0 : std::strcmp(v, "reverse") == 0 ? 1 : 2;
}
thread_local int t_thread_order = thread_order_from_env();
thread_local uint64_t t_launch_no = 0;
int64_t smem_limit() { return t_smem_limit > 0 ? t_smem_limit : SM90_SMEM_OPTIN; }
cudaError_t take_launch_error() {
  const cudaError_t e = t_launch_error;
  t_launch_error = cudaSuccess;
  return e;
}

// Each kernel's opt-in to dynamic shared memory above 48 KiB (cudaFuncSetAttribute's
// MaxDynamicSharedMemorySize). Per calling thread, as the emulated device is (smem_limit): a
// process-wide one, as the GPU's, would let a test emulating sm_80 lower it under another's launch.
thread_local std::unordered_map<const void *, int64_t> t_optin;
constexpr int64_t SMEM_DEFAULT = 48 * 1024;
cudaError_t set_max_smem(const void *fn, int64_t bytes) {
  if (bytes < 0 || bytes > smem_limit()) return cudaErrorInvalidValue;
  t_optin[fn] = bytes;
  return cudaSuccess;
}

void run(dim3 g, dim3 b, const char *kernel, const void *fn, int64_t smem, void (*body)(void *), void *ctx,
         bool whole) {
  if (smem > smem_limit()) {  // the GPU refuses the launch; nothing runs, nothing is counted
    t_launch_error = cudaErrorInvalidValue;
    return;
  }
  if (smem > SMEM_DEFAULT) {  // above 48 KiB only after the kernel's opt-in covers it
    const auto it = t_optin.find(fn);
    const int64_t optin = it == t_optin.end() ? 0 : it->second;
    if (smem > optin) {
      std::fprintf(stderr,
                   "camex emulation: %s launched with %lld bytes of dynamic shared memory, over its opt-in "
                   "(%lld; cudaFuncSetAttribute): the GPU refuses the launch\n",
                   kernel, (long long)smem, (long long)optin);
      t_launch_error = cudaErrorInvalidValue;
      return;
    }
  }
  std::lock_guard<std::mutex> lock(launch_mutex);
  const unsigned nt = b.x * b.y * b.z;
  const bool count = g_mode != 0, sample = g_mode == 2 && !whole;
  g_kernel = kernel;
  const bool rev_threads = !count && (t_thread_order == 1 || (t_thread_order == 2 && (t_launch_no++ & 1)));
  LaunchRec rec;
  if (count) {
    rec.kernel = kernel;
    rec.grid = g;
    rec.threads = nt;
    rec.smem = smem;
    rec.blocks = (uint64_t)g.x * g.y * g.z;
    g_cur = &rec;
  }
  // The launching thread's stack holds the kernel's arguments (Launcher's closure); found once per
  // thread (for the main thread glibc reads /proc/self/maps).
  thread_local uintptr_t host_lo = 0, host_hi = 0;
  if (host_hi == 0) stack_of_self(host_lo, host_hi);
  g_host_lo = host_lo;
  g_host_hi = host_hi;
  refresh_bounds();
  g_dyn_bytes = smem;
  // The blocks to run and the weight of each (1 each without sampling).
  struct Blk {
    uint3 idx;
    uint64_t weight;
  };
  std::vector<Blk> blocks;
  for (auto [z, wz] : samples(g.z, sample))
    for (auto [y, wy] : samples(g.y, sample))
      for (auto [x, wx] : samples(g.x, sample)) blocks.push_back(Blk{make_uint3(x, y, z), wx * wy * wz});
  rec.sampled = blocks.size();
  if (t_reverse_blocks) std::reverse(blocks.begin(), blocks.end());

  FBar bar;
  bar.expected = nt;
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned w = 0; w < nt / 32; ++w) {
    warps.push_back(std::make_unique<Warp>());
    warps.back()->bar.expected = 32;
  }
  std::vector<std::unique_ptr<Worker>> workers;
  for (unsigned t = 0; t < nt; ++t) {
    auto wk = std::make_unique<Worker>();
    wk->tid = make_uint3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
    wk->warp = t / 32 < warps.size() ? warps[t / 32].get() : nullptr;
    wk->lane = t % 32;
    wk->gdim = g;
    wk->bdim = b;
    wk->bar = &bar;
    wk->count = count;
    wk->body = body;
    wk->ctx = ctx;
    char *stack = fiber_stack(t);
    wk->stack_lo = (uintptr_t)stack;
    wk->stack_hi = (uintptr_t)stack + FIBER_STACK;
    workers.push_back(std::move(wk));
  }
  Worker *const outer = t_worker;  // null: launches do not nest
  for (const Blk &blk : blocks) {
    // A block's dynamic shared memory starts as whatever the SM held (often the previous block's
    // data), never zeroed: all-ones bytes here, NaN in f32, f16 and bf16, so that a kernel reading
    // shared memory it never wrote gets NaN in its results instead of a lucky zero.
    if (smem > 0) std::memset(dyn_buf, 0xff, (size_t)smem);
    for (unsigned t = 0; t < nt; ++t) {
      Worker &w = *workers[t];
      w.bid = blk.idx;
      w.weight = blk.weight;
      w.done = false;
      w.pending.clear();  // copies never waited for are a kernel bug; they do not land
      w.group = 0;
      // First frame: r15, r14, r13, r12 = the worker, rbx, rbp, return into camex_emu_fiber_start;
      // 16-byte aligned so that the fiber's first call sees the ABI's alignment.
      void **frame = reinterpret_cast<void **>(w.stack_hi - 72);
      for (int k = 0; k < 9; ++k) frame[k] = nullptr;
      frame[3] = &w;
      frame[6] = reinterpret_cast<void *>(&camex_emu_fiber_start);
      w.sp = frame;
    }
    unsigned live = nt;
    while (live > 0) {
      const uint64_t before = g_progress;
      for (unsigned k = 0; k < nt; ++k) {
        Worker &w = *workers[rev_threads ? nt - 1 - k : k];
        if (w.done) continue;
        t_worker = &w;
        camex_emu_switch(&t_sched_sp, w.sp);
        if (w.done) --live;
      }
      if (live > 0 && g_progress == before) {
        std::fprintf(stderr,
                     "camex emulation: deadlock in %s, block (%u, %u, %u): %u threads wait at a barrier "
                     "(__syncthreads or mma.sync) that the others never reach\n",
                     kernel, blk.idx.x, blk.idx.y, blk.idx.z, live);
        std::abort();
      }
    }
    t_worker = outer;
    if (count) count_block(workers, nt, blk.weight);
  }
  if (g_fault != cudaSuccess) {  // the GPU would have stopped the kernel there and failed the launch
    t_launch_error = g_fault;
    g_fault = cudaSuccess;
  }
  if (count) {
    // Distinct sectors, each with its weight; within a registered allocation at most its sectors.
    std::vector<uint64_t> per_alloc(g_allocs.size(), 0);
    for (auto &[s, w] : rec.sectors) {
      const uintptr_t a = s * 32;
      const auto it = range_holding(g_allocs, a, 1);
      if (it != g_allocs.end()) per_alloc[it - g_allocs.begin()] += w;
      else rec.dram += 32 * w;
    }
    for (size_t k = 0; k < g_allocs.size(); ++k) {
      const uint64_t secs = g_allocs[k].second / 32 - g_allocs[k].first / 32 + 1;
      rec.dram += 32 * std::min(per_alloc[k], secs);
    }
    rec.sectors.clear();
    g_cur = nullptr;
    std::lock_guard<std::mutex> r(rec_mutex);
    g_records.push_back(std::move(rec));
  }
}

}  // namespace emu

// Each fiber runs the kernel body for its block once, then hands back to the scheduler for good.
extern "C" void camex_emu_fiber_main(emu::Worker *w) {
  w->body(w->ctx);
  w->done = true;
  ++emu::g_progress;
  emu::camex_emu_switch(&w->sp, emu::t_sched_sp);
  std::abort();  // never resumed
}

extern "C" int32_t camex_emu_counting(int32_t mode) {
  std::lock_guard<std::mutex> lock(emu::launch_mutex);  // never between the blocks of a launch
  const int prev = emu::g_mode;
  emu::g_mode = mode == 1 || mode == 2 ? mode : 0;
  return prev;
}

extern "C" int64_t camex_emu_smem_limit(int64_t bytes) {
  const int64_t prev = emu::smem_limit();
  emu::t_smem_limit = bytes > 0 ? bytes : 0;
  return prev;
}

extern "C" int32_t camex_emu_reverse_blocks(int32_t reversed) {
  const int32_t prev = emu::t_reverse_blocks ? 1 : 0;
  emu::t_reverse_blocks = reversed != 0;
  return prev;
}

extern "C" int32_t camex_emu_thread_order(int32_t order) {
  const int32_t prev = emu::t_thread_order;
  emu::t_thread_order = order == 0 || order == 1 ? order : 2;
  return prev;
}

extern "C" int64_t camex_emu_sample_above(int64_t blocks) {
  std::lock_guard<std::mutex> lock(emu::launch_mutex);
  const int64_t prev = emu::g_sample_above;
  emu::g_sample_above = blocks < 2 ? 2 : blocks;
  return prev;
}

extern "C" void camex_emu_register(uint64_t ptr, int64_t bytes, int32_t add) {
  std::lock_guard<std::mutex> lock(emu::launch_mutex);
  auto &v = emu::g_allocs;
  const std::pair<uintptr_t, uintptr_t> r{(uintptr_t)ptr, (uintptr_t)ptr + (uintptr_t)(bytes > 0 ? bytes : 0)};
  v.erase(std::remove_if(v.begin(), v.end(), [&](const auto &x) { return x.first == r.first; }), v.end());
  if (add && bytes > 0) v.insert(std::upper_bound(v.begin(), v.end(), r), r);
}

extern "C" void camex_emu_track(uint64_t ptr, int64_t bytes, int32_t live) {
  std::lock_guard<std::mutex> lock(emu::track_mutex);
  auto &m = emu::tracked();
  if (live && bytes > 0) m[(uintptr_t)ptr] = (uintptr_t)ptr + (uintptr_t)bytes;
  else m.erase((uintptr_t)ptr);
  ++emu::g_track_gen;
}

extern "C" void camex_emu_reset(void) {
  std::lock_guard<std::mutex> r(emu::rec_mutex);
  emu::g_records.clear();
}

extern "C" int64_t camex_emu_launches(camex_emu_launch *out, int64_t cap) {
  std::lock_guard<std::mutex> r(emu::rec_mutex);
  const int64_t n = (int64_t)emu::g_records.size();
  for (int64_t k = 0; k < n && k < cap; ++k) {
    const auto &s = emu::g_records[k];
    camex_emu_launch &d = out[k];
    std::memset(&d, 0, sizeof d);
    std::strncpy(d.kernel, s.kernel.c_str(), sizeof d.kernel - 1);
    d.grid_x = s.grid.x;
    d.grid_y = s.grid.y;
    d.grid_z = s.grid.z;
    d.block_threads = s.threads;
    d.dyn_smem_bytes = s.smem;
    d.blocks = (int64_t)s.blocks;
    d.sampled_blocks = (int64_t)s.sampled;
    d.mma_flop = s.mma;
    d.smem_wavefronts = s.wavefronts;
    d.smem_bytes = s.smem_bytes;
    d.gmem_bytes = s.gmem;
    d.dram_bytes = s.dram;
  }
  return n;
}

// ---- the ThreadSanitizer entry points the instrumented kernel sources call ----
// No sanitizer runtime is linked: these are the only definitions.
#define CAMEX_PC ((uintptr_t)__builtin_return_address(0))
#define CAMEX_RW(N)                                                                               \
  extern "C" void __tsan_read##N(void *p) { emu::checked(CAMEX_PC, p, N, false); }                \
  extern "C" void __tsan_write##N(void *p) { emu::checked(CAMEX_PC, p, N, true); }                \
  extern "C" void __tsan_unaligned_read##N(void *p) { emu::bounded(CAMEX_PC, p, N, false); }      \
  extern "C" void __tsan_unaligned_write##N(void *p) { emu::bounded(CAMEX_PC, p, N, true); }      \
  extern "C" void __tsan_volatile_read##N(void *p) { emu::checked(CAMEX_PC, p, N, false); }       \
  extern "C" void __tsan_volatile_write##N(void *p) { emu::checked(CAMEX_PC, p, N, true); }
CAMEX_RW(1)
CAMEX_RW(2)
CAMEX_RW(4)
CAMEX_RW(8)
CAMEX_RW(16)
#undef CAMEX_RW
extern "C" void __tsan_read_range(void *p, unsigned long n) { emu::bounded(CAMEX_PC, p, n, false); }
extern "C" void __tsan_write_range(void *p, unsigned long n) { emu::bounded(CAMEX_PC, p, n, true); }
extern "C" void __tsan_init(void) {}
extern "C" void __tsan_func_entry(void *) {}
extern "C" void __tsan_func_exit(void) {}
extern "C" void __tsan_vptr_update(void **, void *) {}
extern "C" void __tsan_vptr_read(void **) {}
// Function-local statics' guard checks (the host-side process defaults) load a byte atomically.
extern "C" char __tsan_atomic8_load(const volatile char *a, int) { return __atomic_load_n(a, __ATOMIC_ACQUIRE); }

