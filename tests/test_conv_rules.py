"""Every convolution of the test models gets a convolution rule on every CPU preset, with
its reduction vectorized over channels; the one classifier of conv kinds, on shapes
that fooled the earlier ones."""

from __future__ import annotations

import pytest
from kernels import CPU_PRESETS, conv_kernel, lowered_kernels, separable_kernel
from torch import nn

from xcompile import targets
from xcompile.schedules.analysis import (DENSE, DEPTHWISE, GROUPED, OTHER, POINTWISE, SEPARABLE,
                                classify)

CONV_RULES = {"xcompile.cpu.PackedConvGEMM", "xcompile.cpu.VectorDepthwise", "xcompile.cpu.SeparableConv"}


def reductions_vectorized_over_channels(func) -> list[str]:
    """The reduction (update) blocks of a scheduled kernel that do not accumulate in a
    local (register) buffer in a vectorized innermost loop feeding the output-channel
    index; empty when every reduction does, as our conv rules' micro-kernels do."""
    from tvm import s_tir, tirx

    from xcompile.schedules.analysis import free_vars, iter_kinds

    sch = s_tir.Schedule(func)
    bad = []

    def visit(parent):
        for rv in sch.get_child_blocks(parent):
            block = sch.get(rv)
            visit(rv)
            if "R" not in iter_kinds(block) or block.init is not None:
                continue  # not a decomposed reduction update (init blocks are spatial)
            loops = sch.get_loops(rv)
            inner = sch.get(loops[-1])
            channel = block.writes[0].region[-1].min  # index of the last (channel) axis
            realize = inner.body
            binding = {iv.var: v for iv, v in zip(block.iter_vars, realize.iter_values)}
            feeds = any(inner.loop_var in free_vars(binding[v]) for v in free_vars(channel)
                        if v in binding)
            local = block.writes[0].source.scope() == "local"
            if inner.kind != tirx.ForKind.VECTORIZED or not feeds or not local:
                bad.append(block.name_hint)

    visit(sch.get_sblock("root"))
    return bad


def has_conv(func) -> bool:
    """Whether any block of ``func`` is a convolution (found without the classifier)."""
    from tvm import s_tir

    from xcompile.schedules.analysis import conv_block, root_blocks

    sch = s_tir.Schedule(func)
    return any(conv_block(sch, rv) is not None for rv in root_blocks(sch))


def _se_model():
    import torch

    torch.manual_seed(3)

    class SEBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.dw = nn.Sequential(nn.Conv2d(c, c, 7, 1, 3, groups=c, bias=False),
                                    nn.BatchNorm2d(c), nn.SiLU())
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // 4, 1), nn.SiLU(),
                                    nn.Conv2d(c // 4, c, 1), nn.Sigmoid())
            self.pw = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            y = self.dw(x)
            return x + self.pw(y * self.se(y))

    return nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.SiLU(), SEBlock(32), SEBlock(32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()


@pytest.fixture(scope="module")
def models(xception71_onnx, mobile_onnx):
    import onnx

    return {"xception71": onnx.load(str(xception71_onnx)),
            "mobile": onnx.load(str(mobile_onnx)),
            "se": _onnx_of(_se_model(), (1, 3, 56, 56))}


def _onnx_of(module, shape):
    import io
    import warnings

    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(shape),), buf, dynamo=False, opset_version=17)
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("preset_name", CPU_PRESETS)
@pytest.mark.parametrize("model", ["xception71", "mobile", "se"])
def test_every_conv_kernel_gets_a_vectorized_conv_rule(models, model, preset_name, fuse):
    """Scheduling only (no code runs), so every CPU preset is checked on any machine."""
    import tvm

    from xcompile import frontend, pipeline

    imported = frontend.import_onnx(models[model])
    lowered, _ = pipeline.lower(imported.mod, targets.resolve(preset_name),
                                fuse_separable=fuse)
    # Every kernel holding a convolution block, whatever else it holds.
    convs = {gv.name_hint for gv, f in lowered.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and has_conv(f)}
    assert len(convs) >= 3, convs
    if fuse and model != "se":  # (the SE block's depthwise output also feeds the gate)
        assert any(classify(lowered[name]) == SEPARABLE for name in convs)
    opt = pipeline.optimize(imported.mod, targets.resolve(preset_name), fuse_separable=fuse)
    funcs = {gv.name_hint: f for gv, f in opt.mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    # Kernels that pack weights are renamed *_prepacked after scheduling.
    scheduled = {name.removesuffix("_prepacked"): name for name in funcs}
    for conv in convs:
        name = scheduled[conv]
        assert opt.kernels[name] in CONV_RULES, (name, opt.kernels[name])
        assert reductions_vectorized_over_channels(funcs[name]) == [], name


def test_the_check_can_fail():
    """The generic fallback vectorizes this conv over its 24 output channels too, but
    accumulates in memory: it does not pass for a conv rule, relabelled or not; nor
    does the unscheduled kernel. Our rule does."""
    from tvm import s_tir

    from xcompile.schedules.cpu import PackedConvGEMM, Fallback

    func = conv_kernel(13, 24, size=9, k=3, pad=1)
    target = targets.resolve("x86-avx2").tvm_target()
    generic = Fallback().apply(func, target).mod["main"]
    assert "T.vectorized" in generic.script()
    assert reductions_vectorized_over_channels(generic) != []
    decomposed = s_tir.Schedule(func)
    conv = decomposed.get_sblock("conv2d_nhwc")
    decomposed.decompose_reduction(conv, decomposed.get_loops(conv)[4])
    assert reductions_vectorized_over_channels(decomposed.mod["main"]) != []
    ours = PackedConvGEMM().apply(func, target).mod["main"]
    assert reductions_vectorized_over_channels(ours) == []


@pytest.mark.parametrize("layer,kind", [
    (nn.Conv2d(16, 16, 3, 1, 1, groups=16), DEPTHWISE),
    (nn.Conv2d(16, 32, 5, 2, 2, groups=16), DEPTHWISE),  # channel multiplier 2
    (nn.Conv2d(16, 16, (1, 3), 1, (0, 1), groups=16), DEPTHWISE),  # 1x3 depthwise
    (nn.Conv2d(16, 16, 3, 1, 1, groups=4), GROUPED),
    (nn.Conv2d(16, 32, 1), POINTWISE),
    (nn.Conv2d(16, 32, 1, 2), POINTWISE),  # strided 1x1 (a residual branch)
    (nn.Conv2d(16, 32, (1, 7), 1, (0, 3)), DENSE),  # 1x7 is not pointwise
    (nn.Conv2d(1, 8, 3, 1, 1), DENSE),  # one input channel is not depthwise
    (nn.MaxPool2d(3, 2, 1), OTHER),
], ids=["dw3x3", "dw-mult2", "dw1x3", "grouped4", "pw", "pw-s2", "dense1x7",
        "dense-1-channel", "pool"])
def test_one_classifier(layer, kind):
    cin = layer.in_channels if isinstance(layer, nn.Conv2d) else 8
    kernels = lowered_kernels(layer, (1, cin, 12, 12))
    found = [classify(f) for name, f in kernels.items() if "transpose" not in name]
    assert found == [kind], kernels


def test_classifier_knows_a_fused_pair():
    assert classify(separable_kernel(c=16, cout=24, size=9)) == SEPARABLE


def test_tuner_and_fusion_use_the_classifier(mobile_onnx):
    """The tuner's task kinds are the classifier's."""
    from xcompile import frontend, pipeline
    from xcompile.tuning import tasks

    host = targets.resolve("host")
    imported = frontend.import_onnx(frontend.load_onnx(mobile_onnx))
    lowered, _ = pipeline.lower(imported.mod, host)
    found = tasks.extract(lowered, host.tvm_target())
    assert {t.kind for t in found} >= {DEPTHWISE, POINTWISE, DENSE, OTHER}
    assert all(t.kind == classify(t.mod["main"]) for t in found)
