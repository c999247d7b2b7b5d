"""Target presets: one table, keyed by name. The rest of xcompile reads a preset's fields
and never branches on target names or strings."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass, replace

from xcompile.errors import XCompileError

from .devices import Device, device

# Host target of CUDA builds: generic x86-64, so the module's host code runs on any x86-64.
_CUDA_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}


@dataclass(frozen=True)
class Preset:
    """A named compilation target.

    ``target`` is the TVM target dict; CPU presets get ``num-cores`` filled in by
    :func:`resolve`. ``family`` selects the schedule rules (see ``schedules``), ``device``
    the runtime device, ``arch`` the machine the exported .so runs on, and
    ``cross_cc`` the compiler that links it when that is not this machine.
    """

    name: str
    description: str
    family: str
    device: str
    arch: str
    target: dict
    host: dict | None = None
    cross_cc: str | None = None
    # Cores assumed for a CPU we are not running on (MetaSchedule needs a number).
    remote_cores: int = 4
    # CPU features (/proc/cpuinfo flags) the preset's code needs on its machine.
    cpu_flags: frozenset[str] = frozenset()
    # CPU presets: the vector width and the FMA pipes per core the peak FLOP rate is
    # estimated from (vector_bits / 32 lanes x 2 FLOPs x fma_units x cores x clock).
    vector_bits: int = 0
    fma_units: int = 0
    # CPU presets: the largest feature map (bytes, at the model's batch) the layers may
    # hold at once; layers with larger maps run on slices of the batch
    # (``xcompile.batch_tiling``). 0: never sliced.
    tile_batch_bytes: int = 0

    @property
    def device_kind(self) -> Device:
        """What the preset's device needs and can do."""
        return device(self.device)

    def tvm_target(self):
        """The ``tvm.target.Target`` for this preset (imports TVM's compiler)."""
        import tvm

        if self.host is not None:
            return tvm.target.Target(self.target, host=self.host)
        return tvm.target.Target(self.target)

    def portable_cpu_target(self):
        """A TVM target for the CPU that runs this preset's host code, at the ISA every
        CPU of its architecture has: what the build's weight transform is compiled for
        (it runs once per load, where the model runs; speed does not matter there)."""
        import tvm

        return tvm.target.Target({"kind": "llvm", "mtriple": f"{self.arch}-linux-gnu"})

    def to_json(self) -> dict:
        """What a manifest or ``xcompile targets`` shows of this preset."""
        out = {"name": self.name, "family": self.family, "device": self.device,
               "arch": self.arch, "target": self.target}
        if self.host is not None:
            out["host"] = self.host
        if self.cross_cc:
            out["cross_cc"] = self.cross_cc
        if self.vector_bits:
            out["vector_bits"], out["fma_units"] = self.vector_bits, self.fma_units
        return out


def _cuda(sm: str, gpus: str) -> Preset:
    return Preset(
        name=f"cuda-{sm.replace('_', '')}",
        description=f"NVIDIA {gpus} (CUDA, {sm}), x86-64 host",
        family="cuda", device="cuda", arch="x86_64",
        # CUDA's static shared memory limit: the kernels use no dynamic shared memory.
        target={"kind": "cuda", "arch": sm, "max_shared_memory_per_block": 48 * 1024},
        host=_CUDA_HOST,
    )


# x86: feature maps up to 2 MiB at the model's batch (the L2 caches of two AVX-512 cores
# of the smallest, 1 MiB; AVX2 cores' are smaller) run whole; the layers up to the last
# larger one run on slices of the batch (see ``xcompile.batch_tiling``). Xception's maps
# are 11 MB an image in the entry flow and 1 MB in the middle flow, so at batch 2 and 8
# every layer up to the global pool runs image by image (as with any limit under 1 MB).
_TILE_BATCH_BYTES = 2 << 20

# The CPU presets in the order ``host`` prefers them: the widest vectors first.
_TABLE = [
    Preset("x86-avx512", "x86-64 with AVX-512 F/BW/DQ/VL (Skylake-SP, Ice Lake, Zen 4 and newer)",
           family="x86", device="cpu", arch="x86_64",
           # LLVM tunes Skylake-SP and its successors to prefer 256-bit vectors and then
           # splits our 16-lane vectors in two wherever no 512-bit instruction forces the
           # width: a SiLU epilogue ran as ymm halves (a 112x112x32 depthwise conv + SiLU
           # 0.36 ms, 0.14 ms with 512-bit vectors; Emerald Rapids).
           target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512",
                   "mattr": ["-prefer-256-bit"]},
           cpu_flags=frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}),
           # Two 512-bit FMA pipes: Xeon Scalable (Gold/Platinum), Sapphire Rapids, Zen 5
           # (Zen 4 runs 512-bit FMAs as two halves: half this peak).
           vector_bits=512, fma_units=2, tile_batch_bytes=_TILE_BATCH_BYTES),
    Preset("x86-avx2", "x86-64 with AVX2 + FMA (Haswell, Zen 1-3 and newer)",
           family="x86", device="cpu", arch="x86_64",
           target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
           cpu_flags=frozenset({"avx2", "fma"}), vector_bits=256, fma_units=2,
           tile_batch_bytes=_TILE_BATCH_BYTES),
    Preset("arm64-neon", "64-bit ARM with NEON (Cortex-A53/A72/A76, Neoverse, Graviton)",
           family="arm", device="cpu", arch="aarch64",
           target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
           cross_cc="aarch64-linux-gnu-g++",
           vector_bits=128, fma_units=2),  # Cortex-A76/A78, Neoverse N1 (A53/A72: 1)
    _cuda("sm_80", "A100 / A30"),
    _cuda("sm_86", "RTX 30xx / A10 / A40"),
    _cuda("sm_89", "RTX 40xx / L4 / L40"),
    _cuda("sm_90", "H100 / H200"),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _TABLE}
PRESETS["cuda"] = replace(PRESETS["cuda-sm90"], name="cuda",
                          description="the newest CUDA preset (" + PRESETS["cuda-sm90"].name + ")")

HOST = "host"


def _cpu_flags() -> set[str]:
    """This machine's CPU features (/proc/cpuinfo flags). ``XCOMPILE_CPU_FLAGS`` (space
    separated) pretends a machine with those only: how the test suite is run as on an
    AVX2 host on an AVX-512 one (code for fewer features runs on more)."""
    pretend = os.environ.get("XCOMPILE_CPU_FLAGS")
    if pretend is not None:
        return set(pretend.split())
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_cpu() -> str:
    """This machine's CPU model as LLVM names it (``znver4``, ``emeraldrapids``): what a
    tuning log records its candidates were timed on. The best schedule differs by model
    within one ISA (a Zen 4 runs 512-bit FMAs as two halves, an Emerald Rapids has two
    full pipes). Needs TVM's compiler."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def runs_here(preset: Preset) -> bool:
    """Whether this machine executes ``preset``'s CPU code natively (its architecture,
    and every CPU feature the code uses)."""
    if not preset.device_kind.is_host or preset.arch != detect_arch():
        return False
    return preset.cpu_flags <= _cpu_flags()


def detect_host_preset() -> Preset:
    """The best CPU preset for this machine, or an error naming what is missing."""
    machine = detect_arch()
    for preset in _TABLE:
        if runs_here(preset):
            # A native build needs no cross compiler.
            return replace(preset, cross_cc=None)
    if machine == "x86_64":
        raise XCompileError("this x86-64 CPU lacks AVX2/FMA; no preset fits it "
                            "(name a target with --target)")
    raise XCompileError(f"no preset for this machine's architecture {machine!r}; "
                        f"name one with --target (see `xcompile targets`)")


def resolve(name: str) -> Preset:
    """The preset called ``name`` ready to compile with: ``host`` is resolved to this
    machine's best CPU preset, and CPU presets get their ``num-cores``."""
    if name == HOST:
        base = detect_host_preset()
        preset = replace(base, name=HOST, description=f"this machine ({base.name})")
        cores = host_cores()
    elif name in PRESETS:
        preset = PRESETS[name]
        native = preset.arch == detect_arch()
        cores = host_cores() if native else preset.remote_cores
    else:
        raise XCompileError(f"unknown target {name!r}; choose one of: "
                            + ", ".join(names()))
    if preset.device_kind.is_host:
        preset = replace(preset, target={**preset.target, "num-cores": cores})
    return preset


def host_clock() -> tuple[float, str]:
    """This machine's core clock in GHz and where it was read: the kernel's cpufreq
    maximum (turbo included), else /proc/cpuinfo's ``cpu MHz`` (what a VM's hypervisor
    reports, or the clock at that moment), else the GHz in the CPU's model name;
    (0.0, reason) when none says."""
    import re

    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return 0.0, "no clock reported"
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    if mhz:
        return float(mhz.group(1)) / 1e3, "/proc/cpuinfo cpu MHz"
    named = re.search(r"^model name\s*:.*@\s*([0-9.]+)\s*GHz", text, re.M)
    if named:
        return float(named.group(1)), "the CPU's model name"
    return 0.0, "no clock reported"


def detect_arch() -> str:
    """This machine's architecture in the presets' spelling."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def names() -> list[str]:
    """All target names a user can pass, ``host`` first."""
    return [HOST, *PRESETS]


def check_toolchain(preset: Preset) -> None:
    """Fail early when the compiler that links the preset's modules is missing."""
    if preset.cross_cc and shutil.which(preset.cross_cc) is None:
        pkg = preset.cross_cc.rsplit("-", 1)[0]
        raise XCompileError(f"{preset.cross_cc} not found: the {preset.name} target links "
                            f"with it (Debian/Ubuntu: apt-get install g++-{pkg})")
