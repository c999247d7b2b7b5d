"""ARM builds: cross-compiled here into aarch64 ELF objects with NEON code."""

import os
import shutil
import subprocess

import pytest

from conftest import run_cli

TOOLS = ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump")


@pytest.fixture(scope="module")
def arm_build(mobile_onnx, tmp_path_factory):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the aarch64 toolchain; missing {missing}")
        pytest.skip(f"aarch64 toolchain not installed: {missing}")
    out = tmp_path_factory.mktemp("arm") / "mobile-arm"
    proc = run_cli("build", "--model", str(mobile_onnx), "--target", "arm64-neon",
                   "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_arm_module_is_aarch64_elf(arm_build):
    head = (arm_build / "module.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    assert head[4] == 2  # 64-bit
    assert int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


def test_arm_module_has_neon_code(arm_build):
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(arm_build / "module.so")],
                         capture_output=True, text=True, check=True).stdout
    # NEON vector arithmetic on 4 x f32 lanes.
    neon = [ln for ln in asm.splitlines()
            if any(op in ln for op in ("fmla\tv", "fmul\tv", "fadd\tv")) and ".4s" in ln]
    assert len(neon) > 10, "no NEON float vector instructions"


def test_arm_build_runs_under_emulation_from_the_cli(arm_build, tmp_path):
    if shutil.which("qemu-aarch64") is None and not os.environ.get("CI"):
        pytest.skip("qemu-user not installed")
    proc = run_cli("run", str(arm_build), "--output", str(tmp_path / "y.npy"))
    assert proc.returncode == 0, proc.stderr
    assert "(aarch64, emulated)" in proc.stdout
    assert proc.stdout.count("class ") == 10  # top-5 of each of the 2 samples
    import numpy as np

    assert np.load(tmp_path / "y.npy").shape == (2, 10)


def test_python_loader_refuses_an_arm_build(arm_build):
    from xcompile import runtime
    from xcompile.errors import XCompileError

    with pytest.raises(XCompileError, match="built for aarch64"):
        runtime.load(arm_build)


def test_verify_an_arm_build_under_emulation(arm_build):
    if shutil.which("qemu-aarch64") is None and not os.environ.get("CI"):
        pytest.skip("qemu-user not installed")
    proc = run_cli("verify", str(arm_build))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rel = float(proc.stdout.split("max relative error")[1].split()[0])
    assert rel < 1e-4
