"""ONNX -> Relax: read and check an ONNX file, import it with its weights detached."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from xcompile.errors import XCompileError
from xcompile.manifest import TensorInfo

log = logging.getLogger(__name__)


@dataclass
class ImportedModel:
    """A Relax module whose ``main`` takes the input followed by the weights.

    ``params`` are the weight tensors in ``main``'s argument order, ``param_names`` their
    names from the ONNX initializers.
    """

    mod: object  # tvm.IRModule
    params: list
    param_names: list[str]
    input: TensorInfo
    outputs: list[TensorInfo]


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise XCompileError("reading ONNX needs the onnx package: pip install onnx") from e
    return onnx


def load_onnx(path: str | os.PathLike):
    """Load and check an ONNX file; a clear error when it is missing or not ONNX."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise XCompileError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends
        raise XCompileError(f"{path} is not an ONNX model ({type(e).__name__})") from e
    # Protobuf parses many non-ONNX byte strings into an empty message.
    if model.ir_version <= 0 or len(model.graph.node) == 0:
        raise XCompileError(f"{path} is not an ONNX model (no graph)")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise XCompileError(f"{path} is not a valid ONNX model: "
                            f"{str(e).strip().splitlines()[0]}") from e
    return model


def _graph_input(model, batch: int | None) -> TensorInfo:
    onnx = _onnx()
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise XCompileError(f"xcompile builds single-input models; this one has "
                            f"{len(inputs)} inputs ({', '.join(i.name for i in inputs)})")
    inp = inputs[0]
    ttype = inp.type.tensor_type
    dims = []
    for axis, d in enumerate(ttype.shape.dim):
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif axis == 0:
            dims.append(batch or 1)
        else:
            raise XCompileError(f"input {inp.name!r} has a dynamic dimension {axis} "
                                f"({d.dim_param or '?'}); only the batch may be dynamic")
    if batch is not None:
        if batch < 1:
            raise XCompileError(f"batch must be >= 1, got {batch}")
        if not dims:
            raise XCompileError(f"input {inp.name!r} is a scalar; it has no batch axis")
        dims[0] = batch
    dtype = str(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
    return TensorInfo(inp.name, tuple(dims), dtype)


def _output_infos(model, ret_ty) -> list[TensorInfo]:
    from tvm import relax

    types = list(ret_ty.fields) if isinstance(ret_ty, relax.TupleType) else [ret_ty]
    names = [o.name for o in model.graph.output]
    infos = []
    for name, ty in zip(names, types):
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            raise XCompileError(f"output {name!r} has no static tensor shape")
        infos.append(TensorInfo(name, tuple(int(v) for v in ty.shape.values), str(ty.dtype)))
    return infos


def import_onnx(model, batch: int | None = None, source: str = "model") -> ImportedModel:
    """Import an ONNX ModelProto into Relax with static shapes and detached weights.

    ``batch`` overrides the input's first dimension (needed when it is dynamic; defaults
    to 1 then). Unsupported operators and shape errors become an :class:`XCompileError`.
    """
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    inp = _graph_input(model, batch)
    try:
        mod = from_onnx(model, shape_dict={inp.name: list(inp.shape)},
                        dtype_dict={inp.name: inp.dtype}, keep_params_in_input=True)
        mod, params = relax.frontend.detach_params(mod)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise XCompileError(f"cannot import {source}: {first}") from e
    main = mod["main"]
    param_names = [p.name for p in main.params[1:]]
    weights = list(params.get("main", []))
    if len(weights) != len(param_names):
        raise XCompileError(f"cannot import {source}: {len(param_names)} weight arguments "
                            f"but {len(weights)} initializers")
    outputs = _output_infos(model, main.ret_ty)
    log.info("imported %s: input %s %s %s, %d weight tensors, %d outputs", source,
             inp.name, list(inp.shape), inp.dtype, len(weights), len(outputs))
    return ImportedModel(mod, weights, param_names, inp, outputs)
