"""`edgepipe build-engine DIR --check`: the first run on a Jetson / GPU host, as a careful engineer would do it.

1. print the versions (TensorRT, CUDA runtime and driver, cuda-python, numpy, Python, JetPack's L4T) and the GPU;
2. build every TensorRT variant the folder ships (fp16, int8) with ``--batch 1,4,8``, each verified on this device
   against the reference set (as `build-engine` always does);
3. rebuild one to prove the timing cache is reused, then damage the cache and rebuild to prove it is replaced;
4. cross-check the layer precisions read from the engine inspector against `trtexec --exportLayerInfo` where
   trtexec is installed (JetPack: /usr/src/tensorrt/bin/trtexec);
5. run batches of 3, 8 and 20 images against the same images one at a time (20 > the profile's max 8: the
   runtime splits it, the report says how);
6. time batch 1 and batch 8 of each engine;
7. write everything into ``DIR/tensorrt-check.json`` and ``DIR/tensorrt-check.md`` (attach both to a bug report);
   a verify that fails prints the `polygraphy run` command that compares TensorRT with ONNX Runtime layer by layer.

TensorRT is imported lazily: without it (or without a GPU) the kit writes the report with the versions it found and
stops with one line. The parts that need no GPU live in compile/tensorrt_report.py (tested everywhere).
"""
from __future__ import annotations

import dataclasses
import subprocess
import time
from argparse import Namespace
from pathlib import Path

from edgepipe import UserError
from edgepipe.compile.tensorrt_report import (BATCH_SIZES, KIT_BATCH, add_step, batch_consistency, compare_layers,
                                              new_report, polygraphy_command, write_report)
from edgepipe.runtime.compiled import EngineSidecar
from edgepipe.runtime.errors import BackendUnavailable
from edgepipe.runtime.manifest import Manifest, exported_onnx, variant_name

# polygraphy's comparison tolerances per precision: starting points for the layer-by-layer search (not measured)
POLYGRAPHY_TOLERANCE = {"fp16": (1e-2, 1e-2), "int8": (1e-1, 1e-1)}
TRTEXEC_TIMEOUT_S = 600


def main(args) -> int:
    from edgepipe.compile import tensorrt_engine
    root = Path(args.dir)
    manifest = Manifest.load(root)
    report = new_report(root)
    env = report["environment"]
    print(f"TensorRT {env['tensorrt']}, CUDA runtime {env.get('cuda_runtime')} / driver {env.get('cuda_driver')}, "
          f"cuda-python {env['cuda_python']}, numpy {env['numpy']}, Python {env['python']}; GPU {env.get('gpu')}; "
          f"Jetson {env['jetson_model']}; trtexec {env['trtexec']}", flush=True)
    try:
        tensorrt_engine.device_check()
    except BackendUnavailable as exc:
        report["error"] = str(exc)
        _, md = write_report(root, report)
        raise BackendUnavailable(f"{exc} (versions found: {md})") from None
    precisions = [p for p in ("fp16", "int8") if variant_name("tensorrt", p) in manifest.variants]
    if not precisions:
        raise UserError(f"{root} has no TensorRT variant; add targets {{backend: tensorrt, precision: fp16}} and "
                        f"{{backend: tensorrt, precision: int8}} to the recipe and re-run `edgepipe run`")
    built = [p for p in precisions if build_step(report, args, p)]
    if built:
        cache_steps(report, args, built[0])
    for precision in built:
        name = variant_name("tensorrt", precision)
        trtexec_step(report, root, name)
        run_steps(report, root, name)
        verify_step(report, root, name)
    json_path, md_path = write_report(root, report)
    print(f"first-run check: {'PASS' if report['ok'] else 'FAIL'}; report: {md_path} and {json_path.name} "
          f"(attach both to a bug report)", flush=True)
    for hint in report["next_steps"]:
        print(hint, flush=True)
    return 0 if report["ok"] else 1


def _build(args, precision: str) -> tuple[int, float]:
    from edgepipe.compile import tensorrt_engine
    build_args = Namespace(dir=args.dir, precision=precision, batch=KIT_BATCH, typing=getattr(args, "typing", "auto"),
                           workspace=args.workspace, rebuild=True, variant=None)
    t0 = time.perf_counter()
    rc = tensorrt_engine.main(build_args)
    return rc, round(time.perf_counter() - t0, 1)


def _sidecar(root: Path, name: str) -> EngineSidecar:
    return Manifest.load(root).variants[name].engine


def build_step(report: dict, args, precision: str) -> bool:
    """Build (and verify) one engine; True when an engine was written."""
    name = variant_name("tensorrt", precision)
    try:
        rc, seconds = _build(args, precision)
    except (UserError, BackendUnavailable) as exc:
        add_step(report, f"build {name}", False, error=str(exc))
        return False
    side = _sidecar(Path(args.dir), name)
    layers = side.layers
    add_step(report, f"build {name}", True, seconds=seconds, verify_exit=rc, typing=side.typing,
             float_precision=side.float_precision, profile=side.profile,
             timing_cache=side.timing_cache, timing_cache_state=side.timing_cache_state,
             layers_by_precision=layers.by_precision, data_movement=layers.data_movement,
             fp32_layers=side.fp32_layers, layer_info=layers.raw)
    return True


def cache_steps(report: dict, args, precision: str) -> None:
    """Rebuild: the timing cache must be reused; damage it and rebuild: it must be replaced."""
    root, name = Path(args.dir), variant_name("tensorrt", precision)
    for label, damage, expected in (("timing cache reused on rebuild", False, "reused"),
                                    ("damaged timing cache replaced", True, "rebuilt")):
        cache = root / (_sidecar(root, name).timing_cache or "")
        if damage and cache.is_file():
            cache.write_bytes(b"not a TensorRT timing cache")
        try:
            _, seconds = _build(args, precision)
        except (UserError, BackendUnavailable) as exc:
            add_step(report, label, False, error=str(exc))
            continue
        state = str(_sidecar(root, name).timing_cache_state)
        add_step(report, label, state.startswith(expected), state=state, seconds=seconds, cache=cache.name)


def trtexec_step(report: dict, root: Path, name: str) -> None:
    """Our reading of the layer precisions against trtexec's export of the same engine."""
    trtexec = report["environment"].get("trtexec")
    if not trtexec:
        add_step(report, f"trtexec layer cross-check {name}", True, skipped="trtexec not installed")
        return
    manifest = Manifest.load(root)
    variant = manifest.variants[name]
    engine = root / next(f.path for f in variant.files if f.path.endswith(".engine"))
    out = engine.with_name("trtexec-layers.json")
    shape = "x".join(str(d) for d in [1, *variant.input_shape[1:]])
    cmd = [trtexec, f"--loadEngine={engine}", f"--exportLayerInfo={out}", "--profilingVerbosity=detailed",
           f"--shapes={manifest.input_name}:{shape}", "--iterations=1", "--warmUp=0", "--duration=0",
           "--noDataTransfers"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TRTEXEC_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        add_step(report, f"trtexec layer cross-check {name}", False, command=" ".join(cmd), error=str(exc))
        return
    if proc.returncode != 0 or not out.is_file():
        add_step(report, f"trtexec layer cross-check {name}", False, command=" ".join(cmd),
                 error=(proc.stdout + proc.stderr)[-800:])
        return
    check = compare_layers(dataclasses.asdict(variant.engine.layers), out.read_text())
    add_step(report, f"trtexec layer cross-check {name}", check["ok"], command=" ".join(cmd), **check)


def run_steps(report: dict, root: Path, name: str) -> None:
    """Batches of 3, 8, 20 against one image at a time; latency at batch 1 and 8."""
    from edgepipe.runtime.model import Classifier
    from edgepipe.runtime.verify import _latency, load_reference
    try:
        clf = Classifier(root, variant=name, backend="tensorrt")
        ref = load_reference(root, Manifest.load(root))
    except (UserError, BackendUnavailable) as exc:
        add_step(report, f"batches {name}", False, error=str(exc))
        return
    x = clf.preprocess.normalize(ref["inputs"])
    batches = batch_consistency(clf.logits, x, BATCH_SIZES, getattr(clf.backend, "batch_range", None))
    add_step(report, f"batches {'/'.join(map(str, BATCH_SIZES))} {name}", batches["ok"], **batches)
    import numpy as np
    bench = {}
    for n in (1, 8):
        batch = np.ascontiguousarray(np.resize(x, (n, *x.shape[1:])), dtype=np.float32)
        lat = _latency(lambda: clf.logits(batch), 20, 100)
        bench[f"batch{n}"] = dict(lat, images_per_s=round(n * 1000.0 / lat["p50"], 1))
    add_step(report, f"bench {name}", True, **bench)


def verify_step(report: dict, root: Path, name: str) -> None:
    """The verify verdict build-engine recorded; on a failure, the Polygraphy command to find the layer."""
    from edgepipe.runtime.device_records import device_record_for_this_machine
    manifest = Manifest.load(root)
    result = ((device_record_for_this_machine(root, manifest) or {}).get("variants") or {}).get(name) or {}
    check = result.get("check") or {}
    ok = result.get("verdict") == "pass"
    add_step(report, f"verify {name}", ok, verdict=result.get("verdict"), top1_agreement=check.get("top1_agreement"),
             rel_mean_abs=check.get("rel_mean_abs"), tolerance=check.get("tolerance"), error=check.get("error"))
    if not ok:
        side = manifest.variants[name].engine
        precision = side.precision or manifest.variants[name].precision
        atol, rtol = POLYGRAPHY_TOLERANCE.get(precision, POLYGRAPHY_TOLERANCE["int8"])
        cmd = polygraphy_command(str(root / (side.source_onnx or exported_onnx("base"))), manifest.input_name,
                                 [1, *manifest.variants[name].input_shape[1:]], atol=atol, rtol=rtol,
                                 precision=precision, strongly_typed=side.typing == "strong")
        report["next_steps"].append(f"{name} does not match the reference set here. Compare TensorRT with ONNX Runtime "
                                    f"layer by layer (pip install 'polygraphy>=0.49' or 'edgepipe[debug]'):\n    {cmd}")
