"""Side-by-side latency and memory: our build against ONNX Runtime, OpenVINO and (for the
built-in models) PyTorch eager on the same input.

Latency: ours, ONNX Runtime and PyTorch in this process, OpenVINO in processes of its own
(float32, and its default precision), interleaved round by round with the order rotating
every round, so that machine noise hits every backend alike; medians over the rounds.
Memory: each backend alone in a fresh process, its peak and final resident memory after
loading and running the model. Every result names the CPU it was measured on.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xcompile import own_process, peers, process_idle, reference, runtime, targets
from xcompile.errors import XCompileError, first_line
from xcompile.manifest import TensorInfo, read_manifest

log = logging.getLogger(__name__)

OURS = "xcompile"
# Pause between backends, at least: thread pools (TVM's, ONNX Runtime's, OpenMP's,
# OpenVINO's TBB) spin-wait for a while after each run, and a spinning pool steals cores
# from the next, so each run also waits for the backends' processes to go idle
# (``process_idle``).
SETTLE_S = 0.05


@dataclass
class Timing:
    """Per-round latencies of one backend, in milliseconds."""

    backend: str
    detail: str
    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def to_json(self) -> dict:
        return {"backend": self.backend, "detail": self.detail,
                "median_ms": round(self.median_ms, 4),
                "min_ms": round(min(self.samples_ms), 4),
                "samples_ms": [round(s, 4) for s in self.samples_ms]}


def machine() -> dict:
    """The CPU the figures come from: model name, cores used, ISA preset, clock."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model", "CPU part")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        isa = targets.resolve(targets.HOST).description.removeprefix("this machine ").strip("()")
    except XCompileError:
        isa = targets.detect_arch()
    ghz, source = targets.host_clock()
    return {"cpu": model, "cores": targets.host_cores(), "isa": isa, "clock_ghz": ghz,
            "clock_source": source}


def describe(m: dict) -> str:
    clock = f", {m['clock_ghz']:.2f} GHz ({m['clock_source']})" if m["clock_ghz"] else ""
    return f"{m['cpu']}, {m['cores']} cores, {m['isa']}{clock}"


def bench(folder, model: str | None = None, input_path: str | None = None,
          repeat: int = 10, warmup: int = 1, with_torch: bool = True,
          with_openvino: bool = True) -> dict:
    """Time the build and its peers; return figures.

    The result holds each backend's timing and ``ratios``: our median latency divided by
    each other backend's (below 1 means we are faster). OpenVINO takes part for CPU
    builds when it is installed (``pip install -e '.[peers]'``).
    """
    if repeat < 1 or warmup < 0:
        raise XCompileError("--repeat must be >= 1 and --warmup >= 0")
    predictor = runtime.load(folder)
    manifest = predictor.manifest
    x = reference.make_input(predictor.input, input_path)
    model_path = reference.reference_model(manifest, model)
    backends = [peers.ours(predictor, x),
                peers.onnxruntime(model_path, predictor.input, x)]
    builtin = manifest["model"].get("builtin")
    if with_torch and builtin:
        try:
            backends.append(peers.pytorch(builtin, manifest["target"]["device"], x))
        except ImportError:
            log.warning("PyTorch is not installed; timing without it")
    host = targets.device(manifest["target"]["device"]).is_host
    with tempfile.TemporaryDirectory(prefix="xcompile-bench-") as tmp:
        if with_openvino and host and not peers.openvino_installed():
            log.warning("OpenVINO is not installed (pip install -e '.[peers]'); timing "
                        "without it")
        elif with_openvino and host:
            x_path = Path(tmp) / "input.npy"
            np.save(x_path, x)
            for name in peers.OPENVINO_PRECISIONS:
                log.info("starting %s in its own process", name)
                try:
                    # (An OwnProcess is a backend: name, detail, run, close.)
                    backends.append(
                        own_process.python_backend(name, folder, model_path, x_path))
                except XCompileError as e:
                    log.warning("%s left out: %s", name, first_line(e))
        try:
            timings = interleaved(backends, repeat, warmup)
        finally:
            for b in backends:
                b.close()
    ours = timings[OURS].median_ms
    return {
        "build": str(folder),
        "target": manifest["target"]["name"],
        "machine": machine(),
        "input": predictor.input.to_json(),
        "repeat": repeat,
        "warmup": warmup,
        "timings": [t.to_json() for t in timings.values()],
        "ratios": {name: round(ours / t.median_ms, 4)
                   for name, t in timings.items() if name != OURS},
    }


def rotated(items: list, i: int) -> list:
    """``items`` starting at position ``i`` (modulo its length): round ``i``'s order, so
    each takes each position equally often over the rounds."""
    return items[i % len(items):] + items[:i % len(items)]


def interleaved(backends: list, repeat: int, warmup: int,
                settle_s: float = SETTLE_S) -> dict[str, Timing]:
    """Each backend's ``repeat`` timings, round by round, after ``warmup`` untimed rounds.
    Before each run, at least ``settle_s`` and until the backends' processes are idle
    (no thread of another still spinning: ``process_idle``); with ``settle_s`` 0, back
    to back. Rotate who goes first: the backend after another one's run finds caches the
    other filled, so each backend takes each position equally often."""
    timings = {b.name: Timing(b.name, b.detail) for b in backends}
    pids = [b.pid for b in backends if b.pid is not None]  # those in processes of their own

    def settle() -> None:
        if settle_s > 0:
            process_idle.wait_until_idle(settle_s, pids)

    for _ in range(warmup):
        for b in backends:
            settle()
            b.run()
    for i in range(repeat):
        for b in rotated(backends, i):
            settle()
            timings[b.name].samples_ms.append(b.run())
        log.info("round %d/%d: %s", i + 1, repeat,
                 ", ".join(f"{n} {t.samples_ms[-1]:.2f} ms" for n, t in timings.items()))
    return timings


def memory(folder, model: str | None = None, input_path: str | None = None,
           runs: int = 5) -> list[dict]:
    """Peak and final resident memory (MiB) of each backend alone in a fresh process
    that loads the model and runs it ``runs`` times: our build through the Python
    loader (TVM runtime only) and the C++ runner (CPU builds of this architecture),
    ONNX Runtime, and OpenVINO (float32 and default precision) when installed. A backend
    that cannot run here gets a row with its ``error``."""
    manifest = read_manifest(folder)
    info = TensorInfo.from_json(manifest["inputs"][0])
    x = reference.make_input(info, input_path)
    model_path = reference.reference_model(manifest, model)
    host = targets.device(manifest["target"]["device"]).is_host
    names = ["xcompile"]
    if host and manifest["target"]["arch"] == targets.detect_arch():
        names.append("xcompile-runner")
    names.append("onnxruntime")
    if host and peers.openvino_installed():
        names += list(peers.OPENVINO_PRECISIONS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="xcompile-memory-") as tmp:
        x_path = Path(tmp) / "input.npy"
        np.save(x_path, x)
        for name in names:
            log.info("memory: %s in a fresh process", name)
            try:
                proc = (own_process.runner_backend(folder, x_path) if name == "xcompile-runner"
                        else own_process.python_backend(name, folder, model_path, x_path))
            except XCompileError as e:
                rows.append({"backend": name, "error": first_line(e)})
                continue
            try:
                proc.run(runs)
                peak, steady = proc.memory_mib()
            finally:
                proc.close()
            rows.append({"backend": name, "detail": proc.detail, "peak_mib": round(peak, 1),
                         "steady_mib": round(steady, 1)})
    return rows


def kernel_times(predictor, x_dev, repeat: int = 3) -> dict[str, tuple[int, float]]:
    """Kernel name -> (calls per run, seconds per run): every kernel call of one loaded
    build timed device-synchronized inside the model, over ``repeat`` runs."""
    predictor.run_device(x_dev)  # warm up before timing
    totals: dict[str, list[float]] = {}
    started: list[float] = []

    def instrument(_func, symbol, before_run, _ret, *_args):
        if before_run:
            predictor.sync()
            started.append(time.perf_counter())
        else:
            predictor.sync()
            totals.setdefault(str(symbol), []).append(time.perf_counter() - started.pop())
        return 0  # VMInstrumentReturnKind.kNoOp

    predictor.set_instrument(instrument)
    try:
        for _ in range(repeat):
            predictor.run_device(x_dev)
    finally:
        predictor.set_instrument(None)
    return {name: (len(v) // repeat, sum(v) / repeat) for name, v in totals.items()}


def profile(folder, input_path: str | None = None, repeat: int = 3) -> list[dict]:
    """Time every kernel call of the build (device-synchronized), summed per kernel over
    ``repeat`` runs; kernels slowest first, each with the rule that scheduled it, its
    kind and, where the build recorded its FLOPs, its GFLOP/s."""
    predictor = runtime.load(folder)
    kernels = {k["name"]: k for k in predictor.manifest["kernels"]}
    x_dev = predictor.to_device(reference.make_input(predictor.input, input_path))
    times = kernel_times(predictor, x_dev, repeat)
    whole = sum(seconds for _, seconds in times.values()) or 1.0
    rows = []
    for name, (calls, seconds) in times.items():
        k = kernels.get(name, {})
        flops = float(k.get("flops", 0.0)) * calls
        rows.append({"kernel": name, "rule": k.get("rule", "(runtime builtin)"),
                     "kind": k.get("kind", "runtime"), "calls": calls,
                     "ms_per_run": seconds * 1e3, "share": seconds / whole,
                     "gflops": flops / seconds / 1e9 if flops and seconds else None})
    return sorted(rows, key=lambda r: -r["ms_per_run"])


def peak_gflops(manifest: dict) -> tuple[float, str] | None:
    """This machine's float32 FMA peak for a CPU build, and how it was found: measured
    by ``fma_peak`` for the build's target (vector width, registers, cores), with what
    lanes x 2 x FMA pipes (the preset's) x cores x the reported clock would have given
    beside it; that arithmetic alone where TVM's compiler is not installed."""
    t = manifest["target"]
    if not t.get("vector_bits") or not targets.device(t["device"]).is_host:
        return None
    from xcompile import fma_peak
    from xcompile.schedules.cpu.target_info import cpu_info

    lanes, units, cores = t["vector_bits"] // 32, t["fma_units"], targets.host_cores()
    ghz, source = targets.host_clock()
    nominal = lanes * 2 * units * cores * ghz
    arithmetic = (f"{lanes} lanes x 2 x {units} FMA pipes x {cores} cores x {ghz:.2f} GHz "
                  f"({source}) = {nominal:.0f} GFLOP/s")
    if not fma_peak.can_compile():  # the TVM runtime alone: nothing to build the kernel
        return (nominal, arithmetic) if ghz else None
    import tvm

    registers = cpu_info(tvm.target.Target(t["target"])).registers
    measured = fma_peak.measure(t["target"], lanes, registers, cores)
    return measured, (f"measured, {fma_peak.chains(registers)} FMA chains of {lanes} lanes "
                      f"per core on {cores} cores = {measured:.0f} GFLOP/s, as if "
                      f"{units} FMA pipes ran at {measured / (lanes * 2 * units * cores):.2f}"
                      f" GHz (the arithmetic, {arithmetic})")


def by_kind(rows: list[dict]) -> list[dict]:
    """The profile's time and FLOP rate summed per kind of kernel, largest first."""
    groups: dict[str, dict] = {}
    for r in rows:
        g = groups.setdefault(r["kind"], {"kind": r["kind"], "ms_per_run": 0.0, "share": 0.0,
                                          "gflop": 0.0, "kernels": 0})
        g["ms_per_run"] += r["ms_per_run"]
        g["share"] += r["share"]
        g["kernels"] += 1
        if r["gflops"]:
            g["gflop"] += r["gflops"] * r["ms_per_run"] / 1e3
    out = sorted(groups.values(), key=lambda g: -g["ms_per_run"])
    for g in out:
        g["gflops"] = g["gflop"] / (g["ms_per_run"] / 1e3) if g["gflop"] else None
    return out


def format_profile(rows: list[dict], peak: tuple[float, str] | None = None,
                   top: int = 10) -> str:
    """The ``top`` slowest kernels and the time per kind, with GFLOP/s and, given the
    machine's estimated ``peak``, its percentage."""
    def rate(g):
        if not g:
            return f"{'-':>8} {'':>6}"
        pct = f"{g / peak[0] * 100:5.0f}%" if peak else ""
        return f"{g:8.1f} {pct:>6}"

    lines = [f"{'kernel':<36} {'rule':<24} {'calls':>5} {'ms/run':>8} {'share':>6} "
             f"{'GFLOP/s':>8} {'peak':>6}"]
    for r in rows[:top]:
        lines.append(f"{r['kernel'][:36]:<36} {r['rule'][:24]:<24} {r['calls']:>5} "
                     f"{r['ms_per_run']:>8.3f} {r['share'] * 100:>5.1f}% {rate(r['gflops'])}")
    lines.append("")
    lines.append(f"{'kind':<20} {'kernels':>7} {'ms/run':>8} {'share':>6} "
                 f"{'GFLOP/s':>8} {'peak':>6}")
    for g in by_kind(rows):
        lines.append(f"{g['kind']:<20} {g['kernels']:>7} {g['ms_per_run']:>8.3f} "
                     f"{g['share'] * 100:>5.1f}% {rate(g['gflops'])}")
    if peak:
        lines.append(f"peak: {peak[1]}")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A human-readable table of ``bench``'s result."""
    width = max(12, *(len(t["backend"]) for t in result["timings"]))
    lines = [f"on {describe(result['machine'])}",
             f"{'backend':<{width}} {'median ms':>10} {'min ms':>10}  detail"]
    for t in result["timings"]:
        lines.append(f"{t['backend']:<{width}} {t['median_ms']:>10.3f} {t['min_ms']:>10.3f}  "
                     f"{t['detail']}")
    for name, r in result["ratios"].items():
        verdict = "faster" if r < 1 else "slower"
        lines.append(f"{OURS} / {name} = {r:.3f}x ({verdict})")
    return "\n".join(lines)


def format_memory(rows: list[dict]) -> str:
    """``memory``'s rows as a table."""
    lines = [f"{'backend':<16} {'peak MiB':>9} {'after MiB':>9}  detail"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['backend']:<16} {'-':>9} {'-':>9}  {r['error']}")
        else:
            lines.append(f"{r['backend']:<16} {r['peak_mib']:>9.1f} {r['steady_mib']:>9.1f}  "
                         f"{r['detail']}")
    return "\n".join(lines)
