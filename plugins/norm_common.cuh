// Shared pieces of the normfuse normalisation kernels.
//
// Every kernel normalises rows of `hidden` elements. A group of TPR threads owns one row and a
// block holds RPB such groups. Each thread keeps up to C slots of V elements in registers, where
// V = 16 bytes / sizeof(T), so a row of up to C * V * TPR elements is read from global memory once.
// Longer rows take a streaming path that reads the input twice (the second read mostly from L2).
//
// Statistics are always accumulated in fp32. For a row held in registers, LayerNorm uses the
// exact two-pass formula over the registers (mean, then mean of squared deviations): one pass over
// memory, and none of the cancellation of E[x^2] - E[x]^2 when the mean is large against the
// spread. The streaming path uses Welford's update per thread and Chan's merge across threads.
//
// Row-loop variants (RPB a multiple of the groups a block holds): each group normalises
// K = RPB / groups rows in turn. gamma/beta are read once into registers, and the next row's loads
// are issued before the current row's reductions, so its memory latency overlaps them instead of
// being hidden only by other resident blocks. They compute every row exactly as the one-row
// variants do (same operations in the same order), so their outputs are bit-identical.
//
// The element type T and the gamma/beta type G are fixed when the module is compiled
// (NORMFUSE_X and NORMFUSE_G); the thread layout variants come from NORMFUSE_VARIANTS, the list
// that plugins/config.py generates, so the Python launch table and the PTX always agree.
//
// A/B switches (compile-time, all off by default; `python bench/kernels.py --sources
// HEAD,HEAD+NAME` or `worktree,worktree+NAME` times a switched build beside the default one).
// The default kernels are the ones the GPU tests prove; a switch is a candidate until it has
// passed them too.
//   NORMFUSE_AB_PLAIN_LOADS       x/residual/gamma/beta through plain loads, not the read-only path
//   NORMFUSE_AB_NO_PREFETCH       no L2 prefetch of gamma/beta before the statistics
//   NORMFUSE_AB_NO_TRAILING_SYNC  each reduction of a row has its own shared buffer, so the
//                                 barrier after reading it (1 of the 2 per block reduction) goes
//   NORMFUSE_AB_PARAMS_EARLY      gamma/beta of every slot loaded into registers before the
//                                 statistics (their latency overlaps the reduction; more registers)
//   NORMFUSE_AB_LN_ONE_REDUCTION  LayerNorm in registers: exact per-thread moments merged with
//                                 Chan's rule in one block reduction instead of two
//   NORMFUSE_AB_LOOP_PARAMS_PER_ROW  row-loop variants load gamma/beta for each row after its
//                                 statistics instead of once into registers (fewer registers for
//                                 16-bit gamma: LayerNorm bf16 4096 (256x2x2) 88 -> 72, 3 blocks/SM)
//   NORMFUSE_AB_SPLIT_MBARRIER    split-row variants exchange partials with st.async into each
//                                 block's inbox, counted by an mbarrier, instead of a cluster
//                                 barrier on each side of reading the peers' shared memory
//   NORMFUSE_AB_MIN_THREADS_PER_SM=N  ask ptxas for N / block resident blocks per SM (a register
//                                 cap; it may spill): the entry points' __launch_bounds__ gets
//                                 that second argument
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace normfuse {

// ---------------------------------------------------------------- element conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------- 16-byte vector access
// N consecutive elements starting at a 16-byte aligned address, moved as N*sizeof(T)/16 loads.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[N]) {
    constexpr int kPer = 16 / sizeof(T);
    static_assert(N % kPer == 0, "a vector is a whole number of 16-byte chunks");
    #pragma unroll
    for (int k = 0; k < N / kPer; ++k) {
        union { uint4 raw; T e[kPer]; } chunk;
#ifdef NORMFUSE_AB_PLAIN_LOADS
        chunk.raw = *reinterpret_cast<const uint4*>(p + k * kPer);
#else
        chunk.raw = __ldg(reinterpret_cast<const uint4*>(p + k * kPer));  // read-only path
#endif
        #pragma unroll
        for (int j = 0; j < kPer; ++j) out[k * kPer + j] = to_float(chunk.e[j]);
    }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[N]) {
    constexpr int kPer = 16 / sizeof(T);
    static_assert(N % kPer == 0, "a vector is a whole number of 16-byte chunks");
    #pragma unroll
    for (int k = 0; k < N / kPer; ++k) {
        union { uint4 raw; T e[kPer]; } chunk;
        #pragma unroll
        for (int j = 0; j < kPer; ++j) chunk.e[j] = from_float<T>(in[k * kPer + j]);
        *reinterpret_cast<uint4*>(p + k * kPer) = chunk.raw;
    }
}

template <typename T>
__device__ __forceinline__ float load_one(const T* __restrict__ p) {
#ifdef NORMFUSE_AB_PLAIN_LOADS
    return to_float(*p);
#else
    return to_float(__ldg(p));
#endif
}

// Ask L2 for the line holding p (gamma/beta, fetched while the row's statistics are reduced).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifndef NORMFUSE_HOST_EMULATION  // plugins/emulation: no L2 to ask
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
    (void)p;
#endif
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---------------------------------------------------------------- statistics
// Count, mean and sum of squared deviations of a set of values; merged with Chan et al.'s rule.
struct Moments {
    float n, mean, m2;
};

__device__ __forceinline__ float combine(float a, float b) { return a + b; }

__device__ __forceinline__ Moments combine(Moments a, Moments b) {
    if (b.n == 0.f) return a;
    if (a.n == 0.f) return b;
    const float n = a.n + b.n;
    const float delta = b.mean - a.mean;
    const float fb = b.n / n;
    return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

// Welford's update with one value (streaming path only).
__device__ __forceinline__ void accumulate(Moments& m, float v) {
    m.n += 1.f;
    const float delta = v - m.mean;
    m.mean += delta / m.n;
    m.m2 += delta * (v - m.mean);
}

__device__ __forceinline__ float shfl_xor(float v, int mask) {
    return __shfl_xor_sync(0xffffffffu, v, mask);
}
__device__ __forceinline__ Moments shfl_xor(Moments v, int mask) {
    return {shfl_xor(v.n, mask), shfl_xor(v.mean, mask), shfl_xor(v.m2, mask)};
}
template <int WIDTH> __device__ __forceinline__ float shfl_first(float v) {
    return __shfl_sync(0xffffffffu, v, 0, WIDTH);
}
template <int WIDTH> __device__ __forceinline__ Moments shfl_first(Moments v) {
    return {shfl_first<WIDTH>(v.n), shfl_first<WIDTH>(v.mean), shfl_first<WIDTH>(v.m2)};
}

// Combine `v` over the TPR threads of a row; every thread of the row gets the same result
// (the same bits: all of them use one combination order). Must be reached by every thread of
// the block, including those whose row is past the end.
// NORMFUSE_AB_NO_TRAILING_SYNC: kSite tells the reductions of one row apart, so that each has its
// own shared buffer (one per instantiation); a block runs each site once (one row group per
// block), so no buffer is written again while a thread still reads it.
#ifdef NORMFUSE_AB_NO_TRAILING_SYNC
template <int TPR, int RPB, typename R, int kSite = 0>
#define NORMFUSE_SITE(k) , k
#else
template <int TPR, int RPB, typename R>
#define NORMFUSE_SITE(k)
#endif
__device__ __forceinline__ R row_allreduce(R v) {
    constexpr int kSpan = TPR < 32 ? TPR : 32;
    #pragma unroll
    for (int mask = kSpan / 2; mask > 0; mask >>= 1) v = combine(v, shfl_xor(v, mask));
    v = shfl_first<kSpan>(v);
    if constexpr (TPR > 32) {
        constexpr int kWarps = TPR / 32;
        __shared__ R partial[RPB][kWarps];
        const int warp = threadIdx.x / 32;
        const int group = warp / kWarps;
        if ((threadIdx.x & 31) == 0) partial[group][warp % kWarps] = v;
        __syncthreads();
        v = partial[group][0];
        #pragma unroll
        for (int w = 1; w < kWarps; ++w) v = combine(v, partial[group][w]);
#ifndef NORMFUSE_AB_NO_TRAILING_SYNC
        __syncthreads();  // `partial` may be written again by the next reduction
#endif
    }
    return v;
}

// ---------------------------------------------------------------- one row group per block
// kCentered: LayerNorm (subtract the mean, add beta); otherwise RMSNorm.
// kResidual: the Add forms, which normalise x + residual and also write that sum.
template <bool kCentered, bool kResidual, typename T, typename G>
struct RowArgs {
    const T* __restrict__ x;
    const T* __restrict__ residual;
    const G* __restrict__ gamma;
    const G* __restrict__ beta;
    T* __restrict__ y;
    T* __restrict__ sum;
    int hidden;
    float eps;
    int lane;     // this thread's index within its row group
    bool active;  // false for the padding groups of the last block
};

// Finish the statistics: the row's mean (0 for RMSNorm) and 1 / sqrt(var + eps).
template <bool kCentered, int TPR, int RPB>
struct Finish;

template <int TPR, int RPB>
struct Finish<false, TPR, RPB> {
    // local = sum of squares of this thread's values
    __device__ __forceinline__ static void run(float local, int hidden, float eps, float& mean,
                                               float& rstd) {
        const float total = row_allreduce<TPR, RPB>(local);
        mean = 0.f;
        rstd = rsqrtf(total / static_cast<float>(hidden) + eps);
    }
};

template <int TPR, int RPB>
struct Finish<true, TPR, RPB> {
    __device__ __forceinline__ static void run(Moments local, int hidden, float eps, float& mean,
                                               float& rstd) {
        const Moments m = row_allreduce<TPR, RPB>(local);
        mean = m.mean;
        rstd = rsqrtf(m.m2 / static_cast<float>(hidden) + eps);
    }
};

// Row held in registers. kVec: slot c of this thread is the 16-byte vector (c * TPR + lane);
// otherwise element j of slot c is the scalar ((c * V + j) * TPR + lane), which is coalesced
// for any hidden size and alignment.
template <bool kVec, int TPR, int RPB, int C, bool kCentered, bool kResidual, typename T, typename G>
__device__ __forceinline__ void row_in_registers(const RowArgs<kCentered, kResidual, T, G>& a) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    float v[C][V];

    auto index = [&](int c, int j) { return kVec ? (c * TPR + a.lane) * V + j : (c * V + j) * TPR + a.lane; };
    auto valid = [&](int c, int j) { return a.active && index(c, j) < a.hidden; };

    // 1. read x (+ residual); all loads are issued before any use
    #pragma unroll
    for (int c = 0; c < C; ++c) {
        if constexpr (kVec) {
            if (valid(c, 0)) {
                load_vec<T, V>(a.x + index(c, 0), v[c]);
                if constexpr (kResidual) {
                    float r[V];
                    load_vec<T, V>(a.residual + index(c, 0), r);
                    #pragma unroll
                    for (int j = 0; j < V; ++j) v[c][j] += r[j];
                }
            } else {
                #pragma unroll
                for (int j = 0; j < V; ++j) v[c][j] = 0.f;
            }
        } else {
            #pragma unroll
            for (int j = 0; j < V; ++j) {
                const int i = index(c, j);
                float s = 0.f;
                if (valid(c, j)) {
                    s = load_one(a.x + i);
                    if constexpr (kResidual) s += load_one(a.residual + i);
                }
                v[c][j] = s;
            }
        }
    }

    // 2. the Add forms write x + residual right away
    if constexpr (kResidual) {
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            if constexpr (kVec) {
                if (valid(c, 0)) store_vec<T, V>(a.sum + index(c, 0), v[c]);
            } else {
                #pragma unroll
                for (int j = 0; j < V; ++j)
                    if (valid(c, j)) a.sum[index(c, j)] = from_float<T>(v[c][j]);
            }
        }
    }

    // 3. statistics. gamma/beta are requested from L2 first, so their latency hides behind the
    //    reductions (this matters for short, latency-bound launches).
#ifdef NORMFUSE_AB_PARAMS_EARLY
    constexpr bool kEarly = kVec;  // gamma/beta into registers now instead of a prefetch
#else
    constexpr bool kEarly = false;
#endif
    float g_early[kEarly ? C : 1][V], b_early[kEarly && kCentered ? C : 1][V];
    if constexpr (kEarly) {
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            if (valid(c, 0)) {
                load_vec<G, V>(a.gamma + index(c, 0), g_early[c]);
                if constexpr (kCentered) load_vec<G, V>(a.beta + index(c, 0), b_early[c]);
            }
        }
    } else if constexpr (kVec) {
#ifndef NORMFUSE_AB_NO_PREFETCH
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            if (valid(c, 0)) {
                prefetch_l2(a.gamma + index(c, 0));
                if constexpr (kCentered) prefetch_l2(a.beta + index(c, 0));
            }
        }
#endif
    }
    float mean = 0.f, rstd;
#ifdef NORMFUSE_AB_LN_ONE_REDUCTION
    if constexpr (kCentered) {
        // exact moments of this thread's values, merged across the row with Chan's rule
        float n = 0.f, s = 0.f;
        #pragma unroll
        for (int c = 0; c < C; ++c)
            #pragma unroll
            for (int j = 0; j < V; ++j)
                if (valid(c, j)) { n += 1.f; s += v[c][j]; }
        const float local_mean = n > 0.f ? s / n : 0.f;
        float m2 = 0.f;
        #pragma unroll
        for (int c = 0; c < C; ++c)
            #pragma unroll
            for (int j = 0; j < V; ++j)
                if (valid(c, j)) { const float d = v[c][j] - local_mean; m2 += d * d; }
        Finish<true, TPR, RPB>::run(Moments{n, local_mean, m2}, a.hidden, a.eps, mean, rstd);
    } else
#endif
    if constexpr (kCentered) {
        // The row is in registers, so the exact two-pass formula costs no second read of memory:
        // the mean first, then the mean of squared deviations from it.
        float s = 0.f;  // slots past the end hold zeros
        #pragma unroll
        for (int c = 0; c < C; ++c)
            #pragma unroll
            for (int j = 0; j < V; ++j) s += v[c][j];
        mean = row_allreduce<TPR, RPB>(s) / static_cast<float>(a.hidden);
        float m2 = 0.f;
        #pragma unroll
        for (int c = 0; c < C; ++c)
            #pragma unroll
            for (int j = 0; j < V; ++j)
                if (valid(c, j)) { const float d = v[c][j] - mean; m2 += d * d; }
        rstd = rsqrtf(row_allreduce<TPR, RPB, float NORMFUSE_SITE(1)>(m2) / static_cast<float>(a.hidden) + a.eps);
    } else {
        float ss = 0.f;
        #pragma unroll
        for (int c = 0; c < C; ++c)
            #pragma unroll
            for (int j = 0; j < V; ++j) ss += v[c][j] * v[c][j];
        rstd = rsqrtf(row_allreduce<TPR, RPB>(ss) / static_cast<float>(a.hidden) + a.eps);
    }

    // 4. y = (v - mean) * rstd * gamma (+ beta)
    #pragma unroll
    for (int c = 0; c < C; ++c) {
        if constexpr (kVec) {
            if (!valid(c, 0)) continue;
            const int i0 = index(c, 0);
            float g[V], out[V];
            if constexpr (kEarly) {
                #pragma unroll
                for (int j = 0; j < V; ++j) g[j] = g_early[c][j];
            } else {
                load_vec<G, V>(a.gamma + i0, g);
            }
            #pragma unroll
            for (int j = 0; j < V; ++j) out[j] = (v[c][j] - mean) * rstd * g[j];
            if constexpr (kCentered) {
                float b[V];
                if constexpr (kEarly) {
                    #pragma unroll
                    for (int j = 0; j < V; ++j) b[j] = b_early[c][j];
                } else {
                    load_vec<G, V>(a.beta + i0, b);
                }
                #pragma unroll
                for (int j = 0; j < V; ++j) out[j] += b[j];
            }
            store_vec<T, V>(a.y + i0, out);
        } else {
            #pragma unroll
            for (int j = 0; j < V; ++j) {
                if (!valid(c, j)) continue;
                const int i = index(c, j);
                float out = (v[c][j] - mean) * rstd * load_one(a.gamma + i);
                if constexpr (kCentered) out += load_one(a.beta + i);
                a.y[i] = from_float<T>(out);
            }
        }
    }
}

// Rows longer than the registers hold: one streaming pass for the statistics (and the sum),
// a second that re-reads the inputs to normalise.
template <int TPR, int RPB, bool kCentered, bool kResidual, typename T, typename G>
__device__ __forceinline__ void row_streaming(const RowArgs<kCentered, kResidual, T, G>& a) {
    const int stop = a.active ? a.hidden : 0;
    float mean, rstd;
    if constexpr (kCentered) {
        Moments m{0.f, 0.f, 0.f};
        for (int i = a.lane; i < stop; i += TPR) {
            float s = load_one(a.x + i);
            if constexpr (kResidual) { s += load_one(a.residual + i); a.sum[i] = from_float<T>(s); }
            accumulate(m, s);
        }
        Finish<true, TPR, RPB>::run(m, a.hidden, a.eps, mean, rstd);
    } else {
        float ss = 0.f;
        for (int i = a.lane; i < stop; i += TPR) {
            float s = load_one(a.x + i);
            if constexpr (kResidual) { s += load_one(a.residual + i); a.sum[i] = from_float<T>(s); }
            ss += s * s;
        }
        Finish<false, TPR, RPB>::run(ss, a.hidden, a.eps, mean, rstd);
    }
    for (int i = a.lane; i < stop; i += TPR) {
        float s = load_one(a.x + i);
        if constexpr (kResidual) s += load_one(a.residual + i);
        float out = (s - mean) * rstd * load_one(a.gamma + i);
        if constexpr (kCentered) out += load_one(a.beta + i);
        a.y[i] = from_float<T>(out);
    }
}

// ---------------------------------------------------------------- row-loop variants
// Row groups of fewer than 256 threads share a block of 256 (plugins/config.py
// BLOCK_THREADS_SMALL_ROWS; a CPU test holds every kernel's .maxntid to config's block).
constexpr int kSmallRowBlock = 256;
template <int TPR> __host__ __device__ constexpr int groups_per_block() { return TPR >= kSmallRowBlock ? 1 : kSmallRowBlock / TPR; }

// N elements of type G kept as raw 16-byte chunks (half the registers of floats for 16-bit G),
// widened to fp32 where they are used.
template <typename G, int N>
struct Packed {
    static constexpr int kPer = 16 / static_cast<int>(sizeof(G));
    static_assert(N % kPer == 0, "a whole number of 16-byte chunks");
    uint4 raw[N / kPer];

    __device__ __forceinline__ void load(const G* __restrict__ p) {
        #pragma unroll
        for (int k = 0; k < N / kPer; ++k) {
#ifdef NORMFUSE_AB_PLAIN_LOADS
            raw[k] = *reinterpret_cast<const uint4*>(p + k * kPer);
#else
            raw[k] = __ldg(reinterpret_cast<const uint4*>(p + k * kPer));
#endif
        }
    }
    __device__ __forceinline__ float get(int j) const {
        union { uint4 r; G e[kPer]; } chunk;
        chunk.r = raw[j / kPer];
        return to_float(chunk.e[j % kPer]);
    }
};

// 16-byte path of a row-loop variant: the group of `lane` normalises rows first, first + GROUPS,
// ... (K of them). Every thread runs all K iterations, active or not, so the barriers inside the
// reductions are reached by the whole block.
template <int TPR, int GROUPS, int K, int C, bool kCentered, bool kResidual, typename T, typename G>
__device__ __forceinline__ void rows_in_registers_looped(const T* __restrict__ x, const T* __restrict__ residual,
                                                         const G* __restrict__ gamma, const G* __restrict__ beta,
                                                         int64_t rows, int hidden, float eps, T* __restrict__ y,
                                                         T* __restrict__ sum, int64_t first, int lane) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    auto index = [&](int c) { return (c * TPR + lane) * V; };  // first element of slot c
    auto slot = [&](int c) { return index(c) < hidden; };      // hidden % V == 0 on this path

    // gamma/beta for every row this group will normalise: once, into registers
    Packed<G, V> g[C], b[kCentered ? C : 1];
    auto load_params = [&]() {
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            if (slot(c)) {
                g[c].load(gamma + index(c));
                if constexpr (kCentered) b[c].load(beta + index(c));
            }
        }
    };
#ifndef NORMFUSE_AB_LOOP_PARAMS_PER_ROW
    load_params();
#endif

    // the next row's x (+ residual), raw: its loads stay in flight through the current row's work
    uint4 next_x[C], next_r[kResidual ? C : 1];
    auto issue = [&](int64_t row) {
        if (row >= rows) return;
        const int64_t offset = row * static_cast<int64_t>(hidden);
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            if (!slot(c)) continue;
#ifdef NORMFUSE_AB_PLAIN_LOADS
            next_x[c] = *reinterpret_cast<const uint4*>(x + offset + index(c));
            if constexpr (kResidual) next_r[c] = *reinterpret_cast<const uint4*>(residual + offset + index(c));
#else
            next_x[c] = __ldg(reinterpret_cast<const uint4*>(x + offset + index(c)));
            if constexpr (kResidual) next_r[c] = __ldg(reinterpret_cast<const uint4*>(residual + offset + index(c)));
#endif
        }
    };
    issue(first);

    #pragma unroll 1
    for (int k = 0; k < K; ++k) {
        const int64_t row = first + static_cast<int64_t>(k) * GROUPS;
        const bool active = row < rows;
        const int64_t offset = (active ? row : 0) * static_cast<int64_t>(hidden);
        auto valid = [&](int c) { return active && slot(c); };

        // 1. this row's values (zeros where there are none), then the next row's loads
        float v[C][V];
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            union { uint4 r; T e[V]; } cx, cr;
            cx.r = next_x[c];
            if constexpr (kResidual) cr.r = next_r[c];
            #pragma unroll
            for (int j = 0; j < V; ++j) {
                float s = 0.f;
                if (valid(c)) {
                    s = to_float(cx.e[j]);
                    if constexpr (kResidual) s += to_float(cr.e[j]);
                }
                v[c][j] = s;
            }
        }
        if (k + 1 < K) issue(row + GROUPS);

        // 2. the Add forms write x + residual
        if constexpr (kResidual) {
            #pragma unroll
            for (int c = 0; c < C; ++c)
                if (valid(c)) store_vec<T, V>(sum + offset + index(c), v[c]);
        }

        // 3. statistics, as row_in_registers computes them
        float mean = 0.f, rstd;
        if constexpr (kCentered) {
            float s = 0.f;
            #pragma unroll
            for (int c = 0; c < C; ++c)
                #pragma unroll
                for (int j = 0; j < V; ++j) s += v[c][j];
            mean = row_allreduce<TPR, GROUPS>(s) / static_cast<float>(hidden);
            float m2 = 0.f;
            #pragma unroll
            for (int c = 0; c < C; ++c)
                #pragma unroll
                for (int j = 0; j < V; ++j)
                    if (valid(c)) { const float d = v[c][j] - mean; m2 += d * d; }
            rstd = rsqrtf(row_allreduce<TPR, GROUPS, float NORMFUSE_SITE(1)>(m2) / static_cast<float>(hidden) + eps);
        } else {
            float ss = 0.f;
            #pragma unroll
            for (int c = 0; c < C; ++c)
                #pragma unroll
                for (int j = 0; j < V; ++j) ss += v[c][j] * v[c][j];
            rstd = rsqrtf(row_allreduce<TPR, GROUPS>(ss) / static_cast<float>(hidden) + eps);
        }

        // 4. y = (v - mean) * rstd * gamma (+ beta)
#ifdef NORMFUSE_AB_LOOP_PARAMS_PER_ROW
        load_params();
#endif
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            if (!valid(c)) continue;
            float out[V];
            #pragma unroll
            for (int j = 0; j < V; ++j) {
                out[j] = (v[c][j] - mean) * rstd * g[c].get(j);
                if constexpr (kCentered) out[j] += b[c].get(j);
            }
            store_vec<T, V>(y + offset + index(c), out);
        }
#ifdef NORMFUSE_AB_NO_TRAILING_SYNC
        // the reductions' shared buffers are written again by the next row
        if constexpr (TPR > 32) __syncthreads();
#endif
    }
}

// A row-loop variant: the 16-byte path above when the row fits and is aligned, else each of the
// K rows streamed (read twice: a fallback for odd sizes and unaligned tensors).
template <int TPR, int GROUPS, int K, int C, bool kCentered, bool kResidual, typename T, typename G>
__device__ __forceinline__ void norm_rows_looped(const T* x, const T* residual, const G* gamma,
                                                 const G* beta, int rows, int hidden, int eps_bits,
                                                 T* y, T* sum, bool vectorisable) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    const int group = static_cast<int>(threadIdx.x) / TPR;
    const int lane = static_cast<int>(threadIdx.x) % TPR;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * (GROUPS * K) + group;
    const float eps = __int_as_float(eps_bits);
    if (hidden <= C * V * TPR && vectorisable) {
        rows_in_registers_looped<TPR, GROUPS, K, C, kCentered, kResidual>(x, residual, gamma, beta, rows, hidden,
                                                                         eps, y, sum, first, lane);
        return;
    }
    // The RowArgs set-up below repeats norm_rows' on purpose: a shared helper changes the one-row
    // kernels' PTX (register numbering and order), and that PTX is what the GPU tests proved.
    for (int k = 0; k < K; ++k) {
        const int64_t row = first + static_cast<int64_t>(k) * GROUPS;
        const bool active = row < rows;
        const int64_t offset = (active ? row : 0) * static_cast<int64_t>(hidden);
        RowArgs<kCentered, kResidual, T, G> a;
        a.x = x + offset;
        a.residual = kResidual ? residual + offset : nullptr;
        a.gamma = gamma;
        a.beta = beta;
        a.y = y + offset;
        a.sum = kResidual ? sum + offset : nullptr;
        a.hidden = hidden;
        a.eps = eps;
        a.lane = lane;
        a.active = active;
        // Not the scalar register path: inside this loop the compiler hoists its C * V per-element
        // offsets, and the registers they take would count against the 16-byte path too.
        row_streaming<TPR, GROUPS>(a);
#ifdef NORMFUSE_AB_NO_TRAILING_SYNC
        if constexpr (TPR > 32) __syncthreads();
#endif
    }
}

// The body every entry point runs. Parameters follow the TensorRT AOT order:
// inputs, then the integer arguments (rows, hidden, epsilon's fp32 bits), then outputs.
template <int TPR, int RPB, int C, bool kCentered, bool kResidual, typename T, typename G>
__device__ __forceinline__ void norm_rows(const T* x, const T* residual, const G* gamma,
                                          const G* beta, int rows, int hidden, int eps_bits,
                                          T* y, T* sum) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    constexpr int kGroups = groups_per_block<TPR>();
    static_assert(RPB % kGroups == 0, "rows per block is a whole number of rows per group");
    if constexpr (RPB != kGroups) {
        const bool vectorisable = hidden % V == 0 && aligned16(x) && aligned16(y) && aligned16(gamma) &&
                                  (!kResidual || (aligned16(residual) && aligned16(sum))) &&
                                  (!kCentered || aligned16(beta));
        norm_rows_looped<TPR, kGroups, RPB / kGroups, C, kCentered, kResidual>(x, residual, gamma, beta, rows,
                                                                              hidden, eps_bits, y, sum, vectorisable);
        return;
    }
    const int group = static_cast<int>(threadIdx.x) / TPR;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + group;
    const bool active = row < rows;
    const int64_t offset = (active ? row : 0) * static_cast<int64_t>(hidden);

    RowArgs<kCentered, kResidual, T, G> a;
    a.x = x + offset;
    a.residual = kResidual ? residual + offset : nullptr;
    a.gamma = gamma;
    a.beta = beta;
    a.y = y + offset;
    a.sum = kResidual ? sum + offset : nullptr;
    a.hidden = hidden;
    a.eps = __int_as_float(eps_bits);
    a.lane = static_cast<int>(threadIdx.x) % TPR;
    a.active = active;

    // Same decision in every thread of the block (it depends on kernel arguments only), so the
    // barriers inside the reductions are reached by all threads.
    const bool vectorisable = hidden % V == 0 && aligned16(x) && aligned16(y) && aligned16(gamma) &&
                              (!kResidual || (aligned16(residual) && aligned16(sum))) &&
                              (!kCentered || aligned16(beta));
    if (hidden <= C * V * TPR) {
        if (vectorisable)
            row_in_registers<true, TPR, RPB, C>(a);
        else
            row_in_registers<false, TPR, RPB, C>(a);
    } else {
        row_streaming<TPR, RPB>(a);
    }
}


// ---------------------------------------------------------------- split-row variants (sm_90+)
// Only in modules built with NORMFUSE_SPLIT_VARIANTS (plugins/build.py defines it for sm_90 and
// newer), so the other kernels' modules are the same text with or without this section.
#ifdef NORMFUSE_SPLIT_VARIANTS
// A few long rows (decode: 1 to 32 tokens) give a one-row-per-block kernel as many blocks as rows,
// so one SM reads, reduces and writes a whole row while the others idle, and that SM's bandwidth
// and round trips set the launch's time. A split variant spreads each row over a thread block
// cluster of S blocks: block r keeps the r-th slice of C * V * TPR elements in registers, reduces
// it, and the S partial statistics are exchanged through distributed shared memory. Every block
// combines them in rank order, so all blocks of a row use the same mean and rstd bits.
// LayerNorm's partials are exact moments of each slice (two passes over registers), merged with
// Chan's rule. gamma/beta are loaded with x, before the statistics: these launches are
// latency-bound, and at C <= 2 they cost few registers. Rows longer than S slices stream each
// slice (read twice), a fallback for a forced layout.
}  // namespace normfuse
#include <cooperative_groups.h>
namespace normfuse {
namespace cg = cooperative_groups;

// `mine` (the same in every thread of a block) combined over the S blocks of this block's cluster
// in rank order; every thread of the cluster gets the same bits. A kernel calls cluster_prepare()
// first, cluster_allreduce<S>() once, and cluster_release() last (a peer may still be reading this
// block's partial, or be about to write into it).
#ifndef NORMFUSE_AB_SPLIT_MBARRIER
__device__ __forceinline__ void cluster_prepare() {}

template <int S, typename R>
__device__ __forceinline__ R cluster_allreduce(R mine) {
    __shared__ R partial;
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) partial = mine;
    cluster.sync();  // every block's partial is written and visible to the cluster
    R total = *cluster.map_shared_rank(&partial, 0);
    #pragma unroll
    for (int r = 1; r < S; ++r) total = combine(total, *cluster.map_shared_rank(&partial, r));
    cluster.barrier_arrive();  // this block has read its peers' partials
    return total;
}

__device__ __forceinline__ void cluster_release() { cg::this_cluster().barrier_wait(); }
#else
// NORMFUSE_AB_SPLIT_MBARRIER: each block pushes its partial into every block's inbox with st.async,
// counted by an mbarrier of each block (the transaction bytes of S partials), instead of a cluster
// barrier between the statistics and y. ptxas gives the default's cluster barrier arrivals (release
// at cluster scope) a MEMBAR.ALL.GPU each; here the only cluster barrier is the one that publishes
// the mbarriers' initialisation, arrived at before the loads and waited on after them.
template <int S, typename R>
__device__ __forceinline__ R* inbox_slots() {
    __shared__ R inbox[S];
    return inbox;
}

// The mbarrier counting this block's arrived partials (shared::cta address).
__device__ __forceinline__ uint32_t inbox_barrier() {
    alignas(8) __shared__ unsigned long long full;
    return static_cast<uint32_t>(__cvta_generic_to_shared(&full));
}

// The exchange's PTX, one instruction (or fenced pair) per function. The CPU emulation
// (plugins/emulation/cuda_host.h) gives each of them its meaning under NORMFUSE_HOST_EMULATION, so
// the counting around them (bytes expected, words pushed, the phase waited on) runs there too.
#ifndef NORMFUSE_HOST_EMULATION
__device__ __forceinline__ uint32_t peer_address(uint32_t local, int rank) {
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    return remote;
}

__device__ __forceinline__ void push_word(uint32_t remote, float v, uint32_t remote_barrier) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];"
                 ::"r"(remote), "r"(__float_as_uint(v)), "r"(remote_barrier) : "memory");
}

__device__ __forceinline__ void mbarrier_init(uint32_t barrier) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n\t"
                 "fence.mbarrier_init.release.cluster;" ::"r"(barrier) : "memory");
}

__device__ __forceinline__ void cluster_arrive_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory");
}

__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait;" ::: "memory"); }

__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t barrier, int bytes) {
    asm volatile("{\n\t.reg .b64 state;\n\t"
                 "mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n\t}"
                 ::"r"(barrier), "r"(bytes) : "memory");
}

__device__ __forceinline__ bool mbarrier_phase0_complete(uint32_t barrier) {
    uint32_t done;
    asm volatile("{\n\t.reg .pred ready;\n\t"
                 "mbarrier.try_wait.parity.shared::cta.b64 ready, [%1], 0;\n\t"
                 "selp.u32 %0, 1, 0, ready;\n\t}"
                 : "=r"(done) : "r"(barrier) : "memory");
    return done != 0;
}
#else
using ::normfuse_emu::cluster_arrive_relaxed;
using ::normfuse_emu::cluster_wait;
using ::normfuse_emu::mbarrier_arrive_expect_tx;
using ::normfuse_emu::mbarrier_init;
using ::normfuse_emu::mbarrier_phase0_complete;
using ::normfuse_emu::peer_address;
using ::normfuse_emu::push_word;
#endif

__device__ __forceinline__ void push(uint32_t remote, float v, uint32_t remote_barrier) {
    push_word(remote, v, remote_barrier);
}
__device__ __forceinline__ void push(uint32_t remote, Moments m, uint32_t remote_barrier) {
    push_word(remote, m.n, remote_barrier);
    push_word(remote + 4, m.mean, remote_barrier);
    push_word(remote + 8, m.m2, remote_barrier);
}

__device__ __forceinline__ void cluster_prepare() {
    if (threadIdx.x == 0) mbarrier_init(inbox_barrier());  // one arrival (this block's expect_tx) a phase
    cluster_arrive_relaxed();
}

template <int S, typename R>
__device__ __forceinline__ R cluster_allreduce(R mine) {
    static_assert(sizeof(R) % 4 == 0, "partials move as 32-bit words");
    const uint32_t full = inbox_barrier();
    R* inbox = inbox_slots<S, R>();
    cluster_wait();  // every block's mbarrier is initialised
    if (threadIdx.x == 0) mbarrier_arrive_expect_tx(full, static_cast<int>(S * sizeof(R)));  // S partials' bytes
    const int rank = static_cast<int>(cg::this_cluster().block_rank());
    if (threadIdx.x < S) {  // thread r writes this block's partial into block r's inbox slot [rank]
        const uint32_t slot = static_cast<uint32_t>(__cvta_generic_to_shared(inbox + rank));
        push(peer_address(slot, threadIdx.x), mine, peer_address(full, threadIdx.x));
    }
    while (!mbarrier_phase0_complete(full)) {
    }
    R total = inbox[0];
    #pragma unroll
    for (int r = 1; r < S; ++r) total = combine(total, inbox[r]);
    return total;
}

// Every partial this block will receive has arrived (it waited for them), and no block reads
// another's shared memory, so a block may exit as soon as it is done.
__device__ __forceinline__ void cluster_release() {}
#endif

// This block's slice of a row held in registers; kVec as in row_in_registers, with indices
// offset by the slice's first element.
template <bool kVec, int TPR, int S, int C, bool kCentered, bool kResidual, typename T, typename G>
__device__ __forceinline__ void slice_in_registers(const RowArgs<kCentered, kResidual, T, G>& a, int rank) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    constexpr int kSlice = C * V * TPR;
    const int base = rank * kSlice;
    auto index = [&](int c, int j) {
        return base + (kVec ? (c * TPR + a.lane) * V + j : (c * V + j) * TPR + a.lane);
    };
    auto valid = [&](int c, int j) { return index(c, j) < a.hidden; };

    // 1. x (+ residual), gamma (+ beta): every load issued before any use
    float v[C][V], g[C][V], b[kCentered ? C : 1][V];
    #pragma unroll
    for (int c = 0; c < C; ++c) {
        if constexpr (kVec) {
            if (valid(c, 0)) {
                load_vec<T, V>(a.x + index(c, 0), v[c]);
                if constexpr (kResidual) {
                    float r[V];
                    load_vec<T, V>(a.residual + index(c, 0), r);
                    #pragma unroll
                    for (int j = 0; j < V; ++j) v[c][j] += r[j];
                }
                load_vec<G, V>(a.gamma + index(c, 0), g[c]);
                if constexpr (kCentered) load_vec<G, V>(a.beta + index(c, 0), b[c]);
            } else {
                #pragma unroll
                for (int j = 0; j < V; ++j) v[c][j] = 0.f;
            }
        } else {
            #pragma unroll
            for (int j = 0; j < V; ++j) {
                v[c][j] = 0.f;
                if (valid(c, j)) {
                    const int i = index(c, j);
                    v[c][j] = load_one(a.x + i);
                    if constexpr (kResidual) v[c][j] += load_one(a.residual + i);
                    g[c][j] = load_one(a.gamma + i);
                    if constexpr (kCentered) b[c][j] = load_one(a.beta + i);
                }
            }
        }
    }

    // 2. the Add forms write x + residual right away
    if constexpr (kResidual) {
        #pragma unroll
        for (int c = 0; c < C; ++c) {
            if constexpr (kVec) {
                if (valid(c, 0)) store_vec<T, V>(a.sum + index(c, 0), v[c]);
            } else {
                #pragma unroll
                for (int j = 0; j < V; ++j)
                    if (valid(c, j)) a.sum[index(c, j)] = from_float<T>(v[c][j]);
            }
        }
    }

    // 3. statistics of the slice, then of the row
    float mean = 0.f, rstd;
    if constexpr (kCentered) {
        const int n = min(max(a.hidden - base, 0), kSlice);  // this slice's elements
        float s = 0.f;  // slots past the end hold zeros
        #pragma unroll
        for (int c = 0; c < C; ++c)
            #pragma unroll
            for (int j = 0; j < V; ++j) s += v[c][j];
        s = row_allreduce<TPR, 1>(s);
        const float slice_mean = n > 0 ? s / static_cast<float>(n) : 0.f;
        float m2 = 0.f;
        #pragma unroll
        for (int c = 0; c < C; ++c)
            #pragma unroll
            for (int j = 0; j < V; ++j)
                if (valid(c, j)) { const float d = v[c][j] - slice_mean; m2 += d * d; }
        m2 = row_allreduce<TPR, 1, float NORMFUSE_SITE(1)>(m2);
        const Moments row = cluster_allreduce<S>(Moments{static_cast<float>(n), slice_mean, m2});
        mean = row.mean;
        rstd = rsqrtf(row.m2 / static_cast<float>(a.hidden) + a.eps);
    } else {
        float ss = 0.f;
        #pragma unroll
        for (int c = 0; c < C; ++c)
            #pragma unroll
            for (int j = 0; j < V; ++j) ss += v[c][j] * v[c][j];
        const float total = cluster_allreduce<S>(row_allreduce<TPR, 1>(ss));
        rstd = rsqrtf(total / static_cast<float>(a.hidden) + a.eps);
    }

    // 4. y = (v - mean) * rstd * gamma (+ beta)
    #pragma unroll
    for (int c = 0; c < C; ++c) {
        if constexpr (kVec) {
            if (!valid(c, 0)) continue;
            float out[V];
            #pragma unroll
            for (int j = 0; j < V; ++j) {
                out[j] = (v[c][j] - mean) * rstd * g[c][j];
                if constexpr (kCentered) out[j] += b[c][j];
            }
            store_vec<T, V>(a.y + index(c, 0), out);
        } else {
            #pragma unroll
            for (int j = 0; j < V; ++j) {
                if (!valid(c, j)) continue;
                float out = (v[c][j] - mean) * rstd * g[c][j];
                if constexpr (kCentered) out += b[c][j];
                a.y[index(c, j)] = from_float<T>(out);
            }
        }
    }
}

// This block's share of a row longer than S slices: ceil(hidden / S) elements, streamed.
template <int TPR, int S, bool kCentered, bool kResidual, typename T, typename G>
__device__ __forceinline__ void slice_streaming(const RowArgs<kCentered, kResidual, T, G>& a, int rank) {
    const int share = (a.hidden + S - 1) / S;
    const int start = min(rank * share, a.hidden);
    const int stop = min(start + share, a.hidden);
    float mean = 0.f, rstd;
    if constexpr (kCentered) {
        Moments m{0.f, 0.f, 0.f};
        for (int i = start + a.lane; i < stop; i += TPR) {
            float s = load_one(a.x + i);
            if constexpr (kResidual) { s += load_one(a.residual + i); a.sum[i] = from_float<T>(s); }
            accumulate(m, s);
        }
        const Moments row = cluster_allreduce<S>(row_allreduce<TPR, 1>(m));
        mean = row.mean;
        rstd = rsqrtf(row.m2 / static_cast<float>(a.hidden) + a.eps);
    } else {
        float ss = 0.f;
        for (int i = start + a.lane; i < stop; i += TPR) {
            float s = load_one(a.x + i);
            if constexpr (kResidual) { s += load_one(a.residual + i); a.sum[i] = from_float<T>(s); }
            ss += s * s;
        }
        const float total = cluster_allreduce<S>(row_allreduce<TPR, 1>(ss));
        rstd = rsqrtf(total / static_cast<float>(a.hidden) + a.eps);
    }
    for (int i = start + a.lane; i < stop; i += TPR) {
        float s = load_one(a.x + i);
        if constexpr (kResidual) s += load_one(a.residual + i);
        float out = (s - mean) * rstd * load_one(a.gamma + i);
        if constexpr (kCentered) out += load_one(a.beta + i);
        a.y[i] = from_float<T>(out);
    }
}

// The body of a split entry point: blocks S * row ... S * row + S - 1 (one cluster) share a row;
// the grid is rows * S blocks of TPR threads, so every block has a row. Parameters as norm_rows'.
template <int TPR, int S, int C, bool kCentered, bool kResidual, typename T, typename G>
__device__ __forceinline__ void norm_row_split(const T* x, const T* residual, const G* gamma,
                                               const G* beta, int rows, int hidden, int eps_bits,
                                               T* y, T* sum) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    (void)rows;  // the grid covers exactly rows * S blocks
    cluster_prepare();
    const int rank = static_cast<int>(cg::this_cluster().block_rank());
    const int64_t offset = static_cast<int64_t>(blockIdx.x / S) * static_cast<int64_t>(hidden);

    RowArgs<kCentered, kResidual, T, G> a;
    a.x = x + offset;
    a.residual = kResidual ? residual + offset : nullptr;
    a.gamma = gamma;
    a.beta = beta;
    a.y = y + offset;
    a.sum = kResidual ? sum + offset : nullptr;
    a.hidden = hidden;
    a.eps = __int_as_float(eps_bits);
    a.lane = static_cast<int>(threadIdx.x);
    a.active = true;

    // the same decision in every block of the cluster: the cluster barriers need all of them
    const bool vectorisable = hidden % V == 0 && aligned16(x) && aligned16(y) && aligned16(gamma) &&
                              (!kResidual || (aligned16(residual) && aligned16(sum))) &&
                              (!kCentered || aligned16(beta));
    if (hidden <= S * C * V * TPR) {
        if (vectorisable)
            slice_in_registers<true, TPR, S, C>(a, rank);
        else
            slice_in_registers<false, TPR, S, C>(a, rank);
    } else {
        slice_streaming<TPR, S>(a, rank);
    }
    cluster_release();
}
#endif  // NORMFUSE_SPLIT_VARIANTS

}  // namespace normfuse

// ---------------------------------------------------------------- module configuration
#ifndef NORMFUSE_X
#define NORMFUSE_X __nv_bfloat16
#endif
#ifndef NORMFUSE_G
#define NORMFUSE_G float
#endif
// V(threads per row, rows per block, slots per thread); normally passed by plugins/config.py.
#ifndef NORMFUSE_VARIANTS
#define NORMFUSE_VARIANTS(V) V(32, 8, 4) V(128, 1, 4) V(256, 1, 4)
#endif

#define NORMFUSE_KERNEL_NAME(family, TPR, RPB, C) normfuse_##family##_t##TPR##_r##RPB##_c##C
// split-row variants: S blocks (a cluster) of TPR threads share a row; one block per cluster slot
#define NORMFUSE_SPLIT_KERNEL_NAME(family, TPR, S, C) normfuse_##family##_t##TPR##_r1_c##C##_s##S
#ifndef NORMFUSE_SPLIT_VARIANTS
#define NORMFUSE_SPLIT_VARIANTS(W)
#endif
// threads in a block of a variant with TPR threads per row (the same for its row-loop variants)
#define NORMFUSE_BLOCK_THREADS(TPR) ((TPR) >= normfuse::kSmallRowBlock ? (TPR) : normfuse::kSmallRowBlock)

#ifdef NORMFUSE_AB_MIN_THREADS_PER_SM
#undef __launch_bounds__
#define __launch_bounds__(threads)                                                                 \
    __annotate__(launch_bounds((threads), (NORMFUSE_AB_MIN_THREADS_PER_SM / (threads) > 0            \
                                               ? NORMFUSE_AB_MIN_THREADS_PER_SM / (threads)         \
                                               : 1)))
#endif
