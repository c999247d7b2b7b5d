"""Batch tiling: layers whose feature maps exceed the preset's ``tile_batch_bytes`` at the
model's batch run on slices of the batch; the numbers stay ONNX Runtime's, and a graph
that cannot be sliced is left as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import export_torch, max_rel_err, ort_run, run_cli
from xcompile import runtime


def _expected_slices(per_image: int, batch: int, limit: int) -> int:
    """How many slices the preset's limit asks for: 1 (none) when the maps fit, else
    the fewest whose maps fit, else one image a slice (at most 8 slices)."""
    if not limit or per_image * batch <= limit:
        return 1
    counts = [n for n in range(2, min(batch, 8) + 1) if batch % n == 0]
    return next((n for n in counts if per_image * batch // n <= limit), counts[-1])


def test_large_maps_run_on_slices_of_the_batch_and_verify(tmp_path):
    import torch
    from torch import nn

    from xcompile import targets

    class Net(nn.Module):
        """A stem, a residual separable block at full resolution, a pool, a head."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32),
                                       nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32))
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.head = nn.Sequential(nn.Conv2d(32, 64, 1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(64, 10))

        def forward(self, x):
            x = self.stem(x)
            return self.head(self.pool(torch.relu(self.block(x) + x)))

    batch, size = 4, 224
    model = Net().eval()
    with torch.no_grad():  # a batch norm that is not the identity
        model.block[2].running_mean.uniform_(-0.5, 0.5)
        model.block[2].running_var.uniform_(0.5, 2.0)
    onnx_path = export_torch(model, tmp_path / "net.onnx", (batch, 3, size, size))
    out = tmp_path / "b"
    proc = run_cli("build", "--model", str(onnx_path), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    preset = targets.resolve(manifest["target"]["name"])
    # The largest map: 32 channels at full resolution, float32.
    slices = _expected_slices(size * size * 32 * 4, batch, preset.tile_batch_bytes)
    names = [k["name"] for k in manifest["kernels"]]
    sliced = [n for n in names if "strided_slice" in n]
    assert len(sliced) == (slices if slices > 1 else 0), names
    assert any("concatenate" in n for n in names) == (slices > 1), names
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    # Each image's result is its own: slice i of the batch ran on its own inputs.
    assert max_rel_err(runtime.load(out)(x), ort_run(onnx_path, x)) < 1e-5
    # The slices share one copy of each weight, in the layout and packing the kernels
    # read (each slice's convs transformed and packed their own before): as many
    # weights and bytes as the batch-1 build's (the head's panels follow the batch).
    one = tmp_path / "b1"
    proc = run_cli("build", "--model", str(onnx_path), "--batch", "1", "-o", str(one))
    assert proc.returncode == 0, proc.stderr
    sliced_params, whole_params = (json.loads((d / "manifest.json").read_text())["params"]
                                   for d in (out, one))
    assert (out / "params.bin").stat().st_size == (one / "params.bin").stat().st_size
    assert len(sliced_params["names"]) == len(whole_params["names"])


def _module(batch: int, spelled_reshape: bool, residual_to_the_end: bool):
    """main(x, w): relu(x) (through a reshape that names the batch), times w, then a
    sum; with ``residual_to_the_end`` the output also adds the relu's sum, so no single
    activation carries the rest before the output."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([batch, 8, 32, 32], "float32"))
    w = relax.Var("w", relax.TensorType([1, 8, 1, 1], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            h = bb.emit(relax.op.reshape(x, [batch, 8, 32, 32])) if spelled_reshape else x
            r = bb.emit(relax.op.nn.relu(h))
            h = bb.emit(relax.op.multiply(r, w))
            s = bb.emit(relax.op.sum(h, axis=[2, 3]))
            if residual_to_the_end:
                a = bb.emit(relax.op.nn.relu(s))
                y = bb.emit_output(relax.op.add(a, bb.emit(relax.op.sum(r, axis=[2, 3]))))
            else:
                y = bb.emit_output(relax.op.nn.relu(s))
        bb.emit_func_output(y)
    return bb.get()


def _count(mod, op_name: str) -> int:
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call)
        and getattr(e.op, "name", "") == op_name else None)
    return len(found)


def test_pass_slices_a_graph_it_can_and_leaves_the_others():
    from tvm import relax

    from xcompile.batch_tiling import tile_batch

    map_bytes = 8 * 32 * 32 * 4  # one image's map
    ok = _module(4, spelled_reshape=False, residual_to_the_end=False)
    tiled = tile_batch(2 * map_bytes)(ok)
    assert _count(tiled, "relax.strided_slice") == 2
    assert _count(tiled, "relax.concat") == 1
    assert _count(tiled, "relax.nn.relu") == 2 + 1  # the prefix's per slice, then the tail's
    # Cut after the sum, not the product before it (the first place after the last
    # large map): each slice's part carries 8 numbers an image, not a map.
    assert _count(tiled, "relax.sum") == 2
    concat = []
    relax.analysis.post_order_visit(
        tiled["main"], lambda e: concat.append(e) if isinstance(e, relax.Call)
        and getattr(e.op, "name", "") == "relax.concat" else None)
    assert [int(d) for d in concat[0].ty.shape] == [4, 8]
    # A limit that every map fits, or none: nothing to slice.
    assert tile_batch(4 * map_bytes)(ok)["main"].same_as(ok["main"])
    assert tile_batch(0)(ok)["main"].same_as(ok["main"])
    # Where not even one image's map fits, one image a slice.
    alone = tile_batch(map_bytes - 1)(ok)
    assert _count(alone, "relax.strided_slice") == 4
    assert _count(alone, "relax.nn.relu") == 4 + 1
    # A reshape that names the batch cannot take a slice; a prefix activation read by
    # the output itself leaves no place to cut.
    for mod in (_module(4, True, False), _module(4, False, True)):
        assert tile_batch(2 * map_bytes)(mod)["main"].same_as(mod["main"])


@pytest.mark.parametrize("batch, limit_maps, slices", [
    (1, 2, 0),    # nothing to slice
    (3, 2, 3),    # room for 2 maps, 2 does not divide 3: slices of one image
    (11, 0, 0),   # one image a slice would be 11 slices, more than the pass unrolls
    (16, 0, 8),   # no image's map fits: the smallest slices the pass unrolls, 8 of 2
    (16, 4, 4),   # room for 4 maps: 4 slices of 4
])
def test_pass_needs_a_divisor_of_the_batch(batch, limit_maps, slices):
    from xcompile.batch_tiling import MAX_SLICES, tile_batch

    assert MAX_SLICES == 8
    mod = _module(batch, spelled_reshape=False, residual_to_the_end=False)
    map_bytes = 8 * 32 * 32 * 4
    tiled = tile_batch(max(limit_maps * map_bytes, map_bytes - 1))(mod)
    if not slices:
        assert tiled["main"].same_as(mod["main"])
    else:
        assert _count(tiled, "relax.strided_slice") == slices
        assert _count(tiled, "relax.nn.relu") == slices + 1
