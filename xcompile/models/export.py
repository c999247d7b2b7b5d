"""Create the built-in models (seeded or from a checkpoint) and export them to ONNX."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from xcompile.errors import XCompileError, first_line
from xcompile.files import atomic_path, cache_folder, check_output_file

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def _xception():
    from .xception import Xception

    return Xception()


def _seed_xception(model, seed: int) -> None:
    from .xception import seed_weights

    seed_weights(model, seed)


BUILTIN_MODELS = {"xception": _xception}
# How each built-in model gets seeded random weights (pure PyTorch code, with the model:
# the GPU kit carries both to make the same weights where there is no xcompile).
SEEDERS = {"xception": _seed_xception}
MIN_INPUT_SIZE = {"xception": 71}


@dataclass(frozen=True)
class BuiltinSpec:
    """Everything that determines a built-in model's ONNX file."""

    name: str = "xception"
    seed: int = 0
    input_size: int = 299
    batch: int = 1
    weights: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a declared dependency
        raise XCompileError("the built-in models need PyTorch: pip install torch==2.13.0") from e
    return torch


def _load_weights(model, path: str) -> None:
    torch = _torch()
    if not os.path.isfile(path):
        raise XCompileError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise XCompileError(f"cannot read weights {path}: {first_line(e)}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise XCompileError(f"{path} holds no state dict")
    fc = state.get("fc.weight")
    if fc is not None and fc.shape[0] != model.fc.out_features:
        model.fc = torch.nn.Linear(model.fc.in_features, fc.shape[0])
    own = model.state_dict()
    wrong = [k for k, v in state.items()
             if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise XCompileError(f"{path} does not match the model's layout: {wrong[0]} has shape "
                            f"{tuple(state[wrong[0]].shape)}, the model's is "
                            f"{tuple(own[wrong[0]].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise XCompileError(
            f"{path} does not match the model's layout: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    model.eval()


def make_torch_model(spec: BuiltinSpec):
    """The PyTorch model ``spec`` describes, in eval mode."""
    if spec.name not in BUILTIN_MODELS:
        raise XCompileError(f"unknown built-in model {spec.name!r}; "
                            f"choose one of: {', '.join(BUILTIN_MODELS)}")
    _torch()
    model = BUILTIN_MODELS[spec.name]()
    if spec.weights:
        _load_weights(model, spec.weights)
    else:
        SEEDERS[spec.name](model, spec.seed)
    return model


METADATA_KEY = "xcompile.builtin"  # marks an ONNX file export_onnx wrote


def is_exported(path) -> bool:
    """Whether ``path`` is an ONNX file ``export_onnx`` wrote (its metadata says so):
    the only kind of existing file an export replaces."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return any(p.key == METADATA_KEY for p in model.metadata_props)


def export_onnx(spec: BuiltinSpec, out: str | os.PathLike, dynamic_batch: bool = False,
                inputs=()) -> Path:
    """Write ``spec``'s model as ONNX (opset 17) to ``out``: its input shape static, or
    with a dynamic batch (``dynamic_batch``: what builds of the built-in model import,
    at the batch they ask for). The same arguments always give the same bytes; the file
    appears only when complete, and replaces only a file this function wrote."""
    torch = _torch()
    if spec.batch < 1:
        raise XCompileError(f"batch must be >= 1, got {spec.batch}")
    low = MIN_INPUT_SIZE.get(spec.name, 1)
    if spec.input_size < low:
        raise XCompileError(f"{spec.name} needs an input size of at least {low}, "
                            f"got {spec.input_size}")
    check_output_file(out, is_exported, inputs=[*inputs, spec.weights])
    model = make_torch_model(spec)
    batch = 1 if dynamic_batch else spec.batch
    example = torch.zeros(batch, 3, spec.input_size, spec.input_size)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    out = Path(out)
    with atomic_path(out, is_exported, inputs=[*inputs, spec.weights]) as tmp, \
            warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; this one folds batch norm into the convolutions, as we want.
        warnings.simplefilter("ignore")
        # PRESERVE keeps batch norm as BatchNormalization nodes (EVAL would fold it into
        # the convolutions): the ONNX weights are then the model's own parameters and
        # buffers, by their state-dict names, and a checkpoint or regenerated weights
        # refit a build by name (xcompile folds batch norm in its weight transform).
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=axes, training=torch.onnx.TrainingMode.PRESERVE)
        import json

        import onnx

        exported = onnx.load(str(tmp))
        onnx.helper.set_model_props(exported, {METADATA_KEY: json.dumps(
            {**spec.to_json(), "batch": "dynamic" if dynamic_batch else spec.batch})})
        onnx.save(exported, str(tmp))
    log.info("wrote %s (%s, seed %d, %dx%d, batch %s)", out, spec.name, spec.seed,
             spec.input_size, spec.input_size, "dynamic" if dynamic_batch else spec.batch)
    return out


def builtin_onnx(spec: BuiltinSpec) -> Path:
    """The ONNX file of a built-in model, generated once into the cache with a dynamic
    batch (a build imports it at ``spec.batch``: no export allocates a large batch)."""
    if spec.weights:
        raise XCompileError("export a model with --weights using `xcompile export-model`, "
                            "then build it with --model")
    path = cache_folder("models") / f"{spec.name}-s{spec.seed}-{spec.input_size}.onnx"
    if not path.is_file():
        export_onnx(spec, path, dynamic_batch=True)
    return path


def resolve_model(model: str | None, batch: int | None,
                  builtin: BuiltinSpec | None = None) -> tuple[str, BuiltinSpec | None]:
    """``(ONNX path, built-in spec or None)`` a command compiles: ``model``, or the
    built-in model ``builtin`` (default: Xception, seed 0, 299x299) at ``batch``,
    generated once into the cache, when it is None."""
    if batch is not None and batch < 1:
        raise XCompileError(f"--batch must be >= 1, got {batch}")
    if model is None:
        from dataclasses import replace

        builtin = replace(builtin or BuiltinSpec(), batch=batch or 1)
        return str(builtin_onnx(builtin)), builtin
    if not Path(model).is_file():
        raise XCompileError(f"model file not found: {model}")
    return model, None
