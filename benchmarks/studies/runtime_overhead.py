"""What the runtime adds to the engine: `Classifier.logits` against OpenVINO's own `benchmark_app` on the same IR.

    python benchmarks/studies/runtime_overhead.py --model /tmp/cam-default [--variant V ...] [--device CPU] [--rounds 3]

For each OpenVINO variant: batch-1 latency of `Classifier.logits` (hash-checked variant, the runtime's
compile settings, input checks, logits copied out) and `benchmark_app -hint latency` on the same .xml
file, device and input shape (`-shape 1,3,H,W`: benchmark_app reshapes the IR to batch 1 and runs its
asynchronous mode, its fastest; `--data-shape` keeps the dynamic batch, which it runs synchronously; fp32
variants with `-infer_precision f32`, as the runtime compiles them). The two run in short alternating turns,
--rounds times, so a busy machine affects both sides of each round alike; the ratio is the median over the
rounds of (runtime median / benchmark_app median of the same round). Target: <= 1.03. The ratio of the
per-round minima is printed too: on a machine shared with other jobs, medians also measure how often a
thread waits for a core, the minima what each side costs when it runs.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgepipe.atomic import write_json
from edgepipe.runtime.backends.base import env_threads
from edgepipe.runtime.model import Classifier

TARGET_RATIO = 1.03


def benchmark_app_path() -> str:
    """benchmark_app ships with the openvino wheel, next to this Python."""
    here = Path(sys.executable).parent / "benchmark_app"
    found = str(here) if here.exists() else shutil.which("benchmark_app")
    if not found:
        raise SystemExit("benchmark_app not found: it comes with `pip install openvino` (next to python)")
    return found


def benchmark_app_latency(xml: Path, device: str, shape: list[int], precision: str, seconds: float,
                          static: bool = True) -> dict:
    """Median and minimum latency (ms) that benchmark_app reports for this IR with the latency hint.
    ``static``: `-shape` (the IR reshaped to batch 1: benchmark_app's asynchronous, fastest mode); else
    `-data_shape` (the dynamic-batch model as compiled, which benchmark_app runs synchronously)."""
    cmd = [benchmark_app_path(), "-m", str(xml), "-d", device, "-hint", "latency", "-t", f"{seconds:g}",
           "-shape" if static else "-data_shape", "[" + ",".join(map(str, shape)) + "]"]
    if precision == "fp32" and device.split(":")[0] in ("CPU", "GPU"):
        cmd += ["-infer_precision", "f32"]
    if env_threads():
        cmd += ["-nthreads", str(env_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    median, low = (re.search(rf"{key}:\s+([0-9.]+) ms", proc.stdout) for key in ("Median", "Min"))
    if proc.returncode != 0 or not median or not low:
        raise SystemExit(f"benchmark_app failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-800:]}")
    return {"median": float(median.group(1)), "min": float(low.group(1))}


def runtime_latency(clf: Classifier, x: np.ndarray, seconds: float) -> dict:
    """Median and minimum latency (ms) of Classifier.logits(x), called back to back for ``seconds``."""
    for _ in range(10):
        clf.logits(x)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        clf.logits(x)
        times.append(time.perf_counter() - t)
    return {"median": statistics.median(times) * 1000.0, "min": min(times) * 1000.0}


def measure_variant(model: str, name: str, device: str, rounds: int, seconds: float, static: bool = True) -> dict:
    clf = Classifier(model, variant=name, backend="openvino", device=device)
    xml = next(f for f in clf.files if f.suffix == ".xml")
    shape = [1 if d in (-1, None) else d for d in clf.variant.input_shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours, theirs = [], []
    for _ in range(rounds):
        theirs.append(benchmark_app_latency(xml, clf.backend.device, shape, clf.variant.precision, seconds, static))
        ours.append(runtime_latency(clf, x, seconds))

    def ratio(key: str) -> float:
        return round(statistics.median(o[key] / t[key] for o, t in zip(ours, theirs)), 3)

    return {"variant": name, "device": clf.backend.device, "benchmark_app_shape": "-shape" if static else "-data_shape",
            "runtime_ms": round(statistics.median(o["median"] for o in ours), 3),
            "benchmark_app_ms": round(statistics.median(t["median"] for t in theirs), 3),
            "ratio": ratio("median"), "ratio_min": ratio("min"),
            "runtime_rounds_ms": [round(o["median"], 3) for o in ours],
            "benchmark_app_rounds_ms": [round(t["median"], 3) for t in theirs],
            "runtime_min_ms": [round(o["min"], 3) for o in ours], "benchmark_app_min_ms": [round(t["min"], 3) for t in theirs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="artifact folder (e.g. from `edgepipe run recipes/default.yaml`)")
    p.add_argument("--variant", action="append", help="OpenVINO variant(s) to measure (default: all of them)")
    p.add_argument("--device", default="CPU", help="OpenVINO device (CPU, GPU, NPU, AUTO, ...)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=3.0, help="length of each turn")
    p.add_argument("--data-shape", action="store_true",
                   help="run benchmark_app on the dynamic-batch model with -data_shape (synchronous there) instead of "
                        "-shape (reshaped to batch 1, asynchronous: its fastest mode, the default)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("EDGEPIPE_OV_HINT", "LATENCY")
    if args.rounds < 1 or args.seconds <= 0:
        p.error("--rounds must be >= 1 and --seconds > 0")
    from edgepipe.runtime.manifest import Manifest
    manifest = Manifest.load(args.model)
    names = args.variant or [n for n, v in manifest.of_backend("openvino").items() if v.status == "ok"]
    results = [measure_variant(args.model, n, args.device, args.rounds, args.seconds, not args.data_shape) for n in names]
    print(f"{'variant':<22} {'device':<8} {'runtime ms':>10} {'benchmark_app ms':>17} {'ratio':>6} {'ratio of minima':>16}"
          f"   (target <= {TARGET_RATIO})")
    for r in results:
        print(f"{r['variant']:<22} {r['device']:<8} {r['runtime_ms']:>10.3f} {r['benchmark_app_ms']:>17.3f} {r['ratio']:>6.3f}"
              f" {r['ratio_min']:>16.3f}   medians per round: {r['runtime_rounds_ms']} vs {r['benchmark_app_rounds_ms']}")
    if args.json:
        write_json(args.json, {"target": TARGET_RATIO, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
