"""CPU schedule rules against the unscheduled TIR of the same kernel, over Xception's
shapes and odd ones; structure of what they produce; rules decline what they do not fit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import targets
from schedules.cpu import ConvGEMM, Depthwise, Generic

HOST = targets.resolve("host")


def lowered_kernels(module: nn.Module, shape) -> dict:
    """The module's kernels as our pipeline lowers them for CPUs (NHWC, fused), before any
    schedule: name -> PrimFunc."""
    import io

    import onnx
    import tvm

    import schedules
    from xcompile import frontend, pipeline

    module = module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(shape),), buf, dynamo=False, opset_version=17)
    imported = frontend.import_onnx(onnx.load_from_string(buf.getvalue()))
    with HOST.tvm_target():
        mod = pipeline.graph_passes(schedules.layout_for("x86"))(imported.mod)
        mod, _ = pipeline._lift_weights(mod)
        mod = pipeline.lowering_passes()(mod)
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc)}


def run_kernel(func, arrays, target=None):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=target or HOST.tvm_target())
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def random_args(func, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal([int(s) for s in p.shape]).astype(p.dtype)
            for p in func.params]


def check_rule(rule, func, expect_parallel=True):
    """Apply ``rule``; its kernel must compute what the unscheduled one does."""
    sch = rule.apply(func, HOST.tvm_target())
    assert sch is not None, f"{rule.name} declined"
    script = sch.mod["main"].script()
    assert "T.vectorized" in script
    if expect_parallel:
        assert "T.parallel" in script
    args = random_args(func)
    want = run_kernel(func, [a.copy() for a in args])
    got = run_kernel(sch.mod["main"], [a.copy() for a in args])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    return sch


def conv_kernel(cin, cout, size, k=1, stride=1, pad=0, groups=1, batch=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    kernels = lowered_kernels(nn.Sequential(*layers), (batch, cin, size, size))
    convs = [f for name, f in kernels.items() if "conv2d" in name]
    assert len(convs) == 1, list(kernels)
    return convs[0]


# Pointwise and full convolutions: Xception's shapes, then odd ones.
CONV_CASES = [
    pytest.param(dict(cin=64, cout=128, size=147), id="pw-147-64-128"),
    pytest.param(dict(cin=128, cout=256, size=74), id="pw-74-128-256"),
    pytest.param(dict(cin=64, cout=128, size=147, stride=2), id="pw-skip-stride2"),
    pytest.param(dict(cin=256, cout=728, size=37), id="pw-37-256-728"),
    pytest.param(dict(cin=728, cout=728, size=19, act=None), id="pw-19-728-728"),
    pytest.param(dict(cin=1024, cout=1536, size=10), id="pw-10-1024-1536"),
    pytest.param(dict(cin=1536, cout=2048, size=10), id="pw-10-1536-2048"),
    pytest.param(dict(cin=3, cout=32, size=299, k=3, stride=2), id="stem-3x3-s2-pad0"),
    pytest.param(dict(cin=32, cout=64, size=149, k=3), id="stem-3x3-pad0"),
    pytest.param(dict(cin=7, cout=20, size=23, k=3, pad=1, batch=2), id="odd-7-20-pad1-b2"),
    pytest.param(dict(cin=13, cout=24, size=17, k=5, stride=2, pad=2, act=nn.SiLU),
                 id="odd-k5-s2-silu"),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_gemm_matches_unscheduled(case):
    func = conv_kernel(**case)
    sch = check_rule(ConvGEMM(), func)
    assert "layout_rewrite_preproc" in sch.mod["main"].script()  # weights packed


DEPTHWISE_CASES = [
    pytest.param(dict(c=64, size=147, k=3, pad=1), id="dw-147-64"),
    pytest.param(dict(c=256, size=74, k=3, pad=1), id="dw-74-256"),
    pytest.param(dict(c=728, size=37, k=3, pad=1), id="dw-37-728"),
    pytest.param(dict(c=728, size=19, k=3, pad=1), id="dw-19-728"),
    pytest.param(dict(c=1536, size=10, k=3, pad=1), id="dw-10-1536"),
    pytest.param(dict(c=128, size=74, k=3, stride=2, pad=1), id="dw-stride2"),
    pytest.param(dict(c=48, size=31, k=5, stride=2, pad=2, act=nn.SiLU), id="dw-k5-s2-silu"),
    pytest.param(dict(c=32, size=21, k=3, pad=0), id="dw-pad0"),
    pytest.param(dict(c=16, size=20, k=5, stride=2, pad=2, mult=2), id="dw-multiplier2"),
]


@pytest.mark.parametrize("case", DEPTHWISE_CASES)
def test_depthwise_matches_unscheduled(case):
    mult = case.pop("mult", 1)
    c = case.pop("c")
    func = conv_kernel(c, c * mult, groups=c, **case)
    assert ConvGEMM().apply(func, HOST.tvm_target()) is None
    check_rule(Depthwise(), func)


def test_odd_depthwise_falls_back_to_generic():
    """12 channels do not fill whole AVX2 vectors: the depthwise rule declines and the
    generic rule still computes the same thing."""
    func = conv_kernel(12, 12, size=15, k=3, pad=1, groups=12)
    assert Depthwise().apply(func, HOST.tvm_target()) is None
    check_rule(Generic(), func)


class _Head(nn.Module):
    """Max pool with a residual add, global average pool, FC: the rest of Xception."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(64, 64, 1)  # as in Xception, pools read NHWC conv outputs
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.skip = nn.Conv2d(64, 64, 1, 2, bias=False)
        self.fc = nn.Linear(64, 1000)

    def forward(self, x):
        x = self.pre(x)
        y = torch.relu(self.pool(x) + self.skip(x))
        return self.fc(y.mean((2, 3)))


def test_generic_rule_on_everything_else():
    kernels = lowered_kernels(_Head(), (1, 64, 38, 38))
    others = {n: f for n, f in kernels.items() if "conv2d" not in n}
    assert any("max_pool" in n for n in others) and any("matmul" in n for n in others)
    for name, func in others.items():
        assert ConvGEMM().apply(func, HOST.tvm_target()) is None, name
        assert Depthwise().apply(func, HOST.tvm_target()) is None, name
        sch = Generic().apply(func, HOST.tvm_target())
        args = random_args(func)
        want = run_kernel(func, [a.copy() for a in args])
        got = run_kernel(sch.mod["main"], [a.copy() for a in args])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    pool = next(f for n, f in others.items() if "max_pool" in n)
    script = Generic().apply(pool, HOST.tvm_target()).mod["main"].script()
    assert "T.parallel" in script and "T.vectorized" in script


def test_rules_decline_gpu_targets():
    func = conv_kernel(64, 128, size=19)
    cuda = targets.resolve("cuda").tvm_target()
    for rule in (ConvGEMM(), Depthwise(), Generic()):
        assert rule.apply(func, cuda) is None


def _asm(func, preset_name):
    import tvm

    preset = targets.resolve(preset_name)
    sch = ConvGEMM().apply(func, preset.tvm_target())
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
                      target=preset.tvm_target())

    def find(m):
        if m.kind == "llvm":
            return m.inspect_source("asm")
        return next((s for s in map(find, m.imports) if s), None)

    return find(lib.mod)


def test_avx512_instructions():
    asm = _asm(conv_kernel(64, 128, size=19), "x86-avx512")
    assert "vfmadd231ps\t%zmm" in asm or "vfmadd231ps\t(" in asm and "zmm" in asm
    assert asm.count("zmm") > 20


def test_avx2_instructions():
    asm = _asm(conv_kernel(64, 128, size=19), "x86-avx2")
    assert "vfmadd231ps" in asm and "%ymm" in asm and "zmm" not in asm


def test_neon_instructions():
    asm = _asm(conv_kernel(64, 128, size=19), "arm64-neon")
    assert asm.count("fmla\tv") > 10 and ".4s" in asm


def test_register_tile_fits_the_registers():
    from schedules.cpu.conv_gemm import register_tile

    for lanes, regs in ((8, 16), (16, 32), (4, 32)):
        for channels in (24, 32, 64, 728, 1000, 1024, 2048):
            mr, nu = register_tile(channels, lanes, regs)
            assert mr * nu + nu + 1 <= regs
            assert mr * nu >= 10  # enough independent FMAs to hide latency
    assert register_tile(728, 8, 16) == (6, 2)  # 728 -> 736 channels, 6x16 tile


def test_a_failing_rule_falls_through_to_the_next(caplog):
    import tvm

    import schedules

    class Broken:
        name = "broken"

        def apply(self, func, target, tunable):
            raise RuntimeError("boom")

    mod = tvm.IRModule({"k": conv_kernel(64, 128, size=19)})
    with HOST.tvm_target():
        out = schedules.apply_rules([Broken(), Generic()])(mod)
    assert schedules.kernel_rules(out) == {"k": "xcompile.cpu.Generic"}
    assert "broken failed on k" in caplog.text


@pytest.mark.parametrize("lanes,registers", [(16, 32), (4, 32)], ids=["avx512-tiles", "neon-tiles"])
@pytest.mark.parametrize("case", [dict(cin=728, cout=728, size=19),
                                  dict(cin=13, cout=24, size=17, k=5, stride=2, pad=2)],
                         ids=["pw-728", "odd-k5"])
def test_other_isas_tilings_compute_the_same(lanes, registers, case):
    """AVX-512 and NEON tile choices, run here: compiled for this CPU, wider or narrower
    vectors are split or widened by LLVM, so the schedule's logic is what is tested."""
    from tvm import s_tir

    from schedules.cpu.analysis import match_conv2d_nhwc
    from schedules.cpu.conv_gemm import gemm_configs

    func = conv_kernel(**case)
    sch = s_tir.Schedule(func)
    conv = match_conv2d_nhwc(sch)
    n, h, w, f = conv.out_shape
    ConvGEMM._schedule(sch, conv, gemm_configs(n * h * w, f, lanes, registers, 4)[0], lanes)
    args = random_args(func)
    want = run_kernel(func, [a.copy() for a in args])
    got = run_kernel(sch.mod["main"], [a.copy() for a in args])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("lanes", [16, 4], ids=["avx512-lanes", "neon-lanes"])
def test_other_isas_depthwise_computes_the_same(lanes):
    from tvm import s_tir

    from schedules.cpu.analysis import match_conv2d_nhwc

    func = conv_kernel(48, 48, size=31, k=5, stride=2, pad=2, groups=48, act=nn.SiLU)
    sch = s_tir.Schedule(func)
    Depthwise._schedule(sch, match_conv2d_nhwc(sch), lanes)
    args = random_args(func)
    want = run_kernel(func, [a.copy() for a in args])
    got = run_kernel(sch.mod["main"], [a.copy() for a in args])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
