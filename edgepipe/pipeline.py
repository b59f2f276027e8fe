"""`edgepipe run RECIPE --out DIR`: train -> prune -> export -> compile every target -> verify -> measure.

Writes into DIR: the artifacts, manifest.json, report.json, report.md and recipe.resolved.yaml. Every
step is cached by the hash of its inputs (see steps.py), so a re-run with unchanged inputs reuses it and
an interrupted run resumes from the last completed step.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgepipe import UserError
from edgepipe.atomic import write_bytes, write_json, write_text
from edgepipe.recipe import Recipe, dump_recipe
from edgepipe.runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, file_entry, sha256_file
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.steps import OutputLock, StepCache, code_hash, hash_key, relative_files, tool_versions


def log(msg: str) -> None:
    print(msg, flush=True)


def prepare_out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".edgepipe-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out}: {exc.strerror or exc}; choose a writable --out") from None
    return out


def model_hash(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def variant_name(prefix: str, backend: str, precision: str) -> str:
    return f"{prefix}{backend}-{precision}"


# ---------------------------------------------------------------- data

def calibration_images(recipe: Recipe, out: Path) -> list[Path]:
    from edgepipe.runtime.data import list_images
    cfg = recipe.data.calibration
    if cfg.source == "generated":
        from edgepipe.compile.calibration import generate_calibration_images
        paths = sorted(generate_calibration_images(out / "calibration", count=cfg.count).glob("calib_*.jpg"))
    else:
        paths = list_images(cfg.source)
    if cfg.limit:
        paths = paths[:cfg.limit]
    if not paths:
        raise UserError(f"data.calibration.source {cfg.source}: no images found; the int8 targets need calibration images")
    return paths


def load_arrays(paths: list[Path], pre: Preprocess, on_bad: str = "skip") -> tuple[list[np.ndarray], list[str]]:
    """Preprocessed images; unreadable ones are skipped and listed (``on_bad="skip"``) or stop the run."""
    from edgepipe.runtime.evaluate import read_image
    arrays, names, bad = [], [], []
    for p in paths:
        img = read_image(p)
        if img is None:
            bad.append(str(p))
            continue
        arrays.append(pre(img))
        names.append(Path(p).name)
    report_bad_images(bad, len(paths), on_bad)
    return arrays, names


def report_bad_images(bad: list[str], total: int, on_bad: str) -> None:
    if not bad:
        return
    if on_bad == "stop" or len(bad) == total:
        raise UserError(f"{len(bad)} of {total} image(s) cannot be read as images, e.g. {bad[0]}; fix or remove "
                        f"them" + (", or set data.on_bad_image: skip" if on_bad == "stop" else ""))
    log(f"  skipped {len(bad)} unreadable image(s): {', '.join(bad[:20])}" + (" ..." if len(bad) > 20 else ""))


def preflight(recipe: Recipe) -> None:
    """Checks that need no model, so a bad data set fails in a second, before the output folder is touched."""
    from edgepipe.runtime.data import IMAGE_EXTS, list_images
    cfg = recipe.data.calibration
    if recipe.data.parity_images < 1:
        raise UserError(f"data.parity_images is {recipe.data.parity_images}; the parity checks need at least 1 image")
    if cfg.source == "generated" and cfg.count < 1:
        raise UserError(f"data.calibration.count is {cfg.count}; give at least 1 (or a folder of images as source)")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"data.calibration.limit is {cfg.limit}; give at least 1, or leave it out to use every image")
    if cfg.source == "generated" or cfg.source.startswith("fashion-mnist:"):
        return
    paths = list_images(cfg.source)[:cfg.limit]
    if not paths:
        raise UserError(f"data.calibration.source {cfg.source}: no images found (looked for "
                        f"{', '.join(sorted(IMAGE_EXTS))}); the parity checks and int8 targets need calibration images")
    if recipe.data.on_bad_image == "stop":
        from edgepipe.runtime.evaluate import read_image
        report_bad_images([str(p) for p in paths if read_image(p) is None], len(paths), "stop")


def remove_stale_parts(out: Path) -> None:
    """Temporary files of a killed run (atomic writes not yet renamed); never taken as outputs, so drop them."""
    for part in out.rglob(".*.part*"):
        if part.is_file():
            part.unlink()


def data_fingerprint(paths: list[Path]) -> str:
    """Content hash of a set of images (names + bytes), so a moved or copied output folder stays cached."""
    return hash_key([(Path(p).name, sha256_file(p) if Path(p).is_file() else None) for p in paths])


# ---------------------------------------------------------------- compile one target

def accuracy_validation(recipe: Recipe, labels: list[str], pre: Preprocess) -> tuple[list | None, str | None]:
    """Labeled (preprocessed array, class index) items for int8 accuracy control, when stages.quantize.max_drop
    is set: the labeled calibration set if the calibration source has labels (so data.evaluation stays
    held out), else a labeled data.evaluation (then the reported drop is measured on the tuning set)."""
    from edgepipe.runtime.data import load_labeled
    from edgepipe.runtime.evaluate import read_image
    if recipe.stages.quantize.max_drop is None:
        return None, None
    sources = [("calibration", recipe.data.calibration.source, recipe.data.calibration.limit),
               ("evaluation", recipe.data.evaluation, None)]
    for what, source, limit in sources:
        if not source or source == "generated":
            continue
        try:
            items = load_labeled(source, labels)[:limit]
        except UserError:
            continue
        images = [(read_image(p), t) for p, t in items if t >= 0]
        items = [(pre(img), t) for img, t in images if img is not None]
        if items:
            return items, f"{what} ({len(items)} labeled images): {source}"
    log("  stages.quantize.max_drop is set but no labeled calibration/evaluation data is given: plain int8")
    return None, None


def validation_fingerprint(recipe: Recipe) -> list:
    """What accuracy_validation reads, for the compile step's cache key."""
    files = [recipe.data.calibration.source, recipe.data.evaluation]
    return [data_fingerprint([Path(f)]) if f and Path(f).is_file() else f for f in files]


def build_target(target, prefix: str, onnx_path: Path, out: Path, calib: list[np.ndarray], recipe: Recipe,
                 validation_set: Callable[[], tuple]) -> dict:
    """Compile one (backend, precision) from the fp32 ONNX; returns the variant record (without checks).
    ``validation_set()``: accuracy_validation's (items, source), read once per run when an int8 target needs it."""
    name = variant_name(prefix, target.backend, target.precision)
    vdir = out / name
    vdir.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    if target.backend == "openvino":
        from edgepipe.compile import openvino_ir
        xml = vdir / "model.xml"
        if target.precision == "int8":
            validation, vsource = validation_set()
            files, info = openvino_ir.quantize_int8(onnx_path, xml, calib, validation=validation,
                                                    max_drop=recipe.stages.quantize.max_drop,
                                                    fast_bias_correction=recipe.stages.quantize.fast_bias_correction,
                                                    mixed_precision=recipe.stages.quantize.mixed_precision)
            info["validation"] = vsource
        else:
            files = openvino_ir.convert(onnx_path, xml, target.precision)
        fmt = "ir"
    elif target.backend == "onnxruntime":
        dst = vdir / "model.onnx"
        if target.precision == "fp32":
            write_bytes(dst, onnx_path.read_bytes())
        elif target.precision == "int8":
            from edgepipe.compile.qdq import quantize_qdq
            validation, vsource = validation_set()
            info = quantize_qdq(onnx_path, dst, calib, recipe.stages.quantize, validation=validation,
                                max_drop=recipe.stages.quantize.max_drop)
            info["validation"] = vsource
        else:
            raise UserError(f"target onnxruntime/{target.precision}: ONNX Runtime variants are fp32 or int8 (QDQ)")
        files, fmt = [dst], "onnx"
    else:  # tensorrt: engines are built on the device (`edgepipe build-engine`); ship the source ONNX
        src = out / f"{prefix}onnxruntime-int8" / "model.onnx" if target.precision == "int8" else onnx_path
        if not src.is_file():
            raise UserError("target tensorrt/int8 needs the QDQ ONNX; add a target {backend: onnxruntime, precision: int8} before it")
        files, fmt = [src], "onnx"
        info = {"engine": "build on the device with `edgepipe build-engine DIR --precision " + target.precision + "`"}
    return {"backend": target.backend, "precision": target.precision, "format": "engine" if target.backend == "tensorrt" else fmt,
            "files": relative_files(out, files), "compile": info,
            "status": "pending-build" if target.backend == "tensorrt" else "ok"}


def export_parity(onnx_path: Path, onnx_sha: str, ref_logits, parity_batch, parity_names, compare) -> dict:
    """The exported fp32 ONNX (ONNX Runtime, CPU) against PyTorch on the parity images."""
    from edgepipe.compile.qdq import run_logits
    parity = compare(ref_logits, run_logits(onnx_path, parity_batch), parity_names, "fp32")
    log(f"  PyTorch -> ONNX parity: max abs {parity['max_abs']:.2e}, top-1 agreement {parity['top1_agreement']:.3f}"
        + ("" if parity["ok"] else "  OUT OF TOLERANCE"))
    return {"sha256": onnx_sha, "parity_vs_pytorch": parity}


# ---------------------------------------------------------------- run

def run(recipe: Recipe, out_dir: str | os.PathLike) -> dict:
    preflight(recipe)
    out = prepare_out_dir(Path(out_dir))
    with OutputLock(out):
        remove_stale_parts(out)
        return _run_locked(recipe, out)


def _run_locked(recipe: Recipe, out: Path) -> dict:
    import torch

    from edgepipe.compile.export import export_onnx
    from edgepipe.compile.parity import compare
    from edgepipe.train.models import build_model, count_macs

    t_start = time.perf_counter()
    write_text(out / "recipe.resolved.yaml", dump_recipe(recipe))
    versions = tool_versions()
    versions["edgepipe_code"] = code_hash()
    cache = StepCache(out, log)
    torch.manual_seed(0)

    log(f"[1/5] model {recipe.model.name}")
    spec = build_model(recipe.model.name, pretrained=recipe.model.pretrained, num_classes=recipe.model.num_classes,
                       checkpoint=recipe.model.checkpoint)
    models = {"": spec}
    if recipe.stages.train.enabled:
        from edgepipe.train.stage import train_stage
        spec = train_stage(spec, recipe, out, cache)
        models = {"": spec}
    if recipe.stages.prune.enabled:
        from edgepipe.train.stage import prune_stage
        models["pruned-"] = prune_stage(spec, recipe, out, cache)
    pre = Preprocess.from_manifest(spec.preprocess)
    if recipe.model.input_size and recipe.model.input_size != pre.crop:  # deploy at another size than trained
        from edgepipe.train.stage import preprocess_at
        pre = Preprocess.from_manifest(preprocess_at(spec.preprocess, recipe.model.input_size, recipe.data.train))

    log("[2/5] data")
    from edgepipe.train.data import materialize_data_refs
    materialize_data_refs(recipe, out)  # "fashion-mnist:test[:N]" -> PNG files + labels.csv under out/data
    calib_paths = calibration_images(recipe, out)
    calib, _ = load_arrays(calib_paths, pre, recipe.data.on_bad_image)
    eval_items = None
    if recipe.data.evaluation:
        from edgepipe.runtime.data import load_items
        eval_items, _ = load_items(recipe.data.evaluation, spec.labels)  # unlabeled: agreement only
    parity_paths = [p for p, _ in eval_items][:recipe.data.parity_images] if eval_items else calib_paths[:recipe.data.parity_images]
    if eval_items and recipe.data.on_bad_image == "stop":
        from edgepipe.runtime.evaluate import read_image
        report_bad_images([str(p) for p, _ in eval_items if read_image(p) is None], len(eval_items), "stop")
    parity_arrays, parity_names = load_arrays(parity_paths, pre, recipe.data.on_bad_image)
    parity_batch = np.concatenate(parity_arrays)
    log(f"  calibration: {len(calib)} images; parity: {len(parity_names)} images"
        + (f"; evaluation: {len(eval_items)} images" if eval_items else ""))

    variants: dict[str, dict] = {}
    references: dict[str, dict] = {}
    exports: dict[str, dict] = {}
    # content hashes of the data sets, for the step keys: once per run, not once per target or variant
    calib_fp, validation_fp = data_fingerprint(calib_paths), validation_fingerprint(recipe)
    eval_fp = data_fingerprint([p for p, _ in eval_items]) if eval_items else None
    # the labeled accuracy-control set is the same for every int8 target (labels and preprocessing are shared)
    validation_set = functools.cache(lambda: accuracy_validation(recipe, spec.labels, pre))
    log("[3/5] export + compile")
    for prefix, mspec in models.items():
        model = mspec.model.eval()
        mhash = model_hash(model)
        onnx_path = out / f"{prefix}model.onnx"
        metadata = {"labels": mspec.labels, "preprocess": pre.to_dict(), "producer": "edgepipe"}
        cache.run(f"{prefix}export-onnx", hash_key(mhash, recipe.export.model_dump(), pre.to_dict(), versions),
                  lambda: {"onnx": str(export_onnx(model, onnx_path, pre.crop, recipe.export.opset,
                                                   recipe.export.dynamic_batch, recipe.export.simplify, metadata))},
                  files=lambda r: [onnx_path])
        with torch.no_grad():
            ref_logits = model(torch.from_numpy(parity_batch)).numpy()
        references[prefix] = {"logits": ref_logits, "macs": count_macs(model, (1, 3, pre.crop, pre.crop)),
                              "model": model, "model_hash": mhash}
        onnx_sha = file_entry(out, onnx_path)["sha256"]
        exports[f"{prefix}model.onnx"] = export_parity(onnx_path, onnx_sha, ref_logits, parity_batch, parity_names, compare)
        for target in recipe.targets:
            if target.pruned is not None and target.pruned != bool(prefix):
                continue
            if target.precision == "int8" and recipe.stages.quantize.method == "qat":
                continue  # only the "-int8-qat" variants (below)
            name = variant_name(prefix, target.backend, target.precision)
            key = hash_key(onnx_sha, target.model_dump(), recipe.stages.quantize.model_dump(),
                           calib_fp, versions, validation_fp)
            rec = cache.run(f"compile-{name}", key, lambda: build_target(target, prefix, onnx_path, out, calib, recipe, validation_set),
                            files=lambda r: [out / f for f in r["files"]])
            variants[name] = dict(rec, source_onnx_sha256=onnx_sha, model_hash=mhash, macs=references[prefix]["macs"])
        if recipe.stages.quantize.enabled and recipe.stages.quantize.method in ("qat", "both"):
            from edgepipe.train.stage import qat_variants
            qat, qat_logits = qat_variants(mspec, prefix, recipe, out, cache, parity_batch)
            for name, rec in qat.items():
                variants[name] = dict(rec, model_hash=mhash, macs=references[prefix]["macs"])
                references[name] = {"logits": qat_logits}  # parity of a QAT variant: against the QAT model

    manifest = _manifest(recipe, spec, pre, variants, versions, out)
    manifest["export"] = exports  # PyTorch -> fp32 ONNX parity, per exported model
    if "pruned-" in models:  # MACs / latency / accuracy before and after pruning, for the report
        manifest["model"]["pruned"] = models["pruned-"].source.get("pruned")
    # Provisional manifest: lets the checks below load each variant through the real runtime. Its variants
    # are "unverified", so a run killed before the end never leaves a manifest that `--backend auto` serves.
    provisional = json.loads(json.dumps(manifest))
    for v in provisional["variants"].values():
        v["status"] = "unverified" if v["status"] == "ok" else v["status"]
    write_json(out / MANIFEST_NAME, provisional)

    log("[4/5] parity + accuracy + latency per variant")
    from edgepipe.benchmarks.measure import measure_variant, measure_torch
    torch_ref = measure_torch(references[""]["model"], pre, eval_items, recipe)
    for name, v in variants.items():
        prefix = "pruned-" if name.startswith("pruned-") else ""
        if v["status"] != "ok":
            continue
        key = hash_key([f["sha256"] for f in manifest["variants"][name]["files"]], recipe.data.evaluation,
                       eval_fp, recipe.bench.model_dump(), parity_names, versions)

        def check(name=name, v=v, prefix=prefix):
            return measure_variant(out, name, parity_batch, parity_names, references.get(name, references[prefix])["logits"],
                                   v["precision"], eval_items, recipe, compare)
        result = cache.run(f"measure-{name}", key, check)
        manifest["variants"][name].update(result)
        if not result["parity"]["ok"]:
            manifest["variants"][name]["status"] = "failed"
            log(f"  {name}: parity out of tolerance -> marked failed")

    log("[5/5] report")
    from edgepipe.benchmarks.report import choose_defaults, write_reports
    choose_defaults(manifest, torch_ref)
    write_json(out / MANIFEST_NAME, manifest)
    report = write_reports(out, recipe, manifest, torch_ref)
    log(f"done in {time.perf_counter() - t_start:.0f}s: {len(cache.ran)} step(s) run, {len(cache.reused)} reused")
    return report


def _manifest(recipe: Recipe, spec, pre: Preprocess, variants: dict, versions: dict, out: Path) -> dict:
    entries = {}
    for name, v in variants.items():
        entries[name] = {
            "backend": v["backend"], "precision": v["precision"], "format": v["format"],
            "files": [file_entry(out, out / f) for f in v["files"]],
            "input_shape": [-1 if recipe.export.dynamic_batch else 1, 3, pre.crop, pre.crop],
            "status": v["status"], "compile": v.get("compile", {}), "macs": v.get("macs"),
            "source_onnx_sha256": v["source_onnx_sha256"], "model_hash": v["model_hash"], "versions": versions,
        }
    return {
        "format_version": FORMAT_VERSION,
        "model": {"name": spec.name, "num_classes": len(spec.labels), "source": spec.source, "recipe": recipe.name},
        "preprocess": pre.to_dict(),
        "labels": spec.labels,
        "input": {"name": "input", "shape": [-1 if recipe.export.dynamic_batch else 1, 3, pre.crop, pre.crop], "dtype": "float32"},
        "output": {"name": "logits", "kind": "logits"},
        "versions": versions,
        "variants": entries,
    }
