"""Deployment: a build folder loads and runs with the TVM runtime alone."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, max_rel_err, ort_run
from xcompile import runtime
from xcompile.build import build, resolve_options
from xcompile.errors import XCompileError


@pytest.fixture(scope="module")
def mobile_build(mobile_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "mobile"
    build(resolve_options(model=str(mobile_onnx), output=str(out)))
    return out


def test_runtime_only_subprocess(mobile_onnx, mobile_build, tmp_path):
    x = np.random.default_rng(9).standard_normal((2, 3, 64, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from xcompile import runtime
        p = runtime.load({str(mobile_build)!r})
        np.save({str(tmp_path / 'y.npy')!r}, p(np.load({str(tmp_path / 'x.npy')!r})))
        # (tvm-ffi itself imports torch when it is installed, for DLPack interop.)
        heavy = [m for m in sys.modules if m.split(".")[0] in ("onnx", "onnxruntime")
                 or m.startswith(("tvm.relax", "tvm.s_tir", "xcompile.models"))]
        assert not heavy, heavy
        try:
            from tvm import relax  # proves the compiler library is not loaded
        except Exception:
            pass
        else:
            sys.exit("the TVM compiler was loaded")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"TVM_USE_RUNTIME_LIB": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    y = np.load(tmp_path / "y.npy")
    assert max_rel_err(y, ort_run(mobile_onnx, x)) < 1e-4


def test_predictor_checks_input(mobile_build):
    p = runtime.load(mobile_build)
    assert p.input.shape == (2, 3, 64, 64)
    with pytest.raises(XCompileError, match=r"input shape \(1, 3, 64, 64\) does not match"):
        p(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(XCompileError, match="input dtype float64"):
        p(np.zeros((2, 3, 64, 64), np.float64))


def test_missing_params_file(mobile_build, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(mobile_build, broken)
    (broken / "params.bin").unlink()
    with pytest.raises(XCompileError, match="params.bin is missing"):
        runtime.load(broken)


def test_truncated_module(mobile_build, tmp_path):
    import shutil

    broken = tmp_path / "truncated"
    shutil.copytree(mobile_build, broken)
    data = (broken / "module.so").read_bytes()
    (broken / "module.so").write_bytes(data[: len(data) // 3])
    with pytest.raises(XCompileError, match="module.so is damaged"):
        runtime.load(broken)
