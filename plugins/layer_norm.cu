// normfuse::LayerNorm
//
//   mean = mean(x),  var = mean((x - mean)^2)          (over the last axis, statistics in fp32)
//   y = (x - mean) / sqrt(var + epsilon) * gamma + beta
//
// Inputs x [rows, hidden], gamma [hidden], beta [hidden]; output y like x. The TensorRT target
// always supplies beta (zeros when the model has none), so there is no optional input here.
// mean and var are never taken as E[x^2] - E[x]^2: a row held in registers gets the exact
// two-pass formula from them, a streamed row Welford's update and Chan's merge (norm_common.cuh).
#include "norm_common.cuh"

#define NORMFUSE_ENTRY(TPR, RPB, C)                                                            \
    extern "C" __global__ void __launch_bounds__(NORMFUSE_BLOCK_THREADS(TPR))                  \
        NORMFUSE_KERNEL_NAME(layer_norm, TPR, RPB, C)(                                         \
            const NORMFUSE_X* x, const NORMFUSE_G* gamma, const NORMFUSE_G* beta, int rows,    \
            int hidden, int eps_bits, NORMFUSE_X* y) {                                         \
        normfuse::norm_rows<TPR, RPB, C, /*centered=*/true, /*residual=*/false>(               \
            x, static_cast<const NORMFUSE_X*>(nullptr), gamma, beta, rows, hidden, eps_bits,   \
            y, static_cast<NORMFUSE_X*>(nullptr));                                             \
    }

NORMFUSE_VARIANTS(NORMFUSE_ENTRY)

// Split-row variants (sm_90+, norm_common.cuh): a cluster of S blocks shares each row.
#define NORMFUSE_SPLIT_ENTRY(TPR, S, C)                                                        \
    extern "C" __global__ void __cluster_dims__(S, 1, 1) __launch_bounds__(TPR)                \
        NORMFUSE_SPLIT_KERNEL_NAME(layer_norm, TPR, S, C)(                                     \
            const NORMFUSE_X* x, const NORMFUSE_G* gamma, const NORMFUSE_G* beta, int rows,    \
            int hidden, int eps_bits, NORMFUSE_X* y) {                                         \
        normfuse::norm_row_split<TPR, S, C, /*centered=*/true, /*residual=*/false>(            \
            x, static_cast<const NORMFUSE_X*>(nullptr), gamma, beta, rows, hidden, eps_bits,   \
            y, static_cast<NORMFUSE_X*>(nullptr));                                             \
    }

NORMFUSE_SPLIT_VARIANTS(NORMFUSE_SPLIT_ENTRY)
