"""Build: ONNX file (or the built-in Xception) -> compiled, exported build folder.

The folder holds ``module.so`` (the Relax VM executable and its kernels), ``params.bin``
(the weights, TVM's parameter format) and ``manifest.json``; see ``xcompile.manifest``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from xcompile import targets
from xcompile import frontend, pipeline, runtime
from xcompile.errors import XCompileError, first_line
from xcompile.manifest import (BUILD, MAX_TRANSFORM_STAGES, MODULE, PARAMS, transform_file,
                               write_manifest)
from xcompile.files import atomic_dir, cache_folder, check_output_folder, sha256_file
from xcompile.models import BuiltinSpec, resolve_model
from xcompile.versions import versions

log = logging.getLogger(__name__)

DEFAULT_BUILD_ROOT = "build"


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build depends on, resolved (no defaults left to fill)."""

    model: str  # the ONNX file compiled
    builtin: BuiltinSpec | None  # set when ``model`` is the generated built-in model
    target: str  # preset name as the user gave it
    batch: int | None  # input batch override; None keeps the model's
    output: str
    custom_schedules: bool = True  # False: TVM's plain path, for comparison
    cuda_graph: bool = True  # capture the whole CUDA model as one graph (static shapes)
    tuning_log: str | None = None  # a log folder; "none"; None: the shipped log, if any
    cuda_archs: tuple[str, ...] = ()  # CUDA targets: the GPU architectures to compile for
    precision: str = "fp32"  # fp32, or fp16 (mixed precision: fp16 math, fp32 accumulation)
    fuse_separable: bool = False  # depthwise -> pointwise pairs as one kernel (CPU families)

    def inputs(self) -> list[str]:
        """The files and folders the build reads (an output must not hold them)."""
        log = self.tuning_log if self.tuning_log and self.tuning_log.lower() != "none" else None
        return [p for p in (self.model, log) if p]

    def describe(self) -> str:
        src = f"built-in {self.builtin.name} (seed {self.builtin.seed}, " \
              f"{self.builtin.input_size}x{self.builtin.input_size})" if self.builtin else ""
        return (f"model={self.model}{' [' + src + ']' if src else ''} target={self.target} "
                f"batch={self.batch if self.batch is not None else 'from model'} "
                f"custom_schedules={self.custom_schedules} cuda_graph={self.cuda_graph} "
                f"tuning_log={self.tuning_log or 'shipped'} precision={self.precision} "
                f"fuse_separable={self.fuse_separable} "
                f"{'cuda_archs=' + ','.join(self.cuda_archs) + ' ' if self.cuda_archs else ''}"
                f"output={self.output}")


def resolve_options(model: str | None = None, target: str = targets.HOST,
                    batch: int | None = None, output: str | None = None,
                    custom_schedules: bool = True, cuda_graph: bool = True,
                    tuning_log: str | None = None,
                    cuda_arch: str | None = None, precision: str = "fp32",
                    fuse_separable: bool = False,
                    builtin: BuiltinSpec | None = None) -> BuildOptions:
    """Fill in defaults and check what can be checked before any work is done (the
    output folder before the built-in model is exported). Without ``model``, the
    built-in model ``builtin`` (default: Xception, seed 0, 299x299) at ``batch``."""
    preset = targets.resolve(target)  # unknown names fail here, before an export
    if batch is not None and batch < 1:
        raise XCompileError(f"--batch must be >= 1, got {batch}")
    if model is None:
        name = f"{(builtin or BuiltinSpec()).name}-{target}-b{batch or 1}"
    else:
        name = f"{Path(model).stem}-{target}" + (f"-b{batch}" if batch else "")
    if output is None:
        output = os.path.join(DEFAULT_BUILD_ROOT, name)
    log_folder = None
    if tuning_log is not None and tuning_log.lower() != "none":
        from xcompile.tuning.log_folder import resolve_folder

        log_folder = resolve_folder(tuning_log, preset.name)  # fails early when absent
    check_output_folder(output, BUILD, inputs=[model, tuning_log, log_folder])
    model_path, builtin = resolve_model(model, batch, builtin)
    if builtin is not None:
        batch = builtin.batch
    if precision not in pipeline.PRECISIONS:
        raise XCompileError(f"--precision must be one of {', '.join(pipeline.PRECISIONS)}, "
                            f"got {precision!r}")
    archs: tuple[str, ...] = ()
    if preset.device_kind.compiles_device_code:
        from xcompile.cuda_codegen import parse_archs

        archs = parse_archs(cuda_arch, preset.target["arch"])
    elif cuda_arch:
        raise XCompileError(f"--cuda-arch applies to CUDA targets, not {target}")
    return BuildOptions(model=model_path, builtin=builtin, target=target, batch=batch,
                        output=output, custom_schedules=custom_schedules,
                        cuda_graph=cuda_graph, tuning_log=tuning_log, cuda_archs=archs,
                        precision=precision, fuse_separable=fuse_separable)


def _export(executable, preset, path: Path) -> None:
    """Link the executable into a shared library for the preset's machine."""
    kwargs = {}
    if preset.cross_cc:
        from tvm.support import cc

        kwargs["fcompile"] = cc.cross_compiler(preset.cross_cc)
    executable.export_library(str(path), **kwargs)


def _gpu_code(module: Path, opts: BuildOptions) -> dict | None:
    """For CUDA builds: the architectures compiled for and what the module embeds."""
    if not opts.cuda_archs:
        return None
    from xcompile.cuda_codegen import embedded_code

    found = embedded_code(module)
    if not found["fatbins"]:
        raise XCompileError("the CUDA module holds no compiled GPU code (TVM did not call "
                            "the nvcc callback); refusing to write a build that would "
                            "need a compiler to load")
    return {"archs": list(opts.cuda_archs), **found}


def _check_memory(imported, preset) -> None:
    """Refuse a native CPU build whose activations cannot fit in this machine's memory
    (a batch of 100000 would): the estimate is a lower bound, the largest call's
    tensors."""
    need = frontend.peak_activation_bytes(imported)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if need <= have:
        return
    message = (f"the model's activations need at least {need / 2**30:.1f} GiB at batch "
               f"{imported.input.shape[0]}; this machine has {have / 2**30:.1f} GiB")
    if targets.runs_here(preset):
        raise XCompileError(message + " (give a smaller --batch)")
    log.warning("%s: the %s machine must have more", message, preset.name)


@dataclass
class Compiled:
    """A compiled model, before it is written to a build folder."""

    preset: object  # targets.Preset
    imported: frontend.ImportedModel
    executable: object  # tvm.relax.VMExecutable
    kernels: dict[str, str]  # kernel name -> the rule that scheduled it
    work: dict[str, tuple[str, float]]  # kernel name -> (kind, FLOPs per call)
    weights: list  # what ``main`` takes after the input: transformed at build time
    weight_names: list[str]
    # The weight transform (raw weights -> main's), a CPU module per stage, compiled for
    # the CPU the build runs on: kept in the build folder for refits.
    transform: list
    tuning: dict | None = None  # what a tuning log contributed
    model_sha256: str = ""  # the ONNX file's (the manifest's, and the tuning log's key)


def compile_model(opts: BuildOptions) -> Compiled:
    """Import, optimize and compile ``opts.model`` for ``opts.target``."""
    import tvm

    from xcompile import schedules

    preset = targets.resolve(opts.target)
    targets.check_toolchain(preset)
    onnx_model = frontend.load_onnx(opts.model)
    imported = frontend.import_onnx(onnx_model, batch=opts.batch, source=opts.model)
    _check_memory(imported, preset)
    model_sha256 = sha256_file(opts.model)
    tuned = None
    if opts.custom_schedules:
        from xcompile.tuning import load_for_build

        tuned = load_for_build(opts.tuning_log, preset,
                               (model_sha256, imported.input.shape[0]))
    opt = pipeline.optimize(imported.mod, preset, opts.custom_schedules, tuned=tuned,
                            precision=opts.precision, fuse_separable=opts.fuse_separable)
    log.info("compiling %d kernels for %s", len(opt.kernels), preset.name)
    # CUDA graphs: the VM captures all kernel launches once and replays them.
    config = {"relax.backend.use_cuda_graph":
              opts.cuda_graph and preset.device_kind.captures_graphs}
    gpu_code = contextlib.nullcontext()
    if preset.device_kind.compiles_device_code:
        from xcompile.cuda_codegen import fatbin_codegen

        gpu_code = fatbin_codegen(opts.cuda_archs, cache_folder())
    codegen = None
    try:
        with gpu_code as codegen, tvm.transform.PassContext(config=config):
            executable = tvm.compile(opt.mod, target=preset.tvm_target(),
                                     relax_pipeline=pipeline.compile_pipeline(preset),
                                     tir_pipeline=schedules.tir_pipeline())
    except XCompileError:
        raise
    except Exception as e:
        if getattr(codegen, "error", None) is not None:  # ours, from inside TVM
            raise codegen.error from e
        first = first_line(e)
        raise XCompileError(f"TVM failed to compile for {preset.name}: {first}") from e
    log.info("transforming weights (layouts, packed panels)")
    if len(opt.weight_stages) > MAX_TRANSFORM_STAGES:
        raise XCompileError(f"{len(opt.weight_stages)} weight transform stages; a build "
                            f"folder holds {MAX_TRANSFORM_STAGES}")
    transform = pipeline.compile_transform(opt.weight_stages, preset.portable_cpu_target())
    here = transform if preset.arch == targets.detect_arch() else pipeline.compile_transform(
        opt.weight_stages, tvm.target.Target({"kind": "llvm"}))
    weights = runtime.apply_transform(here, imported.params)
    # By position: the lifted weights' variable names need not be unique.
    names = [f"w{i:04d}" for i in range(len(opt.mod["main"].params) - 1)]
    return Compiled(preset, imported, executable, opt.kernels, opt.work, weights, names,
                    transform,
                    tuned.summary() if tuned else None, model_sha256)



def build(opts: BuildOptions) -> dict:
    """Compile ``opts.model`` for ``opts.target`` into ``opts.output``; return the manifest.

    The output folder appears only when the build succeeded.
    """
    import tvm

    start = time.perf_counter()
    log.info("build options: %s", opts.describe())
    c = compile_model(opts)
    with atomic_dir(opts.output, BUILD, inputs=opts.inputs()) as tmp:
        _export(c.executable, c.preset, tmp / MODULE)
        params = dict(zip(c.weight_names, c.weights))
        (tmp / PARAMS).write_bytes(tvm.runtime.save_param_dict(params))
        transform_files = [transform_file(i) for i in range(len(c.transform))]
        for module, name in zip(c.transform, transform_files):
            _export(module, c.preset, tmp / name)
        manifest = {
            "model": {"path": str(Path(opts.model).resolve()),
                      "sha256": c.model_sha256,
                      "builtin": opts.builtin.to_json() if opts.builtin else None},
            "inputs": [c.imported.input.to_json()],
            "outputs": [o.to_json() for o in c.imported.outputs],
            "target": c.preset.to_json(),
            "versions": versions(),
            "options": asdict(opts),
            "module": MODULE,
            "params": {"file": PARAMS, "names": c.weight_names,
                       "onnx_names": c.imported.param_names},
            # The raw (ONNX) weights in the order the transform takes them: a refit
            # must bring these names, shapes and dtypes.
            "transform": {"files": transform_files, "raw": [
                {"name": name, "shape": [int(s) for s in w.shape], "dtype": str(w.dtype)}
                for name, w in zip(c.imported.param_names, c.imported.params)]},
            "kernels": [{"name": k, "rule": r, "kind": c.work.get(k, ("other", 0.0))[0],
                         "flops": c.work.get(k, ("other", 0.0))[1]}
                        for k, r in sorted(c.kernels.items())],
            "tuning": c.tuning,
            "gpu_code": _gpu_code(tmp / MODULE, opts),
            # Checked before loading: dlopen of a damaged .so can crash the process.
            "sha256": {name: sha256_file(tmp / name)
                       for name in (MODULE, PARAMS, *transform_files)},
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        write_manifest(tmp, manifest)
    log.info("built %s in %.1f s", opts.output, manifest["build_seconds"])
    return manifest
