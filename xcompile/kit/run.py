#!/usr/bin/env python3
"""The GPU kit's one command: check and time xcompile's CUDA builds of the built-in
Xception on this machine, with PyTorch as the reference and the peer.

    ./run [--cpu] [--rounds R] [--iters N] [--out DIR] [--budget SECONDS]

Needs Python 3.8+, numpy, PyTorch and the NVIDIA driver; no TVM, no xcompile, no
network. The kit carries no weights: they are made here by the same PyTorch code and
seed as where the kit was made (``kitlib/xception.py``), checked against the checksum
recorded there, and given to the builds as raw weights (the C++ runner applies each
build's own weight transform). Each build is checked against PyTorch fp32 on the same
weights and input (fp32 builds within 1e-4, fp16 builds within 1e-2), then timed
against PyTorch eager (fp32, TF32, fp16 channels-last) and torch.compile, each backend
in a process of its own, in interleaved rounds whose order rotates. Prints a table,
writes ``results.json``, exits 1 when a check fails. ``--cpu`` runs a kit made for the
CPU (``xcompile gpu-kit --target host``): the same checks, PyTorch on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KIT = Path(__file__).resolve().parent
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
PAUSE_S = 0.05  # between backends: a spinning pool must not steal the next one's time


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def seeded_model(kit: dict):
    sys.path.insert(0, str(KIT / "kitlib"))
    from xception import Xception, seed_weights  # the kit's copy of xcompile's model code

    model = Xception()
    seed_weights(model, kit["seed"])
    return model.eval()


def model_input(kit: dict, batch: int):
    import numpy as np

    size = kit["input_size"]
    return np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype("float32")


# ---------------------------------------------------------------- PyTorch workers


def worker(backend: str, batch: int, device: str) -> None:
    """A PyTorch backend in its own process: prints 'ready' (or 'error ...'), then
    answers each 'run N' on stdin with 'ms MEDIAN MIN'."""
    import torch

    kit = json.loads((KIT / "kit.json").read_text())
    try:
        model = seeded_model(kit).to(device)
        x = torch.from_numpy(model_input(kit, batch)).to(device)
        torch.backends.cuda.matmul.allow_tf32 = backend == "eager-tf32"
        torch.backends.cudnn.allow_tf32 = backend == "eager-tf32"
        if backend == "eager-fp16-cl":
            model = model.half().to(memory_format=torch.channels_last)
            x = x.half().to(memory_format=torch.channels_last)
        if backend == "compile":
            model = torch.compile(model)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        with torch.inference_mode():
            for _ in range(3):  # warm-up (and torch.compile's compilation)
                model(x)
            sync()
    except Exception as e:  # torch.compile without a C compiler, say
        text = str(e).strip().splitlines()
        print(f"error {type(e).__name__}: {text[0] if text else ''}"[:300], flush=True)
        return
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        n = int(line.split()[1])
        times = []
        with torch.inference_mode():
            for _ in range(n):
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        print(f"ms {times[len(times) // 2]} {times[0]}", flush=True)


class Backend:
    """A process that answers 'run N' with 'ms MEDIAN MIN'."""

    def __init__(self, name: str, cmd: list[str], env=None):
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.error = None
        self.samples: list[float] = []

    def expect(self, prefix: str) -> str:
        """The next line of the process when it starts with ``prefix``; else "" and
        ``error`` says why (the process is ended)."""
        line = self.proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if self.proc.poll() is None:
            self.proc.kill()
        err = self.proc.stderr.read().strip().splitlines()
        self.error = line.strip() or (err[-1] if err else "the process ended")
        return ""

    def time(self, iters: int) -> None:
        self.proc.stdin.write(f"run {iters}\n")
        self.proc.stdin.flush()
        line = self.expect("ms ")
        if line:
            self.samples.append(float(line.split()[1]))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()

    @property
    def median(self):
        return statistics.median(self.samples) if self.samples else None


# ---------------------------------------------------------------- the kit's run


def regenerate_weights(kit: dict, folder: Path) -> None:
    """The builds' raw weights made here (``0000.npy``...), checked against the kit."""
    import numpy as np

    state = seeded_model(kit).state_dict()
    digest = hashlib.sha256()
    folder.mkdir(parents=True)
    for i, name in enumerate(kit["raw_names"]):
        array = np.ascontiguousarray(state[name].detach().cpu().numpy())
        digest.update(array.tobytes())
        np.save(folder / f"{i:04d}.npy", array)
    if digest.hexdigest() != kit["raw_sha256"]:
        import torch

        fail(f"PyTorch {torch.__version__} here makes other weights from seed {kit['seed']} "
             f"than PyTorch {kit['torch_here']} where the kit was made (checksums differ); "
             "the checks below would compare other models", 1)


def reference(kit: dict, batch: int, device: str):
    """PyTorch fp32 (no TF32) on the seeded weights: what every build is checked against."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = seeded_model(kit).to(device)
    with torch.inference_mode():
        return model(torch.from_numpy(model_input(kit, batch)).to(device)).float().cpu().numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="run", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="a kit of CPU builds; PyTorch on the CPU")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--iters", type=int, default=20, help="calls per backend per round")
    p.add_argument("--out", default=str(KIT / "results"), help="where results.json goes")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for the whole run; rounds stop when it is spent")
    p.add_argument("--worker", nargs=3, metavar=("BACKEND", "BATCH", "DEVICE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return 0
    started = time.perf_counter()
    try:
        import numpy as np
        import torch
    except ImportError as e:
        fail(f"the kit needs numpy and PyTorch: {e}")
    kit = json.loads((KIT / "kit.json").read_text())
    device = "cpu" if args.cpu else "cuda"
    if kit["device"] != device:
        fail(f"this kit holds {kit['device']} builds; "
             + ("run it without --cpu" if kit["device"] == "cuda" else "run it with --cpu"))
    if device == "cuda" and not torch.cuda.is_available():
        fail("no CUDA GPU is visible to PyTorch here")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    work = Path(tempfile.mkdtemp(prefix="xcompile-kit-"))
    results = {"kit": kit["target"], "device": gpu, "torch": torch.__version__,
               "python": sys.version.split()[0], "checks": [], "timings": {}}
    failed = False
    backends: dict[tuple[str, int], Backend] = {}
    try:
        regenerate_weights(kit, work / "raw")
        print(f"weights regenerated from seed {kit['seed']}: checksum ok")
        for build in kit["builds"]:
            batch, precision = build["batch"], build["precision"]
            x = work / f"x-b{batch}.npy"
            if not x.exists():
                np.save(x, model_input(kit, batch))
            out = work / build["name"]
            out.mkdir()
            proc = Backend(f"xcompile-{precision}", [
                str(KIT / "xcompile_run"), str(KIT / build["path"]), "--input", str(x),
                "--outputs", str(out), "--raw-weights", str(work / "raw"), "--serve"])
            if not proc.expect("latency"):
                results["checks"].append({"build": build["name"], "ok": False,
                                          "error": proc.error})
                print(f"FAIL {build['name']}: {proc.error}")
                failed = True
                continue
            ref = reference(kit, batch, device)
            ours = np.load(out / "0.npy")
            rel = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
            ok = rel <= TOLERANCE[precision]
            failed |= not ok
            results["checks"].append({"build": build["name"], "max_rel_error": rel,
                                      "tolerance": TOLERANCE[precision], "ok": ok})
            print(f"{'ok  ' if ok else 'FAIL'} {build['name']}: max relative error {rel:.2e} "
                  f"(tolerance {TOLERANCE[precision]:.0e})")
            backends[(f"xcompile-{precision}", batch)] = proc
        peers = ["eager-fp32"] + (["eager-tf32", "eager-fp16-cl", "compile"]
                                  if device == "cuda" else [])
        for batch in sorted({b["batch"] for b in kit["builds"]}):
            for name in peers:
                w = Backend(name, [sys.executable, str(Path(__file__).resolve()), "--worker",
                                   name, str(batch), device])
                if w.expect("ready"):
                    backends[(name, batch)] = w
                else:
                    results["timings"].setdefault(str(batch), {})[name] = {
                        "error": w.error or "did not start"}
                    print(f"note: {name} at batch {batch} cannot run here: {w.error}")
        keys = sorted(backends)
        for r in range(args.rounds):
            if time.perf_counter() - started > args.budget:
                print(f"note: time budget spent after {r} rounds")
                break
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                time.sleep(PAUSE_S)
                backends[key].time(args.iters)
        for (name, batch), b in backends.items():
            results["timings"].setdefault(str(batch), {})[name] = (
                {"median_ms": b.median, "samples_ms": b.samples} if b.samples
                else {"error": b.error or "no samples"})
    finally:
        for b in backends.values():
            b.close()
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {Path(args.out) / 'results.json'} ({time.perf_counter() - started:.0f} s)")
    return 1 if failed else 0


def print_table(results: dict) -> None:
    cols = ["xcompile-fp32", "xcompile-fp16", "eager-fp32", "eager-tf32", "eager-fp16-cl",
            "compile"]
    print(f"\n{results['device']}, PyTorch {results['torch']}: median ms per call")
    print(f"{'batch':>5} " + " ".join(f"{c:>14}" for c in cols))
    for batch, row in sorted(results["timings"].items(), key=lambda kv: int(kv[0])):
        cells = []
        for c in cols:
            v = row.get(c, {}).get("median_ms")
            cells.append(f"{v:14.3f}" if v else f"{'-':>14}")
        print(f"{batch:>5} " + " ".join(cells))
        ours = row.get("xcompile-fp32", {}).get("median_ms")
        for peer in ("compile", "eager-fp32"):
            theirs = row.get(peer, {}).get("median_ms")
            if ours and theirs:
                print(f"{'':>5} xcompile fp32 / {peer} = {ours / theirs:.3f}x")
        ours16 = row.get("xcompile-fp16", {}).get("median_ms")
        theirs16 = row.get("eager-fp16-cl", {}).get("median_ms")
        if ours16 and theirs16:
            print(f"{'':>5} xcompile fp16 / eager-fp16-cl = {ours16 / theirs16:.3f}x")


if __name__ == "__main__":
    sys.exit(main())
