"""Target presets (name -> TVM target dict, host, cross compiler, runtime device) and
the kinds of device they run on."""

from .devices import DEVICES, Device, device
from .presets import (HOST, PRESETS, Preset, check_toolchain, detect_arch, host_clock,
                      host_cores, host_cpu, names, resolve, runs_here)

__all__ = ["DEVICES", "HOST", "PRESETS", "Device", "Preset", "check_toolchain", "detect_arch",
           "device", "host_clock", "host_cores", "host_cpu", "names", "resolve", "runs_here"]
