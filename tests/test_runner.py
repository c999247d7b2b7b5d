"""The C++ runner: x86 natively, aarch64 builds under qemu-aarch64, both against ONNX
Runtime; its one-line errors for bad input."""

import os
import shutil

import numpy as np
import pytest

from conftest import max_rel_err, ort_run
from xcompile import runner
from xcompile.build import build, resolve_options

ARM_TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64")


def _needs_arm():
    missing = [t for t in ARM_TOOLS if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the aarch64 toolchain and qemu; missing {missing}")
        pytest.skip(f"not installed: {missing}")


@pytest.fixture(scope="module")
def x86_build(mobile_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("runner") / "mobile-x86"
    build(resolve_options(model=str(mobile_onnx), output=str(out)))
    return out


@pytest.fixture(scope="module")
def mobile_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "x.npy"
    np.save(path, np.random.default_rng(4).standard_normal((2, 3, 64, 64), dtype=np.float32))
    return path


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert needle in lines[0], lines[0]


def test_x86_runner_matches_onnxruntime(x86_build, mobile_onnx, mobile_input, tmp_path):
    proc = runner.run(x86_build, str(mobile_input), str(tmp_path / "y.npy"), repeat=2)
    assert proc.returncode == 0, proc.stderr
    assert "latency: median" in proc.stdout
    y = np.load(tmp_path / "y.npy")
    assert max_rel_err(y, ort_run(mobile_onnx, np.load(mobile_input))) < 1e-4


def _copy_with(build, dst, name, data, update_checksum=False):
    """A copy of ``build`` whose file ``name`` holds ``data`` (its manifest checksum
    updated to match, when asked: as a miscompiled build would be)."""
    import hashlib
    import json

    shutil.copytree(build, dst)
    (dst / name).write_bytes(data)
    if update_checksum:
        m = json.loads((dst / "manifest.json").read_text())
        m["sha256"][name] = hashlib.sha256(data).hexdigest()
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_runner_errors(x86_build, mobile_input, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 3, 64, 64), np.float32))
    _one_line_error(runner.run(x86_build, str(bad)),
                    "has shape (1, 3, 64, 64); the model's input is (2, 3, 64, 64)")
    np.save(bad, np.zeros((2, 3, 64, 64), np.float64))
    _one_line_error(runner.run(x86_build, str(bad)), "holds <f8 data; the model's input is float32")

    data = (x86_build / "module.so").read_bytes()
    damaged = _copy_with(x86_build, tmp_path / "damaged", "module.so", data[: len(data) // 2])
    _one_line_error(runner.run(damaged, str(mobile_input)), "SHA-256 differs")
    truncated = _copy_with(x86_build, tmp_path / "truncated", "module.so", data[: len(data) // 2],
                           update_checksum=True)
    _one_line_error(runner.run(truncated, str(mobile_input)), "truncated or damaged")

    no_params = tmp_path / "no-params"
    shutil.copytree(x86_build, no_params)
    (no_params / "params.bin").unlink()
    _one_line_error(runner.run(no_params, str(mobile_input)), "params.bin is missing")


def test_runner_takes_the_weights_in_the_manifests_order(x86_build, mobile_onnx,
                                                         mobile_input, tmp_path):
    """Weights are passed in the order the manifest lists them, whatever their names
    sort to (named w10000 before w1001 they once came in the wrong order)."""
    import json

    import tvm

    renamed = tmp_path / "renamed"
    shutil.copytree(x86_build, renamed)
    m = json.loads((renamed / "manifest.json").read_text())
    params = tvm.runtime.load_param_dict((renamed / "params.bin").read_bytes())
    # Names whose sorted order is the reverse of main's order.
    names = [f"w{len(m['params']['names']) - i:05d}" for i in range(len(m["params"]["names"]))]
    blob = tvm.runtime.save_param_dict(
        {new: params[old] for old, new in zip(m["params"]["names"], names)})
    _copy_with(x86_build, tmp_path / "scratch", "params.bin", blob)
    (renamed / "params.bin").write_bytes(blob)
    m["params"]["names"] = names
    import hashlib

    m["sha256"]["params.bin"] = hashlib.sha256(blob).hexdigest()
    (renamed / "manifest.json").write_text(json.dumps(m))
    proc = runner.run(renamed, str(mobile_input), str(tmp_path / "y.npy"))
    assert proc.returncode == 0, proc.stderr
    assert max_rel_err(np.load(tmp_path / "y.npy"), ort_run(mobile_onnx, np.load(mobile_input))) < 1e-4


@pytest.fixture(scope="module")
def arm_builds(mobile_onnx, xception71_onnx, tmp_path_factory):
    _needs_arm()
    root = tmp_path_factory.mktemp("arm-run")
    outs = {}
    for name, model in (("mobile", mobile_onnx), ("xception71", xception71_onnx)):
        outs[name] = root / name
        build(resolve_options(model=str(model), target="arm64-neon", output=str(outs[name])))
    return outs


def test_x86_runner_refuses_an_arm_build(arm_builds, mobile_input):
    import subprocess

    exe = runner.build_runner("x86_64")
    proc = subprocess.run([str(exe), str(arm_builds["mobile"]), "--input", str(mobile_input)],
                          capture_output=True, text=True)
    _one_line_error(proc, "another architecture")


@pytest.mark.parametrize("name", ["mobile", "xception71"])
def test_arm_build_under_qemu_matches_onnxruntime(arm_builds, name, mobile_onnx,
                                                  xception71_onnx, tmp_path):
    model = {"mobile": mobile_onnx, "xception71": xception71_onnx}[name]
    shape = (2, 3, 64, 64) if name == "mobile" else (1, 3, 71, 71)
    x = np.random.default_rng(8).standard_normal(shape, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = runner.run(arm_builds[name], str(tmp_path / "x.npy"), str(tmp_path / "y.npy"))
    assert proc.returncode == 0, proc.stderr
    assert max_rel_err(np.load(tmp_path / "y.npy"), ort_run(model, x)) < 1e-4
