"""ONNX -> Relax: read and check an ONNX file, import it with its weights detached."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from xcompile.errors import XCompileError, first_line
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
                            f"{first_line(e)}") from e
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
            if batch is None:
                log.warning("input %r has a dynamic batch (%s); building for batch 1 "
                            "(give --batch N for another)", inp.name, d.dim_param or "?")
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


def c_identifier(name: str, taken: set[str]) -> str:
    """``name`` as a C identifier not in ``taken`` (which it joins): every character
    outside [A-Za-z0-9_] becomes '_', a leading digit gets a '_' before it."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", name) or "_"
    if ident[0].isdigit():
        ident = "_" + ident
    unique, n = ident, 1
    while unique in taken:
        unique, n = f"{ident}_{n}", n + 1
    taken.add(unique)
    return unique


def _with_c_identifiers(model):
    """A copy of ``model`` whose graph inputs and initializers are named by C
    identifiers, and ``{new name: ONNX name}``. Those names become the Relax
    parameters' and then the kernels' argument names, which reach generated source:
    CUDA's codegen keeps a '/' in them (tf2onnx: ``model/dense/MatMul/ReadVariableOp:0``)
    and nvcc rejects it."""
    onnx = _onnx()
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    taken: set[str] = set()
    renamed = {}
    for name in [i.name for i in graph.input] + [t.name for t in graph.initializer]:
        if name not in renamed:
            renamed[name] = c_identifier(name, taken)
    for value in list(graph.input) + list(graph.initializer):
        value.name = renamed[value.name]
    for value in graph.value_info:
        value.name = renamed.get(value.name, value.name)

    def rename_uses(g):
        for node in g.node:
            node.input[:] = [renamed.get(n, n) for n in node.input]
            for attr in node.attribute:  # subgraphs (If, Loop) read outer names too
                for sub in [attr.g, *attr.graphs]:
                    rename_uses(sub)

    rename_uses(graph)
    return model, {new: old for old, new in renamed.items()}


def import_onnx(model, batch: int | None = None, source: str = "model") -> ImportedModel:
    """Import an ONNX ModelProto into Relax with static shapes and detached weights.

    ``batch`` overrides the input's first dimension (needed when it is dynamic; defaults
    to 1 then, with a warning). Inputs and weights are renamed to C identifiers in
    Relax (see ``_with_c_identifiers``); ``input`` and ``param_names`` keep the ONNX
    names. Unsupported operators and shape errors become an :class:`XCompileError`.
    """
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    inp = _graph_input(model, batch)
    renamed, onnx_names = _with_c_identifiers(model)
    inner = {v: k for k, v in onnx_names.items()}[inp.name]
    try:
        mod = from_onnx(renamed, shape_dict={inner: list(inp.shape)},
                        dtype_dict={inner: inp.dtype}, keep_params_in_input=True)
        mod, params = relax.frontend.detach_params(mod)
    except Exception as e:
        raise XCompileError(f"cannot import {source}: {first_line(e)}") from e
    main = mod["main"]
    param_names = [onnx_names.get(p.name, p.name) for p in main.params[1:]]
    weights = list(params.get("main", []))
    if len(weights) != len(param_names):
        raise XCompileError(f"cannot import {source}: {len(param_names)} weight arguments "
                            f"but {len(weights)} initializers")
    outputs = _output_infos(model, main.ret_ty)
    log.info("imported %s: input %s %s %s, %d weight tensors, %d outputs", source,
             inp.name, list(inp.shape), inp.dtype, len(weights), len(outputs))
    return ImportedModel(mod, weights, param_names, inp, outputs)


def static_shape(ty) -> list[int] | None:
    """The dimensions of a Relax tensor type with a static shape; None for any other
    type (a tuple, an unknown shape, a symbolic dimension)."""
    from tvm import relax

    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(v) for v in ty.shape.values]
    except (TypeError, ValueError, AttributeError):  # a symbolic dimension
        return None


def tensor_bytes(ty) -> int:
    """Bytes of a Relax tensor type with a static shape (0 for any other type)."""
    import math

    import numpy as np

    shape = static_shape(ty)
    return 0 if shape is None else math.prod(shape) * np.dtype(str(ty.dtype)).itemsize


def peak_activation_bytes(imported: ImportedModel) -> int:
    """A lower bound of the memory ``main`` needs for activations: the largest sum of
    one call's result and tensor arguments (weights excluded)."""
    from tvm import relax

    weights = set(imported.mod["main"].params[1:])
    peak = imported.input.nbytes
    for block in imported.mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            args = value.args if isinstance(value, relax.Call) else []
            live = tensor_bytes(binding.var.ty) + sum(
                tensor_bytes(a.ty) for a in args
                if isinstance(a, relax.Var) and a not in weights)
            peak = max(peak, live)
    return peak
