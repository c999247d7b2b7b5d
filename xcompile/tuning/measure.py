"""Builder and runner for MetaSchedule that keep their worker processes.

Candidates are compiled by a pool of builder processes (one per core, in parallel) into
shared libraries, then timed one at a time by a single runner process that owns the CPU
while it measures. Remote devices are measured through TVM's RPC tracker instead
(``rpc_runner``); the builder then links for the remote machine (a cross compiler).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from xcompile.errors import XCompileError

from .workers import WorkerPool

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 60.0
# Jobs a worker serves before it is replaced (a fresh one imports TVM again, ~3 s): see
# the README's tuning notes for the memory growth these bound.
BUILDER_MAX_USES = 2000
RUNNER_MAX_USES = 2000
# A candidate whose first call takes this many times the fastest time of its task is
# not measured further (its first-call time is what the log gets).
REJECT_FACTOR = 3.0


@dataclass(frozen=True)
class Evaluator:
    """How a candidate is timed: ``repeat`` means of ``number`` calls each, every mean
    spanning at least ``min_repeat_ms`` (``number`` grows to reach it), after one
    untimed warm-up call."""

    number: int = 1
    repeat: int = 3
    min_repeat_ms: int = 10


# ---------------------------------------------------------------- worker side

_ARGS: dict = {}  # in the runner worker: argument tensors by signature, oldest first


def build_job(mod_json: str, target_json: str, path: str, cross_cc: str | None) -> str:
    """Compile a scheduled TIR module and link it at ``path``; runs in a builder worker."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = tvm.ir.load_json(mod_json)
    target = tvm.target.Target(json.loads(target_json))
    # Weights a schedule packs are packed once at build time in a real build: the
    # kernel is timed reading the packed layout, without the packing.
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    lib = tvm.compile(mod, target=target)
    kwargs = {}
    if cross_cc:
        from tvm.support import cc

        kwargs["fcompile"] = cc.cross_compiler(cross_cc)
    lib.export_library(path, **kwargs)
    return path


def run_job(path: str, args_info: list, evaluator: Evaluator, device: str,
            reject_s: float | None = None) -> list[float]:
    """Time the kernel in ``path`` on random arguments; runs in the runner worker.

    The warm-up call is timed too: a candidate slower than ``reject_s`` there is
    reported with that one time instead of a full measurement (it cannot win)."""
    import numpy as np
    import tvm

    from xcompile.runtime import load_device_runtime

    load_device_runtime(device)
    dev = tvm.device(device)
    lib = tvm.runtime.load_module(path)
    key = (device, json.dumps(args_info))
    args = _ARGS.get(key)
    if args is None:  # candidates of a task share their arguments: make them once
        rng = np.random.default_rng(0)
        args = []
        for _kind, dtype, shape in args_info:
            data = rng.uniform(-1, 1, size=shape) if "float" in dtype else np.zeros(shape)
            args.append(tvm.runtime.tensor(data.astype(dtype), dev))
        if len(_ARGS) >= 16:
            _ARGS.pop(next(iter(_ARGS)))
        _ARGS[key] = args
    func = lib["main"]
    start = time.perf_counter()
    func(*args)  # warm-up: page faults, caches, the thread pool's start
    dev.sync()
    first = time.perf_counter() - start
    if reject_s is not None and first > reject_s:
        return [first]
    timer = lib.time_evaluator("main", dev, number=evaluator.number,
                               repeat=evaluator.repeat, min_repeat_ms=evaluator.min_repeat_ms)
    return [float(x) for x in timer(*args).results]


# ---------------------------------------------------------------- tuner side


def _args_info_json(runner_input) -> list:
    return [list(a.as_json()) for a in runner_input.args_info]


def make_builder(target, cores: int, cross_cc: str | None = None):
    """A MetaSchedule builder backed by ``cores`` persistent builder processes."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    target_json = str(target)  # its JSON form

    @derived_object
    class PoolBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = WorkerPool(cores, {"TVM_NUM_THREADS": "1"}, BUILD_TIMEOUT_S,
                                   BUILDER_MAX_USES)
            self.dir = tempfile.mkdtemp(prefix="xcompile-tune-")
            self.seconds = 0.0  # wall time spent building, for the progress report

        def build(self, build_inputs):
            import tvm

            start = time.perf_counter()
            jobs = []
            for inp in build_inputs:
                # One folder per candidate: MetaSchedule's clean-up removes the folder.
                path = os.path.join(tempfile.mkdtemp(dir=self.dir), "candidate.so")
                jobs.append((tvm.ir.save_json(inp.mod), target_json, path, cross_cc))
            done = self.pool.map(build_job, jobs)
            self.seconds += time.perf_counter() - start
            return [BuilderResult(value, None) if ok else BuilderResult(None, str(value))
                    for ok, value in done]

        def close(self):
            self.pool.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    return PoolBuilder()


def make_local_runner(cores: int, device: str = "cpu", evaluator: Evaluator = Evaluator()):
    """A MetaSchedule runner timing candidates in one persistent process on this machine
    (its CPU, or its GPU for ``device="cuda"``)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult

    @derived_object
    class DoneFuture(PyRunnerFuture):
        def __init__(self, result):
            super().__init__()
            self._result = result

        def done(self):
            return True

        def result(self):
            return self._result

    @derived_object
    class PoolRunner(PyRunner):
        def __init__(self):
            super().__init__()
            self.pool = WorkerPool(1, {"TVM_NUM_THREADS": str(cores), "TVM_BIND_THREADS": "0"},
                                   RUN_TIMEOUT_S, RUNNER_MAX_USES)
            self.seconds = 0.0  # wall time spent measuring
            self.best: dict[str, float] = {}  # argument signature -> fastest seconds

        def run(self, runner_inputs):
            start = time.perf_counter()
            jobs, sigs = [], []
            for inp in runner_inputs:
                info = _args_info_json(inp)
                sig = json.dumps(info)
                best = self.best.get(sig)
                sigs.append(sig)
                jobs.append((inp.artifact_path, info, evaluator, device,
                             REJECT_FACTOR * best if best else None))
            done = self.pool.map(run_job, jobs)
            for sig, (ok, value) in zip(sigs, done):
                if ok and len(value) > 1:
                    mean = sum(value) / len(value)
                    self.best[sig] = min(self.best.get(sig, mean), mean)
            self.seconds += time.perf_counter() - start
            return [DoneFuture(RunnerResult(value, None) if ok else RunnerResult(None, value))
                    for ok, value in done]

        def close(self):
            self.pool.close()

    return PoolRunner()


def rpc_runner(tracker: str, key: str, evaluator: Evaluator = Evaluator()):
    """MetaSchedule's RPC runner on the device ``key`` registered with ``tracker``."""
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

    host, port = parse_tracker(tracker)  # checked by resolve_tune_options
    config = RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                       session_priority=1, session_timeout_sec=60)
    return RPCRunner(config, EvaluatorConfig(number=evaluator.number, repeat=evaluator.repeat,
                                             min_repeat_ms=evaluator.min_repeat_ms,
                                             enable_cpu_cache_flush=False), max_workers=1)


def tracker_keys(host: str, port: int) -> set[str]:
    """The device keys registered with the tracker at ``host:port``."""
    import socket

    from tvm import rpc

    try:  # fail fast: TVM's own client retries for a long time
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise XCompileError(f"cannot reach the RPC tracker at {host}:{port} "
                            f"({e.strerror or e})") from e
    return set(rpc.connect_tracker(host, port).summary().get("queue_info", {}))


def check_tracker(host: str, port: int, key: str) -> None:
    """The tracker answers and has a device under ``key`` (else the runner would wait
    for one forever)."""
    keys = tracker_keys(host, port)
    if key not in keys:
        raise XCompileError(f"no device is registered under key {key!r} at the RPC tracker "
                            f"{host}:{port} (keys there: {', '.join(sorted(keys)) or 'none'})")


def parse_tracker(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--rpc-tracker must be HOST:PORT, got {text!r}")
    return host, int(port)
