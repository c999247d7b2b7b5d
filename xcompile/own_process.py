"""A backend in a process of its own, timed on request and measured for memory.

The parent starts ``python -m xcompile.own_process SPEC`` (or the C++ runner with
``--serve``), which loads the model and then answers ``run N`` with ``ms MEDIAN MIN``, the
runner's protocol: so a benchmark interleaves it round by round with the backends of its
own process, and reads its peak and current resident memory (VmHWM, VmRSS) from
``/proc/PID/status`` without the child measuring itself. Our build's worker imports the
TVM runtime only (``TVM_USE_RUNTIME_LIB=1``), as a deployment does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from xcompile.errors import XCompileError

READY = "ready"


class OwnProcess:
    """A backend's process: started at construction, ready when it returns."""

    def __init__(self, name: str, cmd: list[str], ready: str = READY, env: dict | None = None):
        self.name = name
        self.detail = ""
        # stderr into a file, read only when the process fails: a pipe nobody reads
        # while it runs would block the child once its warnings fill the pipe.
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, text=True, bufsize=1,
                                      env={**os.environ, **(env or {})})
        line = self._expect(ready)
        self.detail = line[len(ready):].strip()

    @property
    def pid(self) -> int:
        """The process's id (``bench`` waits for its threads to go idle)."""
        return self._proc.pid

    def _expect(self, prefix: str) -> str:
        while True:
            line = self._proc.stdout.readline()
            if not line:
                self._proc.wait()
                self._stderr.seek(0)
                err = self._stderr.read().strip().splitlines()
                why = err[-1] if err else f"exit status {self._proc.returncode}"
                raise XCompileError(f"{self.name} failed in its own process: "
                                    f"{why.removeprefix('error: ')}")
            if line.startswith(prefix):
                return line.strip()

    def run(self, n: int = 1) -> float:
        """Run ``n`` times; the median latency in ms as the process measured it."""
        self._proc.stdin.write(f"run {n}\n")
        self._proc.stdin.flush()
        return float(self._expect("ms ").split()[1])

    def memory_mib(self) -> tuple[float, float]:
        """(peak, current) resident memory of the process so far, in MiB."""
        fields = {}
        with open(f"/proc/{self._proc.pid}/status", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.split()
        return int(fields["VmHWM"][0]) / 1024, int(fields["VmRSS"][0]) / 1024

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write("quit\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            stream.close()


def python_backend(name: str, build_dir, model_path, input_path) -> OwnProcess:
    """``peers.make(name, ...)`` in a Python process of its own."""
    spec = json.dumps({"backend": name, "build": str(build_dir), "model": str(model_path),
                       "input": str(input_path)})
    env = {"TVM_USE_RUNTIME_LIB": "1"} if name == "xcompile" else {}
    return OwnProcess(name, [sys.executable, "-m", "xcompile.own_process", spec], env=env)


def runner_backend(build_dir, input_path) -> OwnProcess:
    """The C++ runner serving the build (a CPU build of this machine's architecture)."""
    from xcompile.runner import build_runner
    from xcompile.targets import detect_arch

    exe = build_runner(detect_arch())
    proc = OwnProcess("xcompile-runner", [str(exe), str(build_dir), "--input", str(input_path),
                                          "--serve"], ready="latency")
    proc.detail = "C++ runner (TVM runtime only)"
    return proc


def main(argv: list[str]) -> int:
    """The worker: load the backend SPEC names, say ``ready DETAIL``, serve ``run N``."""
    import statistics

    import numpy as np

    from xcompile import peers
    from xcompile.errors import XCompileError as Error

    spec = json.loads(argv[0])
    try:
        x = np.load(spec["input"], allow_pickle=False)
        backend = peers.make(spec["backend"], Path(spec["build"]), Path(spec["model"]), x)
    except Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{READY} {backend.detail}", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        n = int(line.split()[1])
        ms = sorted(backend.run() for _ in range(n))
        print(f"ms {statistics.median(ms)} {ms[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
