"""Verify a build against ONNX Runtime on the same ONNX file and input."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from xcompile import reference, runtime
from xcompile.errors import XCompileError
from xcompile.manifest import TensorInfo, read_manifest

log = logging.getLogger(__name__)

DEFAULT_RTOL = 1e-4  # fp32
# fp16 builds (float16 operands, float32 accumulation) against ONNX Runtime in fp32: the
# operands' rounding (2^-11 relative) compounds over Xception's 36 convolutions.
FP16_RTOL = 1e-2


@dataclass(frozen=True)
class Comparison:
    """How one output differs from the reference.

    ``max_rel`` is the largest absolute difference relative to the reference's largest
    magnitude (a norm-wise relative error, stable where single values cross zero).
    """

    name: str
    max_abs: float
    max_rel: float
    rtol: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.rtol


def compare(name: str, ours: np.ndarray, ref: np.ndarray, rtol: float) -> Comparison:
    """Compare two arrays of the same shape."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return Comparison(name, float("inf"), float("inf"), rtol)
    max_abs = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return Comparison(name, max_abs, max_rel, rtol)


def default_rtol(manifest: dict) -> float:
    """1e-4 for fp32 builds; 1e-2 for fp16 (mixed-precision) builds."""
    fp16 = manifest.get("options", {}).get("precision") == "fp16"
    return FP16_RTOL if fp16 else DEFAULT_RTOL


def verify(folder, model: str | None = None, input_path: str | None = None,
           rtol: float | None = None, seed: int = 0) -> list[Comparison]:
    """Run the build and ONNX Runtime (fp32) on the same input; one comparison per
    output, within ``rtol`` (default: ``default_rtol`` of the build).

    A build for another architecture (aarch64 here) runs through the C++ runner under
    emulation.
    """
    from xcompile.targets import detect_arch

    manifest = read_manifest(folder)
    rtol = default_rtol(manifest) if rtol is None else rtol
    if not (np.isfinite(rtol) and rtol > 0):
        raise XCompileError(f"the tolerance must be a positive number, got {rtol}")
    inp = TensorInfo.from_json(manifest["inputs"][0])
    outputs = [TensorInfo.from_json(o) for o in manifest["outputs"]]
    model_path = reference.reference_model(manifest, model)
    x = reference.make_input(inp, input_path, seed)
    refs = reference.ort_session(model_path, inp).run(None, {inp.name: x})
    if manifest["target"]["arch"] == detect_arch():
        ours = runtime.load(folder)(x)
        ours = ours if isinstance(ours, list) else [ours]
    else:
        from xcompile import runner

        ours = runner.predict(folder, x)[0]
    results = [compare(info.name, o, r, rtol) for info, o, r in zip(outputs, ours, refs)]
    for c in results:
        log.debug("%s: max abs %.3g, max rel %.3g", c.name, c.max_abs, c.max_rel)
    return results
