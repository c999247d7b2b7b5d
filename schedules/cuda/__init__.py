"""CUDA family: our rules for separable-convolution kernels (dense/pointwise convs as a
tiled GEMM, depthwise convs), then DLight's generic GPU rules (tensor-core and CUDA-core
matmul, GEMV, reductions, a thread-binding fallback) in DLight's own priority order for
the rest. Every CUDA kernel leaves here bound to threads."""

from __future__ import annotations

from ..registry import register, register_baseline, register_layout
from .conv_gemm import SharedMemoryConvGEMM
from .depthwise import ThreadDepthwise

# NHWC with HWIO weights: output channels are contiguous, so a warp's loads and stores of
# neighbouring channels coalesce and the pointwise conv is a row-major GEMM.
CUDA_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}

DLIGHT_RULES = ("Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback")


def _dlight(rule_cls_name: str):
    def make():
        from tvm.s_tir import dlight

        rule = getattr(dlight.gpu, rule_cls_name)()
        rule.name = f"dlight.gpu.{rule_cls_name}"
        return rule

    return make


register_layout("cuda", CUDA_LAYOUT)
register("cuda", SharedMemoryConvGEMM)
register("cuda", ThreadDepthwise)
for _name in DLIGHT_RULES:
    register("cuda", _dlight(_name))
    register_baseline("cuda", _dlight(_name))

__all__ = ["CUDA_LAYOUT", "DLIGHT_RULES", "SharedMemoryConvGEMM", "ThreadDepthwise"]
