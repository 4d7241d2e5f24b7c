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
//   - every deadlock (no thread can move) as a failed launch that says where the threads wait.
// Inline PTX is not emulated: L2 prefetches are skipped (norm_common.cuh) and the mbarrier
// exchange (NORMFUSE_AB_SPLIT_MBARRIER) is refused by plugins/emulate.py.
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

// One per cluster launch: the S blocks' barrier phases and their shared-memory bases.
struct Cluster {
    explicit Cluster(unsigned size) : size(size), blocks(size, nullptr), exited(size), asleep_for(size, -1) {}
    unsigned size;
    std::vector<Block*> blocks;
    std::vector<std::atomic<bool>> exited;
    std::mutex mutex;
    std::condition_variable changed;
    std::vector<unsigned> arrived;  // per phase, blocks that arrived
    int completed = 0;              // phases every block has arrived at
    int registered = 0;             // blocks whose shared-memory base is known
    std::vector<int> asleep_for;    // per block, the phase it sleeps waiting for, or -1
    std::string error;              // the first block's failure

    // Every block has exited or sleeps for a phase not completed: no one can complete it.
    bool stuck() const {
        for (unsigned r = 0; r < size; ++r)
            if (!exited[r] && (asleep_for[r] < 0 || asleep_for[r] < completed)) return false;
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
            c.changed.notify_all();
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
            int lowest = -1;
            for (const Fiber& f : b.fibers)
                if (!f.done && f.cluster_waiting >= 0 && (lowest < 0 || f.cluster_waiting < lowest)) lowest = f.cluster_waiting;
            if (lowest < 0) {
                b.error = "block " + std::to_string(b.block_idx.x) + " deadlocked: " + waits_description(b);
                break;
            }
            Cluster& c = *b.cluster;
            std::unique_lock<std::mutex> lock(c.mutex);
            c.asleep_for[b.rank] = lowest;
            c.changed.notify_all();
            c.changed.wait(lock, [&] { return c.completed > lowest || !c.error.empty() || c.stuck(); });
            const bool moved = c.completed > lowest;
            c.asleep_for[b.rank] = -1;
            if (!c.error.empty()) {
                b.error = "a peer block failed";
                break;
            }
            if (!moved) {
                b.error = "block " + std::to_string(b.block_idx.x) + " waits at cluster barrier phase " +
                          std::to_string(lowest) + " that its peers never complete";
                break;
            }
            for (int t = 0; t < static_cast<int>(n); ++t)
                if (!b.fibers[t].done && b.fibers[t].cluster_waiting >= 0 && b.fibers[t].cluster_waiting < c.completed)
                    b.ready.push_back(t);
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
        if (!b.error.empty() && c.error.empty()) c.error = b.error;
        c.exited[b.rank] = true;
        c.changed.notify_all();
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
