"""bench: interleaved timing against ONNX Runtime and OpenVINO (in processes of its own),
memory per backend in fresh processes, the kernel profile with FLOP rates; and the
loaders' memory: weights read once, straight into the tensors the module uses."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, export_torch, run_cli
from kernels import executable_cpu_presets
from xcompile import peers, targets
from xcompile.build import build, resolve_options

needs_openvino = pytest.mark.skipif(not peers.openvino_installed(),
                                    reason="OpenVINO is not installed (pip install -e '.[peers]')")


@pytest.fixture(scope="module")
def mobile_build(mobile_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "mb"
    build(resolve_options(model=str(mobile_onnx), output=str(out)))
    return out


@needs_openvino
@pytest.mark.timing
def test_bench_times_every_peer_and_measures_memory(mobile_build, tmp_path):
    proc = run_cli("bench", str(mobile_build), "--repeat", "3", "--memory", "--profile",
                   "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    timings = {t["backend"]: t for t in result["timings"]}
    assert list(timings) == ["xcompile", "onnxruntime", "openvino-f32", "openvino"]
    assert all(len(t["samples_ms"]) == 3 and t["median_ms"] > 0 for t in timings.values())
    for name, t in timings.items():
        if name != "xcompile":
            assert result["ratios"][name] == pytest.approx(
                timings["xcompile"]["median_ms"] / t["median_ms"], rel=1e-3)
    assert "f32" in timings["openvino-f32"]["detail"]
    assert "its default here" in timings["openvino"]["detail"]
    # The figures name the machine they come from.
    machine = result["machine"]
    assert machine["cores"] == targets.host_cores() and machine["cpu"] in proc.stdout
    memory = {r["backend"]: r for r in result["memory"]}
    assert set(memory) == {"xcompile", "xcompile-runner", "onnxruntime", "openvino-f32",
                           "openvino"}
    for r in memory.values():
        assert r["peak_mib"] >= r["steady_mib"] > 1, r
    # Profile: convolution kernels have FLOP rates; the peak is measured here (a VM's
    # reported clock need not be the one its cores run at), and no kernel passes it.
    rows = result["profile"]
    convs = [r for r in rows if r["kind"] in ("pointwise", "dense", "depthwise")]
    assert convs and all(r["gflops"] > 0 for r in convs)
    assert result["peak"]["how"].startswith("measured")
    assert max(r["gflops"] for r in convs) < 1.1 * result["peak"]["gflops"]
    preset = targets.resolve("host")
    ghz, _ = targets.host_clock()
    arithmetic = preset.vector_bits / 32 * 2 * preset.fma_units * targets.host_cores() * ghz
    assert f"= {arithmetic:.0f} GFLOP/s" in result["peak"]["how"]
    assert "GFLOP/s" in proc.stdout and "peak:" in proc.stdout


def test_runtime_only_peak_is_the_arithmetic(mobile_build):
    """With the TVM runtime alone, bench cannot build the FMA kernel: the peak is lanes x
    2 x pipes x cores x the reported clock, and says so (it had ended in an
    AttributeError from TVM)."""
    code = ("import json, sys; from xcompile.bench import peak_gflops; "
            "from xcompile.manifest import read_manifest; "
            "print(json.dumps(peak_gflops(read_manifest(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(mobile_build)], text=True,
                          capture_output=True, env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    if result is None:
        assert targets.host_clock()[0] == 0  # no clock reported: no peak to give
    else:
        assert not result[1].startswith("measured") and "FMA pipes" in result[1], result


BLAS_RATE = """
import time
import numpy as np
a = np.random.default_rng(0).standard_normal((1536, 1536), dtype=np.float32)
best = float("inf")
for _ in range(5):
    start = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - start)
print(2 * 1536 ** 3 / best / 1e9)
"""


@pytest.mark.parametrize("preset_name", executable_cpu_presets())
def test_fma_peak_kernel_computes_every_lane(preset_name):
    """The peak kernel computes what it claims: every lane of every chain its own
    recurrence from its own seed, in float32 FMA arithmetic (one rounding a step). A
    kernel whose vector loop the compiler made scalar (one lane computed, its value
    given to all: how TVM 0.27 compiled an index bound inside the vectorized loop)
    fails on every element but one a chain."""
    import tvm

    from xcompile import fma_peak
    from xcompile.schedules.cpu.target_info import cpu_info

    preset = targets.resolve(preset_name)
    cores = targets.host_cores()
    target = {**preset.target, "num-cores": cores}
    info = cpu_info(tvm.target.Target(target))
    steps = 500
    got = fma_peak.compute(target, info.lanes, info.registers, cores, steps)
    # A float32 FMA: the float64 product of two float32 values is exact, the sum is
    # rounded once, then to float32.
    want = fma_peak.seeds(cores, info.lanes * fma_peak.chains(info.registers))
    m, a = np.float64(np.float32(fma_peak.MULTIPLIER)), np.float64(np.float32(fma_peak.ADDEND))
    for _ in range(steps):
        want = (want.astype(np.float64) * m + a).astype(np.float32)
    assert len(np.unique(want)) == want.size  # every lane its own value
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.timing
@pytest.mark.parametrize("preset_name", executable_cpu_presets())
def test_measured_fma_peak_is_a_ceiling(preset_name):
    """The measured FMA peak is at least what the BLAS under numpy reaches on a large
    float32 matrix product here: a peak kernel that spilled its chains to memory, or ran
    on one core of several, would fall below it."""
    import tvm

    from xcompile import fma_peak
    from xcompile.schedules.cpu.target_info import cpu_info

    preset = targets.resolve(preset_name)
    cores = targets.host_cores()
    target = {**preset.target, "num-cores": cores}
    info = cpu_info(tvm.target.Target(target))
    # The peak before and after the BLAS, the best of each side: a moment when the VM had
    # one core fewer (once, in CI: the peak read half, the BLAS a moment later did not)
    # has to strike both to fail the test; a spilling kernel fails it every time.
    peaks = [fma_peak.measure(target, info.lanes, info.registers, cores)]
    # numpy's BLAS in a process of its own: its threads spin after a product, and would
    # slow whatever runs beside them in this one.
    blas = float(subprocess.run([sys.executable, "-c", BLAS_RATE], capture_output=True,
                                text=True, check=True).stdout)
    peaks.append(fma_peak.measure(target, info.lanes, info.registers, cores))
    # numpy's BLAS may use a wider ISA than the preset: compare with the preset's share.
    share = min(1.0, preset.vector_bits / targets.resolve("host").vector_bits)
    threads = tvm.get_global_func("runtime.NumThreads")()
    assert max(peaks) >= 0.8 * blas * share, (peaks, blas, cores, threads,
                                              sorted(os.sched_getaffinity(0)))


SPIN = "import time\nend = time.perf_counter() + {s}\nwhile time.perf_counter() < end: pass\n"


def test_runs_wait_for_spinning_threads():
    """``bench`` starts a run only once no watched thread spins: one in this process, or
    in a backend's own process named by its pid; another process, unnamed, is not
    waited for (``process_idle``)."""
    import threading

    from xcompile import process_idle

    spinner = threading.Thread(target=exec, args=(SPIN.format(s=0.4), {}))
    spinner.start()
    waited = process_idle.wait_until_idle(0.0)
    assert not spinner.is_alive() and 0.35 <= waited < process_idle.LIMIT_S, waited
    spinner.join()
    for watched in (True, False):
        child = subprocess.Popen([sys.executable, "-c", SPIN.format(s=0.6)])
        time.sleep(0.15)  # the interpreter started, spinning
        try:
            waited = process_idle.wait_until_idle(0.0, [child.pid] if watched else [])
            if watched:
                assert child.poll() is not None and 0.3 <= waited, waited
            else:
                assert child.poll() is None and waited < 0.3, waited
        finally:
            child.wait()


def test_bench_without_openvino(mobile_build, tmp_path):
    proc = run_cli("bench", str(mobile_build), "--repeat", "2", "--no-openvino", "--json",
                   str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert [t["backend"] for t in result["timings"]] == ["xcompile", "onnxruntime"]


def test_manifest_records_each_kernels_work(tmp_path):
    """A 3x3 conv's FLOPs are 2 * pixels * Cin * Cout * 9, counted before the schedule
    pads the channels to whole tiles, and without its fused SiLU (whose polynomial
    sigmoid is ~30 operations an element: counted, they made such kernels look up to
    5x faster than they ran)."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(5, 24, 3, 1, 1, bias=False), nn.SiLU()).eval()
    path = export_torch(model, tmp_path / "c.onnx", (1, 5, 20, 20))
    out = tmp_path / "c"
    build(resolve_options(model=str(path), output=str(out)))
    kernels = json.loads((out / "manifest.json").read_text())["kernels"]
    conv = [k for k in kernels if k["kind"] == "dense"]
    assert len(conv) == 1
    assert conv[0]["flops"] == 2 * 20 * 20 * 5 * 24 * 9
    del torch


BIG = 4  # 1x1 convs of 1536 -> 1536: 9 MiB of weights each


@pytest.fixture(scope="module")
def weighty_build(tmp_path_factory):
    from torch import nn

    tmp = tmp_path_factory.mktemp("weighty")
    layers = [nn.Conv2d(16, 1536, 1)] + [nn.Conv2d(1536, 1536, 1) for _ in range(BIG)]
    path = export_torch(nn.Sequential(*layers).eval(), tmp / "w.onnx", (1, 16, 4, 4))
    out = tmp / "w"
    build(resolve_options(model=str(path), output=str(out)))
    return out


LOAD_RSS = """
import json, sys
def status():
    return {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/self/status')
            if l.startswith(('VmHWM', 'VmRSS'))}
from xcompile import runtime
runtime._tvm()
before = status()
p = runtime.load(sys.argv[1])
after = status()
print(json.dumps({"before": before, "after": after}))
"""


def test_python_loader_reads_weights_once(weighty_build):
    """Loading raises the peak resident memory by the weights and little more (TVM's
    load_param_dict raised it by about 5x the file)."""
    weights_kib = (weighty_build / "params.bin").stat().st_size / 1024
    proc = subprocess.run([sys.executable, "-c", LOAD_RSS, str(weighty_build)],
                          capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "TVM_USE_RUNTIME_LIB": "1"})
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout)
    grew = rss["after"]["VmHWM"] - rss["before"]["VmHWM"]
    assert weights_kib < grew < 1.2 * weights_kib + 16 * 1024, (grew, weights_kib)
    # Nor does the runtime import PyTorch (tvm-ffi would, for a Windows workaround).
    proc = subprocess.run([sys.executable, "-c",
                           "import sys; from xcompile import runtime; runtime._tvm(); "
                           "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


def test_cpp_runner_reads_weights_once(weighty_build, tmp_path):
    from xcompile.runner import build_runner

    try:
        exe = build_runner(targets.detect_arch())
    except Exception as e:  # no C++ compiler here
        pytest.skip(f"the C++ runner cannot be built here: {e}")
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1, 16, 4, 4), np.float32))
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", str(exe), str(weighty_build),
                           "--input", str(x)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    weights_kib = (weighty_build / "params.bin").stat().st_size / 1024
    # The runner and TVM's runtime take about 25 MiB; the weights once, not three times.
    assert peak_kib < weights_kib + 48 * 1024, (peak_kib, weights_kib)


def test_params_file_matches_tvm_and_refuses_damage(weighty_build, tmp_path):
    import hashlib

    import tvm

    from xcompile.errors import XCompileError
    from xcompile.params_file import read_params

    data = (weighty_build / "params.bin").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    ours = read_params(weighty_build / "params.bin", sha)
    theirs = tvm.runtime.load_param_dict(data)
    assert list(ours) == list(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name].numpy(), theirs[name].numpy())
    cases = {"truncated": data[:-100], "trailing": data + b"\0", "magic": b"\1" + data[1:],
             "huge": data[:16] + (1 << 60).to_bytes(8, "little") + data[24:]}
    for what, damaged in cases.items():
        path = tmp_path / f"{what}.bin"
        path.write_bytes(damaged)
        with pytest.raises(XCompileError, match="damaged"):
            read_params(path, hashlib.sha256(damaged).hexdigest())
    with pytest.raises(XCompileError, match="SHA-256"):
        read_params(weighty_build / "params.bin", "0" * 64)


def test_bench_of_a_damaged_weights_file_is_one_line(weighty_build, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(weighty_build, copy)
    with open(copy / "params.bin", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    assert_one_line_error(run_cli("run", str(copy)), "params.bin", "SHA-256")
