"""Built-in models: PyTorch definitions, seeded weights, ONNX export."""

from .export import (BUILTIN_MODELS, BuiltinSpec, builtin_onnx, export_onnx, make_torch_model,
                     resolve_model)

__all__ = ["BUILTIN_MODELS", "BuiltinSpec", "builtin_onnx", "export_onnx", "make_torch_model",
           "resolve_model"]
