// normfuse::AddRMSNorm
//
//   sum = x + residual
//   y = sum / sqrt(mean(sum^2) + epsilon) * gamma      (over the last axis, statistics in fp32)
//
// Inputs x, residual [rows, hidden] and gamma [hidden]; outputs y and sum, like x. The sum is
// rounded to x's dtype only when stored; y is computed from the fp32 sum.
#include "norm_common.cuh"

#define NORMFUSE_ENTRY(TPR, RPB, C)                                                            \
    extern "C" __global__ void __launch_bounds__(NORMFUSE_BLOCK_THREADS(TPR))                  \
        NORMFUSE_KERNEL_NAME(add_rms_norm, TPR, RPB, C)(                                       \
            const NORMFUSE_X* x, const NORMFUSE_X* residual, const NORMFUSE_G* gamma,          \
            int rows, int hidden, int eps_bits, NORMFUSE_X* y, NORMFUSE_X* sum) {              \
        normfuse::norm_rows<TPR, RPB, C, /*centered=*/false, /*residual=*/true>(               \
            x, residual, gamma, static_cast<const NORMFUSE_G*>(nullptr), rows, hidden,         \
            eps_bits, y, sum);                                                                 \
    }

NORMFUSE_VARIANTS(NORMFUSE_ENTRY)

// Split-row variants (sm_90+, norm_common.cuh): a cluster of S blocks shares each row.
#define NORMFUSE_SPLIT_ENTRY(TPR, S, C)                                                        \
    extern "C" __global__ void __cluster_dims__(S, 1, 1) __launch_bounds__(TPR)                \
        NORMFUSE_SPLIT_KERNEL_NAME(add_rms_norm, TPR, S, C)(                                   \
            const NORMFUSE_X* x, const NORMFUSE_X* residual, const NORMFUSE_G* gamma,          \
            int rows, int hidden, int eps_bits, NORMFUSE_X* y, NORMFUSE_X* sum) {              \
        normfuse::norm_row_split<TPR, S, C, /*centered=*/false, /*residual=*/true>(            \
            x, residual, gamma, static_cast<const NORMFUSE_G*>(nullptr), rows, hidden,         \
            eps_bits, y, sum);                                                                 \
    }

NORMFUSE_SPLIT_VARIANTS(NORMFUSE_SPLIT_ENTRY)
