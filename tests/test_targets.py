"""Target presets: the table, host detection, TVM target construction."""

import pytest

from xcompile import targets
from conftest import run_cli
from xcompile.errors import XCompileError


def test_presets_named_in_the_design():
    for name in ("x86-avx2", "x86-avx512", "arm64-neon", "cuda-sm80", "cuda-sm86",
                 "cuda-sm89", "cuda-sm90", "cuda", "host"):
        assert name in targets.names()
    assert targets.PRESETS["cuda"].target == targets.PRESETS["cuda-sm90"].target


@pytest.mark.parametrize("name", targets.names())
def test_every_preset_makes_a_tvm_target(name):
    preset = targets.resolve(name)
    tgt = preset.tvm_target()
    assert tgt.kind.name == preset.target["kind"]
    if preset.device == "cpu":
        assert int(tgt.attrs["num-cores"]) >= 1
    else:
        assert tgt.host is not None


def test_host_is_this_machine():
    preset = targets.resolve("host")
    assert preset.arch == targets.detect_arch()
    assert preset.target["num-cores"] == targets.host_cores()
    assert preset.cross_cc is None


def test_unknown_target():
    with pytest.raises(XCompileError, match="unknown target 'tpu'"):
        targets.resolve("tpu")


def test_targets_command_lists_dicts():
    proc = run_cli("targets", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["arm64-neon"]["target"]["mtriple"] == "aarch64-linux-gnu"
    assert rows["cuda-sm86"]["target"] == {"kind": "cuda", "arch": "sm_86",
                                           "max_shared_memory_per_block": 49152}
