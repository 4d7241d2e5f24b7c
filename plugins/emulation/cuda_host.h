// Run the normfuse kernels' CUDA source on the CPU, for tests (plugins/emulate.py).
//
// This is not a backend and proves nothing about the PTX, its speed or the GPU's rounding: it
// executes the same source text, one fiber per CUDA thread, so that a wrong index, slice, merge
// or barrier shows up on a machine without a GPU. What it emulates:
//   - threads as fibers of one OS thread per block (started with ucontext, then switched with
//     _setjmp/_longjmp, which skip ucontext's signal-mask system call), switched only at
//     barriers, so a thread runs as far as it can before it waits. Which waiting thread runs
//     next is the launch's `order`: first released first (kFifo), last released first (kLifo:
//     one warp races ahead and overwrites shared memory that the others have not read yet, if a
//     barrier is missing), or a seeded random pick (any other value);
//   - __syncthreads and the warp shuffles as barriers that every live thread of the block (warp)
//     must reach from the same line, else the launch fails with both lines named; a thread that
//     exits while others wait fails it too (the kernels' reductions are reached by every thread);
//   - __shared__ variables as thread_local statics: one copy per OS thread, that is per block;
//   - a thread block cluster as S blocks on S OS threads, with its barrier (sync, arrive, wait),
//     block_rank and map_shared_rank into a peer block's copy of a __shared__ variable; mapping a
//     peer that has exited fails the launch;
//   - the PTX of the mbarrier exchange (NORMFUSE_AB_SPLIT_MBARRIER), which norm_common.cuh keeps
//     in one-instruction functions: shared-memory addresses as 32-bit words (mapa names a peer's
//     copy), mbarrier phases with their pending arrivals and transaction bytes, st.async writing
//     into a peer and completing bytes on its mbarrier, try_wait as a wait for the phase. Bytes
//     never pushed, or pushed beyond a phase, fail the launch (a wait no one completes, or an
//     mbarrier left mid-phase) where the GPU would hang or read a partial too early;
//   - every deadlock (no thread can move) as a failed launch that says where the threads wait.
// Other inline PTX is not emulated: the L2 prefetches are skipped (norm_common.cuh).
#pragma once

// The emulator's own code, the standard library templates it uses and CUDA's conversions are
// optimised even though emulate.py compiles the kernels -O0 (half the compile time): a launch's
// time goes to switching threads. The kernels' own code, after the pop below, stays -O0.
#pragma GCC push_options
#pragma GCC optimize("O2")

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <setjmp.h>
#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define NORMFUSE_HOST_EMULATION 1

// CUDA's headers give these keywords meanings for the host compiler; here they are plain C++.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#undef __cluster_dims__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define __shared__ static thread_local

namespace normfuse_emu {

constexpr int kWarp = 32;
constexpr unsigned kFifo = 0, kLifo = 1;  // scheduling orders; other values seed a random pick
constexpr size_t kStackBytes = 64 * 1024;

struct Cluster;

struct Fiber {
    ucontext_t start;  // where it begins, entered once
    jmp_buf resume;    // where it continues, once it has run
    bool started = false;
    uint3 thread_idx;
    bool done = false;
    int cluster_arrivals = 0;  // cluster barrier phases this thread has arrived at
    int cluster_waiting = -1;  // the phase it waits for, or -1
    bool cluster_pending = false;  // arrived at a phase it has not waited on yet
    bool mbarrier_waiting = false;  // waits for phase 0 of its block's mbarrier at
    std::ptrdiff_t mbarrier_offset = 0;  // this shared-memory offset to complete
};

// A barrier of a fixed set of threads (a block or a warp) that must all arrive from one site.
struct Barrier {
    std::vector<int> waiting;
    const char* file = nullptr;
    int line = 0;
};

// Shuffle operands: two buffers, so that a lane can write its next value while slower lanes
// still read the previous exchange.
struct Warp {
    Barrier barrier;
    uint64_t exchange[2][kWarp] = {};
    unsigned generation = 0;
};

struct Block {
    uint3 block_idx, block_dim, grid_dim;
    Cluster* cluster = nullptr;
    unsigned rank = 0;
    char* tls_base = nullptr;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Barrier barrier;
    std::vector<int> ready;  // threads that may run; ready[ready_head:] are the ones not yet taken
    size_t ready_head = 0;
    std::vector<int> cluster_arrived;  // per phase, threads of this block that arrived
    unsigned order = kFifo;
    uint64_t random_state = 0;
    int current = -1;
    int live = 0;
    jmp_buf scheduler;
    std::string error;
    std::function<void()> body;
};

// An mbarrier object of a block's shared memory: its current phase, the arrivals still pending in
// it (of `count` a phase) and its transaction count (bytes expected less bytes completed).
struct MBarrier {
    int count = 0;
    int pending = 0;
    long long tx = 0;
    unsigned phase = 0;

    // what try_wait.parity 0 reads: phase 0 is over and phase 1 not (the kernel uses one phase)
    bool phase0_complete() const { return (phase & 1u) != 0; }
};

// One per cluster launch: the S blocks' barrier phases, mbarriers and shared-memory bases. Every
// change that may let a waiting thread go on moves `progress`; a block with nothing to run sleeps
// until it moves, and the cluster is stuck when every block has exited or sleeps having seen the
// latest progress.
struct Cluster {
    explicit Cluster(unsigned size) : size(size), blocks(size, nullptr), exited(size), asleep_at(size, -1) {}
    unsigned size;
    std::vector<Block*> blocks;
    std::vector<std::atomic<bool>> exited;
    std::mutex mutex;
    std::condition_variable changed;
    std::vector<unsigned> arrived;  // per phase, blocks that arrived
    int completed = 0;              // phases every block has arrived at
    int registered = 0;             // blocks whose shared-memory base is known
    std::map<std::pair<unsigned, std::ptrdiff_t>, MBarrier> mbarriers;  // by block rank and offset
    long long progress = 0;
    std::vector<long long> asleep_at;  // per block, the progress it fell asleep at, or -1
    std::string error;              // the first block's failure

    void moved() {
        ++progress;
        changed.notify_all();
    }
    bool stuck() const {
        for (unsigned r = 0; r < size; ++r)
            if (!exited[r] && asleep_at[r] != progress) return false;
        return true;
    }
};

inline thread_local Block* tls_block = nullptr;
inline thread_local std::vector<std::unique_ptr<char[]>> tls_stacks;  // fiber stacks, reused by the next block
inline thread_local char tls_anchor;  // a fixed point of this module's thread-local block

inline Block& block() { return *tls_block; }
inline Fiber& fiber() { return tls_block->fibers[tls_block->current]; }

inline std::string where(const char* file, int line) {
    const char* name = std::strrchr(file, '/');
    return std::string(name ? name + 1 : file) + ":" + std::to_string(line);
}

// Give the CPU back to the block's scheduler; returns when this thread is scheduled again.
inline void yield() {
    Block& b = block();
    Fiber& f = fiber();
    if (!_setjmp(f.resume)) _longjmp(b.scheduler, 1);  // after a failure the scheduler never comes back
}

// The launch's first failure, said as where it happened and what.
inline void record(Block& b, unsigned thread, const std::string& message) {
    if (b.error.empty())
        b.error = "block " + std::to_string(b.block_idx.x) + ", thread " + std::to_string(thread) + ": " + message;
}

// Fail the launch from the running thread, which is never resumed.
[[noreturn]] inline void fail(const std::string& message) {
    Block& b = block();
    record(b, fiber().thread_idx.x, message);
    _longjmp(b.scheduler, 1);
}

// Arrive at `bar` (of `members` live threads) from file:line; returns once all have arrived.
inline void arrive_and_wait(Barrier& bar, int members, const char* file, int line, const char* what) {
    Block& b = block();
    if (bar.waiting.empty()) {
        bar.file = file;
        bar.line = line;
    } else if (bar.line != line || std::strcmp(bar.file, file) != 0) {
        fail(std::string(what) + " reached from " + where(file, line) + " while others wait at " +
             where(bar.file, bar.line));
    }
    bar.waiting.push_back(b.current);
    if (static_cast<int>(bar.waiting.size()) == members) {
        for (int t : bar.waiting) b.ready.push_back(t);
        bar.waiting.clear();
    }
    yield();
}

inline void sync_block(const char* file, int line) {
    arrive_and_wait(block().barrier, block().live, file, line, "__syncthreads");
}

inline int lane() { return static_cast<int>(fiber().thread_idx.x) % kWarp; }

inline int warp_members(const Block& b, int warp) {
    return std::min<int>(kWarp, static_cast<int>(b.block_dim.x) - warp * kWarp);
}

// Every lane of the warp (full mask) exchanges `v`; returns the value of lane `source(lane)`.
template <typename T, typename Source>
T exchange(unsigned mask, T v, Source source, const char* file, int line) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
    Block& b = block();
    const int warp = static_cast<int>(fiber().thread_idx.x) / kWarp;
    const int members = warp_members(b, warp);
    if (mask != (members == kWarp ? 0xffffffffu : (1u << members) - 1)) {
        fail("warp shuffle with mask " + std::to_string(mask) + " at " + where(file, line) +
             ": only full warps are emulated");
    }
    for (int l = 0; l < members; ++l) {
        if (b.fibers[warp * kWarp + l].done) fail("warp shuffle at " + where(file, line) + " after lane " +
                                                  std::to_string(l) + " exited");
    }
    Warp& w = b.warps[warp];
    const unsigned buffer = w.generation & 1u;
    uint64_t raw = 0;
    std::memcpy(&raw, &v, sizeof(T));
    w.exchange[buffer][lane()] = raw;
    const bool last = static_cast<int>(w.barrier.waiting.size()) + 1 == members;
    if (last) ++w.generation;  // the next exchange writes the other buffer
    arrive_and_wait(w.barrier, members, file, line, "warp shuffle");
    const int from = source(lane());
    T out;
    std::memcpy(&out, &w.exchange[buffer][from < members ? from : lane()], sizeof(T));
    return out;
}

// ---------------------------------------------------------------- thread block clusters
inline void cluster_phase_arrive(const char* file, int line) {
    Block& b = block();
    Fiber& f = fiber();
    if (b.cluster == nullptr) fail("cluster barrier at " + where(file, line) + " in a launch without clusters");
    if (f.cluster_pending) fail("cluster barrier arrival at " + where(file, line) + " before waiting on the last one");
    f.cluster_pending = true;
    const int phase = f.cluster_arrivals++;
    if (static_cast<int>(b.cluster_arrived.size()) <= phase) b.cluster_arrived.resize(phase + 1, 0);
    if (++b.cluster_arrived[phase] == b.live) {  // the whole block has arrived: so has the block
        Cluster& c = *b.cluster;
        std::lock_guard<std::mutex> lock(c.mutex);
        if (c.arrived.size() <= static_cast<size_t>(phase)) c.arrived.resize(phase + 1, 0);
        if (++c.arrived[phase] == c.size) {
            c.completed = phase + 1;
            c.moved();
        }
    }
}

inline void cluster_phase_wait(const char* file, int line) {
    Block& b = block();
    Fiber& f = fiber();
    if (b.cluster == nullptr) fail("cluster barrier at " + where(file, line) + " in a launch without clusters");
    if (!f.cluster_pending) fail("cluster barrier wait at " + where(file, line) + " without an arrival");
    f.cluster_pending = false;
    f.cluster_waiting = f.cluster_arrivals - 1;
    yield();  // the scheduler resumes this thread once the phase has completed
    f.cluster_waiting = -1;
}

template <typename T>
T* map_shared_rank(T* local, unsigned rank, const char* file, int line) {
    Block& b = block();
    Cluster& c = *b.cluster;
    if (rank >= c.size) fail("map_shared_rank(" + std::to_string(rank) + ") in a cluster of " + std::to_string(c.size));
    if (c.exited[rank]) fail("map_shared_rank at " + where(file, line) + ": block rank " + std::to_string(rank) +
                             " of the cluster has exited, its shared memory is gone");
    const std::ptrdiff_t offset = reinterpret_cast<char*>(local) - &tls_anchor;
    return reinterpret_cast<T*>(c.blocks[rank]->tls_base + offset);
}

// ---------------------------------------------------------------- the mbarrier exchange's PTX
// A shared-memory address is a 32-bit word, as in PTX: the low 24 bits the variable's offset from
// this module's thread-local anchor (the same in every block's copy), the high 8 bits 0 for this
// block's own window (shared::cta) or 1 + the rank that mapa named (shared::cluster).
constexpr uint32_t kOffsetMask = 0xFFFFFFu;

inline Cluster& cluster_for(const char* what) {
    if (block().cluster == nullptr) fail(std::string(what) + " in a launch without clusters");
    return *block().cluster;
}

inline uint32_t shared_address(const void* p) {
    const std::ptrdiff_t offset = static_cast<const char*>(p) - &tls_anchor;
    if (offset < -(1 << 23) || offset >= (1 << 23)) fail("a __shared__ variable out of the emulated address range");
    return static_cast<uint32_t>(offset) & kOffsetMask;
}

struct SharedPlace {
    unsigned rank;
    std::ptrdiff_t offset;
};

inline SharedPlace place_of(uint32_t address) {
    std::ptrdiff_t offset = address & kOffsetMask;
    if (offset & 0x800000) offset -= 0x1000000;
    const unsigned tag = address >> 24;
    return {tag == 0 ? block().rank : tag - 1, offset};
}

inline uint32_t peer_address(uint32_t local, int rank) {  // mapa.shared::cluster.u32
    Cluster& c = cluster_for("mapa");
    if (local >> 24) fail("mapa of an address that is already a cluster address");
    if (rank < 0 || rank >= static_cast<int>(c.size))
        fail("mapa to block rank " + std::to_string(rank) + " in a cluster of " + std::to_string(c.size));
    return (local & kOffsetMask) | (static_cast<uint32_t>(rank + 1) << 24);
}

// The thread's own block's mbarrier at `address`, or "" and an error (said once the lock is left:
// fail() never returns, and would leave the cluster's mutex held).
inline MBarrier* own_mbarrier(Cluster& c, uint32_t address, const char* what, std::string& error) {
    const SharedPlace at = place_of(address);
    if (at.rank != block().rank) {
        error = std::string(what) + " on a peer's mbarrier: it takes a shared::cta address";
        return nullptr;
    }
    auto it = c.mbarriers.find({at.rank, at.offset});
    if (it == c.mbarriers.end()) {
        error = std::string(what) + " on an mbarrier that is not initialised";
        return nullptr;
    }
    return &it->second;
}

// A phase completes once its arrivals are in and its transaction count is back to zero.
inline void settle(Cluster& c, MBarrier& m) {
    if (m.pending == 0 && m.tx == 0) {
        ++m.phase;
        m.pending = m.count;
    }
    c.moved();
}

inline void mbarrier_init(uint32_t barrier) {  // mbarrier.init ..., 1; fence.mbarrier_init
    Cluster& c = cluster_for("mbarrier.init");
    const SharedPlace at = place_of(barrier);
    if (at.rank != block().rank) fail("mbarrier.init of a peer's mbarrier");
    std::lock_guard<std::mutex> lock(c.mutex);
    MBarrier& m = c.mbarriers[{at.rank, at.offset}];
    m = MBarrier{1, 1, 0, 0};
    c.moved();
}

inline void mbarrier_arrive_expect_tx(uint32_t barrier, int bytes) {
    Cluster& c = cluster_for("mbarrier.arrive.expect_tx");
    std::string error;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        if (MBarrier* m = own_mbarrier(c, barrier, "mbarrier.arrive.expect_tx", error)) {
            if (m->pending == 0) {
                error = "mbarrier.arrive.expect_tx: more arrivals than the mbarrier's count";
            } else {
                m->tx += bytes;
                --m->pending;
                settle(c, *m);
            }
        }
    }
    if (!error.empty()) fail(error);
}

// st.async.shared::cluster.mbarrier::complete_tx::bytes.b32: 4 bytes into a (peer's) shared
// memory, then 4 transaction bytes completed on the mbarrier beside them.
inline void push_word(uint32_t remote, float v, uint32_t remote_barrier) {
    Cluster& c = cluster_for("st.async");
    const SharedPlace to = place_of(remote), bar = place_of(remote_barrier);
    std::string error;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        auto it = c.mbarriers.find({bar.rank, bar.offset});
        if (to.rank != bar.rank) {
            error = "st.async into block rank " + std::to_string(to.rank) + " completing bytes on an mbarrier of rank " +
                    std::to_string(bar.rank);
        } else if (c.exited[to.rank]) {
            error = "st.async into block rank " + std::to_string(to.rank) + " of the cluster, which has exited";
        } else if (it == c.mbarriers.end()) {
            error = "st.async completing bytes on an mbarrier of block rank " + std::to_string(bar.rank) +
                    " that is not initialised";
        } else {
            std::memcpy(c.blocks[to.rank]->tls_base + to.offset, &v, sizeof v);
            it->second.tx -= static_cast<long long>(sizeof v);
            settle(c, it->second);
        }
    }
    if (!error.empty()) fail(error);
}

// mbarrier.try_wait.parity 0 in a loop: returns once phase 0 has completed. A thread that would
// spin sleeps instead, so that a phase no one completes is a failed launch, not a hang.
inline bool mbarrier_phase0_complete(uint32_t barrier) {
    Cluster& c = cluster_for("mbarrier.try_wait");
    std::string error;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        MBarrier* m = own_mbarrier(c, barrier, "mbarrier.try_wait", error);
        if (m != nullptr && m->phase0_complete()) return true;
    }
    if (!error.empty()) fail(error);
    Fiber& f = fiber();
    f.mbarrier_waiting = true;
    f.mbarrier_offset = place_of(barrier).offset;
    yield();  // the scheduler resumes this thread once the phase has completed
    f.mbarrier_waiting = false;
    return true;
}

inline void cluster_arrive_relaxed() { cluster_phase_arrive(__FILE__, __LINE__); }
inline void cluster_wait() { cluster_phase_wait(__FILE__, __LINE__); }

// ---------------------------------------------------------------- running a grid
inline void fiber_main() {
    Block& b = block();
    b.body();
    Fiber& f = fiber();
    f.done = true;
    --b.live;
    // the kernels' barriers are reached by every thread: one that exits while others wait is a bug
    auto exited_during = [&](const Barrier& bar, const char* what) {
        if (!bar.waiting.empty())
            record(b, f.thread_idx.x, "exited while " + std::to_string(bar.waiting.size()) + " threads wait at " +
                                          what + " (" + where(bar.file, bar.line) + ")");
    };
    exited_during(b.barrier, "__syncthreads");
    exited_during(b.warps[f.thread_idx.x / kWarp].barrier, "a warp shuffle");  // other warps are not its business
    if (b.cluster != nullptr && f.cluster_arrivals != static_cast<int>(b.cluster_arrived.size()))
        record(b, f.thread_idx.x, "exited after " + std::to_string(f.cluster_arrivals) +
                                      " cluster barrier arrivals, where others of its block made " +
                                      std::to_string(b.cluster_arrived.size()));
    _longjmp(b.scheduler, 1);  // a fiber never returns: its stack has nowhere to return to
}

inline std::string waits_description(const Block& b) {
    std::string out;
    if (!b.barrier.waiting.empty())
        out += std::to_string(b.barrier.waiting.size()) + " at __syncthreads (" + where(b.barrier.file, b.barrier.line) + ") ";
    for (size_t w = 0; w < b.warps.size(); ++w)
        if (!b.warps[w].barrier.waiting.empty())
            out += std::to_string(b.warps[w].barrier.waiting.size()) + " of warp " + std::to_string(w) +
                   " at a shuffle (" + where(b.warps[w].barrier.file, b.warps[w].barrier.line) + ") ";
    return out;
}

// The ready thread to run next, in the launch's order.
inline int next_thread(Block& b) {
    int t;
    if (b.order == kFifo) {
        t = b.ready[b.ready_head++];
    } else {
        size_t pick = b.ready.size() - 1;  // kLifo: the last released
        if (b.order != kLifo) {
            b.random_state = b.random_state * 6364136223846793005ull + 1442695040888963407ull;  // Knuth's LCG
            pick = b.ready_head + static_cast<size_t>(b.random_state >> 33) % (b.ready.size() - b.ready_head);
        }
        t = b.ready[pick];
        b.ready[pick] = b.ready.back();
        b.ready.pop_back();
    }
    if (b.ready_head == b.ready.size()) {  // all taken: start the queue again
        b.ready.clear();
        b.ready_head = 0;
    }
    return t;
}

inline bool waits_on_cluster(const Block& b) {
    for (const Fiber& f : b.fibers)
        if (!f.done && (f.cluster_waiting >= 0 || f.mbarrier_waiting)) return true;
    return false;
}

inline bool phase_done(const Cluster& c, const Block& b, const Fiber& f) {
    auto it = c.mbarriers.find({b.rank, f.mbarrier_offset});
    return it != c.mbarriers.end() && it->second.phase0_complete();
}

// Queue the block's threads whose cluster barrier phase or mbarrier phase has completed (with
// the cluster's mutex held); false if there is none.
inline bool release_cluster_waiters(Block& b, const Cluster& c) {
    bool any = false;
    for (int t = 0; t < static_cast<int>(b.fibers.size()); ++t) {
        const Fiber& f = b.fibers[t];
        if (f.done) continue;
        if ((f.cluster_waiting >= 0 && f.cluster_waiting < c.completed) || (f.mbarrier_waiting && phase_done(c, b, f))) {
            b.ready.push_back(t);
            any = true;
        }
    }
    return any;
}

inline std::string cluster_waits_description(const Block& b, const Cluster& c) {
    int lowest = -1, on_mbarrier = 0;
    for (const Fiber& f : b.fibers) {
        if (f.done) continue;
        if (f.cluster_waiting >= 0 && (lowest < 0 || f.cluster_waiting < lowest)) lowest = f.cluster_waiting;
        if (f.mbarrier_waiting) ++on_mbarrier;
    }
    std::string out;
    if (lowest >= 0) out = "cluster barrier phase " + std::to_string(lowest);
    for (const Fiber& f : b.fibers) {
        if (f.done || !f.mbarrier_waiting) continue;
        auto it = c.mbarriers.find({b.rank, f.mbarrier_offset});
        if (it == c.mbarriers.end()) break;
        const MBarrier& m = it->second;
        out += std::string(out.empty() ? "" : " and ") + "an mbarrier phase (" + std::to_string(on_mbarrier) +
               " threads; " + std::to_string(m.pending) + " arrivals pending, " + std::to_string(m.tx) +
               " transaction bytes outstanding)";
        break;
    }
    return out;
}

// Run every thread of one block on this OS thread until all have exited or the launch fails.
inline void run_block(Block& b) {
    tls_block = &b;
    b.tls_base = &tls_anchor;
    const unsigned n = b.block_dim.x;
    b.fibers.resize(n);
    b.warps.resize((n + kWarp - 1) / kWarp);
    b.live = static_cast<int>(n);
    if (b.cluster != nullptr) {  // no block runs before every peer's shared memory can be mapped
        std::unique_lock<std::mutex> lock(b.cluster->mutex);
        b.cluster->blocks[b.rank] = &b;
        ++b.cluster->registered;
        b.cluster->changed.notify_all();
        b.cluster->changed.wait(lock, [&] { return b.cluster->registered == static_cast<int>(b.cluster->size); });
    }
    while (tls_stacks.size() < n) tls_stacks.emplace_back(new char[kStackBytes]);
    ucontext_t model;  // one getcontext (a system call) for all of the block's threads
    getcontext(&model);
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = b.fibers[t];
        f.thread_idx = {t, 0, 0};
        f.start = model;
        f.start.uc_stack.ss_sp = tls_stacks[t].get();
        f.start.uc_stack.ss_size = kStackBytes;
        f.start.uc_link = nullptr;
        makecontext(&f.start, fiber_main, 0);
        b.ready.push_back(static_cast<int>(t));
    }
    int finished = 0;
    while (b.error.empty() && finished < static_cast<int>(n)) {
        if (b.ready_head == b.ready.size()) {
            // nothing can move in this block: it may wait for its cluster's other blocks
            if (!waits_on_cluster(b)) {
                b.error = "block " + std::to_string(b.block_idx.x) + " deadlocked: " + waits_description(b);
                break;
            }
            Cluster& c = *b.cluster;
            std::unique_lock<std::mutex> lock(c.mutex);
            bool released = false;
            while (!(released = release_cluster_waiters(b, c)) && c.error.empty() && !c.stuck()) {
                c.asleep_at[b.rank] = c.progress;
                c.changed.notify_all();  // its peers may now find the cluster stuck
                c.changed.wait(lock, [&] { return c.progress != c.asleep_at[b.rank] || !c.error.empty() || c.stuck(); });
                if (c.progress != c.asleep_at[b.rank]) c.asleep_at[b.rank] = -1;
            }
            c.asleep_at[b.rank] = -1;
            if (!c.error.empty()) {
                b.error = "a peer block failed";
                break;
            }
            if (!released) {
                b.error = "block " + std::to_string(b.block_idx.x) + " waits at " + cluster_waits_description(b, c) +
                          " that its peers never complete";
                break;
            }
            continue;
        }
        b.current = next_thread(b);
        Fiber& f = b.fibers[b.current];
        if (!_setjmp(b.scheduler)) {
            if (f.started) _longjmp(f.resume, 1);
            f.started = true;
            setcontext(&f.start);
        }
        if (b.fibers[b.current].done) ++finished;
    }
    if (b.cluster != nullptr) {
        Cluster& c = *b.cluster;
        std::lock_guard<std::mutex> lock(c.mutex);
        for (const auto& [key, m] : c.mbarriers) {  // bytes pushed past a phase leave it unbalanced
            if (key.first == b.rank && b.error.empty() && (m.pending != m.count || m.tx != 0))
                b.error = "block " + std::to_string(b.block_idx.x) + " exited with its mbarrier mid-phase: " +
                          std::to_string(m.pending) + " of " + std::to_string(m.count) + " arrivals pending, " +
                          std::to_string(m.tx) + " transaction bytes outstanding";
        }
        if (!b.error.empty() && c.error.empty()) c.error = b.error;
        c.exited[b.rank] = true;
        c.moved();
    }
    tls_block = nullptr;
}

// Launch `body` (the kernel with its arguments bound) on `grid` blocks of `threads` threads, in
// clusters of `cluster_size` consecutive blocks. Returns an empty string or the first failure.
inline std::string run_grid(const std::function<void()>& body, unsigned grid, unsigned threads, unsigned cluster_size,
                            unsigned order) {
    if (cluster_size == 0 || grid % cluster_size != 0)
        return "grid of " + std::to_string(grid) + " blocks is not a whole number of clusters of " +
               std::to_string(cluster_size);
    if (threads == 0 || threads > 1024) return "blocks of " + std::to_string(threads) + " threads";
    auto make_block = [&](unsigned index, Cluster* cluster, unsigned rank) {
        std::unique_ptr<Block> b(new Block());
        b->block_idx = {index, 0, 0};
        b->block_dim = {threads, 1, 1};
        b->grid_dim = {grid, 1, 1};
        b->cluster = cluster;
        b->rank = rank;
        b->body = body;
        b->order = order;
        b->random_state = (static_cast<uint64_t>(order) << 32) ^ index;
        return b;
    };
    if (cluster_size == 1) {  // one block after another on this thread, as blocks reuse an SM
        for (unsigned index = 0; index < grid; ++index) {
            auto b = make_block(index, nullptr, 0);
            run_block(*b);
            if (!b->error.empty()) return b->error;
        }
        return "";
    }
    for (unsigned first = 0; first < grid; first += cluster_size) {
        Cluster cluster(cluster_size);
        std::vector<std::unique_ptr<Block>> blocks;
        for (unsigned r = 0; r < cluster_size; ++r) blocks.push_back(make_block(first + r, &cluster, r));
        // every block of a cluster on its own OS thread, kept until the whole cluster is done,
        // so that no peer's thread-local shared memory disappears under a read
        std::vector<std::thread> workers;
        for (auto& b : blocks) workers.emplace_back([&b] { run_block(*b); });
        for (auto& w : workers) w.join();
        if (!cluster.error.empty()) return cluster.error;  // the first failure, not its echoes
        for (auto& b : blocks)
            if (!b->error.empty()) return b->error;
    }
    return "";
}

template <typename... A, size_t... I>
void call(void (*kernel)(A...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}

// cuLaunchKernel's convention: params[i] points at the value of the kernel's i-th parameter.
template <typename... A>
const char* launch(void (*kernel)(A...), unsigned grid, unsigned threads, unsigned cluster_size, unsigned order,
                   void** params) {
    static thread_local std::string result;
    result = run_grid([=] { call(kernel, params, std::index_sequence_for<A...>{}); }, grid, threads, cluster_size,
                      order);
    return result.empty() ? nullptr : result.c_str();
}

}  // namespace normfuse_emu

// ---------------------------------------------------------------- the CUDA names the kernels use
#define threadIdx (::normfuse_emu::fiber().thread_idx)
#define blockIdx (::normfuse_emu::block().block_idx)
#define blockDim (::normfuse_emu::block().block_dim)
#define gridDim (::normfuse_emu::block().grid_dim)
#define __syncthreads() ::normfuse_emu::sync_block(__FILE__, __LINE__)
#define __cvta_generic_to_shared(p) ::normfuse_emu::shared_address(p)

template <typename T>
inline T normfuse_emu_shfl_xor(unsigned mask, T v, int lane_mask, const char* file, int line) {
    return ::normfuse_emu::exchange(mask, v, [=](int lane) { return lane ^ lane_mask; }, file, line);
}
template <typename T>
inline T normfuse_emu_shfl(unsigned mask, T v, int source, int width, const char* file, int line) {
    return ::normfuse_emu::exchange(mask, v, [=](int lane) { return (lane & ~(width - 1)) + source % width; }, file,
                                    line);
}
#define __shfl_xor_sync(mask, v, lane_mask, ...) normfuse_emu_shfl_xor(mask, v, lane_mask, __FILE__, __LINE__)
#define __shfl_sync(mask, v, source, width) normfuse_emu_shfl(mask, v, source, width, __FILE__, __LINE__)

template <typename T>
inline T __ldg(const T* p) { return *p; }

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float v) { unsigned u; std::memcpy(&u, &v, 4); return u; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

#pragma GCC pop_options
