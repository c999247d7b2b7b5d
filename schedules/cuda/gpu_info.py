"""Per-target numbers the CUDA rules need, asked of TVM where it can tell."""

from __future__ import annotations

from dataclasses import dataclass

# CUDA's static shared memory limit per block; a target built without a device attached
# does not say more (TVM fills ``max_shared_memory_per_block`` only from a live GPU).
STATIC_SHARED_BYTES = 48 * 1024
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
    attrs = target.attrs
    return GPUInfo(max_threads=int(attrs.get("max_num_threads", 1024)),
                   warp=int(attrs.get("thread_warp_size", 32)),
                   shared_bytes=int(attrs.get("max_shared_memory_per_block",
                                              STATIC_SHARED_BYTES)))
