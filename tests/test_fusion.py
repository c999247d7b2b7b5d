"""The separable-fusion graph pass: which depthwise -> pointwise pairs it fuses, and whole
models built with and without it against ONNX Runtime (fp32, rtol 1e-4)."""

import json

import numpy as np
from kernels import lowered_kernels
from torch import nn

from conftest import export_torch, max_rel_err, ort_run, run_cli
from xcompile import runtime
from xcompile.schedules.analysis import DEPTHWISE, classify

RTOL = 1e-4


def _convs(module, shape, fuse=True):
    kernels = lowered_kernels(module, shape, fuse_separable=fuse)
    return sorted(name for name in kernels if "conv2d" in name)


def test_pass_fuses_each_depthwise_with_its_pointwise():
    block = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.Conv2d(16, 32, 1),
                          nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1, groups=32),
                          nn.Conv2d(32, 24, 1))
    assert len(_convs(block, (1, 16, 12, 12), fuse=False)) == 4
    fused = _convs(block, (1, 16, 12, 12))
    assert len(fused) == 2 and all(name.count("conv2d") == 2 for name in fused), fused


class _TwoUses(nn.Module):
    """The depthwise output feeds two pointwise convs: fusing one would lose it for the
    other."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw1 = nn.Conv2d(16, 16, 1)
        self.pw2 = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        y = self.dw(x)
        return self.pw1(y) * self.pw2(y)


class _Residual(nn.Module):
    """The depthwise output is also the pointwise conv's residual (one kernel argument,
    read twice in it)."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        y = self.dw(x)
        return self.pw(y) + y


def test_pass_leaves_what_it_cannot_fuse():
    strided = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.Conv2d(16, 32, 1, 2))
    assert len(_convs(strided, (1, 16, 12, 12))) == 2  # 1x1 stride 2: not pixel for pixel
    dense = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.Conv2d(16, 32, 1))
    assert len(_convs(dense, (1, 16, 12, 12))) == 2  # no depthwise conv
    assert len(_convs(_TwoUses(), (1, 16, 12, 12))) == 3
    assert len(_convs(_Residual(), (1, 16, 12, 12))) == 2


def test_cuda_lowering_does_not_fuse():
    """No CUDA rule schedules a fused pair yet, so the CUDA family keeps them apart."""
    from xcompile import schedules

    assert schedules.fuses_separable("x86") and schedules.fuses_separable("arm")
    assert not schedules.fuses_separable("cuda")


def _build(onnx_path, out, *flags):
    proc = run_cli("build", "--model", str(onnx_path), "-o", str(out), *flags)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "manifest.json").read_text())


def test_fused_and_unfused_builds_match_onnxruntime(mobile_onnx, tmp_path):
    """The mobile CNN's two pairs (multiplier-2 5x5 depthwise, batch norm and SiLU
    between the convs, batch 2, the last pixel chunk running past the end) fuse with
    --fuse-separable; both builds verify."""
    x = np.random.default_rng(11).standard_normal((2, 3, 64, 64), dtype=np.float32)
    ref = ort_run(mobile_onnx, x)
    fused = _build(mobile_onnx, tmp_path / "fused", "--fuse-separable")
    rules = [k["rule"] for k in fused["kernels"]]
    assert rules.count("xcompile.cpu.SeparableConv") == 2
    assert "xcompile.cpu.VectorDepthwise" not in rules
    assert fused["options"]["fuse_separable"] is True
    assert max_rel_err(runtime.load(tmp_path / "fused")(x), ref) < RTOL
    plain = _build(mobile_onnx, tmp_path / "plain")
    assert "xcompile.cpu.SeparableConv" not in [k["rule"] for k in plain["kernels"]]
    assert len(plain["kernels"]) == len(fused["kernels"]) + 2
    assert max_rel_err(runtime.load(tmp_path / "plain")(x), ref) < RTOL


def test_xception_fused_build_matches_onnxruntime(xception71_onnx, tmp_path):
    """Every Xception pair fuses (entry, middle and exit flows), whatever the channel
    counts are to the host's vector width, and the model verifies."""
    _build(xception71_onnx, tmp_path / "x", "--fuse-separable", "--tuning-log", "none")
    m = json.loads((tmp_path / "x" / "manifest.json").read_text())
    rules = [k["rule"] for k in m["kernels"]]
    assert "xcompile.cpu.VectorDepthwise" not in rules  # no depthwise kernel left on its own
    # Xception's distinct pairs: 11 shapes, and the middle flow's first depthwise conv,
    # which reads its block's ReLU (``activation_fusion``), apart from the other two.
    assert rules.count("xcompile.cpu.SeparableConv") == 12
    x = np.random.default_rng(2).standard_normal((1, 3, 71, 71), dtype=np.float32)
    assert max_rel_err(runtime.load(tmp_path / "x")(x), ort_run(xception71_onnx, x)) < RTOL


class _PreActivated(nn.Module):
    """Xception's block: the activation of a sum feeds the depthwise conv, the sum itself
    the residual; ``shared``: the activation is added too (a second reader)."""

    def __init__(self, act, shared=False):
        super().__init__()
        self.stem = nn.Conv2d(16, 16, 3, 1, 1)
        self.act, self.shared = act, shared
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.act(x)
        out = self.pw(self.dw(y)) + x
        return out + y if self.shared else out


def test_activation_before_a_depthwise_conv_is_computed_in_it():
    """A ReLU, a clip or a leaky ReLU that only a depthwise conv reads is inlined into
    its input read (no kernel of its own); an expensive activation (sigmoid: a
    polynomial per window tap) and one with a second reader stay kernels of their own."""
    for act in (nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1)):
        kernels = lowered_kernels(_PreActivated(act), (1, 16, 12, 12))
        assert len(kernels) == 5, sorted(kernels)  # 2 transposes, 3 convs
        fused = [f for name, f in kernels.items() if "relu" in name or "maximum" in name]
        assert len(fused) == 1 and classify(fused[0]) == DEPTHWISE, sorted(kernels)
    for module in (_PreActivated(nn.Sigmoid()), _PreActivated(nn.ReLU(), shared=True)):
        kernels = lowered_kernels(module, (1, 16, 12, 12))
        assert len(kernels) == 6, sorted(kernels)


def test_activation_fused_build_matches_onnxruntime(tmp_path):
    """The pre-activated block, built (the ReLU inside the depthwise conv, which reads
    negative inputs through it), against ONNX Runtime; and with --fuse-separable, where
    the depthwise conv with its ReLU then fuses into the pointwise conv."""
    onnx_path = export_torch(_PreActivated(nn.ReLU()), tmp_path / "pre.onnx", (2, 16, 20, 20))
    x = np.random.default_rng(5).standard_normal((2, 16, 20, 20), dtype=np.float32)
    ref = ort_run(onnx_path, x)
    plain = _build(onnx_path, tmp_path / "plain")
    assert len(plain["kernels"]) == 5
    assert max_rel_err(runtime.load(tmp_path / "plain")(x), ref) < RTOL
    fused = _build(onnx_path, tmp_path / "fused", "--fuse-separable")
    assert [k["rule"] for k in fused["kernels"]].count("xcompile.cpu.SeparableConv") == 1
    assert max_rel_err(runtime.load(tmp_path / "fused")(x), ref) < RTOL
