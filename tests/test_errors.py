"""Bad input: one ``error:`` line naming the problem, a non-zero exit, no traceback,
and no output folder (not even a half-written one)."""

import numpy as np
import onnx
from onnx import TensorProto, helper

from conftest import assert_one_line_error, run_cli


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_missing_model_file(tmp_path):
    proc = run_cli("build", "--model", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o"))
    assert_one_line_error(proc, "not found", "nope.onnx")
    assert _leftovers(tmp_path) == []


def test_file_that_is_not_onnx(tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_text("this is a text file, not a protobuf\n" * 20)
    proc = run_cli("build", "--model", str(bogus), "-o", str(tmp_path / "o"))
    assert_one_line_error(proc, "not an ONNX model")
    assert _leftovers(tmp_path) == ["bogus.onnx"]


def test_op_tvm_cannot_import(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("DFT", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 2])])
    path = tmp_path / "dft.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    proc = run_cli("build", "--model", str(path), "-o", str(tmp_path / "o"))
    assert_one_line_error(proc, "cannot import", "DFT")
    assert _leftovers(tmp_path) == ["dft.onnx"]


def test_unknown_target(mobile_onnx, tmp_path):
    proc = run_cli("build", "--model", str(mobile_onnx), "--target", "x86-avx1024",
                   "-o", str(tmp_path / "o"))
    line = assert_one_line_error(proc, "unknown target", "x86-avx1024")
    assert "x86-avx512" in line  # the choices are listed
    assert _leftovers(tmp_path) == []


def test_wrong_input_shape_at_run_time(mobile_onnx, tmp_path):
    out = tmp_path / "b"
    assert run_cli("build", "--model", str(mobile_onnx), "-o", str(out)).returncode == 0
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    for cmd in ("run", "verify", "bench"):
        proc = run_cli(cmd, str(out), "--input", str(tmp_path / "x.npy"))
        assert_one_line_error(proc, "(1, 3, 32, 32)", "(2, 3, 64, 64)")


def test_unwritable_output_folder(mobile_onnx, tmp_path):
    # The tests may run as root, which ignores permission bits: put the output under a
    # regular file, which no user can write into.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_cli("build", "--model", str(mobile_onnx), "-o", str(blocker / "out"))
    assert_one_line_error(proc, "cannot create output location")
    proc = run_cli("build", "--model", str(mobile_onnx), "-o", str(blocker))
    assert_one_line_error(proc, "not a folder")
    assert blocker.read_text() == "x"
    assert _leftovers(tmp_path) == ["a-file"]


def test_failed_build_keeps_previous_output(mobile_onnx, tmp_path):
    """A failing rebuild leaves the earlier build as it was."""
    out = tmp_path / "keep"
    assert run_cli("build", "--model", str(mobile_onnx), "-o", str(out)).returncode == 0
    before = (out / "manifest.json").read_text()
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x00garbage" * 10)
    proc = run_cli("build", "--model", str(bogus), "-o", str(out))
    assert_one_line_error(proc, "not an ONNX model")
    assert (out / "manifest.json").read_text() == before
    assert _leftovers(tmp_path) == ["bogus.onnx", "keep"]


def test_not_a_build_folder(tmp_path):
    proc = run_cli("run", str(tmp_path))
    assert_one_line_error(proc, "not an xcompile build")
    proc = run_cli("verify", str(tmp_path / "missing"))
    assert_one_line_error(proc, "not found")


def test_bad_numbers():
    proc = run_cli("build", "--batch", "0")
    assert proc.returncode == 2 and "expected a number >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
