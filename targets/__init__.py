"""Target presets (name -> TVM target dict, host, cross compiler, runtime device)."""

from .presets import (HOST, PRESETS, Preset, detect_arch, host_cores, names, resolve,
                      runs_here)

__all__ = ["HOST", "PRESETS", "Preset", "detect_arch", "host_cores", "names", "resolve",
           "runs_here"]
