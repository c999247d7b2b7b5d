"""ONNX Clip (ReLU6, as PyTorch exports MobileNets) joins the convolution before it:
recognised by what the importer's kernels compute, converted with the layout, fused into
the convolution's write-back, and the numbers stay ONNX Runtime's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import export_torch, max_rel_err, run_cli


@pytest.fixture(scope="module")
def relu6_onnx(tmp_path_factory):
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
                          nn.Conv2d(16, 24, 1), nn.Hardtanh(-1.0, 1.0)).eval()
    return export_torch(model, tmp_path_factory.mktemp("relu6") / "relu6.onnx", (1, 3, 20, 20))


def test_the_importers_clip_kernels_are_recognised(relu6_onnx):
    """The bound kernels are found by their computation; an elementwise kernel that is
    no bound (an add) and one that transposes are not."""
    import onnx
    import tvm
    from tvm import te

    from xcompile import frontend
    from xcompile.clip_recovery import elementwise_bound

    imported = frontend.import_onnx(onnx.load(str(relu6_onnx)))
    kinds = [elementwise_bound(f) for f in imported.mod.functions.values()
             if isinstance(f, tvm.tirx.PrimFunc)]
    # (The two ReLU6 share their kernels: same shapes. Hardtanh has its own.)
    assert kinds.count("maximum") == kinds.count("minimum") == 2

    a = te.placeholder((4, 5), name="a")
    b = te.placeholder((), name="b")
    add = te.compute((4, 5), lambda i, j: a[i, j] + b[()])
    swapped = te.compute((5, 4), lambda i, j: te.max(a[j, i], b[()]))
    assert elementwise_bound(te.create_prim_func([a, b, add])) is None
    assert elementwise_bound(te.create_prim_func([a, b, swapped])) is None


def test_clip_fuses_into_the_convolutions_and_verifies(relu6_onnx, tmp_path):
    import onnxruntime as ort

    from xcompile import runtime

    out = tmp_path / "b"
    proc = run_cli("build", "--model", str(relu6_onnx), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    kernels = json.loads((out / "manifest.json").read_text())["kernels"]
    # Three convolution kernels and the input's layout change: no kernel of its own
    # for a bound, none transposing around one.
    assert len([k for k in kernels if k["kind"] in ("pointwise", "depthwise", "dense")]) == 3
    bounds = [k["name"] for k in kernels if "maximum" in k["name"] or "minimum" in k["name"]]
    assert bounds and all(name.startswith("fused_conv") for name in bounds), bounds
    assert len(kernels) <= 5, [k["name"] for k in kernels]
    x = np.random.default_rng(0).standard_normal((1, 3, 20, 20), dtype=np.float32) * 4
    want = ort.InferenceSession(str(relu6_onnx), providers=["CPUExecutionProvider"]).run(
        None, {"image": x})[0]
    assert max_rel_err(runtime.load(out)(x), want) < 1e-5
