"""The built-in Xception: architecture as the paper gives it, deterministic export,
timm-layout checkpoints."""

import numpy as np
import onnx
import pytest
import torch

from conftest import assert_one_line_error, ort_run, run_cli
from xcompile.errors import XCompileError
from xcompile.models import BuiltinSpec, export_onnx, make_torch_model
from xcompile.models.xception import Xception, count_conv_layers, count_parameters


def test_parameter_count_and_layers():
    model = Xception()
    assert count_parameters(model) == 22_855_952
    assert count_conv_layers(model) == 36
    blocks = [n for n, _ in model.named_children() if n.startswith("block")]
    assert len(blocks) == 12  # + the stem and exit convs: 14 modules
    # No nonlinearity between depthwise and pointwise; batch norm after each.
    bn_eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bn_eps == {1e-5}


def test_timm_parameter_names():
    keys = set(Xception().state_dict())
    for key in ("conv1.weight", "bn1.running_var", "block1.skip.weight",
                "block1.rep.0.conv1.weight", "block1.rep.0.pointwise.weight",
                "block1.rep.1.weight", "block2.rep.1.conv1.weight",
                "block12.rep.4.pointwise.weight", "conv3.conv1.weight",
                "conv4.pointwise.weight", "bn4.bias", "fc.weight", "fc.bias"):
        assert key in keys, key


def test_seeded_export_is_deterministic(tmp_path):
    a = export_onnx(BuiltinSpec(seed=3, input_size=71), tmp_path / "a.onnx")
    b = export_onnx(BuiltinSpec(seed=3, input_size=71), tmp_path / "b.onnx")
    c = export_onnx(BuiltinSpec(seed=4, input_size=71), tmp_path / "c.onnx")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    model = onnx.load(str(a))
    assert model.opset_import[0].version == 17
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 71, 71]


def test_seeded_activations_are_sane():
    model = make_torch_model(BuiltinSpec(seed=0))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 147, 147),
                                                                  dtype=np.float32))
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert torch.isfinite(logits).all()
    # Calibrated batch norm keeps features O(1): neither vanishing nor exploding.
    assert 0.05 < feats.std().item() < 20
    assert logits.abs().max().item() < 100


def test_timm_checkpoint_round_trip(tmp_path):
    """A state dict in timm's layout loads, and the exported ONNX reproduces it."""
    source = make_torch_model(BuiltinSpec(seed=11))
    ckpt = tmp_path / "xception.pth"
    torch.save({"state_dict": source.state_dict()}, ckpt)
    out = tmp_path / "from_ckpt.onnx"
    proc = run_cli("export-model", "-o", str(out), "--weights", str(ckpt),
                   "--input-size", "99", "--batch", "2")
    assert proc.returncode == 0, proc.stderr
    x = np.random.default_rng(1).standard_normal((2, 3, 99, 99), dtype=np.float32)
    with torch.no_grad():
        want = source(torch.from_numpy(x)).numpy()
    got = ort_run(out, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(XCompileError, match="does not match the model's layout"):
        make_torch_model(BuiltinSpec(weights=str(bad)))
    proc = run_cli("export-model", "-o", str(tmp_path / "x.onnx"), "--weights", str(bad))
    assert_one_line_error(proc, "layout")
    assert not (tmp_path / "x.onnx").exists()


def test_too_small_input(tmp_path):
    proc = run_cli("export-model", "-o", str(tmp_path / "x.onnx"), "--input-size", "32")
    assert_one_line_error(proc, "at least 71")
