"""Memory safety: every kernel of the test models runs with each of its buffers placed
against unmapped guard pages (``guard_pages.py``), for every CPU preset this machine
executes: padding 0 (stride-1 windows read in place), 1, 2 and asymmetric, strides 1
and 2, batch 1 and 2, fused and unfused separable convolutions, channel counts that do
not fill whole vectors (odd ones: overlapped full-width vectors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernels import executable_cpu_presets
from torch import nn

from conftest import export_torch, make_mobile_cnn
from onnx_models import keras_like

HARNESS = Path(__file__).with_name("guard_pages.py")


class _OddChannels(nn.Module):
    """Depthwise convs over 27 and 45 channels and a max pool with a residual add over
    45: odd counts, run in overlapped full-width vectors (16x16 and 8x8 maps)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 27, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(27, 27, 3, 1, 1, groups=27),
                                  nn.Conv2d(27, 45, 1), nn.BatchNorm2d(45), nn.ReLU())
        self.dw = nn.Conv2d(45, 45, 3, 1, 1, groups=45)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.skip = nn.Conv2d(45, 45, 1, 2)

    def forward(self, x):
        x = self.stem(x)
        return torch.relu(self.pool(self.dw(x)) + self.skip(x))


def run_harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HARNESS), *map(str, args)],
                          capture_output=True, text=True, timeout=900)


def assert_all_kernels_ok(proc) -> None:
    ran = [ln for ln in proc.stdout.splitlines() if ln.startswith("running ")]
    culprit = ran[-1] if ran else "(before any kernel)"
    assert proc.returncode == 0, (f"{culprit} faulted (exit {proc.returncode}):\n"
                                  f"{proc.stderr[-1500:]}")
    assert "kernels ok" in proc.stdout.splitlines()[-1], proc.stdout[-500:]


@pytest.fixture(scope="module")
def models(tmp_path_factory, xception71_onnx):
    import torch

    root = tmp_path_factory.mktemp("guarded")
    torch.manual_seed(0)
    # The timm xception41 stem that faulted: 3x3 stride 2 pad 1, then 3x3 pad 1.
    stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 1, 1),
                         nn.ReLU()).eval()
    # legacy Xception's stem: no padding, so the stride-1 3x3 conv (and a 1x3 one after
    # it) reads its rows in place, the rows padded to whole tiles reading the last one.
    valid = nn.Sequential(nn.Conv2d(3, 32, 3, 2), nn.ReLU(), nn.Conv2d(32, 40, 3),
                          nn.ReLU(), nn.Conv2d(40, 24, (1, 3))).eval()
    return {
        "stem": export_torch(stem, root / "stem.onnx", (1, 3, 150, 150)),
        "valid-stem": export_torch(valid, root / "valid.onnx", (2, 3, 35, 35)),
        # tf2onnx's Keras style: 'same' padding, asymmetric at stride 2; 24 and 40
        # channels (no whole 16-lane vectors).
        "asymmetric": keras_like(root / "keras.onnx", batch="N"),
        # 76x76: its SiLU depthwise rows of 19 and 10 pixels run as uneven register
        # tiles (10 + 9), the last one under a bounds check.
        "mobile": export_torch(make_mobile_cnn(), root / "mobile.onnx", (2, 3, 76, 76)),
        # Odd channel counts: depthwise convs in full-width vectors, the last tile moved
        # back over the one before (``schedules.overlapped_vectors``); 16x16 and 8x8 maps,
        # so that the feature maps end on a 64-byte boundary, right at the guard.
        "odd": export_torch(_OddChannels().eval(), root / "odd.onnx", (2, 3, 32, 32)),
        "xception71": xception71_onnx,
    }


@pytest.mark.parametrize("preset", executable_cpu_presets())
@pytest.mark.parametrize("model,batch,fuse", [
    ("stem", 1, False), ("stem", 2, False), ("valid-stem", 2, False),
    ("asymmetric", 2, False),
    ("mobile", 2, False), ("mobile", 1, True), ("mobile", 2, True), ("odd", 2, False),
    ("xception71", 1, False), ("xception71", 2, True),
], ids=["stem-b1", "stem-b2", "valid-stem-b2", "keras-asymmetric-b2", "mobile-b2",
        "mobile-fused-b1", "mobile-fused-b2", "odd-channels-b2", "xception71-b1",
        "xception71-fused-b2"])
def test_kernels_stay_inside_their_buffers(models, model, batch, fuse, preset):
    args = [models[model], preset, batch] + (["--fuse-separable"] if fuse else [])
    assert_all_kernels_ok(run_harness(*args))


def test_the_harness_catches_an_overrun(tmp_path):
    """A kernel that reads one element past its input dies in the harness."""
    script = tmp_path / "overrun.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(HARNESS.parent)!r})
import numpy as np, tvm
from tvm.script import tirx as T
import guard_pages

OFFSET = int(sys.argv[1])

@T.prim_func
def main(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
    T.func_attr({{"global_symbol": "main"}})
    for i in range(64):
        b[i] = a[i + OFFSET]

lib = tvm.compile(tvm.IRModule({{"main": main}}), target={{"kind": "llvm"}})
guard_pages.run_guarded(lib, main, np.random.default_rng(0), at_end=sys.argv[1] == "1")
print("survived")
""")
    for offset, survives in (("0", True), ("1", False), ("-1", False)):
        proc = subprocess.run([sys.executable, str(script), offset], capture_output=True,
                              text=True, timeout=120)
        assert ("survived" in proc.stdout) is survives, (offset, proc.stdout, proc.stderr[-500:])
        if not survives:
            assert proc.returncode != 0
