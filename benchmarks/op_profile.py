"""Where an fp32 ONNX model's batch-1 time goes on ONNX Runtime's CPU provider, by kind of layer, next to
where its FLOPs are: the explanation of the gap between an engine and the roofline floor (which assumes
every FLOP at large-matmul speed). Uses ONNX Runtime's own profiler at the optimization level it serves with.

    python -m edgepipe.benchmarks.op_profile out/default [--variant onnxruntime-fp32] [--runs 200]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from edgepipe import UserError
from edgepipe.benchmarks import run_tool
from edgepipe.compile.onnx_layers import layer_kinds
from edgepipe.runtime.backends.base import env_threads
from edgepipe.runtime.integrity import verify_files
from edgepipe.runtime.manifest import Manifest

def profile(onnx_path: Path, runs: int = 200, warmup: int = 20, threads: int | None = None) -> dict:
    """``threads``: None for what the ONNX Runtime backend uses (EDGEPIPE_THREADS, else its default)."""
    import onnx
    import onnxruntime as ort
    kinds, macs = layer_kinds(onnx.load(str(onnx_path)))
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        threads = env_threads() if threads is None else threads
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in inp.shape], dtype=np.float32)
        for _ in range(warmup + runs):
            session.run(None, {inp.name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    # the profiler records from session creation: keep the kernels of the timed runs only
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    after = run_starts[warmup] if len(run_starts) > warmup else 0
    timed_runs = max(1, len(run_starts) - warmup)
    time_us: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= after:
            # ORT names a fused / NCHWc node after the original output it produces (plus "_nchwc")
            name = e["name"][: -len("_kernel_time")].removesuffix("_nchwc")
            kind = kinds.get(name) or e["args"].get("op_name", "other")
            time_us[kind] += e["dur"]
    total_us, total_macs = sum(time_us.values()) or 1.0, sum(macs.values())
    rows = []
    for kind in sorted(time_us, key=time_us.get, reverse=True):
        ms = time_us[kind] / timed_runs / 1000
        rows.append({"kind": kind, "ms": round(ms, 4), "time_share": round(time_us[kind] / total_us, 4),
                     "macs": macs.get(kind, 0),
                     "macs_share": round(macs.get(kind, 0) / total_macs, 4) if total_macs else None,
                     "gflops": round(2 * macs[kind] / (ms / 1e3) / 1e9, 1) if macs.get(kind) and ms else None})
    return {"model": str(onnx_path), "runs": timed_runs, "kernel_ms": round(total_us / timed_runs / 1000, 4),
            "macs": total_macs, "by_kind": rows}


def markdown(result: dict) -> str:
    lines = [f"Kernel time per batch-1 run on ONNX Runtime CPU: {result['kernel_ms']:.2f} ms "
             f"({result['macs'] / 1e6:.0f} MMACs, mean of {result['runs']} runs)", "",
             "| layer kind | ms | share of time | share of MACs | GFLOP/s |", "|---|---|---|---|---|"]
    for r in result["by_kind"]:
        lines.append(f"| {r['kind']} | {r['ms']:.3f} | {r['time_share']:.1%} | "
                     f"{'—' if r['macs_share'] is None else format(r['macs_share'], '.1%')} | "
                     f"{'—' if r['gflops'] is None else format(r['gflops'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgepipe.benchmarks.op_profile", description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="artifact folder (manifest.json)")
    ap.add_argument("--variant", default="onnxruntime-fp32")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, help="default: EDGEPIPE_THREADS, as the backends use")
    args = ap.parse_args(argv)
    return run_tool("op_profile", lambda: markdown(profile(variant_onnx(Path(args.dir), args.variant), runs=args.runs,
                                                             threads=args.threads)))


def variant_onnx(model_dir: Path, name: str) -> Path:
    """The hash-checked .onnx file of variant ``name``."""
    files = verify_files(model_dir, Manifest.load(model_dir).variant(name).files, name)
    onnx_file = next((f for f in files if f.suffix == ".onnx"), None)
    if onnx_file is None:
        raise UserError(f"variant {name} has no .onnx file")
    return onnx_file

if __name__ == "__main__":
    sys.exit(main())
