"""CUDA builds: compiled here without a GPU; run where one is."""

import json
import re
import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error, max_rel_err, ort_run, run_cli
from xcompile.build import compile_model, resolve_options

# CUDA builds compile their kernels with nvcc; without the CUDA toolkit they are an error.
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="CUDA builds need nvcc (the CUDA toolkit)")


def _cuda_sources(module) -> list[str]:
    found = []
    if module.kind == "cuda":
        found.append(module.inspect_source())
    for sub in module.imports:
        found.extend(_cuda_sources(sub))
    return found


def _thread_bound(func) -> bool:
    """The PrimFunc binds a loop to threadIdx (TVMScript shows every binding)."""
    return 'T.thread_binding' in func.script() and '"threadIdx.' in func.script()


@pytest.fixture(scope="module")
def compiled(mobile_onnx):
    """The mobile CNN compiled for CUDA (in this process)."""
    return compile_model(resolve_options(model=str(mobile_onnx), target="cuda",
                                         output="/nonexistent-unused"))


@pytest.fixture(scope="module")
def cuda_build(mobile_onnx, tmp_path_factory):
    """The mobile CNN's CUDA build folder, made by the command line."""
    out = tmp_path_factory.mktemp("cuda") / "build"
    proc = run_cli("build", "--model", str(mobile_onnx), "--target", "cuda", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_cuda_build_compiles_with_thread_bound_kernels(compiled):
    c = compiled
    rules = set(c.kernels.values())
    # Our rules take the separable convolutions; DLight's the rest.
    assert {"xcompile.cuda.SharedMemoryConvGEMM", "xcompile.cuda.ThreadDepthwise"} <= rules, rules
    assert all(r.startswith(("xcompile.cuda.", "dlight.gpu.")) for r in rules), rules
    sources = _cuda_sources(c.executable.mod)
    assert len(sources) == 1
    src = sources[0]
    # One __global__ function per kernel the VM launches (a reshape can be a view).
    launched = set(re.findall(r"call\s+(\w+)", c.executable.as_text())) & set(c.kernels)
    assert len(launched) >= len(c.kernels) - 1, (launched, c.kernels)
    defined = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src))
    assert defined == {f"{k}_kernel" for k in launched}
    assert "threadIdx.x" in src and "blockIdx.x" in src
    assert "__launch_bounds__" in src


def test_cuda_xception_kernels_bound_to_threads(xception71_onnx):
    """Every scheduled Xception kernel binds threads (no serial GPU kernel)."""
    import tvm

    from xcompile import schedules
    from xcompile import frontend, pipeline

    from xcompile import targets

    preset = targets.resolve("cuda")
    imported = frontend.import_onnx(frontend.load_onnx(xception71_onnx))
    opt = pipeline.optimize(imported.mod, preset)
    mod, kernels = opt.mod, opt.kernels
    funcs = {gv.name_hint: f for gv, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    assert len(funcs) > 20
    for name, func in funcs.items():
        assert kernels[name] != schedules.UNSCHEDULED, name
        assert _thread_bound(func), f"{name} is not bound to threads"
    # The check itself can fail: the same kernels without rules bind nothing.
    unscheduled = pipeline.lowering_passes()(pipeline.graph_passes(None)(imported.mod))
    assert not any(_thread_bound(f) for _, f in unscheduled.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc))


def test_cuda_module_carries_a_fatbin_for_each_arch(mobile_onnx, tmp_path):
    """The exported module holds compiled GPU code (no compiler needed to load it), for
    every architecture asked for."""
    out = tmp_path / "cuda"
    proc = run_cli("build", "--model", str(mobile_onnx), "--target", "cuda-sm90",
                   "--cuda-arch", "sm_80,sm_90", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from xcompile.cuda_codegen import embedded_code

    m = json.loads((out / "manifest.json").read_text())
    assert m["gpu_code"]["archs"] == ["sm_80", "sm_90"]
    found = embedded_code(out / "module.so")  # read from the file, not the manifest
    assert found["fatbins"] == 1
    assert found["sass"] == ["sm_80", "sm_90"]
    # PTX of the newest, for GPUs newer than both to JIT (plain compute_90, from sm_90).
    assert found["ptx"] == ["sm_90"]
    assert not found["cuda_source"]  # nothing left to compile at load time
    # The check can fail: a CPU module has no fatbin.
    cpu = tmp_path / "cpu"
    assert run_cli("build", "--model", str(mobile_onnx), "-o", str(cpu)).returncode == 0
    assert embedded_code(cpu / "module.so")["fatbins"] == 0


@pytest.mark.parametrize("args,needle", [
    (["--target", "cuda", "--cuda-arch", "compute_90"], "sm_XX"),
    (["--target", "host", "--cuda-arch", "sm_90"], "CUDA targets"),
])
def test_cuda_arch_option_errors(mobile_onnx, tmp_path, args, needle):
    proc = run_cli("build", "--model", str(mobile_onnx), *args, "-o", str(tmp_path / "b"))
    assert_one_line_error(proc, needle)


def test_cuda_build_folder(cuda_build):
    m = json.loads((cuda_build / "manifest.json").read_text())
    assert m["target"]["device"] == "cuda"
    assert m["target"]["target"] == {"kind": "cuda", "arch": "sm_90",
                                     "max_shared_memory_per_block": 49152}
    assert (cuda_build / "module.so").stat().st_size > 0


def _gpu_available() -> bool:
    from xcompile.runtime import device_available

    return shutil.which("nvidia-smi") is not None and device_available("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(), reason="needs an NVIDIA GPU and driver")
def test_cuda_build_loads_and_runs(mobile_onnx, tmp_path):
    from xcompile import runtime

    out = tmp_path / "cuda-run"
    proc = run_cli("build", "--model", str(mobile_onnx), "--target", "cuda", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64), dtype=np.float32)
    ours = runtime.load(out)(x)
    assert max_rel_err(ours, ort_run(mobile_onnx, x)) < 1e-4


def test_cuda_graph_option(mobile_onnx, compiled):
    assert "vm.builtin.cuda_graph.run_or_capture" in compiled.executable.as_text()
    c = compile_model(resolve_options(model=str(mobile_onnx), target="cuda",
                                      output="/nonexistent-unused", cuda_graph=False))
    assert "vm.builtin.cuda_graph.run_or_capture" not in c.executable.as_text()


def test_cuda_graph_is_off_on_cpu(mobile_onnx):
    c = compile_model(resolve_options(model=str(mobile_onnx), target="host",
                                      output="/nonexistent-unused"))
    assert "cuda_graph" not in c.executable.as_text()


@pytest.mark.skipif(_gpu_available(), reason="checks the message on machines without a GPU")
def test_cuda_build_without_a_driver_is_a_clear_error(cuda_build):
    assert_one_line_error(run_cli("run", str(cuda_build)), "cuda")


@pytest.mark.skipif(_gpu_available(), reason="checks the message on machines without a GPU")
def test_cuda_bundle_carries_the_cuda_runtime(cuda_build, tmp_path):
    """A CUDA bundle holds TVM's CUDA runtime and the CUDA runtime library next to the
    CPU ones; without a driver its runner fails with one line, not a crash."""
    import subprocess

    bundle = tmp_path / "bundle"
    proc = run_cli("package", str(cuda_build), "-o", str(bundle))
    assert proc.returncode == 0, proc.stderr[-2000:]
    libs = sorted(p.name for p in (bundle / "lib").iterdir())
    assert {"libtvm_runtime.so", "libtvm_ffi.so", "libtvm_runtime_cuda.so",
            "libcudart.so.13"} <= set(libs), libs
    assert "NVIDIA GPU" in (bundle / "README.txt").read_text()
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 64, 64), np.float32))
    out = subprocess.run([str(bundle / "xcompile_run"), str(bundle), "--input",
                          str(tmp_path / "x.npy")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2, out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cuda" in errors[0].lower(), out.stderr


def test_cuda_fp16_build_carries_fp16_weights_and_a_fatbin(mobile_onnx, tmp_path):
    import tvm

    from xcompile.cuda_codegen import embedded_code

    out = tmp_path / "cuda16"
    proc = run_cli("build", "--model", str(mobile_onnx), "--target", "cuda", "--precision",
                   "fp16", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert embedded_code(out / "module.so")["sass"] == ["sm_90"]
    params = tvm.runtime.load_param_dict((out / "params.bin").read_bytes())
    assert "float16" in {str(v.dtype) for v in params.values()}


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(), reason="needs an NVIDIA GPU and driver")
def test_cuda_bundle_runs_on_the_gpu_and_matches_the_cpu_build(mobile_onnx, tmp_path):
    """The C++ runner runs a CUDA bundle (fatbin, no compiler at load) and its output
    matches the CPU build of the same model and input; fp16 within its tolerance."""
    import subprocess

    x = np.random.default_rng(4).standard_normal((2, 3, 64, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    cpu = tmp_path / "cpu"
    assert run_cli("build", "--model", str(mobile_onnx), "-o", str(cpu)).returncode == 0
    assert run_cli("run", str(cpu), "--input", str(tmp_path / "x.npy"), "--output",
                   str(tmp_path / "cpu.npy")).returncode == 0
    for precision, tol in (("fp32", 1e-4), ("fp16", 1e-2)):
        build, bundle = tmp_path / f"cuda-{precision}", tmp_path / f"bundle-{precision}"
        assert run_cli("build", "--model", str(mobile_onnx), "--target", "cuda",
                       "--precision", precision, "-o", str(build)).returncode == 0
        assert run_cli("package", str(build), "-o", str(bundle)).returncode == 0
        out = subprocess.run([str(bundle / "xcompile_run"), str(bundle), "--input",
                              str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
                              "--repeat", "5"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert max_rel_err(np.load(tmp_path / "y.npy"), np.load(tmp_path / "cpu.npy")) < tol


def launches(executable) -> tuple[int, int]:
    """(kernel launches in ``main`` itself, launches inside captured CUDA graphs), read
    from the compiled VM code."""
    text = executable.as_text()
    direct = captured = 0
    for function in re.split(r"^(?=@\S+:$)", text, flags=re.M):
        name = function.split(":", 1)[0].lstrip("@")
        calls = re.findall(r"^\s+call\s+(\S+)", function, flags=re.M)
        kernels = sum(not c.startswith("vm.") for c in calls)
        if name == "main":
            direct += kernels
        elif "cuda_graph_capture" in name:
            captured += kernels
    return direct, captured


def relax_launches(mod) -> dict[str, int]:
    """Kernel calls per Relax function of ``mod`` (a module after the compile pipeline)."""
    import tvm
    from tvm import relax, tirx

    counts = {}
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            calls = []
            relax.analysis.post_order_visit(func.body, lambda e: calls.append(e) if (
                isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.GlobalVar)
                and isinstance(mod[e.op], tirx.PrimFunc)) else None)
            counts[gv.name_hint] = len(calls)
    return counts


@pytest.mark.parametrize("precision,batch", [("fp32", 1), ("fp32", 32), ("fp16", 1),
                                             ("fp16", 32)])
def test_cuda_graphs_hold_the_model(xception71_onnx, precision, batch):
    """RewriteCUDAGraph captures what depends only on main's weights, which it knows by
    main's num_input: at least 90% of Xception's launches replay from the graph. (The
    Relax code the VM code is made from, read before codegen: no nvcc needed.)"""
    import onnx
    import tvm

    from xcompile import frontend, pipeline, targets

    preset = targets.resolve("cuda")
    imported = frontend.import_onnx(onnx.load(str(xception71_onnx)), batch=batch)
    optimized = pipeline.optimize(imported.mod, preset, precision=precision).mod
    for graphs in (True, False):
        with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": graphs}):
            counts = relax_launches(pipeline.compile_pipeline(preset)(optimized))
        captured = sum(n for name, n in counts.items() if "cuda_graph_capture" in name)
        if graphs:
            assert captured >= 0.9 * (counts["main"] + captured), counts
        else:  # the check can fail: without graphs main launches everything
            assert captured == 0 and counts["main"] > 40, counts


def test_compiled_vm_code_launches_from_the_graph(compiled):
    """The same, in the compiled executable's VM code."""
    direct, captured = launches(compiled.executable)
    assert captured >= 0.75 * (direct + captured) and captured >= 6, (direct, captured)
