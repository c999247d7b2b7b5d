"""Command line: parse, validate, call the library, print results.

Every failure the user can cause ends as one ``error: ...`` line and a non-zero exit;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from xcompile.errors import XCompileError, first_line

log = logging.getLogger("xcompile")


MAX_COUNT = 1_000_000  # repeats, trials, batch: anything larger is a typo


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected a number <= {MAX_COUNT}, got {value}")
    return value


def _count(text: str) -> int:
    """A whole number >= 0 (warm-up rounds)."""
    return 0 if text.strip() == "0" else _positive(text)


def _tolerance(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _is_bench_json(path) -> bool:
    """Whether ``path`` holds figures ``bench --json`` wrote."""
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "timings" in data and "ratios" in data


def cmd_export_model(args) -> int:
    from xcompile.models import BuiltinSpec, export_onnx

    spec = BuiltinSpec(name=args.name, seed=args.seed, input_size=args.input_size,
                       batch=args.batch, weights=args.weights)
    path = export_onnx(spec, args.output)
    print(f"wrote {path}")
    return 0


def cmd_targets(args) -> int:
    from xcompile import targets

    rows = []
    for name in targets.names():
        try:
            preset = targets.resolve(name)
        except XCompileError as e:  # ``host`` on a machine no preset fits
            rows.append({"name": name, "error": str(e)})
            continue
        rows.append({**preset.to_json(), "name": name, "description": preset.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        if "error" in row:
            print(f"{row['name']:<12} ({row['error']})")
            continue
        tgt = json.dumps(row["target"])
        host = f" host={json.dumps(row['host'])}" if "host" in row else ""
        print(f"{row['name']:<12} {row['description']}\n{'':<12} {tgt}{host}")
    return 0


def cmd_build(args) -> int:
    from xcompile.build import build, resolve_options

    opts = resolve_options(model=args.model, target=args.target, batch=args.batch,
                           output=args.output, custom_schedules=not args.no_custom_schedules,
                           cuda_graph=not args.no_cuda_graph, tuning_log=args.tuning_log,
                           cuda_arch=args.cuda_arch, precision=args.precision,
                           fuse_separable=args.fuse_separable)
    manifest = build(opts)
    rules = {}
    for k in manifest["kernels"]:
        rules[k["rule"]] = rules.get(k["rule"], 0) + 1
    summary = ", ".join(f"{n} {r}" for r, n in sorted(rules.items()))
    print(f"built {opts.output} ({manifest['target']['name']}, "
          f"{len(manifest['kernels'])} kernels: {summary}) in {manifest['build_seconds']} s")
    tuning = manifest.get("tuning") or {}
    for applied in (tuning, tuning.get("fallback") or {}):
        if applied.get("applied"):
            print(f"tuning log {applied['log']}: {len(applied['applied'])} kernels tuned")
    return 0


def cmd_tune(args) -> int:
    from xcompile.tuning import resolve_tune_options, tune

    opts = resolve_tune_options(
        model=args.model, target=args.target, batch=args.batch, trials=args.trials,
        trials_per_task=args.trials_per_task, tasks=args.tasks, log_dir=args.log_dir,
        rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, search=not args.only_ours)
    m = tune(opts)
    tuned = [t for t in m["tasks"].values() if t.get("tuned")]
    print(f"{'task':<34} {'kind':<10} {'calls':>5} {'trials':>6} {'ours ms':>9} "
          f"{'tuned ms':>9} {'speedup':>7}")
    for t in sorted(tuned, key=lambda t: -(t.get("baseline_ms") or 0) * t.get("calls", 1)):
        base, best = t.get("baseline_ms"), t.get("best_ms")
        speed = f"{base / best:.2f}x" if base and best else "-"
        print(f"{t['name']:<34} {t.get('kind', '?'):<10} {t.get('calls', 0):>5} "
              f"{t.get('trials', 0):>6} {base or float('nan'):>9.3f} "
              f"{best or float('nan'):>9.3f} {speed:>7}")
    print(f"log {args.log_dir}: {m['trials']} trials, {m['wall_seconds']:.0f} s of tuning "
          f"in all; convergence plot in {m['target']['name']}/convergence.png")
    if not args.no_validate:
        from xcompile.tuning_validation import validate

        v = validate(opts)
        if v is not None:
            kept = [w for w in v["workloads"] if w["kept"] and w["workload"] not in v["rejected"]]
            est = v["estimate_ms"]
            second = sum(1 for w in kept if w.get("rank", 1) > 1)
            print(f"validated in the whole model ({v['seconds']:.0f} s): {len(kept)} of "
                  f"{len(v['workloads'])} tuned kernels kept ({second} with their "
                  f"second-fastest result); {v['model']['outcome']}")
            if "untuned_ms" in v["model"]:
                base = (f"the default build, shipped log {v['baseline_log']}"
                        if v.get("baseline_log") else "no log")
                ratio = (f": {v['model']['ratio']:.4f}x in {v['model']['rounds']} paired rounds"
                         if "ratio" in v["model"] else "")
                print(f"  end to end: {v['model']['untuned_ms']:.2f} ms without it ({base}), "
                      f"{v['model']['validated_ms']:.2f} ms with it over that{ratio}")
                print(f"  the tuner's model estimate (its kernels timed alone): "
                      f"{est['untuned']:.2f} ms untuned, {est['tuned']:.2f} ms with every "
                      "result that won alone")
    return 0


def _top5(output) -> list[str]:
    """Top-5 classes per sample: the output as it is when it already is a probability
    distribution (a model ending in Softmax), else the softmax of its logits."""
    import numpy as np

    logits = np.asarray(output, dtype=np.float64).reshape(output.shape[0], -1)
    distribution = bool(np.all((logits >= 0) & (logits <= 1))
                        and np.allclose(logits.sum(axis=1), 1.0, atol=1e-3))
    lines = []
    for i, row in enumerate(logits[:4]):
        if distribution:
            p = row
        else:
            p = np.exp(row - row.max())
            p /= p.sum()
        top = np.argsort(-p)[:5]
        lines.append(f"sample {i}: " + ", ".join(f"class {c} ({p[c]:.4f})" for c in top))
    if logits.shape[0] > 4:
        lines.append(f"... {logits.shape[0] - 4} more samples")
    return lines


def cmd_run(args) -> int:
    import time

    from xcompile.targets import detect_arch
    from xcompile import reference, runtime
    from xcompile.files import check_output_file, is_npy, save_npy
    from xcompile.manifest import read_manifest

    manifest = read_manifest(args.build)
    if args.output:  # checked before the run, not after
        check_output_file(args.output, is_npy, inputs=[args.input, args.build])
    if manifest["target"]["arch"] != detect_arch():
        return _run_foreign(args, manifest)
    predictor = runtime.load(args.build)
    x = reference.make_input(predictor.input, args.input)
    times = []
    out = None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = predictor(x)
        times.append((time.perf_counter() - t0) * 1e3)
    first = out[0] if isinstance(out, list) else out
    for line in _top5(first):
        print(line)
    times.sort()
    print(f"latency: median {times[len(times) // 2]:.3f} ms, min {times[0]:.3f} ms "
          f"over {args.repeat} runs")
    if args.output:
        save_npy(args.output, first, inputs=[args.input, args.build])
        print(f"wrote {args.output}")
    return 0


def _run_foreign(args, manifest) -> int:
    """Another architecture's build: the C++ runner, under emulation."""
    from xcompile import reference, runner
    from xcompile.files import save_npy
    from xcompile.manifest import TensorInfo

    x = reference.make_input(TensorInfo.from_json(manifest["inputs"][0]), args.input)
    outputs, latency = runner.predict(args.build, x, repeat=args.repeat)
    y = outputs[0]
    for line in _top5(y):
        print(line)
    print(f"{latency} ({manifest['target']['arch']}, emulated)")
    if args.output:
        save_npy(args.output, y, inputs=[args.input, args.build])
        print(f"wrote {args.output}")
    return 0


def cmd_refit(args) -> int:
    from xcompile.refit import refit

    manifest = refit(args.build, args.weights, args.output)
    print(f"wrote {args.output} ({args.build} with the weights of {args.weights}) in "
          f"{manifest['refit']['seconds']} s")
    return 0


def cmd_gpu_kit(args) -> int:
    from xcompile.kit import make_kit

    def numbers(text: str) -> tuple[int, ...]:
        return tuple(_positive(t) for t in text.split(","))

    try:
        batches = numbers(args.batches)
    except argparse.ArgumentTypeError as e:
        raise XCompileError(f"--batches: {e}") from None
    precisions = tuple(args.precisions.split(","))
    bad = [p for p in precisions if p not in ("fp32", "fp16")]
    if bad:
        raise XCompileError(f"--precisions takes fp32 and fp16, got {bad[0]!r}")
    kit = make_kit(args.output, target=args.target, input_size=args.input_size,
                   batches=batches, precisions=precisions, seed=args.seed)
    print(f"wrote {args.output} ({len(kit['builds'])} builds for {kit['target']}, "
          f"{kit['bytes'] / 2**20:.1f} MiB); on the GPU machine: {args.output}/run")
    return 0


def cmd_package(args) -> int:
    from xcompile.package import package

    out = package(args.build, args.output)
    print(f"wrote bundle {out}")
    return 0


def cmd_verify(args) -> int:
    from xcompile.errors import VerificationError
    from xcompile.verify import verify

    results = verify(args.build, model=args.model, input_path=args.input, rtol=args.rtol)
    for c in results:
        status = "ok" if c.passed else "FAIL"
        print(f"{c.name}: max abs error {c.max_abs:.3e}, max relative error "
              f"{c.max_rel:.3e} (tolerance {c.rtol:.0e}) {status}")
    failed = [c.name for c in results if not c.passed]
    if failed:
        raise VerificationError(f"output {', '.join(failed)} differs from ONNX Runtime "
                                f"beyond {results[0].rtol:.0e}")
    return 0


def cmd_bench(args) -> int:
    from xcompile.bench import bench, format_table
    from xcompile.files import atomic_path, check_output_file

    if args.json:  # checked before the run, not after
        check_output_file(args.json, _is_bench_json, inputs=[args.build, args.input])
    result = bench(args.build, model=args.model, input_path=args.input, repeat=args.repeat,
                   warmup=args.warmup, with_torch=not args.no_torch,
                   with_openvino=not args.no_openvino)
    print(format_table(result))
    if args.memory:
        from xcompile.bench import format_memory, memory

        result["memory"] = memory(args.build, model=args.model, input_path=args.input)
        print("\nresident memory, each backend alone in a fresh process (load + 5 runs):")
        print(format_memory(result["memory"]))
    if args.profile:
        from xcompile.bench import format_profile, peak_gflops, profile
        from xcompile.manifest import read_manifest

        rows = profile(args.build, input_path=args.input)
        peak = peak_gflops(read_manifest(args.build))
        result["profile"] = rows
        result["peak"] = {"gflops": peak[0], "how": peak[1]} if peak else None
        print(f"\ntop kernels by time ({len(rows)} kernels):")
        print(format_profile(rows, peak))
    if args.json:
        with atomic_path(args.json, _is_bench_json, inputs=[args.build, args.input]) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error stated as the one ``error:`` line every other error
    is (and exit status 2)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    from xcompile import targets

    p = _Parser(prog="xcompile", description=(
        "Compile ONNX CNNs (Xception built in) with Apache TVM for x86, ARM and CUDA."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("export-model", help="write the built-in Xception as ONNX")
    s.add_argument("-o", "--output", required=True, metavar="FILE.onnx")
    s.add_argument("--name", default="xception", help="built-in model (default: xception)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    s.add_argument("--weights", metavar="FILE.pth", help="checkpoint in timm's layout")
    s.add_argument("--input-size", type=_positive, default=299, metavar="N")
    s.add_argument("--batch", type=_positive, default=1, metavar="N")
    s.set_defaults(func=cmd_export_model)

    s = sub.add_parser("targets", help="list the target presets")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_targets)

    s = sub.add_parser("build", help="compile a model into a build folder")
    s.add_argument("--model", metavar="FILE.onnx",
                   help="ONNX model (default: built-in Xception, seed 0, 299x299)")
    s.add_argument("--target", default=targets.HOST, metavar="NAME",
                   help=f"target preset (default: host); one of {', '.join(targets.names())}")
    s.add_argument("--batch", type=_positive, metavar="N", help="input batch size")
    s.add_argument("-o", "--output", metavar="DIR",
                   help="build folder (default: build/<model>-<target>-b<batch>)")
    s.add_argument("--no-custom-schedules", action="store_true",
                   help="TVM's plain path for comparison: the model's layout, no xcompile "
                        "rules (CPU kernels stay naive loops; CUDA keeps DLight)")
    s.add_argument("--fuse-separable", action="store_true",
                   help="CPU targets: compute each depthwise conv inside the pointwise conv "
                        "after it, one kernel per pair (off by default: it measured no "
                        "faster on x86; see the README)")
    s.add_argument("--no-cuda-graph", action="store_true",
                   help="CUDA targets: launch kernels one by one instead of replaying a "
                        "captured CUDA graph")
    s.add_argument("--cuda-arch", metavar="sm_XX[,sm_YY]",
                   help="CUDA targets: GPU architectures to compile kernels for, into one "
                        "fatbin (default: the preset's)")
    s.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: mixed precision (float16 operands and weights, float32 "
                        "accumulation, inputs and outputs); default fp32")
    s.add_argument("--tuning-log", metavar="DIR|none",
                   help="apply a tuning log (a log folder, or the --log-dir of `tune`); "
                        "default: the log shipped for this target when there is one; "
                        "'none': no tuning log")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("tune", help="auto-tune a model's kernels with MetaSchedule into a "
                                    "per-target log that builds apply")
    s.add_argument("--model", metavar="FILE.onnx",
                   help="ONNX model (default: built-in Xception, seed 0, 299x299)")
    s.add_argument("--target", default=targets.HOST, metavar="NAME",
                   help="target preset (default: host)")
    s.add_argument("--batch", type=_positive, metavar="N", help="input batch size")
    s.add_argument("--trials", type=_positive, default=600, metavar="N",
                   help="measured trials the log should hold for these tasks (default 600; "
                        "a rerun continues up to N)")
    s.add_argument("--trials-per-task", type=_positive, metavar="M",
                   help="per task in this run: at most M of our configurations and M "
                        "search trials")
    s.add_argument("--tasks", default="convs", metavar="convs|separable|all|REGEX",
                   help="which kernels: every convolution (default; the stem's KxK convs "
                        "too), depthwise and pointwise convs only, all, or those whose "
                        "name matches REGEX")
    s.add_argument("--log-dir", default="tuning-logs", metavar="DIR",
                   help="logs go to DIR/<target> (default: tuning-logs)")
    s.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="measure on a remote device registered with this TVM RPC tracker")
    s.add_argument("--rpc-key", metavar="KEY", help="the remote device's key")
    s.add_argument("--only-ours", action="store_true",
                   help="search only our rules' tilings, not MetaSchedule's own space")
    s.add_argument("--no-validate", action="store_true",
                   help="skip the check in the whole model (builds with and without the "
                        "log, timed per kernel and end to end) that decides which results "
                        "builds apply; then every result that won alone applies")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("run", help="run a build on an input, print top-5 and latency "
                                   "(an aarch64 build runs under qemu-aarch64)")
    s.add_argument("build", metavar="DIR")
    s.add_argument("--input", metavar="FILE.npy", help="input (default: seeded random)")
    s.add_argument("--output", metavar="FILE.npy", help="write the first output here")
    s.add_argument("--repeat", type=_positive, default=1, metavar="N")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("refit", help="a build with new weights (an ONNX file of the same "
                                     "graph, or a timm checkpoint for the built-in model), "
                                     "without rebuilding")
    s.add_argument("build", metavar="DIR")
    s.add_argument("--weights", required=True, metavar="FILE.onnx|FILE.pth")
    s.add_argument("-o", "--output", required=True, metavar="DIR")
    s.set_defaults(func=cmd_refit)

    s = sub.add_parser("gpu-kit", help="write a kit that checks and times the built-in "
                                       "Xception's CUDA builds on a GPU machine without TVM "
                                       "(one command there: KIT/run)")
    s.add_argument("-o", "--output", required=True, metavar="KIT")
    s.add_argument("--target", default="cuda-sm90", metavar="NAME",
                   help="the builds' target (default cuda-sm90; host: a kit of CPU builds, "
                        "run with KIT/run --cpu)")
    s.add_argument("--input-size", type=_positive, default=299, metavar="N")
    s.add_argument("--batches", default="1,32", metavar="N[,M]")
    s.add_argument("--precisions", default="fp32,fp16", metavar="fp32[,fp16]")
    s.add_argument("--seed", type=int, default=0, help="seed of the weights (made there)")
    s.set_defaults(func=cmd_gpu_kit)

    s = sub.add_parser("package", help="make a self-contained bundle of a CPU build: the "
                                       "build, the C++ runner and the TVM runtime libraries "
                                       "for its architecture")
    s.add_argument("build", metavar="DIR")
    s.add_argument("-o", "--output", required=True, metavar="BUNDLE")
    s.set_defaults(func=cmd_package)

    s = sub.add_parser("verify", help="compare a build with ONNX Runtime")
    s.add_argument("build", metavar="DIR")
    s.add_argument("--model", metavar="FILE.onnx", help="the ONNX file (default: the build's)")
    s.add_argument("--input", metavar="FILE.npy", help="input (default: seeded random)")
    s.add_argument("--rtol", type=_tolerance, default=None,
                   help="relative tolerance (default 1e-4; 1e-2 for fp16 builds)")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("bench", help="time a build against ONNX Runtime, OpenVINO and "
                                     "PyTorch (and measure memory)")
    s.add_argument("build", metavar="DIR")
    s.add_argument("--model", metavar="FILE.onnx", help="the ONNX file (default: the build's)")
    s.add_argument("--input", metavar="FILE.npy", help="input (default: seeded random)")
    s.add_argument("--repeat", type=_positive, default=10, metavar="N", help="timed rounds")
    s.add_argument("--warmup", type=_count, default=1, metavar="N", help="untimed rounds")
    s.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    s.add_argument("--no-openvino", action="store_true", help="leave OpenVINO out")
    s.add_argument("--memory", action="store_true",
                   help="also measure each backend's peak and final resident memory, each "
                        "alone in a fresh process")
    s.add_argument("--profile", action="store_true",
                   help="also time each kernel: the 10 slowest with their rules, time per "
                        "kind of kernel, GFLOP/s and the share of the CPU's peak")
    s.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from xcompile import signals

    args = make_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    signals.handle()
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`xcompile targets | head`): done
        sys.stderr.close()
        return 0
    except (KeyboardInterrupt, Exception) as e:
        if isinstance(e, KeyboardInterrupt) or (signals.received() is not None
                                                and not isinstance(e, signals.Interrupted)):
            # Also an interrupt that TVM turned into its own error in a callback.
            e = signals.interrupted()
        if args.debug and not isinstance(e, signals.Interrupted):
            raise
        if isinstance(e, XCompileError):
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        # A bug or an unforeseen TVM failure: still one line.
        print(f"error: unexpected {type(e).__name__}: {first_line(e)} (rerun with --debug "
              f"for the traceback)", file=sys.stderr)
        return 3
