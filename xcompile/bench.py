"""Side-by-side latency: our build against ONNX Runtime (and PyTorch eager for the
built-in models) on the same input, in one process, interleaved round by round (the
order rotating every round) so that machine noise hits every backend alike; medians
over the rounds."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

from xcompile import reference, runtime, targets
from xcompile.errors import XCompileError

log = logging.getLogger(__name__)

OURS = "xcompile"
# Pause between backends: thread pools (TVM's, ONNX Runtime's, OpenMP's) spin-wait for a
# while after each run, and a spinning pool steals cores from the next backend.
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


def _ours(predictor, x):
    x_dev = predictor.to_device(x)

    def run():
        predictor.run_device(x_dev)
        predictor.sync()

    where = predictor.manifest["target"]["name"]
    return run, f"TVM {predictor.manifest['versions']['tvm']}, {where}"


def _onnxruntime(model_path, predictor, x):
    session = reference.ort_session(model_path, predictor.input)
    feed = {predictor.input.name: x}

    def run():
        session.run(None, feed)

    import onnxruntime

    return run, f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider"


def _pytorch(builtin: dict, predictor, x):
    """PyTorch eager on the built-in model with the same weights, on the build's device
    when torch can reach it (CUDA builds on a torch without CUDA fall back to the CPU)."""
    import torch

    from xcompile.models import BuiltinSpec, make_torch_model

    model = make_torch_model(BuiltinSpec(**builtin))
    device = targets.device(predictor.manifest["target"]["device"]).torch_device
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    model = model.to(device)
    xt = torch.from_numpy(x).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            model(xt)
        sync()

    return run, f"torch {torch.__version__} eager, {device}"


def bench(folder, model: str | None = None, input_path: str | None = None,
          repeat: int = 10, warmup: int = 1, with_torch: bool = True) -> dict:
    """Time the build, ONNX Runtime and (for built-in models) PyTorch; return figures.

    The result holds each backend's timing and ``ratios``: our median latency divided
    by each other backend's (below 1 means we are faster).
    """
    if repeat < 1 or warmup < 0:
        raise XCompileError("--repeat must be >= 1 and --warmup >= 0")
    predictor = runtime.load(folder)
    manifest = predictor.manifest
    x = reference.make_input(predictor.input, input_path)
    model_path = reference.reference_model(manifest, model)
    runners = {OURS: _ours(predictor, x),
               "onnxruntime": _onnxruntime(model_path, predictor, x)}
    builtin = manifest["model"].get("builtin")
    if with_torch and builtin:
        try:
            runners["pytorch"] = _pytorch(builtin, predictor, x)
        except ImportError:
            log.warning("PyTorch is not installed; timing without it")
    timings = {name: Timing(name, detail) for name, (_, detail) in runners.items()}
    for _ in range(warmup):
        for run, _ in runners.values():
            run()
    names = list(runners)
    for i in range(repeat):
        # Rotate who goes first: the backend after another one's run pays for its
        # still-spinning threads and evicted caches (8% measured here), so each backend
        # takes each position equally often.
        for name in names[i % len(names):] + names[:i % len(names)]:
            run = runners[name][0]
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            run()
            timings[name].samples_ms.append((time.perf_counter() - t0) * 1e3)
        log.info("round %d/%d: %s", i + 1, repeat,
                 ", ".join(f"{n} {t.samples_ms[-1]:.2f} ms" for n, t in timings.items()))
    ours = timings[OURS].median_ms
    return {
        "build": str(folder),
        "target": manifest["target"]["name"],
        "input": predictor.input.to_json(),
        "repeat": repeat,
        "warmup": warmup,
        "timings": [t.to_json() for t in timings.values()],
        "ratios": {name: round(ours / t.median_ms, 4)
                   for name, t in timings.items() if name != OURS},
    }


def profile(folder, input_path: str | None = None, repeat: int = 3) -> list[dict]:
    """Time every kernel call of the build (device-synchronized), summed per kernel over
    ``repeat`` runs; kernels slowest first, each with the rule that scheduled it."""
    predictor = runtime.load(folder)
    rules = {k["name"]: k["rule"] for k in predictor.manifest["kernels"]}
    x_dev = predictor.to_device(reference.make_input(predictor.input, input_path))
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
    whole = sum(sum(v) for v in totals.values()) or 1.0
    rows = [{"kernel": name, "rule": rules.get(name, "(runtime builtin)"),
             "calls": len(v) // repeat, "ms_per_run": sum(v) / repeat * 1e3,
             "share": sum(v) / whole} for name, v in totals.items()]
    return sorted(rows, key=lambda r: -r["ms_per_run"])


def format_profile(rows: list[dict], top: int = 10) -> str:
    """The ``top`` slowest kernels as a table."""
    lines = [f"{'kernel':<36} {'rule':<24} {'calls':>5} {'ms/run':>8} {'share':>6}"]
    for r in rows[:top]:
        lines.append(f"{r['kernel'][:36]:<36} {r['rule'][:24]:<24} {r['calls']:>5} "
                     f"{r['ms_per_run']:>8.3f} {r['share'] * 100:>5.1f}%")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A human-readable table of ``bench``'s result."""
    width = max(12, *(len(t["backend"]) for t in result["timings"]))
    lines = [f"{'backend':<{width}} {'median ms':>10} {'min ms':>10}  detail"]
    for t in result["timings"]:
        lines.append(f"{t['backend']:<{width}} {t['median_ms']:>10.3f} {t['min_ms']:>10.3f}  "
                     f"{t['detail']}")
    for name, r in result["ratios"].items():
        verdict = "faster" if r < 1 else "slower"
        lines.append(f"{OURS} / {name} = {r:.3f}x ({verdict})")
    return "\n".join(lines)
