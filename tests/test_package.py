"""Bundles: self-contained folders that run with the C++ runner (natively or under
qemu-aarch64) and load with the Python loader."""

import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import assert_one_line_error, max_rel_err, ort_run, run_cli
from xcompile import runtime
from xcompile.build import build, resolve_options


@pytest.fixture(scope="module")
def bundle(mobile_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    build(resolve_options(model=str(mobile_onnx), output=str(root / "build")))
    proc = run_cli("package", str(root / "build"), "-o", str(root / "bundle"))
    assert proc.returncode == 0, proc.stderr
    return root / "bundle"


def test_bundle_layout(bundle):
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["README.txt", "lib", "manifest.json", "module.so", "params.bin",
                     "xcompile_run"]
    assert sorted(p.name for p in (bundle / "lib").iterdir()) == ["libtvm_ffi.so",
                                                                  "libtvm_runtime.so"]
    assert all(os.access(p, os.R_OK | os.X_OK) for p in (bundle / "lib").iterdir())
    assert "./xcompile_run . --input" in (bundle / "README.txt").read_text()


def test_bundle_runs_alone_and_from_python(bundle, mobile_onnx, tmp_path):
    x = np.random.default_rng(6).standard_normal((2, 3, 64, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    ref = ort_run(mobile_onnx, x)
    # The runner, from a copy of the bundle elsewhere, with no Python environment.
    moved = shutil.copytree(bundle, tmp_path / "elsewhere")
    proc = subprocess.run(["./xcompile_run", ".", "--input", str(tmp_path / "x.npy"),
                           "--output", str(tmp_path / "y.npy")], cwd=moved,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert max_rel_err(np.load(tmp_path / "y.npy"), ref) < 1e-4
    assert max_rel_err(runtime.load(moved)(x), ref) < 1e-4


def test_package_errors(mobile_onnx, tmp_path):
    incomplete = tmp_path / "cpu"
    build(resolve_options(model=str(mobile_onnx), output=str(incomplete)))
    (incomplete / "params.bin").unlink()
    proc = run_cli("package", str(incomplete), "-o", str(tmp_path / "b1"))
    assert_one_line_error(proc, "params.bin")
    assert not (tmp_path / "b1").exists()
    proc = run_cli("package", str(tmp_path / "nope"), "-o", str(tmp_path / "b2"))
    assert_one_line_error(proc, "not found")


def test_arm_bundle_under_qemu(xception71_onnx, tmp_path):
    if not all(shutil.which(t) for t in ("aarch64-linux-gnu-g++", "qemu-aarch64")):
        if os.environ.get("CI"):
            pytest.fail("CI must install the aarch64 toolchain and qemu")
        pytest.skip("aarch64 toolchain or qemu not installed")
    build(resolve_options(model=str(xception71_onnx), target="arm64-neon",
                          output=str(tmp_path / "arm")))
    assert run_cli("package", str(tmp_path / "arm"), "-o", str(tmp_path / "bundle")).returncode == 0
    x = np.random.default_rng(9).standard_normal((1, 3, 71, 71), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = run_cli("run", str(tmp_path / "bundle"), "--input", str(tmp_path / "x.npy"),
                   "--output", str(tmp_path / "y.npy"))
    assert proc.returncode == 0, proc.stderr
    assert max_rel_err(np.load(tmp_path / "y.npy"), ort_run(xception71_onnx, x)) < 1e-4
