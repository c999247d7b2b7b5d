"""TVM's tensor intrinsics (tensor-core and dot-product instructions that schedules
tensorize with), registered per device without TVM's 30-second package import."""

from __future__ import annotations

import sys
from pathlib import Path

from xcompile import targets


def register_tensor_intrinsics(device: str) -> None:
    """Register the tensor intrinsics MetaSchedule's rules may use on ``device`` (its
    ``tensor_intrinsics`` modules of ``tvm.s_tir.tensor_intrin``).

    The package's ``__init__`` runs every module of it: 30 s here, 25 s of it CUDA's,
    where CPU tuning needs the x86 and ARM ones (0.2 s). Each module is run once, under
    its own name and entered in ``sys.modules`` as a normal import would enter it: an
    import of the whole package later in the process finds it there and runs only the
    others (no intrinsic is registered twice, none is missing)."""
    import importlib.util

    import tvm.s_tir

    folder = Path(tvm.s_tir.__file__).parent / "tensor_intrin"
    for sub in targets.device(device).tensor_intrinsics:
        name = f"tvm.s_tir.tensor_intrin.{sub}"
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, folder / f"{sub}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
