"""CPU families (x86 AVX2/AVX-512, ARM NEON): the same rules, sized per target from the
vector ISA TVM reports; most specific first, the generic fallback last."""

from ..registry import register, register_layout
from .conv_gemm import ConvGEMM
from .depthwise import Depthwise
from .generic import Generic

# Convolutions in NHWC with HWIO weights: channels are contiguous, so every conv
# vectorizes over channels; weights change layout once, at build time.
CPU_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}

for _family in ("x86", "arm"):
    register_layout(_family, CPU_LAYOUT)
    for _rule in (ConvGEMM, Depthwise, Generic):
        register(_family, _rule)

__all__ = ["CPU_LAYOUT", "ConvGEMM", "Depthwise", "Generic"]
