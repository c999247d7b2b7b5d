"""CPU families (x86 AVX2/AVX-512, ARM NEON): the same rules, sized per target from the
vector ISA TVM reports; most specific first, the generic fallback last."""

from ..registry import register, register_layout, register_separable_fusion, register_winograd
from .conv_gemm import PackedConvGEMM
from .depthwise import VectorDepthwise
from .generic import Fallback
from .matmul import VectorMatmul
from .reduction import VectorReduction
from .separable import SeparableConv
from .winograd import WinogradConv

# Convolutions in NHWC with HWIO weights: channels are contiguous, so every conv
# vectorizes over channels; weights change layout once, at build time.
CPU_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}

for _family in ("x86", "arm"):
    register_layout(_family, CPU_LAYOUT)
    register_separable_fusion(_family, SeparableConv)
    for _rule in (SeparableConv, WinogradConv, PackedConvGEMM, VectorDepthwise, VectorMatmul,
                  VectorReduction, Fallback):
        register(_family, _rule)

# Winograd convolutions (``xcompile.winograd``): measured on x86 only (see the rule).
register_winograd("x86", WinogradConv)

__all__ = ["CPU_LAYOUT", "Fallback", "PackedConvGEMM", "SeparableConv", "VectorDepthwise",
           "VectorMatmul", "VectorReduction", "WinogradConv"]
