"""Winograd convolutions (``xcompile.winograd``, ``schedules.cpu.winograd``): the graph
pass takes the 3x3 convs the rule fits and leaves the rest direct; the unscheduled
Winograd TIR computes the direct convolution; the rule's schedules, every configuration
of them, compute what the unscheduled Winograd TIR does, for every CPU preset this
machine executes (the others skipped, saying why)."""

from __future__ import annotations

import numpy as np
import pytest
from kernels import (assert_computes_the_same, conv_kernel, executable_cpu_presets,
                     lowered_kernels, random_args, run_kernel)
from torch import nn

from xcompile import targets
from xcompile.schedules.analysis import DENSE, DEPTHWISE, WINOGRAD, classify, work_flops
from xcompile.schedules.cpu import PackedConvGEMM, WinogradConv


@pytest.fixture(params=executable_cpu_presets())
def preset(request):
    """A CPU preset whose code this machine runs."""
    return targets.resolve(request.param)


SMALL_CASES = [
    # Padded, a map that is not a multiple of the 4-pixel tiles, two images.
    pytest.param(dict(cin=16, cout=32, size=15, k=3, pad=1, batch=2), id="16-32-pad1-b2"),
    pytest.param(dict(cin=16, cout=48, size=9, k=3, pad=1, act=nn.SiLU), id="16-48-silu"),
    # No epilogue at all: the output transform writes the output itself.
    pytest.param(dict(cin=32, cout=16, size=10, k=3, act=None, norm=False), id="32-16-bare"),
]


@pytest.mark.parametrize("case", SMALL_CASES)
def test_winograd_computes_the_direct_convolution(case):
    """The algorithm itself (its matrices, padding, partial tiles), unscheduled."""
    wino, direct = conv_kernel(**case, winograd=True), conv_kernel(**case)
    assert classify(wino) == WINOGRAD and classify(direct) == DENSE
    assert [p.shape for p in wino.params] == [p.shape for p in direct.params]
    # Counted as the direct convolution it replaces (profiles and the tuner's estimate).
    assert work_flops(wino) == work_flops(direct)
    args = random_args(direct)
    want = run_kernel(direct, [a.copy() for a in args])
    got = run_kernel(wino, [a.copy() for a in args])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("case", SMALL_CASES)
def test_winograd_rule_matches_unscheduled(case, preset):
    func = conv_kernel(**case, winograd=True)
    target = preset.tvm_target()
    assert PackedConvGEMM().apply(func, target) is None
    sch = WinogradConv().apply(func, target)
    assert sch is not None, "WinogradConv declined"
    script = sch.mod["main"].script()
    assert "T.parallel" in script and "T.vectorized" in script
    # The kernel transform stays a weight-packing block, run once at build time.
    assert "layout_rewrite_preproc" in script
    assert_computes_the_same(func, sch.mod["main"], target)


def test_every_configuration_computes_the_same():
    from tvm import s_tir

    from xcompile.schedules.analysis import match_winograd

    # 12 tiles a row: several register blocks divide them on either ISA.
    func = conv_kernel(cin=16, cout=32, size=48, k=3, pad=1, winograd=True)
    rule, target = WinogradConv(), targets.resolve("host").tvm_target()
    configs = rule.configs(match_winograd(s_tir.Schedule(func)), target)
    assert len(configs) > 1
    for config in configs:
        sch = rule.apply_config(func, target, config)
        assert sch is not None, config
        assert_computes_the_same(func, sch.mod["main"], target)


def test_xception_stem_against_the_direct_convolution(preset):
    """legacy Xception's second stem conv (32 -> 64 channels on 149x149, no padding,
    its batch norm and ReLU), scheduled, against the unscheduled direct conv."""
    case = dict(cin=32, cout=64, size=149, k=3)
    wino, direct = conv_kernel(**case, winograd=True), conv_kernel(**case)
    target = preset.tvm_target()
    sch = WinogradConv().apply(wino, target)
    assert sch is not None
    assert_computes_the_same(direct, sch.mod["main"], target)


@pytest.mark.parametrize("layer,kind", [
    (nn.Conv2d(16, 32, 3, 1, 1), WINOGRAD),
    (nn.Conv2d(16, 32, 3, 2, 1), DENSE),  # stride 2
    (nn.Conv2d(16, 32, 3, 1, 2, dilation=2), DENSE),
    (nn.Conv2d(16, 32, 5, 1, 2), DENSE),  # 5x5
    (nn.Conv2d(16, 16, 3, 1, 1, groups=16), DEPTHWISE),
    (nn.Conv2d(7, 32, 3, 1, 1), DENSE),  # channels no vector width divides
    (nn.Conv2d(16, 20, 3, 1, 1), DENSE),
], ids=["3x3", "stride2", "dilated", "5x5", "depthwise", "7-in", "20-out"])
def test_the_pass_takes_the_convs_the_rule_fits(layer, kind):
    kernels = lowered_kernels(layer, (1, layer.in_channels, 12, 12))
    found = [classify(f) for name, f in kernels.items() if "transpose" not in name]
    assert found == [kind], list(kernels)
    direct = lowered_kernels(layer, (1, layer.in_channels, 12, 12), winograd=False)
    assert WINOGRAD not in [classify(f) for f in direct.values()]
