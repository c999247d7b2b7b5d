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

from xcompile import schedules
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
    untimed warm-up call.

    ``rotate_bytes`` (CPUs): time ``repeat`` single calls instead (reporting the middle
    half of them, ``middle_half``), each on its own copy of the weights, rotating
    through as many copies as span ``rotate_bytes`` (the model's weights): every call
    then finds its weights as far back in the caches as the model leaves them, one
    inference after their last use (in the last-level cache where the model fits in it,
    in DRAM where it does not); the input and the output stay the same, warm, as the
    model's kernels find theirs (``argument_sets``). Measured on a
    2-core Sapphire Rapids (480 MiB L3), the built-in Xception's 19x19x728 GEMM: 1.4 ms
    warm, 1.6-1.9 ms rotated, 1.64 ms per call inside the model. TVM's
    ``cache_flush_cpu_non_first_arg`` (clflush of weights and output before each call)
    took 5 ms per call, three quarters of the measuring time, and summed 8-10% above the
    model."""

    number: int = 1
    repeat: int = 3
    min_repeat_ms: int = 10
    rotate_bytes: int = 0


def timing(evaluator: Evaluator, remote: bool) -> str:
    """How ``evaluator`` times candidates, as a log records it (``log_folder.TIMING_*``):
    over RPC, TVM's runner cannot rotate weights and flushes the CPU caches instead."""
    from .log_folder import TIMING_CPU, TIMING_FLUSHED, TIMING_WARM

    if not evaluator.rotate_bytes:
        return TIMING_WARM
    return TIMING_FLUSHED if remote else TIMING_CPU


# Copies of a kernel's weights the runner rotates through, at most.
MAX_ROTATION = 256
CPU_REPEAT = 10


# ---------------------------------------------------------------- worker side

_ARGS: dict = {}  # in the runner worker: argument tensors by signature, oldest first
_CURSOR: dict = {}  # in the runner worker: the next rotation set by signature


def build_job(mod_json: str, target_json: str, path: str, cross_cc: str | None) -> str:
    """Compile a scheduled TIR module and link it at ``path``; runs in a builder worker."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = tvm.ir.load_json(mod_json)
    target = tvm.target.Target(json.loads(target_json))
    # Weights a schedule packs are packed once at build time in a real build: the
    # kernel is timed reading the packed layout, without the packing.
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    # What the build's pipeline adds to our schedules (the prefetches and clamped
    # padded-row reads they mark), so that a candidate is timed as a build compiles it.
    mod = schedules.finish_kernels()(mod)
    lib = tvm.compile(mod, target=target, tir_pipeline=schedules.tir_pipeline())
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
    import tvm

    from xcompile.runtime import load_device_runtime

    load_device_runtime(device)
    dev = tvm.device(device)
    lib = tvm.runtime.load_module(path)
    key = (device, json.dumps(args_info), evaluator.rotate_bytes)
    sets = _ARGS.get(key)
    if sets is None:  # candidates of a task share their arguments: make them once
        # A task's candidates can take two signatures (weights prepacked by our rule or
        # not): keep a few, fewer when each is a rotation as large as the model.
        while len(_ARGS) >= (4 if evaluator.rotate_bytes else 16):
            oldest = next(iter(_ARGS))
            del _ARGS[oldest]
            _CURSOR.pop(oldest, None)
        sets = _ARGS[key] = argument_sets(args_info, evaluator.rotate_bytes, dev)
    else:
        _ARGS[key] = _ARGS.pop(key)  # most recently used last
    func = lib["main"]
    args = sets[0]
    start = time.perf_counter()
    func(*args)  # warm-up: page faults, caches, the thread pool's start
    dev.sync()
    first = time.perf_counter() - start
    if reject_s is not None and first > reject_s:
        return [first]
    if evaluator.rotate_bytes:
        # One cursor for the task's candidates: every set is used again only after all
        # the others were (a reuse distance of rotate_bytes, also across candidates).
        times = []
        for _ in range(evaluator.repeat):
            _CURSOR[key] = (_CURSOR.get(key, 0) + 1) % len(sets)
            start = time.perf_counter()
            func(*sets[_CURSOR[key]])
            times.append(time.perf_counter() - start)
        return middle_half(times)
    timer = lib.time_evaluator("main", dev, number=evaluator.number, repeat=evaluator.repeat,
                               min_repeat_ms=evaluator.min_repeat_ms)
    return [float(x) for x in timer(*args).results]


def middle_half(times: list[float]) -> list[float]:
    """The middle half of ``times`` (sorted; all of them when fewer than 4), whose mean
    MetaSchedule, the baseline and the estimate then take. Single calls now and then
    meet a page fault, an interrupt or a neighbour's burst that the model's median run
    does not. Measured on the 2-core Emerald Rapids (AVX-512): the plain mean of ten
    rotated calls summed the untuned Xception's kernels to 46.8-48.8 ms per round, the
    middle half to 44.7, against 46.2 ms end to end; the shipped log's batch-8 tune
    estimated 444 ms for the untuned model (355 measured) with the plain mean, 376 with
    the middle half (356-380 measured that hour)."""
    if len(times) < 4:
        return list(times)
    ordered = sorted(times)
    quarter = len(ordered) // 4
    return ordered[quarter:len(ordered) - quarter]


def argument_sets(args_info: list, rotate_bytes: int, dev) -> list[list]:
    """Random arguments for a kernel: one set, or for rotation as many sets as the
    weights (the arguments between the first and the last) span ``rotate_bytes`` (2 to
    ``MAX_ROTATION``). Every set shares the input (the first argument) and the output
    (the last: destination-passing style), warm, as the model's kernels find them: the
    one before left the input in cache, and Relax's memory planner hands the output
    storage another kernel used moments before. Measured on a 2-core Zen 4 (32 MiB L3):
    with rotated outputs coming from DRAM every candidate of a memory-bound kernel timed
    alike (the row-tiled 19x19x728 depthwise conv 0.101 ms, as the default; inside the
    model 0.067 against 0.104 ms per call), and a 480-trial tune kept nothing."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)

    def tensor(dtype, shape):
        if "float" in dtype:
            data = rng.random(size=shape, dtype=np.float32) * 2 - 1
        else:
            data = np.zeros(shape)
        return tvm.runtime.tensor(data.astype(dtype), dev)

    first = tensor(*args_info[0][1:])
    if len(args_info) == 1:
        return [[first]]
    weights, last = args_info[1:-1], tensor(*args_info[-1][1:])
    count = 1
    if rotate_bytes and weights:
        rest = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                   for _kind, dtype, shape in weights) or 1
        count = max(2, min(MAX_ROTATION, -(-rotate_bytes // rest)))
    return [[first, *(tensor(dtype, shape) for _kind, dtype, shape in weights), last]
            for _ in range(count)]


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
            # (input, output) signature -> fastest seconds. Not the whole signature: a
            # task's candidates take its weights packed (our rule's) or not (the
            # search's own space), and a slow candidate of either is rejected early.
            self.best: dict[str, float] = {}

        def run(self, runner_inputs):
            start = time.perf_counter()
            jobs, sigs = [], []
            for inp in runner_inputs:
                info = _args_info_json(inp)
                sig = json.dumps([info[0], info[-1]])
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
                                             enable_cpu_cache_flush=bool(evaluator.rotate_bytes)),
                     max_workers=1)


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
