"""x86 builds against ONNX Runtime on the same ONNX file and input (fp32, rtol 1e-4)."""

import json

import numpy as np
import pytest

from conftest import max_rel_err, ort_run, run_cli
from xcompile import runtime
from xcompile.build import build, resolve_options

RTOL = 1e-4


@pytest.fixture(scope="module")
def xception71_build(xception71_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "x71"
    build(resolve_options(model=str(xception71_onnx), target="host", output=str(out)))
    return out


def test_xception_small_input_matches_onnxruntime(xception71_onnx, xception71_build):
    x = np.random.default_rng(0).standard_normal((1, 3, 71, 71), dtype=np.float32)
    ours = runtime.load(xception71_build)(x)
    ref = ort_run(xception71_onnx, x)
    assert ours.shape == (1, 1000)
    assert max_rel_err(ours, ref) < RTOL
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


def test_manifest_records_the_build(xception71_onnx, xception71_build):
    m = json.loads((xception71_build / "manifest.json").read_text())
    import hashlib

    assert m["model"]["sha256"] == hashlib.sha256(xception71_onnx.read_bytes()).hexdigest()
    assert m["inputs"] == [{"name": "input", "shape": [1, 3, 71, 71], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "logits", "shape": [1, 1000], "dtype": "float32"}]
    assert m["target"]["target"]["kind"] == "llvm"
    assert m["versions"]["tvm"].startswith("0.27")
    assert m["versions"]["tvm_ffi"] == "0.1.14.post1"
    assert m["build_seconds"] > 0
    names = {k["name"] for k in m["kernels"]}
    # Fusion ran: convolutions carry their bias/ReLU epilogues in one kernel.
    assert any(n.startswith("fused_conv2d") for n in names), names
    rules = {k["rule"] for k in m["kernels"]}
    # (The stem's stride-1 3x3 conv, 32 -> 64 channels, by Winograd's algorithm.)
    assert rules == {"xcompile.cpu.PackedConvGEMM", "xcompile.cpu.VectorDepthwise",
                     "xcompile.cpu.VectorMatmul", "xcompile.cpu.VectorReduction",
                     "xcompile.cpu.WinogradConv", "xcompile.cpu.Fallback"}, rules
    # Every ONNX weight is recorded by its name; params.bin holds exactly the weights
    # main takes, each under its own name.
    import onnx
    import tvm

    initializers = [t.name for t in onnx.load(str(xception71_onnx)).graph.initializer]
    assert sorted(m["params"]["onnx_names"]) == sorted(initializers)
    params = tvm.runtime.load_param_dict((xception71_build / "params.bin").read_bytes())
    assert sorted(params) == sorted(m["params"]["names"])
    assert len(set(m["params"]["names"])) == len(m["params"]["names"])


def test_batch_override(xception71_onnx, tmp_path):
    out = tmp_path / "b3"
    build(resolve_options(model=str(xception71_onnx), target="host", batch=3,
                          output=str(out)))
    proc = run_cli("verify", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_non_xception_cnn_builds_and_verifies(mobile_onnx, tmp_path):
    """Depthwise 5x5, stride 2, channel multiplier 2, SiLU, batch 2."""
    out = tmp_path / "mobile"
    proc = run_cli("build", "--model", str(mobile_onnx), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    x = np.random.default_rng(5).standard_normal((2, 3, 64, 64), dtype=np.float32)
    ours = runtime.load(out)(x)
    ref = ort_run(mobile_onnx, x)
    assert max_rel_err(ours, ref) < RTOL
    np.save(tmp_path / "x.npy", x)
    proc = run_cli("verify", str(out), "--input", str(tmp_path / "x.npy"))
    assert proc.returncode == 0, proc.stderr
    assert "max relative error" in proc.stdout


def test_verify_fails_above_tolerance(mobile_onnx, tmp_path):
    """verify is not a rubber stamp: a build whose weights were altered fails it."""
    import tvm

    out = tmp_path / "tampered"
    build(resolve_options(model=str(mobile_onnx), output=str(out)))
    m = json.loads((out / "manifest.json").read_text())
    params = tvm.runtime.load_param_dict((out / "params.bin").read_bytes())
    first = m["params"]["names"][0]
    arr = params[first].numpy()
    params = {k: v for k, v in params.items()}
    params[first] = tvm.runtime.tensor(arr * 1.01)
    (out / "params.bin").write_bytes(tvm.runtime.save_param_dict(params))
    # Record the altered weights as the build's own, as a miscompiled build would be.
    import hashlib

    m["sha256"]["params.bin"] = hashlib.sha256((out / "params.bin").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(m))
    proc = run_cli("verify", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout


@pytest.mark.slow
def test_default_build_299_verifies_from_cli(tmp_path):
    """The main job: no-argument build (built-in Xception, 299x299, host), then verify."""
    out = tmp_path / "default"
    proc = run_cli("build", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "build options:" in proc.stderr
    proc = run_cli("verify", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rel = float(proc.stdout.split("max relative error")[1].split()[0])
    assert rel < RTOL
    proc = run_cli("run", str(out), "--output", str(tmp_path / "y.npy"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("class ") == 5
    assert np.load(tmp_path / "y.npy").shape == (1, 1000)


def test_no_custom_schedules_keeps_the_plain_path(mobile_onnx, tmp_path):
    out = tmp_path / "plain"
    proc = run_cli("build", "--model", str(mobile_onnx), "--no-custom-schedules",
                   "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert {k["rule"] for k in m["kernels"]} == {"unscheduled"}
    assert m["options"]["custom_schedules"] is False
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64), dtype=np.float32)
    assert max_rel_err(runtime.load(out)(x), ort_run(mobile_onnx, x)) < RTOL


def test_squeeze_excite_cnn_with_7x7_depthwise(tmp_path):
    """What EfficientNet-style networks bring: 7x7 depthwise, squeeze-excite (global
    pool, two FCs as 1x1 convs, sigmoid gate broadcast over the feature map), SiLU."""
    import torch
    from torch import nn

    from conftest import export_torch

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

    model = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.SiLU(), SEBlock(32), SEBlock(32),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()
    onnx_path = export_torch(model, tmp_path / "se.onnx", (1, 3, 56, 56))
    out = tmp_path / "se"
    proc = run_cli("build", "--model", str(onnx_path), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert "unscheduled" not in {k["rule"] for k in m["kernels"]}
    proc = run_cli("verify", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fp16_build_verifies_within_its_tolerance(mobile_onnx, tmp_path):
    """Mixed precision: float16 weights in params.bin, float32 in and out; it matches
    ONNX Runtime's fp32 within the fp16 tolerance (1e-2), and not within 1e-6."""
    import tvm

    out = tmp_path / "fp16"
    proc = run_cli("build", "--model", str(mobile_onnx), "--precision", "fp16", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["options"]["precision"] == "fp16"
    params = tvm.runtime.load_param_dict((out / "params.bin").read_bytes())
    assert "float16" in {str(v.dtype) for v in params.values()}
    proc = run_cli("verify", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tolerance 1e-02" in proc.stdout
    assert run_cli("verify", str(out), "--rtol", "1e-6").returncode == 1
