"""The parts of the Jetson first-run kit (`edgepipe build-engine DIR --check`, compile/tensorrt_check.py) that need
no GPU: the machine's versions, batch-size consistency against per-image results, the cross-check of our layer
precisions against trtexec's, the Polygraphy command for a failed verify, and the report (JSON + markdown) a
user attaches to a bug report. Everything here runs, and is tested, on any machine."""
from __future__ import annotations

import importlib.util
import json
import platform
import shlex
import shutil
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from edgepipe.compile.tensorrt_layers import layer_precisions

REPORT_NAME = "tensorrt-check"          # tensorrt-check.json and tensorrt-check.md in the artifact folder
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
BATCH_SIZES = (3, 8, 20)                # below, at and above the kit's profile max (--batch 1,4,8)
KIT_BATCH = "1,4,8"
# a batch must give what the same images give one at a time: same top-1, logits within this fraction of the
# per-image logits' spread (kernels may differ per batch size, fp16/int8 round differently)
BATCH_MAX_REL = 0.05


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00 \n") or None
    except OSError:
        return None


def trtexec_path() -> str | None:
    """trtexec on PATH, else where JetPack puts it."""
    return shutil.which("trtexec") or (JETPACK_TRTEXEC if Path(JETPACK_TRTEXEC).is_file() else None)


def environment() -> dict:
    """What a bug report needs about this machine; never raises (a missing piece is written as its error)."""
    l4t = _read("/etc/nv_tegra_release")  # JetPack's L4T release line
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
           "numpy": np.__version__, "jetson_model": _read("/proc/device-tree/model"),
           "l4t": l4t.splitlines()[0] if l4t else None,
           "trtexec": trtexec_path(), "polygraphy": _version("polygraphy"), "onnxruntime": _version("onnxruntime")}
    env["tensorrt"] = _tensorrt_version()
    from edgepipe.runtime.backends.trt import cuda_python_version
    env["cuda_python"] = cuda_python_version() if importlib.util.find_spec("cuda") else "not installed"
    env.update(_cuda_facts())
    return env


def _tensorrt_version() -> str:
    if importlib.util.find_spec("tensorrt") is None:
        return "not installed"
    try:
        import tensorrt as trt
        return str(trt.__version__)
    except Exception as exc:  # a broken install is a fact for the report, not a crash
        return f"import failed: {exc}"


def _cuda_facts() -> dict:
    """CUDA runtime and driver versions and the GPU, through cuda-python; errors as strings."""
    from edgepipe.runtime.backends.trt import cuda_call, cudart, gpu_info
    from edgepipe.runtime.errors import BackendUnavailable
    out = {}
    try:
        rt = cudart()
        out["cuda_runtime"] = _cuda_version(cuda_call(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
        out["cuda_driver"] = _cuda_version(cuda_call(rt.cudaDriverGetVersion(), "cudaDriverGetVersion"))
        out["gpu"] = gpu_info()
    except BackendUnavailable as exc:
        out.setdefault("gpu", {"error": str(exc)})
    return out


def _cuda_version(v) -> str:
    v = int(v)
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none (no driver)"


def batch_consistency(logits, x: np.ndarray, sizes=BATCH_SIZES, batch_range: tuple[int, int] | None = None) -> dict:
    """Run ``sizes`` images as one batch each and compare with the same images one at a time.

    ``logits``: batch (N, C, H, W) float32 -> (N, classes). ``x``: preprocessed images (tiled when fewer than the
    largest size). ``batch_range``: the engine profile's (min, max); a batch above max is run in chunks of max
    (as the TensorRT backend does), one below min padded: the chunks are reported."""
    from edgepipe.runtime.backends.trt import batch_chunks
    need = max(sizes)
    x = np.ascontiguousarray(np.resize(x, (need, *x.shape[1:])) if len(x) < need else x[:need], dtype=np.float32)
    single = np.concatenate([logits(x[i:i + 1]) for i in range(need)])
    spread = float(np.mean(np.std(single, axis=1))) or 1.0
    results, ok = {}, True
    for n in sizes:
        got = logits(x[:n])
        diff = float(np.max(np.abs(got - single[:n]))) if got.shape == single[:n].shape else float("inf")
        same_top1 = got.shape == single[:n].shape and bool((got.argmax(1) == single[:n].argmax(1)).all())
        row = {"images": n, "max_abs_diff": round(diff, 6), "rel_to_spread": round(diff / spread, 6),
               "same_top1": same_top1, "ok": same_top1 and diff / spread <= BATCH_MAX_REL}
        if batch_range is not None:
            row["run_as"] = [size for _, _, size in batch_chunks(n, *batch_range)]
            if n > batch_range[1]:
                row["note"] = f"{n} > profile max {batch_range[1]}: split into {len(row['run_as'])} runs"
        results[str(n)] = row
        ok = ok and row["ok"]
    return {"ok": ok, "max_rel_to_spread": BATCH_MAX_REL, "sizes": results}


def compare_layers(ours: dict, trtexec_json: str) -> dict:
    """Our inspector reading vs trtexec --exportLayerInfo's file for the same engine (the same JSON, read by the
    same rule: both must agree; a difference means the engine or the reader is not what we think)."""
    theirs = layer_precisions(trtexec_json)
    if not theirs.get("available"):
        return {"ok": False, "why": theirs.get("why") or "trtexec reported no layers"}
    mine = {r["name"]: r.get("precision") for r in ours.get("per_layer") or []}
    other = {r["name"]: r.get("precision") for r in theirs["per_layer"]}
    differ = sorted(n for n in mine.keys() & other.keys() if mine[n] != other[n])
    only = sorted(mine.keys() ^ other.keys())
    same = ours.get("by_precision") == theirs["by_precision"] and not differ and not only
    return {"ok": same, "ours": ours.get("by_precision"), "trtexec": theirs["by_precision"],
            "layers_that_differ": differ[:20], "layers_in_one_only": only[:20]}


def polygraphy_command(onnx_path: str, input_name: str, shape, *, atol: float, rtol: float, precision: str,
                       strongly_typed: bool = False) -> str:
    """`polygraphy run` comparing TensorRT with ONNX Runtime on every layer's output (``--trt-outputs mark all`` /
    ``--onnx-outputs mark all``), for a variant whose verify failed on the device. Marking every tensor as an
    output stops some TensorRT fusions, so the first layer that differs is the lead, not the final word."""
    dims = ",".join(str(int(d)) for d in shape)
    args = ["polygraphy", "run", str(onnx_path), "--trt", "--onnxrt"]
    if strongly_typed:
        args.append("--strongly-typed")  # the ONNX's own types, as build-engine builds it
    else:
        args += ["--fp16"] + (["--int8"] if precision == "int8" else [])
    args += ["--input-shapes", f"{input_name}:[{dims}]", "--trt-outputs", "mark", "all", "--onnx-outputs", "mark", "all",
             "--atol", f"{atol:g}", "--rtol", f"{rtol:g}"]
    return shlex.join(args)


def markdown(report: dict) -> str:
    """The report as a page a user can paste into an issue."""
    env = report.get("environment", {})
    gpu = env.get("gpu") or {}
    lines = [f"# edgepipe TensorRT first-run check: {'PASS' if report.get('ok') else 'FAIL'}", "",
             f"- folder: `{report.get('folder')}`, created {report.get('created')}, edgepipe {report.get('edgepipe')}",
             f"- TensorRT {env.get('tensorrt')}, CUDA runtime {env.get('cuda_runtime')} / driver {env.get('cuda_driver')}, "
             f"cuda-python {env.get('cuda_python')}, numpy {env.get('numpy')}, Python {env.get('python')}",
             f"- GPU: {gpu.get('gpu') or gpu.get('error')} (compute {gpu.get('compute_capability')}, "
             f"{gpu.get('multiprocessors')} SMs); Jetson: {env.get('jetson_model')}; L4T: {env.get('l4t')}",
             f"- trtexec: {env.get('trtexec')}; polygraphy: {env.get('polygraphy')}", ""]
    if report.get("error"):
        lines += [f"**Stopped:** {report['error']}", ""]
    lines += ["| step | result | details |", "|---|---|---|"]
    for step in report.get("steps", []):
        details = json.dumps(step.get("details", {}), sort_keys=True)
        lines.append(f"| {step['name']} | {'ok' if step.get('ok') else 'FAIL'} | `{details[:300]}` |")
    for hint in report.get("next_steps", []):
        lines += ["", hint]
    return "\n".join(lines) + "\n"


def new_report(root: Path) -> dict:
    from edgepipe import __version__
    return {"format": 1, "folder": str(root), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "edgepipe": __version__, "environment": environment(), "steps": [], "next_steps": [], "ok": False}


def add_step(report: dict, name: str, ok: bool, **details) -> dict:
    step = {"name": name, "ok": bool(ok), "details": details}
    report["steps"].append(step)
    return step


def write_report(root: Path, report: dict) -> tuple[Path, Path]:
    """tensorrt-check.json and tensorrt-check.md in the folder (atomic writes); ``ok`` when every step passed."""
    from edgepipe.atomic import write_bytes, write_json
    report["ok"] = bool(report["steps"]) and not report.get("error") and all(s["ok"] for s in report["steps"])
    paths = (Path(root) / f"{REPORT_NAME}.json", Path(root) / f"{REPORT_NAME}.md")
    write_json(paths[0], report)
    write_bytes(paths[1], markdown(report).encode())
    return paths
