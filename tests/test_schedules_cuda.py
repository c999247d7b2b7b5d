"""CUDA schedule rules, checked without a GPU.

Arithmetic: each rule's loop nest, with its thread bindings left out, is an ordinary
serial program; it is built for this CPU and compared with the unscheduled TIR of the same
kernel over Xception's shapes and odd ones. Launch shape: the bound schedule is lowered for
CUDA and its kernel's block size, grid and shared memory are checked against the target's
limits. (test_cuda compiles whole models with nvcc.)"""

from __future__ import annotations

import pytest
from kernels import (CONV_CASES, DEPTHWISE_CASES, assert_computes_the_same, conv_kernel,
                     depthwise_kernel, lowered_kernels)
from torch import nn

from xcompile import targets
from xcompile.schedules.cuda import SharedMemoryConvGEMM, ThreadDepthwise
from xcompile.schedules.cuda.conv_gemm import TILES, tile_configs

CUDA = targets.resolve("cuda")
LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 48 * 1024}


def lowered_for_cuda(func):
    """``func``'s device kernels after TVM's lowering for the CUDA preset."""
    import tvm
    from tvm import s_tir

    target = CUDA.tvm_target()
    mod = tvm.IRModule({"main": func.with_attr("target", target)
                        .with_attr("global_symbol", "main")})
    with target:
        lowered = s_tir.pipeline.default_s_tir_pipeline()[0](mod)
    return [f for gv, f in lowered.functions_items() if gv.name_hint != "main"]


def launch_shape(kernel) -> dict[str, int]:
    """Thread axis -> extent (blockIdx.x, threadIdx.y...) of a lowered device kernel."""
    import re

    # TVMScript shows each launch as `T.launch_thread("threadIdx.x", 64)`.
    return {axis: int(extent) for axis, extent in
            re.findall(r'T\.launch_thread\("(\w+\.\w)", (\d+)\)', kernel.script())}


def check_cuda_rule(rule_cls, func, config=None):
    """The rule's kernel (one config, default the first) computes what the unscheduled
    one does, and launches within the limits; returns the launch shape."""
    from tvm import s_tir

    target = CUDA.tvm_target()
    rule = rule_cls()
    if config is None:
        config = rule.all_configs(func, target)[0]
    bound = rule.apply_config(func, target, config)
    assert bound is not None, f"{rule.name} declined {config}"
    (kernel,) = lowered_for_cuda(bound.mod["main"])
    assert s_tir.analysis.verify_gpu_code(kernel, LIMITS)
    shape = launch_shape(kernel)

    serial = rule_cls.unbound().apply_config(func, target, config)
    assert "thread_binding" not in serial.mod["main"].script()
    assert_computes_the_same(func, serial.mod["main"])
    return shape


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_gemm_matches_unscheduled(case):
    func = conv_kernel(**case)
    assert ThreadDepthwise().apply(func, CUDA.tvm_target()) is None
    shape = check_cuda_rule(SharedMemoryConvGEMM, func)
    n, h, w, f = (int(s) for s in func.params[-1].shape)
    config = SharedMemoryConvGEMM().all_configs(func, CUDA.tvm_target())[0]
    # One block per BM x BN output tile, (BM/TM) x (BN/TN) threads in each.
    assert shape["threadIdx.y"] == config.bm // config.tm
    assert shape["threadIdx.x"] == config.bn // config.tn
    assert shape["blockIdx.x"] == -(-n * h * w // config.bm) * -(-f // config.bn)


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "x".join(map(str, t)))
def test_every_gemm_tile_computes_the_same(tile):
    """The tuner's other tiles, on a shape none of them divides."""
    from xcompile.schedules.cuda.conv_gemm import BlockTile

    func = conv_kernel(cin=40, cout=72, size=13, k=3, pad=1, act=nn.SiLU)
    shape = check_cuda_rule(SharedMemoryConvGEMM, func, BlockTile(*tile))
    assert shape["threadIdx.x"] * shape["threadIdx.y"] == (tile[0] // tile[2]) * (tile[1] // tile[3])


@pytest.mark.parametrize("case", DEPTHWISE_CASES)
def test_depthwise_matches_unscheduled(case):
    func = depthwise_kernel(**case)
    assert SharedMemoryConvGEMM().apply(func, CUDA.tvm_target()) is None
    shape = check_cuda_rule(ThreadDepthwise, func)
    n, h, w, c = (int(s) for s in func.params[-1].shape)
    assert shape["threadIdx.x"] == 256
    assert shape["blockIdx.x"] == -(-n * h * w * c // 256)  # a thread per output element


def test_depthwise_wider_configs_compute_the_same():
    from xcompile.schedules.cuda.depthwise import ThreadTile

    func = depthwise_kernel(48, size=31, k=5, stride=2, pad=2, act=nn.SiLU)
    for config in (ThreadTile(128, 4), ThreadTile(512, 2)):
        check_cuda_rule(ThreadDepthwise, func, config)


def test_default_tile_fills_the_gpu():
    """Big problems get the big tile; Xception's 19x19 and 10x10 layers at batch 1 get
    smaller tiles, so there are enough blocks for every SM."""
    big = tile_configs(147 * 147, 128, 1024, 48 * 1024)[0]
    assert (big.bm, big.bn) == (128, 64)
    small = tile_configs(19 * 19, 728, 1024, 48 * 1024)[0]
    assert (small.bm, small.bn) == (32, 32)
    assert (tile_configs(19 * 19 * 32, 728, 1024, 48 * 1024)[0].bm) == 128  # batch 32
    # A block-size limit below 256 threads rules out the 256-thread tiles.
    assert all(c.threads[0] * c.threads[1] <= 128 for c in tile_configs(10**6, 2048, 128, 48 * 1024))


def test_cuda_rules_decline_what_they_do_not_fit():
    """CPU targets, fp16 operands (DLight's tensor-core rule takes those) and non-conv
    kernels: the rules return None and the next rule in the CUDA list handles them."""
    from xcompile import schedules

    cuda = CUDA.tvm_target()
    host = targets.resolve("host").tvm_target()
    func = conv_kernel(64, 128, size=19)
    assert SharedMemoryConvGEMM().apply(func, host) is None and ThreadDepthwise().apply(func, host) is None
    # (Above 64 in every GEMM dimension: DLight tensorizes nothing smaller.)
    fp16 = lowered_kernels(nn.Conv2d(128, 256, 1), (1, 128, 19, 19), precision="fp16")
    conv16 = next(f for name, f in fp16.items() if "conv2d" in name)
    assert SharedMemoryConvGEMM().apply(conv16, cuda) is None
    pool = next(iter(lowered_kernels(nn.MaxPool2d(3, 2, 1), (1, 16, 9, 9)).values()))
    rules = schedules.rules_for("cuda")
    assert [r.name for r in rules][:2] == [SharedMemoryConvGEMM.name, ThreadDepthwise.name]
    for target_func in (conv16, pool):
        assert all(rule.apply(target_func, cuda, False) is None for rule in rules[:2])
    # The fp16 conv goes to DLight's Matmul on tensor cores (mma), not to its fallback.
    taker, scheduled = next((rule, sch) for rule in rules[2:]
                            if (sch := rule.apply(conv16, cuda, False)) is not None)
    assert taker.name == "dlight.gpu.Matmul"
    (kernel,) = lowered_for_cuda(scheduled.mod["main"])
    assert "mma" in kernel.script(), "no tensor-core (mma) instruction in the fp16 conv"
    assert next(rule for rule in rules[2:] if rule.apply(pool, cuda, False) is not None)
