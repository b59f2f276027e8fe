"""`edgepipe build-engine DIR --precision fp16|int8 [--variant NAME] [--typing auto|weak|strong] [--workspace MB]
[--batch MIN,OPT,MAX] [--rebuild]`

Run on the Jetson / GPU host (TensorRT 10.3 - 11.x). Builds the engine the way trtexec does: explicit batch,
one optimization profile over the batch, int8 by explicit quantization from the QDQ ONNX (no calibrator),
a timing cache per TensorRT version and GPU kept in the folder, detailed profiling verbosity so the engine
inspector can say which layers really run in int8 / fp16. Weakly typed networks (TensorRT 10.x) take fp16 /
int8 from builder flags; strongly typed ones (preferred from 10.12, the only kind in 11) from the ONNX: the
QDQ graph for int8, the fp16 ONNX `edgepipe run` exports for fp16. The decisions are in tensorrt_plan.py.

After the build the engine and its sidecar (TensorRT version, GPU, compute capability, typing, profile, source
ONNX, per-layer precisions) go into manifest.json (written atomically) or, in a signed folder, into this
machine's MAC'd engine record (runtime/engine_records.py: the signed manifest is never rewritten), and the
engine is proven on this device against the reference set (edgepipe.runtime.verify). Only then is the TensorRT
default set, by the serving policy over what passed here (runtime/serving.py), never by this module.

TensorRT objects are named ``builder``, ``network``, ``parser``, ``config``, ``profile``, ``cache``, ``engine``,
``inspector``, ``runtime``, ``inp`` (tests/test_tensorrt.py checks every attribute used on them, and every
``trt.`` name, against the API of each supported TensorRT version).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from edgepipe import UserError
from edgepipe.atomic import write_bytes
from edgepipe.compile.tensorrt_layers import layer_precisions
from edgepipe.compile.tensorrt_plan import (Source, check_version, choose_source, entry_record, parse_batch,
                                            profile_shapes, source_files, timing_cache_name, typing_mode, up_to_date)
from edgepipe.runtime.backends.base import BACKENDS
from edgepipe.runtime.errors import BackendUnavailable
from edgepipe.runtime.integrity import FileEntry
from edgepipe.runtime.engine_records import save_built_engine, set_engine_default
from edgepipe.runtime.manifest import Variant, variant_name
from edgepipe.runtime.serving import verified_default
from edgepipe.runtime.signing import load_manifest
from edgepipe.runtime.verify import verify_model_dir

# functions that use the builder precision flags, which exist in TensorRT 10.x only (weak typing)
WEAK_TYPING_ONLY = ("set_precision_flags", "keep_fp32")
LAYER_INFO = "layers.json"  # the engine inspector's raw JSON, next to model.engine


def import_tensorrt():
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable(f"TensorRT is not installed: {BACKENDS['tensorrt'].install_hint}")
    import tensorrt as trt
    check_version(trt.__version__)
    return trt


def device_check():
    """(tensorrt module, {gpu, compute_capability}); every missing piece (TensorRT, cuda-python, a usable
    GPU and driver) in one line, so one look says all that must be fixed."""
    from edgepipe.runtime.backends.trt import gpu_info
    problems, trt, gpu = [], None, None
    try:
        trt = import_tensorrt()
    except BackendUnavailable as exc:
        problems.append(str(exc))
    try:
        gpu = gpu_info()
    except BackendUnavailable as exc:  # cuda-python missing, or a CUDA error with its fix
        problems.append(str(exc))
    if problems:
        raise BackendUnavailable("cannot build a TensorRT engine here: " + "; ".join(problems))
    return trt, gpu


def set_precision_flags(trt, config, precision: str) -> None:
    """Weak typing (TensorRT 10.x): fp16 kernels allowed everywhere; int8 where the Q/DQ nodes say."""
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization from the Q/DQ nodes: no calibrator


def keep_fp32(trt, network, config, names: list[str]) -> dict:
    """Weak typing: pin the layers `edgepipe run` found near fp16 overflow (ONNX node names, which the ONNX parser
    gives its layers) to fp32, as a strongly typed build keeps them from the fp16 ONNX. PREFER, not OBEY: a layer
    without an fp32 kernel warns instead of failing the build (the inspector's layers.json shows what ran)."""
    wanted, pinned = set(names), []
    skip = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE, trt.LayerType.CONSTANT)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name not in wanted or layer.type in skip:
            continue
        layer.precision = trt.DataType.FLOAT
        for j in range(layer.num_outputs):
            if layer.get_output_type(j) in (trt.DataType.FLOAT, trt.DataType.HALF):
                layer.set_output_type(j, trt.DataType.FLOAT)
        pinned.append(layer.name)
    if pinned:
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    return {"asked": len(wanted), "pinned": sorted(pinned), "how": "layer precision constraints (prefer)"}


def load_timing_cache(config, path: Path) -> str:
    """Attach the timing cache at ``path`` (or a new one); a cache TensorRT refuses (another version or GPU,
    or damaged) is replaced by an empty one. Returns what happened."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return "reused" if data else "new"
    print(f"timing cache {path.name} was refused by TensorRT (made elsewhere or damaged); starting a new one", flush=True)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        return "off (TensorRT refused an empty timing cache)"
    return "rebuilt (the old one was refused)"


def save_timing_cache(config, path: Path, state: str) -> str:
    if state.startswith("off"):
        return state
    cache = config.get_timing_cache()
    data = cache.serialize() if cache is not None else None
    if data is None:
        return state + "; not saved (TensorRT returned no timing cache)"
    write_bytes(path, bytes(data))
    return state


def inspect_layers(trt, serialized, raw_path: Path) -> dict:
    """Which layers run in which precision, from the engine inspector (the build used DETAILED verbosity); its raw
    JSON (what `trtexec --exportLayerInfo` writes) is kept at ``raw_path`` for the user and for bug reports."""
    runtime = trt.Runtime(trt_logger(trt))
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        return {"available": False, "why": "the new engine could not be deserialized for inspection"}
    inspector = engine.create_engine_inspector()
    raw = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    write_bytes(raw_path, str(raw).encode())
    return dict(layer_precisions(raw), raw=raw_path.name)


def trt_logger(trt):
    from edgepipe.runtime.backends.trt import trt_logger as shared
    return shared(trt)


def build_engine(trt, source: Source, engine_path: Path, precision: str, workspace_mb: int,
                 batch: tuple[int, int, int], cache_path: Path) -> dict:
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    strong = source.typing == "strong"
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source.path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {source.entry.path}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector's per-layer precisions
    if strong:
        guard = {"asked": len(source.fp32_layers), "how": f"kept fp32 in the {source.floats} ONNX"}
    else:
        set_precision_flags(trt, config, precision)
        guard = keep_fp32(trt, network, config, source.fp32_layers)
    inp = network.get_input(0)
    shapes = profile_shapes(tuple(inp.shape), batch, source.entry.path)
    if shapes is not None:
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, *shapes)
        config.add_optimization_profile(profile)
    cache_state = load_timing_cache(config, cache_path)
    engine_path.with_name(LAYER_INFO).unlink(missing_ok=True)  # never list a previous build's layers
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build the {precision} engine from {source.entry.path} (see the messages above); "
                        f"try a larger --workspace")
    write_bytes(engine_path, bytes(serialized))
    cache_state = save_timing_cache(config, cache_path, cache_state)
    shape = [int(d) for d in inp.shape]
    return {"input_shape": [-1 if shape[0] < 0 else shape[0], *shape[1:]], "timing_cache_state": cache_state,
            "fp32_layers": guard,
            "profile": None if shapes is None else {"min": list(shapes[0]), "opt": list(shapes[1]), "max": list(shapes[2])},
            "layers": inspect_layers(trt, serialized, engine_path.with_name(LAYER_INFO))}


def engine_files(root: Path, engine_path: Path) -> list[FileEntry]:
    """The engine, and the inspector's raw layer JSON when the build wrote one."""
    raw = engine_path.with_name(LAYER_INFO)
    return [FileEntry.of(root, p) for p in (engine_path, raw) if p == engine_path or p.is_file()]


def main(args) -> int:
    if getattr(args, "check", False):  # the first-run kit: builds both precisions itself
        from edgepipe.compile.tensorrt_check import main as check_main
        return check_main(args)
    root = Path(args.dir)
    manifest, _ = load_manifest(root)  # signature checked when trusted keys are configured; engines built here
    precision = args.precision
    batch = parse_batch(args.batch)
    if args.workspace <= 0:
        raise UserError(f"--workspace {args.workspace}: give the builder workspace in MB, e.g. 1024")
    name = getattr(args, "variant", None) or variant_name("tensorrt", precision)
    if name != variant_name("tensorrt", precision):
        v = manifest.variants.get(name)
        if not v or v.backend != "tensorrt":
            tensorrt = list(manifest.of_backend("tensorrt"))
            raise UserError(f"--variant {name}: not a TensorRT variant of {root}; TensorRT variants: {', '.join(tensorrt) or 'none'}")
        if v.precision != precision:
            raise UserError(f"--variant {name} is {v.precision}; pass --precision {v.precision}")
    trt, gpu = device_check()
    typing = typing_mode(check_version(trt.__version__), getattr(args, "typing", "auto"))
    source = choose_source(manifest, root, precision, typing, name)
    from edgepipe.runtime.backends.trt import engine_mismatch
    existing = manifest.variants.get(name)
    engine_path = root / name / "model.engine"
    if not args.rebuild and up_to_date(existing, engine_path, engine_mismatch(existing and existing.tensorrt, trt.__version__, gpu),
                                       source, batch, typing):
        print(f"{name}: engine is up to date ({engine_path}); --rebuild forces a new build")
        return 0
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    cache_name = timing_cache_name(trt.__version__, gpu["compute_capability"], gpu["gpu"], gpu.get("multiprocessors"))
    print(f"building {name} ({typing}ly typed, float layers {source.float_precision}) from {source.entry.path} "
          f"(TensorRT {trt.__version__}, {gpu['gpu']}, batch {batch})", flush=True)
    if precision == "int8" and source.float_precision == "fp32":
        print(f"{name}: its strongly typed source has fp32 float parts, so the engine is INT8 + FP32 (slower than "
              f"INT8 + FP16); re-run `edgepipe run` to ship the fp16 QDQ ONNX, or on TensorRT 10.x use --typing weak", flush=True)
    built = build_engine(trt, source, engine_path, precision, args.workspace, batch, root / cache_name)
    manifest, _ = load_manifest(root)  # re-read: keep everything else as it is now
    written = save_built_engine(root, name, engine_variant(
        manifest.variants.get(name), precision=precision, root=root, engine_path=engine_path, source=source,
        built=built, found={"version": trt.__version__, **gpu}, batch=batch, workspace_mb=args.workspace,
        cache_name=cache_name))
    by = built["layers"].get("by_precision") or {}
    print(f"{name}: wrote {engine_path} and its record in {written.relative_to(root)}; layers by precision: "
          + (", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "not reported"), flush=True)
    record = verify_model_dir(root, variants=[name])  # proves the engine on this device against the reference set
    if record["variants"][name]["verdict"] != "pass":
        print(f"{name}: the engine does not match the reference set on this device (see {record.get('path')}); "
              f"it is not served automatically", flush=True)
        return 1
    manifest, _ = load_manifest(root)
    default = verified_default(manifest, "tensorrt", record)  # the serving policy, over what passed here
    if default and manifest.defaults.get("tensorrt") != default:
        set_engine_default(root, default)
    return 0


def engine_variant(record: Variant | None, *, precision: str, root: Path, engine_path: Path, source: Source,
                   built: dict, found: dict, batch, workspace_mb: int, cache_name: str) -> Variant:
    """The manifest entry of a built engine: its files and sidecar (``found``: TensorRT version and GPU), and
    what the pending-build record (or the engine built before) says of its origin, model and reference logits."""
    typing = source.typing
    sources = source_files(record)
    sources.setdefault(typing, dict(entry_record(source.entry), floats=source.floats))
    old = record or Variant("tensorrt", precision, "engine", [], [])
    return Variant(
        backend="tensorrt", precision=precision, format="engine", files=engine_files(root, engine_path),
        input_shape=built["input_shape"], status="ok", made_from=old.made_from, quantization=old.quantization,
        compile=dict(old.compile or {}, source_variant=source.variant), macs=old.macs, model_hash=old.model_hash,
        versions=old.versions, reference_logits=old.reference_logits, source_onnx_sha256=source.entry.sha256,
        tensorrt={**found, "precision": precision, "typing": typing,
                  "float_precision": source.float_precision, "fp32_layers": built["fp32_layers"],
                  "source_onnx": source.entry.path, "source_onnx_sha256": source.entry.sha256, "source_files": sources,
                  "qdq_check_ok": None if source.qdq_check is None else bool(source.qdq_check.ok),
                  "batch": list(batch), "profile": built["profile"], "workspace_mb": workspace_mb,
                  "timing_cache": cache_name, "timing_cache_state": built["timing_cache_state"], "layers": built["layers"]})
