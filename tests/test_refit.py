"""Refit: new weights into a build without rebuilding (the build keeps its weight
transform as CPU modules), by ``xcompile refit``, the Python loader and the C++ runner."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, max_rel_err, ort_run, run_cli
from xcompile import runner, runtime
from xcompile.build import build, resolve_options
from xcompile.models import BuiltinSpec, export_onnx, make_torch_model

SPEC = BuiltinSpec(input_size=71)


@pytest.fixture(scope="module")
def builtin_build(tmp_path_factory):
    """The built-in Xception (seed 0) at 71x71, batch 1, as `build` makes it."""
    out = tmp_path_factory.mktemp("refit") / "x71"
    build(resolve_options(builtin=SPEC, output=str(out)))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A timm legacy_xception-layout checkpoint (other weights: seed 11) and the ONNX
    export of the model with it."""
    root = tmp_path_factory.mktemp("ckpt")
    path = root / "xception.pth"
    torch.save({"state_dict": make_torch_model(replace(SPEC, seed=11)).state_dict()}, path)
    onnx_path = export_onnx(replace(SPEC, weights=str(path)), root / "with-ckpt.onnx")
    return path, onnx_path


def test_refit_with_a_timm_checkpoint_matches_its_export(builtin_build, checkpoint, tmp_path):
    path, exported = checkpoint
    out = tmp_path / "refit"
    proc = run_cli("refit", str(builtin_build), "--weights", str(path), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["refit"]["seconds"] < 60
    # The module and the transform are the build's; only the weights changed.
    before = json.loads((builtin_build / "manifest.json").read_text())
    for name in (m["module"], *m["transform"]["files"]):
        assert m["sha256"][name] == before["sha256"][name]
    assert m["sha256"]["params.bin"] != before["sha256"]["params.bin"]
    x = np.random.default_rng(3).standard_normal((1, 3, 71, 71), dtype=np.float32)
    ref = ort_run(exported, x)
    assert max_rel_err(runtime.load(out)(x), ref) < 1e-4
    assert max_rel_err(runtime.load(builtin_build)(x), ref) > 1e-2  # the weights did change
    proc = run_cli("verify", str(out))  # against the refit's own model
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The C++ runner runs the refit build.
    np.save(tmp_path / "x.npy", x)
    outputs, _ = runner.predict(out, x)
    assert max_rel_err(outputs[0], ref) < 1e-4


def test_refit_from_an_onnx_file(mobile_onnx, tmp_path):
    from conftest import export_torch, make_mobile_cnn

    build_dir = tmp_path / "b"
    assert run_cli("build", "--model", str(mobile_onnx), "-o", str(build_dir)).returncode == 0
    model = make_mobile_cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-0.7)
    other = export_torch(model, tmp_path / "other.onnx", (2, 3, 64, 64))
    assert run_cli("refit", str(build_dir), "--weights", str(other), "-o",
                   str(tmp_path / "r")).returncode == 0
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32)
    assert max_rel_err(runtime.load(tmp_path / "r")(x), ort_run(other, x)) < 1e-4


def test_wrong_weights_are_refused(builtin_build, mobile_onnx, tmp_path):
    # Another number of classes: the same names, one shape differs (the head).
    ckpt = tmp_path / "ten.pth"
    model = make_torch_model(SPEC)
    model.fc = torch.nn.Linear(model.fc.in_features, 10)
    torch.save(model.state_dict(), ckpt)
    proc = run_cli("refit", str(builtin_build), "--weights", str(ckpt), "-o", str(tmp_path / "r"))
    assert_one_line_error(proc, "fc.weight", "(10, 2048)", "(1000, 2048)")
    # Another graph altogether.
    proc = run_cli("refit", str(builtin_build), "--weights", str(mobile_onnx), "-o",
                   str(tmp_path / "r"))
    assert_one_line_error(proc, "has no weight")
    assert not (tmp_path / "r").exists()


def test_loaders_take_raw_weights(builtin_build, checkpoint, tmp_path):
    """The Python loader and the C++ runner make main's weights from raw ones at load
    time with the build's transform (what the GPU kit does with regenerated weights)."""
    import onnx
    import onnx.numpy_helper

    _, exported = checkpoint
    m = json.loads((builtin_build / "manifest.json").read_text())
    found = {t.name: onnx.numpy_helper.to_array(t)
             for t in onnx.load(str(exported)).graph.initializer}
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, spec in enumerate(m["transform"]["raw"]):
        np.save(raw / f"{i:04d}.npy", found[spec["name"]])
    x = np.random.default_rng(5).standard_normal((1, 3, 71, 71), dtype=np.float32)
    ref = ort_run(exported, x)
    assert max_rel_err(runtime.load(builtin_build, raw_weights=raw)(x), ref) < 1e-4
    np.save(tmp_path / "x.npy", x)
    proc = runner.run(builtin_build, str(tmp_path / "x.npy"), str(tmp_path / "y.npy"))
    assert proc.returncode == 0  # (params.bin: the seed-0 weights)
    exe = runner.build_runner("x86_64")
    import subprocess

    done = subprocess.run([str(exe), str(builtin_build), "--input", str(tmp_path / "x.npy"),
                           "--output", str(tmp_path / "y.npy"), "--raw-weights", str(raw)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert max_rel_err(np.load(tmp_path / "y.npy"), ref) < 1e-4
    # A raw weight of the wrong shape: one line naming it.
    first = m["transform"]["raw"][0]
    np.save(raw / "0000.npy", np.zeros([s + 1 for s in first["shape"]], np.float32))
    done = subprocess.run([str(exe), str(builtin_build), "--input", str(tmp_path / "x.npy"),
                           "--raw-weights", str(raw)], capture_output=True, text=True)
    assert done.returncode == 2 and first["name"] in done.stderr, done.stderr
