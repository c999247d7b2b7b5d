"""What a build is compared against: its ONNX file, an input, and ONNX Runtime on both."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xcompile.errors import XCompileError, first_line
from xcompile.files import sha256_file
from xcompile.manifest import TensorInfo


def reference_model(manifest: dict, model: str | None = None) -> Path:
    """The ONNX file a build was made from: ``model`` if given (it must be the same file,
    by SHA-256), else the recorded path, else the regenerated built-in model."""
    want = manifest["model"]["sha256"]
    if model is not None:
        if not Path(model).is_file():
            raise XCompileError(f"model file not found: {model}")
        if sha256_file(model) != want:
            raise XCompileError(f"{model} is not the model this build was made from "
                                f"(SHA-256 differs)")
        return Path(model)
    recorded = Path(manifest["model"]["path"])
    if recorded.is_file() and sha256_file(recorded) == want:
        return recorded
    builtin = manifest["model"].get("builtin")
    if builtin:
        from xcompile.models import BuiltinSpec, builtin_onnx

        path = builtin_onnx(BuiltinSpec(**builtin))
        if sha256_file(path) == want:
            return path
    raise XCompileError(f"the build's model {recorded} is gone or changed; pass --model")


def make_input(info: TensorInfo, path: str | None = None, seed: int = 0) -> np.ndarray:
    """The input from a .npy file (checked against ``info``), or a seeded random one."""
    if path is None:
        rng = np.random.default_rng(seed)
        return rng.standard_normal(info.shape).astype(info.dtype)
    if not Path(path).is_file():
        raise XCompileError(f"input file not found: {path}")
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # an empty file is an EOFError
        raise XCompileError(f"{path} is not a .npy array ({first_line(e)})") from e
    if not isinstance(x, np.ndarray):
        raise XCompileError(f"{path} is not a .npy array (an .npz archive?)")
    if tuple(x.shape) != info.shape or str(x.dtype) != info.dtype:
        raise XCompileError(f"{path} holds {x.dtype} {tuple(x.shape)}; the model's input "
                            f"{info.name!r} is {info.dtype} {info.shape}")
    return x


def ort_session(model_path: Path, input_info: TensorInfo):
    """An ONNX Runtime CPU session for ``model_path`` that accepts ``input_info``'s shape
    (a build may override the file's batch size)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise XCompileError("comparing with ONNX Runtime needs onnxruntime: "
                            "pip install onnxruntime") from e
    model = onnx.load(str(model_path))
    inp = next(i for i in model.graph.input if i.name == input_info.name)
    dims = inp.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value != input_info.shape[0]:
        # Let the file take the build's batch: a symbolic batch axis in and out.
        dims[0].dim_param = "batch"
        for out in model.graph.output:
            odims = out.type.tensor_type.shape.dim
            if odims:
                odims[0].dim_param = "batch"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
