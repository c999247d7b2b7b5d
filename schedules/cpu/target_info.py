"""Per-target numbers the CPU rules need, asked of TVM where it can tell."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CPUInfo:
    """Vector lanes of float32, vector registers, and cores to spread work over; the L1
    data cache's sets and ways (64-byte lines); the L2 cache of one core, in bytes."""

    lanes: int
    registers: int
    cores: int
    l1_sets: int
    l1_ways: int
    l2_bytes: int


# L1 data caches, the smallest of each family's cores we target: x86 (Zen 2-5, Skylake
# to Emerald Rapids) 32-48 KB in 64 sets of 8-12 ways; ARM (Cortex-A72 to Neoverse V2)
# 32-64 KB in 128-256 sets of 2-4 ways (as 128 x 4: the A72's 2 ways of 256 sets hold
# as many lines, fewer of them in one set).
X86_L1 = {"l1_sets": 64, "l1_ways": 8}
ARM_L1 = {"l1_sets": 128, "l1_ways": 4}

# L2 caches per core, the smallest of the cores each vector ISA's preset targets:
# AVX-512 1 MiB (Skylake-SP, Zen 4 and 5; Ice Lake-SP 1.25, Sapphire and Emerald Rapids
# 2), AVX2 256 KiB (Haswell to Skylake client; Zen 1-3 512 KiB), ARM 256 KiB (a
# Cortex-A72 cluster's 1 MiB over its 4 cores; Neoverse N1 1 MiB).
AVX512_L2 = 1 << 20
AVX2_L2 = 256 << 10
ARM_L2 = 256 << 10


def cpu_info(target) -> CPUInfo:
    """Read the vector ISA from LLVM's feature list for ``target``.

    (``llvm_get_vector_width`` reports 512 bits for a Haswell target in TVM 0.27, so the
    width comes from the features instead.)
    """
    from tvm.target import codegen

    def has(feature: str) -> bool:
        return bool(codegen.llvm_cpu_has_features(feature, target))

    cores = int(target.attrs.get("num-cores", 1))
    if has("avx512f"):
        return CPUInfo(lanes=16, registers=32, cores=cores, l2_bytes=AVX512_L2, **X86_L1)
    if has("avx2") or has("avx"):
        return CPUInfo(lanes=8, registers=16, cores=cores, l2_bytes=AVX2_L2, **X86_L1)
    if has("neon"):
        return CPUInfo(lanes=4, registers=32, cores=cores, l2_bytes=ARM_L2, **ARM_L1)
    # SSE-class x86 or unknown
    return CPUInfo(lanes=4, registers=16, cores=cores, l2_bytes=AVX2_L2, **X86_L1)


def channel_vector(channels: int, lanes: int) -> int:
    """Lanes of the channel vectors for ``channels`` contiguous channels: the target's
    full width when it divides them, else the widest power of two below it that does
    (728 channels on AVX-512: 8-lane vectors), so every vector is whole and no access
    runs past the channels. An odd count gets 1 (scalar code)."""
    width = lanes
    while channels % width:
        width //= 2
    return width


# The most of the channels an overlapped last vector may compute twice where whole
# vectors of half the width would do (``overlaps_pay``).
OVERLAP_SHARE = 1 / 8


def overlaps_fit(channels: int, lanes: int) -> bool:
    """Whether ``channels`` can run in vectors of the target's full width, the last one
    overlapping the one before it (``schedules.overlapped_vectors``): they fill one
    vector, and the width does not divide them (728 on AVX-512: 46 vectors of 16)."""
    return channels > lanes and channels % lanes != 0


def vector_width(channels: int, lanes: int, overlapped: bool) -> int:
    """The channel vectors' lanes: the target's full width where ``overlapped`` and
    overlapped vectors fit (``overlaps_fit``), else the widest whole ones
    (``channel_vector``)."""
    return lanes if overlapped and overlaps_fit(channels, lanes) else channel_vector(
        channels, lanes)


def overlaps_pay(channels: int, lanes: int) -> bool:
    """Whether overlapped full-width vectors (``overlaps_fit``) are the default: where
    the widest whole vectors (``channel_vector``) are under half the width, or where
    the overlap is at most an eighth of the channels (``OVERLAP_SHARE``).

    Measured on a 2-core Zen 4 (AVX-512) against whole vectors, depthwise 3x3 convs
    alone, warm: 105 channels (1 lane, scalar code) 0.19x as long, 36 (4 lanes) 0.84x,
    120 (8 lanes; 128 computed) 0.92x, 40 (8 lanes; 48 computed) 1.11x; a max pool and
    residual add over 37 channels 0.41x. In legacy_xception (728 channels: 46 vectors of
    16, 736 computed, against 91 of 8), per kernel in the model, interleaved both ways:
    its 19x19x728 depthwise convs at batch 1 0.84x and 0.81x as long (the two kernels),
    at batch 8 0.86x and 0.82x (two runs, either order)."""
    if not overlaps_fit(channels, lanes):
        return False
    overlap = -(-channels // lanes) * lanes - channels
    narrow = channel_vector(channels, lanes) < lanes // 2
    return narrow or overlap <= channels * OVERLAP_SHARE
