"""Kernels for the schedule tests: small PyTorch layers lowered by our pipeline to the
PrimFuncs the rules see (NHWC, fused), built and run on this CPU; the shapes tested."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from xcompile import targets

HOST = targets.resolve("host")
CPU_PRESETS = [name for name, p in targets.PRESETS.items() if p.device == "cpu"]


def executable_cpu_presets():
    """The CPU presets as pytest parameters: those this machine runs natively are run,
    the others are skipped, saying which instructions the machine lacks."""
    params = []
    for name in CPU_PRESETS:
        preset = targets.PRESETS[name]
        why = None
        if not targets.runs_here(preset):
            why = (f"this {targets.detect_arch()} machine cannot execute {name} code "
                   f"(needs {preset.arch} with {', '.join(sorted(preset.cpu_flags)) or 'its ISA'})")
        params.append(pytest.param(name, id=name,
                                   marks=[pytest.mark.skip(reason=why)] if why else []))
    return params


def lowered_kernels(module: nn.Module, shape, precision: str = "fp32",
                    fuse_separable: bool = False, winograd: bool = True) -> dict:
    """The module's kernels as our pipeline lowers them for this CPU (NHWC, fused; CUDA
    shares the layout), before any schedule: name -> PrimFunc. ``fuse_separable``:
    depthwise -> pointwise pairs as one kernel, as CPU builds do; ``winograd`` False:
    the 3x3 convs direct (builds take Winograd's algorithm where the rule does)."""
    import io

    import onnx
    import tvm

    from xcompile import frontend, pipeline

    module = module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(shape),), buf, dynamo=False, opset_version=17)
    imported = frontend.import_onnx(onnx.load_from_string(buf.getvalue()))
    mod, _ = pipeline.lower(imported.mod, HOST, precision=precision,
                            fuse_separable=fuse_separable, winograd=winograd)
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc)}


def finished(func):
    """``func`` after the pass that finishes scheduled kernels (``schedules.
    finish_kernels``), as builds and the tuner compile it."""
    import tvm

    from xcompile import schedules

    return schedules.finish_kernels()(tvm.IRModule({"main": func}))["main"]


def run_kernel(func, arrays, target=None):
    """``func`` compiled as a build compiles its kernels (``finished``), run on
    ``arrays``; returns the last (the output)."""
    import tvm

    from xcompile import schedules

    lib = tvm.compile(tvm.IRModule({"main": finished(func.with_attr("global_symbol", "main"))}),
                      target=target or HOST.tvm_target(), tir_pipeline=schedules.tir_pipeline())
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def assert_computes_the_same(func, scheduled, target=None):
    """``scheduled`` (a PrimFunc built for ``target``, default this CPU's preset) gives
    what the unscheduled ``func`` gives on the same random arguments (rtol 1e-5)."""
    args = random_args(func)
    want = run_kernel(func, [a.copy() for a in args], target)
    got = run_kernel(scheduled, [a.copy() for a in args], target)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def random_args(func, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal([int(s) for s in p.shape]).astype(p.dtype)
            for p in func.params]


def conv_kernel(cin, cout, size, k=1, stride=1, pad=0, groups=1, batch=1, act=nn.ReLU,
                winograd=False, norm=True):
    """The lowered conv (+ batch norm unless not ``norm``, activation); direct unless
    ``winograd``."""
    layers = [nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    if act is not None:
        layers.append(act())
    kernels = lowered_kernels(nn.Sequential(*layers), (batch, cin, size, size),
                              winograd=winograd)
    convs = [f for name, f in kernels.items() if "conv2d" in name]
    assert len(convs) == 1, list(kernels)
    return convs[0]


def depthwise_kernel(c, mult=1, **layer):
    """The lowered depthwise conv (+ batch norm, activation) of ``c`` channels."""
    return conv_kernel(c, c * mult, groups=c, **layer)


def separable_kernel(c, cout, size, stride=1, pad=1, k=3, between=False, act=nn.ReLU):
    """The fused kernel of a depthwise conv (+ batch norm and ReLU when ``between``) and
    the 1x1 conv after it (+ batch norm, activation)."""
    layers = [nn.Conv2d(c, c, k, stride, pad, groups=c, bias=False)]
    if between:
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
    layers += [nn.Conv2d(c, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    kernels = lowered_kernels(nn.Sequential(*layers), (1, c, size, size), fuse_separable=True)
    convs = [f for name, f in kernels.items() if "conv2d" in name]  # not the transposes
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


# Fused depthwise -> pointwise: Xception's flows, then odd ones.
SEPARABLE_CASES = [
    pytest.param(dict(c=728, cout=728, size=19), id="sep-19-728-middle"),
    pytest.param(dict(c=256, cout=728, size=37), id="sep-37-256-728"),
    pytest.param(dict(c=64, cout=128, size=147, act=None), id="sep-147-64-128"),
    pytest.param(dict(c=1536, cout=2048, size=10), id="sep-10-1536-2048"),
    pytest.param(dict(c=32, cout=24, size=15, stride=2, between=True), id="sep-s2-bn-relu"),
    pytest.param(dict(c=48, cout=20, size=13, k=5, pad=0, act=nn.SiLU), id="sep-k5-pad0-silu"),
]
