"""`edgepipe build-engine DIR --precision fp16|int8 [--workspace MB] [--batch MIN,OPT,MAX] [--rebuild]`

Run on the Jetson / GPU host. Builds a TensorRT (>= 10) engine from the artifact folder's fp32 ONNX (fp16)
or its QDQ ONNX (int8, explicit quantization: no calibrator), with an optimization profile over the batch
and a timing cache kept next to the engine (later builds are faster). The engine and its sidecar (TensorRT
version, GPU, compute capability, precision, source ONNX sha256) go into manifest.json, written atomically.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from edgepipe import UserError
from edgepipe.atomic import write_bytes, write_json
from edgepipe.runtime.backends.base import INSTALL_HINT
from edgepipe.runtime.errors import BackendUnavailable
from edgepipe.runtime.manifest import MANIFEST_NAME, file_entry, load_manifest, verify_files

# the ONNX each precision is built from, in order of preference
SOURCES = {"fp16": ("tensorrt-fp16", "onnxruntime-fp32"), "int8": ("tensorrt-int8", "onnxruntime-int8")}
TIMING_CACHE = "tensorrt-timing.cache"


def parse_batch(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise UserError(f"--batch {text!r}: give MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, e.g. 1,1,8")
    return values


def source_onnx(manifest: dict, root: Path, precision: str) -> tuple[str, Path, dict, str]:
    """(source variant name, ONNX path, its manifest record, the ONNX's sha256), hash-checked."""
    for name in SOURCES[precision]:
        v = manifest["variants"].get(name)
        onnx_files = [f for f in (v or {}).get("files", []) if f["path"].endswith(".onnx")]
        if onnx_files:  # a pending-build tensorrt record or the ONNX Runtime variant
            path = verify_files(root, dict(v, files=onnx_files), name)[0]
            return name, path, v, onnx_files[0]["sha256"]  # verify_files just checked the file against it
    hint = "add a target {backend: onnxruntime, precision: int8} (the QDQ ONNX)" if precision == "int8" else \
        "add a target {backend: onnxruntime, precision: fp32}"
    raise UserError(f"{root}: no ONNX to build a {precision} engine from; {hint} to the recipe and re-run `edgepipe run`")


def import_tensorrt():
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable(f"TensorRT is not installed: {INSTALL_HINT['tensorrt']}")
    import tensorrt as trt
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old; edgepipe needs TensorRT 10 or newer (JetPack 6.1+)")
    return trt


def build_engine(trt, onnx_path: Path, engine_path: Path, precision: str, workspace_mb: int,
                 batch: tuple[int, int, int], cache_path: Path) -> dict:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path.name}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.set_flag(trt.BuilderFlag.FP16)  # fp16 engine; for int8 the layers left in float run in fp16
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization from the Q/DQ nodes: no calibrator
    inp = network.get_input(0)
    shape = tuple(inp.shape)
    if shape[0] == -1:
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (batch[0], *shape[1:]), (batch[1], *shape[1:]), (batch[2], *shape[1:]))
        config.add_optimization_profile(profile)
    elif batch != (shape[0],) * 3:
        raise UserError(f"{onnx_path.name} has a static batch of {shape[0]}; use --batch {shape[0]},{shape[0]},{shape[0]} "
                        f"or export with export.dynamic_batch: true")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build the {precision} engine from {onnx_path.name} (see the messages above); "
                        f"try a larger --workspace")
    write_bytes(engine_path, bytes(serialized))
    write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return {"input_shape": [-1 if shape[0] == -1 else shape[0], *shape[1:]]}


def main(args) -> int:
    root = Path(args.dir)
    manifest = load_manifest(root)
    precision = args.precision
    batch = parse_batch(args.batch)
    if args.workspace <= 0:
        raise UserError(f"--workspace {args.workspace}: give the builder workspace in MB, e.g. 1024")
    src_name, onnx_path, src, src_sha = source_onnx(manifest, root, precision)
    trt = import_tensorrt()
    from edgepipe.runtime.backends.trt import engine_mismatch, gpu_info
    gpu = gpu_info()
    name = f"tensorrt-{precision}"
    existing = manifest["variants"].get(name, {})
    engine_path = root / name / "model.engine"
    if (not args.rebuild and existing.get("format") == "engine" and existing.get("status") == "ok" and engine_path.is_file()
            and engine_mismatch(existing.get("tensorrt"), trt.__version__, gpu) is None
            and existing["tensorrt"].get("source_onnx_sha256") == src_sha and existing["tensorrt"].get("batch") == list(batch)):
        print(f"{name}: engine is up to date ({engine_path}); --rebuild forces a new build")
        return 0
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"building {name} from {onnx_path.relative_to(root)} (TensorRT {trt.__version__}, {gpu['gpu']}, batch {batch})", flush=True)
    built = build_engine(trt, onnx_path, engine_path, precision, args.workspace, batch, root / TIMING_CACHE)
    manifest = load_manifest(root)  # re-read: keep everything else as it is now
    manifest["variants"][name] = {
        "backend": "tensorrt", "precision": precision, "format": "engine",
        "files": [file_entry(root, engine_path)], "input_shape": built["input_shape"], "status": "ok",
        "source_onnx_sha256": src_sha, "compile": dict(src.get("compile", {}), source_variant=src_name),
        "tensorrt": {"version": trt.__version__, **gpu, "precision": precision, "source_onnx": onnx_path.relative_to(root).as_posix(),
                     "source_onnx_sha256": src_sha, "batch": list(batch), "workspace_mb": args.workspace,
                     "timing_cache": TIMING_CACHE},
        "note": "not measured at build time: measure the engine with `edgepipe bench DIR` on this device",
    }
    manifest.setdefault("defaults", {})["tensorrt"] = name
    write_json(root / MANIFEST_NAME, manifest)
    print(f"{name}: wrote {engine_path} and its manifest entry")
    return 0
