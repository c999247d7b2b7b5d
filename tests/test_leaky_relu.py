"""ONNX LeakyRelu (Keras and YOLO-style CNNs) in an NHWC build: rewritten as
``max(x, alpha * x)`` (``min`` for alpha > 1), it converts with the layout and fuses into
the convolution before it, and the numbers stay ONNX Runtime's."""

from __future__ import annotations

import json

import numpy as np

from conftest import export_torch, max_rel_err, ort_run, run_cli
from xcompile import runtime


def test_leaky_relu_fuses_into_the_convolutions_and_verifies(tmp_path):
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.LeakyReLU(0.1),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.LeakyReLU(1.5),
                          nn.Conv2d(16, 24, 1), nn.LeakyReLU(0.2)).eval()
    onnx_path = export_torch(model, tmp_path / "leaky.onnx", (1, 3, 20, 20))
    out = tmp_path / "b"
    proc = run_cli("build", "--model", str(onnx_path), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    kernels = [k["name"] for k in json.loads((out / "manifest.json").read_text())["kernels"]]
    # Three convolution kernels, each with its activation, and the two layout changes
    # of the input and the output: no transposes around an activation.
    assert len(kernels) == 5, kernels
    assert sum("maximum" in k or "minimum" in k for k in kernels) == 3, kernels
    x = np.random.default_rng(0).standard_normal((1, 3, 20, 20), dtype=np.float32) * 4
    assert max_rel_err(runtime.load(out)(x), ort_run(onnx_path, x)) < 1e-6
