"""The GPU kit: what a machine with an NVIDIA GPU and no TVM needs to check and time
xcompile's CUDA builds of the built-in Xception (``xcompile gpu-kit``).

The kit holds the builds (fp32 and fp16, each batch) without their weights, the C++
runner with the TVM runtime libraries (TVM's CUDA runtime and the CUDA runtime among
them: the driver is the machine's), the built-in model's PyTorch code, ``kit.json`` and
the entry point ``run`` (``run.py`` beside this file), which makes the weights there,
checks them against the checksum recorded here, and checks and times each build against
PyTorch. Nothing in it needs Python's TVM or xcompile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from xcompile import runner, targets
from xcompile.errors import XCompileError
from xcompile.files import OutputKind, atomic_dir, check_output_folder
from xcompile.manifest import PARAMS, read_manifest

log = logging.getLogger(__name__)

KIT_JSON = "kit.json"
ENTRY = "run"
MAX_BYTES = 60 * 2**20  # what can be brought to a GPU machine


def _is_kit(folder: Path) -> bool:
    try:
        return "raw_sha256" in json.loads((folder / KIT_JSON).read_text())
    except (OSError, ValueError):
        return False


KIT = OutputKind("GPU kit", _is_kit,
                 frozenset({KIT_JSON, ENTRY, runner.RUNNER, "lib", "builds", "kitlib"}))


def make_kit(out: str | Path, target: str = "cuda-sm90", input_size: int = 299,
             batches: tuple[int, ...] = (1, 32), precisions: tuple[str, ...] = ("fp32", "fp16"),
             seed: int = 0) -> dict:
    """Write the kit for ``target`` to ``out``; returns its ``kit.json``."""
    import numpy as np
    import torch

    from xcompile.build import build, resolve_options
    from xcompile.models import BuiltinSpec, make_torch_model
    from xcompile.models import xception as xception_code

    check_output_folder(out, KIT)
    preset = targets.resolve(target)
    if preset.arch != targets.detect_arch():
        raise XCompileError(f"a kit runs its builds through this machine's runner: "
                            f"{preset.name} is for {preset.arch}")
    spec = BuiltinSpec(seed=seed, input_size=input_size)
    with atomic_dir(out, KIT) as tmp:
        builds = []
        raw_names = None
        for precision in precisions:
            for batch in batches:
                name = f"{precision}-b{batch}"
                folder = tmp / "builds" / name
                log.info("kit: building %s", name)
                build(resolve_options(target=target, batch=batch, output=str(folder),
                                      precision=precision, builtin=spec))
                (folder / PARAMS).unlink()  # the weights are made where the kit runs
                manifest = read_manifest(folder)
                names = [r["name"] for r in manifest["transform"]["raw"]]
                if raw_names not in (None, names):
                    raise XCompileError("the kit's builds take their weights in other orders")
                raw_names = names
                builds.append({"name": name, "precision": precision, "batch": batch,
                               "path": f"builds/{name}"})
        state = make_torch_model(spec).state_dict()
        digest = hashlib.sha256()
        for name in raw_names:
            digest.update(np.ascontiguousarray(state[name].numpy()).tobytes())
        shutil.copy2(runner.build_runner(preset.arch), tmp / runner.RUNNER)
        (tmp / "lib").mkdir()
        for lib in [*sorted(runner.runtime_libs(preset.arch).glob("*.so")),
                    *runner.device_libs(preset.device)]:
            shutil.copy2(lib, tmp / "lib" / lib.name)
        (tmp / "kitlib").mkdir()
        shutil.copy2(xception_code.__file__, tmp / "kitlib" / "xception.py")
        shutil.copy2(Path(__file__).with_name("run.py"), tmp / ENTRY)
        (tmp / ENTRY).chmod(0o755)
        kit = {"target": preset.name, "device": preset.device, "seed": seed,
               "input_size": input_size, "builds": builds, "raw_names": raw_names,
               "raw_sha256": digest.hexdigest(), "torch_here": torch.__version__}
        (tmp / KIT_JSON).write_text(json.dumps(kit, indent=2) + "\n")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if size > MAX_BYTES:
            raise XCompileError(f"the kit would be {size / 2**20:.1f} MiB; at most "
                                f"{MAX_BYTES / 2**20:.0f} MiB can be brought to the GPU machine")
        kit["bytes"] = size
    log.info("kit %s: %d builds, %.1f MiB", out, len(builds), size / 2**20)
    return kit
