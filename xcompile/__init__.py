"""xcompile: a TVM compiler driver for separable-convolution CNNs (Xception first).

The data flow, one module per stage:
``frontend`` (ONNX -> Relax) -> ``pipeline`` (graph passes) -> ``schedules`` (per-target
TensorIR rules) -> ``build`` (compile + export + manifest) -> ``runtime`` (load with the TVM
runtime only). ``verify`` and ``bench`` compare a build against ONNX Runtime.

Importing this package is cheap: TVM, torch and ONNX load only in the functions that
need them, so ``xcompile.runtime`` works where only the TVM runtime is installed.
"""

__version__ = "0.1.0"

from .errors import XCompileError  # noqa: E402

__all__ = ["XCompileError", "__version__"]
