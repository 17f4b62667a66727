// The fiber scheduler of the SIMT emulation (see simt.h), and the few CUDA runtime calls the
// kernels' host code makes, answered for an emulated sm_90 device.
#include "cuda_emu/simt.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

// Context switch: save the callee-saved registers on the current stack, store its pointer in
// *from, continue on `to` (a stack saved the same way, or a fresh one from new_stack()).
extern "C" void simt_switch(void** from, void* to);
asm(R"(
  .text
  .globl simt_switch
  .type simt_switch, @function
simt_switch:
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
  .size simt_switch, .-simt_switch
)");

namespace vllm_mla::simt {
namespace {

constexpr size_t kStackBytes = size_t(256) << 10;
constexpr int kMaxThreads = 1024;

struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
};

struct Fiber {
  void* sp = nullptr;
  ThreadState st{};
  bool done = false;
  std::vector<PendingCopy> open;                 // issued, not yet committed
  std::vector<std::vector<PendingCopy>> groups;  // committed, oldest first
};

struct Group {  // a barrier: a warp's (collective) or the block's
  int expected = 0, arrived = 0, kind = 0;
  uint64_t generation = 0;
};

struct Warp {
  Group group;
  alignas(16) unsigned char in[32 * 64];
  alignas(16) unsigned char out[32 * 64];
};

struct Emulator {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<char*> stacks;
  Group block;
  int current = 0, live = 0;
  bool reverse = false;        // switch order (VLLM_MLA_EMU_ORDER=reverse)
  uint64_t progress = 0;       // arrivals and exits: a full round without any is a deadlock
  void* main_sp = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
  char* smem = nullptr;        // dynamic shared memory, its end against a guard page
  size_t smem_bytes = 0, smem_mapped = 0;
  char* smem_map = nullptr;
};

thread_local Emulator* g_emu = nullptr;
thread_local std::vector<std::pair<uintptr_t, uintptr_t>>* g_ranges = nullptr;  // [begin, end)

Emulator& emu() { return *g_emu; }
Fiber& cur() { return emu().fibers[emu().current]; }

// The thread's index in its block (x fastest); its warp is index / 32, its lane index % 32.
int linear_tid(const ThreadState& st) {
  return int(st.thread_idx.x +
             st.block_dim.x * (st.thread_idx.y + st.block_dim.y * st.thread_idx.z));
}

void switch_to(int next) {
  Emulator& e = emu();
  Fiber& from = e.fibers[e.current];
  e.current = next;
  simt_switch(&from.sp, e.fibers[next].sp);
}

// Next live fiber after the current one (the current one if it is the only one), in thread
// order or, with VLLM_MLA_EMU_ORDER=reverse, the opposite: a kernel whose result depends on the
// order (a missing barrier, a race on shared memory) gives different results in the two.
int next_live() {
  Emulator& e = emu();
  const int n = int(e.fibers.size());
  for (int i = 1; i <= n; ++i) {
    const int f = e.reverse ? (e.current - i + n) % n : (e.current + i) % n;
    if (!e.fibers[f].done) return f;
  }
  return e.current;
}

[[noreturn]] void abandon(const std::string& what) {
  Emulator& e = emu();
  if (e.error.empty()) e.error = what;
  void* dead;
  simt_switch(&dead, e.main_sp);
  __builtin_unreachable();
}

void complete_copies(Fiber& f, size_t keep) {
  while (f.groups.size() > keep) {
    for (const PendingCopy& c : f.groups.front()) {
      if (c.valid)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    f.groups.erase(f.groups.begin());
  }
}

void exit_thread() {
  Emulator& e = emu();
  Fiber& f = cur();
  if (!f.open.empty()) f.groups.push_back(std::move(f.open));
  complete_copies(f, 0);
  f.done = true;
  --e.live;
  ++e.progress;
  Group& w = e.warps[linear_tid(f.st) / 32].group;
  if (w.arrived > 0) abandon("a thread exited while lanes of its warp wait at a collective");
  --w.expected;
  // exited threads no longer hold up __syncthreads (as on the device)
  if (--e.block.expected == e.block.arrived && e.block.arrived > 0) {
    e.block.arrived = 0;
    ++e.block.generation;
  }
  void* dead;
  if (e.live == 0) {
    simt_switch(&dead, e.main_sp);
  } else {
    const int next = next_live();
    e.current = next;
    simt_switch(&dead, e.fibers[next].sp);
  }
  __builtin_unreachable();
}

void fiber_entry() {
  try {
    (*emu().body)();
  } catch (const std::exception& ex) {
    abandon(std::string("exception in a thread: ") + ex.what());
  }
  exit_thread();
}

// A fresh stack whose first switch "returns" into fiber_entry with the ABI's alignment.
void* new_stack(char* base) {
  auto* top = reinterpret_cast<uintptr_t*>(base + kStackBytes - 64);
  top[0] = reinterpret_cast<uintptr_t>(&fiber_entry);  // 16-byte aligned slot: after `ret`,
  for (int i = 1; i <= 6; ++i) top[-i] = 0;            // rsp % 16 == 8, as after a call
  return top - 6;
}

// Arrive at `g`; the last arrival runs `done` and releases the others.
template <class F>
void arrive(Group& g, int kind, const char* what, F&& done) {
  Emulator& e = emu();
  if (g.arrived == 0) {
    g.kind = kind;
  } else if (g.kind != kind) {
    abandon(std::string(what) + ": lanes of one warp are at different collectives");
  }
  ++e.progress;
  if (++g.arrived == g.expected) {
    done();
    g.arrived = 0;
    ++g.generation;
    return;
  }
  const uint64_t gen = g.generation;
  while (g.generation == gen) {
    const uint64_t seen = e.progress;
    switch_to(next_live());
    if (g.generation == gen && e.progress == seen)
      abandon(std::string(what) + ": deadlock (no thread can reach the barrier)");
  }
}

}  // namespace

const ThreadState& self() { return cur().st; }

char* dynamic_smem() { return emu().smem; }

void syncthreads() {
  Emulator& e = emu();
  arrive(e.block, 0, "__syncthreads", [] {});
}

void warp_collective(int kind, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                     CollectiveOp op) {
  Emulator& e = emu();
  const int tid = linear_tid(cur().st);
  Warp& w = e.warps[tid / 32];
  const int lane = tid % 32;
  if (in_bytes > 64 || out_bytes > 64) abandon("warp collective operands over 64 bytes");
  if (w.group.expected != 32) abandon("warp collective in a warp with exited lanes");
  std::memcpy(w.in + lane * in_bytes, in, in_bytes);
  arrive(w.group, kind, "warp collective", [&] { op(w.in, w.out); });
  std::memcpy(out, w.out + lane * out_bytes, out_bytes);
}

GlobalRanges::GlobalRanges() {
  if (g_ranges != nullptr) throw std::runtime_error("simt: nested GlobalRanges");
  g_ranges = new std::vector<std::pair<uintptr_t, uintptr_t>>();
}

GlobalRanges::~GlobalRanges() {
  delete g_ranges;
  g_ranges = nullptr;
}

void GlobalRanges::add(const void* begin, size_t bytes) {
  const auto b = reinterpret_cast<uintptr_t>(begin);
  g_ranges->emplace_back(b, b + bytes);
}

void check_global_read(const void* p, size_t bytes, const char* what) {
  if (g_ranges == nullptr) return;
  const auto a = reinterpret_cast<uintptr_t>(p);
  for (const auto& [begin, end] : *g_ranges)
    if (a >= begin && a + bytes <= end) return;
  char msg[160];
  std::snprintf(msg, sizeof(msg), "%s: a %zu-byte read at %p lies outside every tensor argument",
                what, bytes, p);
  fail(msg);
}

void async_copy_16(void* dst, const void* src, bool valid) {
  Emulator& e = emu();
  const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (d % 16 || s % 16) fail("cp.async: a 16-byte copy needs 16-byte aligned addresses");
  if (valid) check_global_read(src, 16, "cp.async");
  if (d < reinterpret_cast<uintptr_t>(e.smem) ||
      d + 16 > reinterpret_cast<uintptr_t>(e.smem) + e.smem_bytes)
    fail("cp.async: destination outside the block's dynamic shared memory");
  cur().open.push_back({dst, src, valid});
}

void async_commit() {
  Fiber& f = cur();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void async_wait(int pending_groups_left) {
  complete_copies(cur(), size_t(pending_groups_left));
}

void fail(const char* what) { abandon(what); }

void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const int threads = int(block.x * block.y * block.z);
  if (threads <= 0 || threads > kMaxThreads) throw std::runtime_error("simt: bad block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  thread_local Emulator state;
  Emulator& e = state;
  if (g_emu == &e) throw std::runtime_error("simt: launch from inside a kernel");
  struct Current {  // g_emu is this launch's emulator until it returns or throws
    explicit Current(Emulator* e) { g_emu = e; }
    ~Current() { g_emu = nullptr; }
  } current(&e);
  while (int(e.stacks.size()) < threads) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("simt: cannot map a thread stack");
    mprotect(p, 4096, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    e.stacks.push_back(static_cast<char*>(p));
  }
  // dynamic shared memory ends against a guard page: an overrun faults
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t need = (smem_bytes + page - 1) / page * page + page;
  if (need > e.smem_mapped) {
    if (e.smem_map) munmap(e.smem_map, e.smem_mapped);
    void* p = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("simt: cannot map shared memory");
    e.smem_map = static_cast<char*>(p);
    e.smem_mapped = need;
    mprotect(e.smem_map + need - page, page, PROT_NONE);
  }
  e.smem_bytes = smem_bytes;
  e.smem = e.smem_map + e.smem_mapped - page - ((smem_bytes + 15) / 16 * 16);
  e.body = &body;
  const char* order = std::getenv("VLLM_MLA_EMU_ORDER");
  e.reverse = order != nullptr && std::string(order) == "reverse";
  e.fibers.assign(threads, Fiber{});
  e.warps.assign((threads + 31) / 32, Warp{});
  e.error.clear();
  // blocks one after another; reversed too with VLLM_MLA_EMU_ORDER=reverse (a block that
  // depends on another's writes in the same launch then sees a different result)
  auto nth = [&](unsigned i, unsigned n) { return e.reverse ? n - 1 - i : i; };
  for (unsigned iz = 0; iz < grid.z; ++iz)
    for (unsigned iy = 0; iy < grid.y; ++iy)
      for (unsigned ix = 0; ix < grid.x; ++ix) {
        const unsigned bx = nth(ix, grid.x), by = nth(iy, grid.y), bz = nth(iz, grid.z);
        std::memset(e.smem, 0xa5, smem_bytes);  // uninitialized shared memory: garbage
        for (int t = 0; t < threads; ++t) {
          Fiber& f = e.fibers[t];
          f = Fiber{};
          f.st.thread_idx =
              make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          f.st.block_idx = make_uint3(bx, by, bz);
          f.st.block_dim = block;
          f.st.grid_dim = grid;
          f.sp = new_stack(e.stacks[t]);
        }
        for (int w = 0; w < int(e.warps.size()); ++w) {
          e.warps[w].group = Group{};
          e.warps[w].group.expected = std::min(32, threads - 32 * w);
        }
        e.block = Group{};
        e.block.expected = threads;
        e.live = threads;
        e.current = e.reverse ? threads - 1 : 0;
        simt_switch(&e.main_sp, e.fibers[e.current].sp);
        if (!e.error.empty()) {
          char where[96];
          std::snprintf(where, sizeof(where), " (block %u,%u,%u)", bx, by, bz);
          throw std::runtime_error("simt: " + e.error + where);
        }
      }
}

}  // namespace vllm_mla::simt

// ------------------------------------------------------------------------------------------
// CUDA runtime calls of the host code, for an emulated sm_90 device.
// ------------------------------------------------------------------------------------------
extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  (void)device;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    // few SMs: the schedule still splits long requests, with few blocks to emulate
    case cudaDevAttrMultiProcessorCount: {
      const char* sms = std::getenv("VLLM_MLA_EMU_SMS");
      *value = sms ? std::max(1, std::atoi(sms)) : 4;
      break;
    }
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

}  // extern "C"
