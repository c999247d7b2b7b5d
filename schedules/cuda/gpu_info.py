"""Per-target numbers the CUDA rules need, asked of TVM (DLight's target analysis)."""

from __future__ import annotations

from dataclasses import dataclass

# TVM cannot tell a GPU's SM count from its target. Grids are sized to give about two
# blocks per SM of the largest preset GPU (H100/H200: 132 SMs) before tiles shrink.
TARGET_BLOCKS = 264


@dataclass(frozen=True)
class GPUInfo:
    """Threads per block (the most), warp width, shared memory per block in bytes."""

    max_threads: int
    warp: int
    shared_bytes: int


def gpu_info(target) -> GPUInfo:
    """The limits of ``target`` as DLight reads them (the presets set the shared memory:
    CUDA's static 48 KB, which a target built without a device attached does not say)."""
    from tvm.s_tir.dlight.analysis.common_analysis import (get_max_shared_memory_per_block,
                                                           get_max_threads_per_block)

    return GPUInfo(max_threads=get_max_threads_per_block(target),
                   warp=int(target.attrs.get("thread_warp_size", 32)),
                   shared_bytes=get_max_shared_memory_per_block(target))
