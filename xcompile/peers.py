"""The runtimes a build is measured against, and the build itself, each as a ``Backend``:
one call runs the model once on a fixed input and returns when the result is ready.

ONNX Runtime and PyTorch run in ``bench``'s own process; OpenVINO runs in a process of
its own (``own_process``): its TBB threads stay pinned and spinning after a run and
slowed ONNX Runtime and our build about 2x beside them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from xcompile import reference, runtime, targets
from xcompile.errors import XCompileError, first_line
from xcompile.manifest import TensorInfo, read_manifest


@dataclass
class Backend:
    """``run()`` runs the model once and returns its latency in milliseconds."""

    name: str
    detail: str
    run: Callable[[], float]
    close: Callable[[], None] = lambda: None
    pid: int | None = None  # the process it runs in, when not this one


def _timed(call) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1e3

    return run


def ours(predictor, x, name: str = "xcompile") -> Backend:
    """A loaded build, on an input already on its device."""
    x_dev = predictor.to_device(x)

    def call():
        predictor.run_device(x_dev)
        predictor.sync()

    m = predictor.manifest
    return Backend(name, f"TVM {m['versions']['tvm']}, {m['target']['name']}", _timed(call))


def onnxruntime(model_path, input_info: TensorInfo, x) -> Backend:
    """ONNX Runtime's CPU provider on the ONNX file, all graph optimizations on. The file
    is handed to ONNX Runtime as it is when its batch fits the input (no copy of the
    model in this process), else rewritten with a symbolic batch first."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise XCompileError("comparing with ONNX Runtime needs onnxruntime: "
                            "pip install onnxruntime") from e
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    batch = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    if isinstance(batch, int) and batch != input_info.shape[0]:
        session = reference.ort_session(model_path, input_info)
    feed = {input_info.name: x}
    return Backend("onnxruntime", f"onnxruntime {ort.__version__}, CPUExecutionProvider",
                   _timed(lambda: session.run(None, feed)))


OPENVINO_PRECISIONS = {"openvino-f32": "f32", "openvino": None}


def openvino(model_path, input_info: TensorInfo, x, precision: str | None) -> Backend:
    """OpenVINO's CPU plugin on the ONNX file reshaped to the input's shape: with
    ``precision`` ``"f32"`` in float32 (``INFERENCE_PRECISION_HINT``), with ``None`` in
    its default precision for this CPU (bf16 where the CPU has AMX or AVX-512 BF16);
    the detail says which it ran."""
    try:
        import openvino as ov
    except ImportError as e:
        raise XCompileError("OpenVINO is not installed: pip install -e '.[peers]'") from e
    core = ov.Core()
    try:
        model = core.read_model(str(model_path))
        model.reshape({input_info.name: list(input_info.shape)})
        config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
        compiled = core.compile_model(model, "CPU", config)
    except Exception as e:  # OpenVINO's own exception types vary by version
        raise XCompileError(f"OpenVINO cannot compile {model_path}: {first_line(e)}") from e
    request = compiled.create_infer_request()
    tensor = ov.Tensor(x)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type
    ran = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    label = f"{ran} (asked for f32)" if precision else f"{ran} (its default here)"
    name = "openvino-f32" if precision else "openvino"
    return Backend(name, f"OpenVINO {ov.get_version().split('-')[0]}, CPU, {label}",
                   _timed(lambda: request.infer({0: tensor})))


def pytorch(builtin: dict, device_name: str, x) -> Backend:
    """PyTorch eager on the built-in model with the same weights, on the build's device
    when torch can reach it (CUDA builds on a torch without CUDA fall back to the CPU)."""
    import torch

    from xcompile.models import BuiltinSpec, make_torch_model

    model = make_torch_model(BuiltinSpec(**builtin))
    device = targets.device(device_name).torch_device
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    model = model.to(device)
    xt = torch.from_numpy(x).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        with torch.inference_mode():
            model(xt)
        sync()

    return Backend("pytorch", f"torch {torch.__version__} eager, {device}", _timed(call))


def make(name: str, build_dir, model_path, x) -> Backend:
    """The backend called ``name`` (``xcompile``, ``onnxruntime``, ``openvino-f32``,
    ``openvino``) for a build and its ONNX file, in this process."""
    if name == "xcompile":
        return ours(runtime.load(build_dir), x)
    info = TensorInfo.from_json(read_manifest(build_dir)["inputs"][0])
    if name == "onnxruntime":
        return onnxruntime(model_path, info, x)
    if name in OPENVINO_PRECISIONS:
        return openvino(model_path, info, x, OPENVINO_PRECISIONS[name])
    raise XCompileError(f"unknown backend {name!r}")


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None
