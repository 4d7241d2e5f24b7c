// normfuse::AddLayerNorm
//
//   sum = x + residual
//   y = (sum - mean(sum)) / sqrt(var(sum) + epsilon) * gamma + beta
//
// Inputs x, residual [rows, hidden], gamma and beta [hidden]; outputs y and sum, like x.
// Statistics in fp32 from one pass (Chan's merge, norm_common.cuh); y from the fp32 sum.
#include "norm_common.cuh"

#define NORMFUSE_ENTRY(TPR, RPB, C)                                                            \
    extern "C" __global__ void __launch_bounds__(NORMFUSE_BLOCK_THREADS(TPR))                  \
        NORMFUSE_KERNEL_NAME(add_layer_norm, TPR, RPB, C)(                                     \
            const NORMFUSE_X* x, const NORMFUSE_X* residual, const NORMFUSE_G* gamma,          \
            const NORMFUSE_G* beta, int rows, int hidden, int eps_bits, NORMFUSE_X* y,         \
            NORMFUSE_X* sum) {                                                                 \
        normfuse::norm_rows<TPR, RPB, C, /*centered=*/true, /*residual=*/true>(                \
            x, residual, gamma, beta, rows, hidden, eps_bits, y, sum);                         \
    }

NORMFUSE_VARIANTS(NORMFUSE_ENTRY)

// Split-row variants (sm_90+, norm_common.cuh): a cluster of S blocks shares each row.
#define NORMFUSE_SPLIT_ENTRY(TPR, S, C)                                                        \
    extern "C" __global__ void __cluster_dims__(S, 1, 1) __launch_bounds__(TPR)                \
        NORMFUSE_SPLIT_KERNEL_NAME(add_layer_norm, TPR, S, C)(                                 \
            const NORMFUSE_X* x, const NORMFUSE_X* residual, const NORMFUSE_G* gamma,          \
            const NORMFUSE_G* beta, int rows, int hidden, int eps_bits, NORMFUSE_X* y,         \
            NORMFUSE_X* sum) {                                                                 \
        normfuse::norm_row_split<TPR, S, C, /*centered=*/true, /*residual=*/true>(             \
            x, residual, gamma, beta, rows, hidden, eps_bits, y, sum);                         \
    }

NORMFUSE_SPLIT_VARIANTS(NORMFUSE_SPLIT_ENTRY)
