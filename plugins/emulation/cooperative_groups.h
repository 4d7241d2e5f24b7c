// The part of CUDA's cooperative groups that the split-row kernels use, for the CPU emulation
// (cuda_host.h); found before CUDA's own header because emulate.py puts this folder first.
#pragma once

#include "cuda_host.h"

namespace cooperative_groups {

class cluster_group {
public:
    unsigned block_rank() const { return ::normfuse_emu::block().rank; }
    unsigned num_blocks() const { return ::normfuse_emu::block().cluster->size; }
    void barrier_arrive() const { ::normfuse_emu::cluster_phase_arrive(__FILE__, __LINE__); }
    void barrier_wait() const { ::normfuse_emu::cluster_phase_wait(__FILE__, __LINE__); }
    void sync() const {
        barrier_arrive();
        barrier_wait();
    }
    template <typename T>
    T* map_shared_rank(T* local, unsigned rank) const {
        return ::normfuse_emu::map_shared_rank(local, rank, __FILE__, __LINE__);
    }
};

inline cluster_group this_cluster() {
    if (::normfuse_emu::block().cluster == nullptr)
        ::normfuse_emu::fail("this_cluster() in a launch without clusters");
    return cluster_group();
}

}  // namespace cooperative_groups
