"""Polynomial exp/sigmoid/erf/tanh: accuracy against float64 on every CPU preset this
machine runs (vectorized at the preset's width), NaN and infinities as ONNX Runtime has
them, and a model made of them (SiLU, GELU, tanh, sigmoid) built without a scalar libm
call and within 1e-4 of ONNX Runtime."""

import math

import numpy as np
import pytest

from kernels import executable_cpu_presets
from xcompile import polynomial_math, targets

GRID = np.concatenate([np.linspace(-100, 100, 40001), np.linspace(-1e-3, 1e-3, 2001),
                       np.geomspace(1e-30, 1e-4, 200), -np.geomspace(1e-30, 1e-4, 200)]
                      ).astype(np.float32)
SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], dtype=np.float32)
REFERENCE = {
    "exp": np.exp,
    "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
    "erf": np.vectorize(math.erf),
    "tanh": np.tanh,
}
ONNX_RUNTIME_SPECIALS = {  # f(nan), f(inf), f(-inf), f(0), f(-0)
    "exp": [np.nan, np.inf, 0, 1, 1],
    "sigmoid": [np.nan, 1, 0, 0.5, 0.5],
    "erf": [np.nan, 1, -1, 0, 0],
    "tanh": [np.nan, 1, -1, 0, 0],
}


def _compiled(fn, n: int, preset):
    import tvm
    from tvm import te

    x = te.placeholder((n,), "float32", name="x")
    y = te.compute(x.shape, lambda i: fn(x[i]), name="y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, y]))
    (loop,) = sch.get_loops(sch.get_sblock("y"))
    sch.vectorize(sch.split(loop, [None, 16])[1])
    return tvm.compile(sch.mod, target=preset.tvm_target())


def _run(module, x):
    import tvm

    out = tvm.runtime.tensor(np.zeros_like(x))
    module(tvm.runtime.tensor(x), out)
    return out.numpy()


@pytest.mark.parametrize("preset_name", executable_cpu_presets())
@pytest.mark.parametrize("name", list(REFERENCE))
def test_accuracy_against_float64(name, preset_name):
    x = np.concatenate([GRID, SPECIALS])
    got = _run(_compiled(getattr(polynomial_math, name), len(x), targets.PRESETS[preset_name]),
               x)
    want = REFERENCE[name](GRID.astype(np.float64))
    ours = got[:len(GRID)].astype(np.float64)
    # Where float32 itself overflows or flushes to zero, only the float32 result counts.
    normal = (np.abs(want) > np.finfo(np.float32).tiny) & (np.abs(want) < np.finfo(np.float32).max)
    rel = np.abs(ours[normal] - want[normal]) / np.abs(want[normal])
    assert rel.max() < 4e-7, (name, GRID[normal][rel.argmax()], rel.max())
    tiny, huge = np.finfo(np.float32).tiny, np.finfo(np.float32).max
    assert np.all(ours[want >= huge] == np.inf)
    assert np.all(np.abs(ours[np.abs(want) <= tiny]) <= tiny)
    np.testing.assert_array_equal(got[len(GRID):], np.array(ONNX_RUNTIME_SPECIALS[name],
                                                            dtype=np.float32))


def test_model_of_transcendentals_has_no_libm_calls_and_verifies(tmp_path):
    import torch
    from torch import nn

    from conftest import export_torch, run_cli

    torch.manual_seed(5)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.dw = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c), nn.BatchNorm2d(c),
                                    nn.GELU())
            self.pw = nn.Sequential(nn.Conv2d(c, c, 1), nn.Tanh())
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.Sigmoid())

        def forward(self, x):
            y = self.pw(self.dw(x))
            return x + y * self.gate(y)

    model = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.SiLU(), Block(32),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 7)).eval()
    with torch.no_grad():  # batch statistics that make the activations span their range
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 4)
    onnx_path = export_torch(model, tmp_path / "t.onnx", (1, 3, 40, 40))
    out = tmp_path / "t"
    proc = run_cli("build", "--model", str(onnx_path), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("verify", str(out), "--rtol", "1e-4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The names a scalar libm call would import (the module's dynamic string table).
    dynamic_names = (out / "module.so").read_bytes()
    for symbol in (b"expf", b"erff", b"tanhf"):
        assert b"\0" + symbol + b"\0" not in dynamic_names, symbol
