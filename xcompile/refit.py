"""Refit: a build with new weights, without rebuilding (TensorRT's refit; fine-tuning).

The build folder keeps its weight transform (layout changes, packed GEMM panels) as CPU
modules; a refit reads the new raw weights (an ONNX file of the same graph, or a timm
checkpoint for the built-in model), checks their names, shapes and dtypes against the
build's, runs the build's own transform on them and writes a build folder that differs
from the original only in ``params.bin`` (and its manifest).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from xcompile import runtime
from xcompile.errors import XCompileError
from xcompile.files import atomic_dir, check_output_folder, sha256_file
from xcompile.manifest import BUILD, MANIFEST, TensorInfo, read_checked, read_manifest

log = logging.getLogger(__name__)


def raw_weights(source: str | Path, manifest: dict) -> tuple[list[np.ndarray], Path]:
    """The raw weights the build's transform takes, and the ONNX file they come from:
    ``source`` itself (its initializers, by the build's ONNX names) or, for a build of
    the built-in model, the built-in model exported with the checkpoint ``source`` (in
    timm's layout). The first name, shape or dtype that differs from the build's is the
    error."""
    source = Path(source)
    if not source.is_file():
        raise XCompileError(f"weights file not found: {source}")
    spec = manifest.get("transform")
    if spec is None:
        raise XCompileError("this build keeps no weight transform (built by an earlier "
                            "xcompile); rebuild it to refit it")
    wanted = [TensorInfo.from_json(r) for r in spec["raw"]]
    onnx_path = source
    if source.suffix in (".pth", ".pt") and manifest["model"].get("builtin"):
        onnx_path = _builtin_onnx_with(source, manifest["model"]["builtin"])
    from xcompile.frontend import load_onnx

    model = load_onnx(onnx_path)
    import onnx.numpy_helper

    found = {t.name: t for t in model.graph.initializer}
    arrays = []
    for want in wanted:
        tensor = found.get(want.name)
        if tensor is None:
            raise XCompileError(f"{source} has no weight {want.name!r} (the build's weights "
                                "are those of its ONNX graph)")
        arrays.append(onnx.numpy_helper.to_array(tensor))
    extra = sorted(set(found) - {w.name for w in wanted})
    if extra:
        raise XCompileError(f"{source} has weights the build does not take (first: "
                            f"{extra[0]!r}): not the same graph")
    runtime.check_raw_weights(arrays, wanted)
    return arrays, onnx_path


def _builtin_onnx_with(checkpoint: Path, builtin: dict) -> Path:
    """The built-in model with ``checkpoint``'s weights as ONNX, exported as the build's
    model was (so the weights come by the same names) into the cache, once per
    checkpoint: the refit build's model, what ``verify`` compares it with."""
    from xcompile.files import cache_folder
    from xcompile.models import BuiltinSpec, export_onnx

    spec = BuiltinSpec(**{**builtin, "batch": 1, "weights": str(checkpoint)})
    digest = sha256_file(checkpoint)[:16]
    path = cache_folder("models") / f"{spec.name}-{spec.input_size}-weights-{digest}.onnx"
    if not path.is_file():
        export_onnx(spec, path, dynamic_batch=True)
    return path


def refit(build_dir: str | Path, weights: str | Path, out: str | Path) -> dict:
    """Write ``build_dir`` with the raw weights of ``weights`` to ``out`` (a new build
    folder, or an earlier one to replace); returns its manifest."""
    import tvm

    started = time.perf_counter()
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    check_output_folder(out, BUILD, inputs=[build_dir, weights])
    arrays, onnx_path = raw_weights(weights, manifest)
    transformed = runtime.transformed_weights(build_dir, manifest, arrays)
    names = manifest["params"]["names"]
    params_file = manifest["params"]["file"]
    keep = [manifest["module"], *manifest["transform"]["files"]]
    files = {name: read_checked(build_dir, name, manifest) for name in keep}
    with atomic_dir(out, BUILD, inputs=[build_dir, weights]) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
            shutil.copymode(build_dir / name, tmp / name)
        (tmp / params_file).write_bytes(tvm.runtime.save_param_dict(dict(zip(names,
                                                                             transformed))))
        new = json.loads(json.dumps(manifest))
        new["sha256"][params_file] = sha256_file(tmp / params_file)
        # Its model is the graph with the new weights: what verify compares it with.
        new["model"] = {"path": str(Path(onnx_path).resolve()),
                        "sha256": sha256_file(onnx_path), "builtin": None}
        new["refit"] = {"from_build": str(build_dir.resolve()),
                        "weights": {"path": str(Path(weights).resolve()),
                                    "sha256": sha256_file(weights)},
                        "seconds": round(time.perf_counter() - started, 2)}
        (tmp / MANIFEST).write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
    log.info("refit %s with %s into %s in %.1f s", build_dir, weights, out,
             new["refit"]["seconds"])
    return new
