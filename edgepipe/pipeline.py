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
    """A progress line; -q / EDGEPIPE_LOG=warning silence it."""
    from edgepipe.log import progress
    progress(msg)


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

def load_crops(paths: list[Path], pre: Preprocess, on_bad: str = "skip") -> tuple[np.ndarray, list[str]]:
    """Resized and cropped uint8 images (N, crop, crop, 3), see Preprocess.crops; unreadable ones are skipped
    and listed (``on_bad="skip"``) or stop the run."""
    from edgepipe.runtime.evaluate import read_image
    images, names, bad = [], [], []
    for p in paths:
        img = read_image(p)
        if img is None:
            bad.append(str(p))
            continue
        images.append(img)
        names.append(Path(p).name)
    report_bad_images(bad, len(paths), on_bad)
    return pre.crops(images), names


def load_arrays(paths: list[Path], pre: Preprocess, on_bad: str = "skip") -> tuple[list[np.ndarray], list[str]]:
    """Preprocessed (1, 3, H, W) images; unreadable ones are skipped and listed (``on_bad="skip"``) or stop the run."""
    crops, names = load_crops(paths, pre, on_bad)
    batch = pre.normalize(crops)
    return [batch[i:i + 1] for i in range(len(batch))], names


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

def control_kind(what: str | None) -> str:
    """The quantizers' name for what control_set's items are scored by."""
    return "labels" if what and what.startswith("labels") else "fp32 agreement"


def control_set(plan, pre: Preprocess, fp32_onnx_path: Path, quantize) -> tuple[list | None, str | None, float | None]:
    """(items, what they are, max_drop in top-1 points) that steer int8 accuracy control, when
    stages.quantize.max_drop or min_agreement is set; (None, None, None) otherwise. Items are held-out
    (preprocessed array, class index) pairs, never a calibration image (data_plan.py): scored by their labels
    when max_drop is set and all have one, else by the fp32 model's own top-1 -- agreement with fp32, whose
    'accuracy' on its own predictions is 100%, so min_agreement a becomes a drop of 100 x (1 - a) points."""
    if quantize.max_drop is None and quantize.min_agreement is None:
        return None, None, None
    arrays, _ = load_arrays([p for p, _ in plan.control], pre)
    targets = [t for _, t in plan.control]
    what = f"{len(arrays)} held-out images ({plan.heldout_source})"
    if quantize.max_drop is not None and len(targets) == len(arrays) and all(t >= 0 for t in targets):
        return list(zip(arrays, targets)), f"labels of {what}", quantize.max_drop
    from edgepipe.compile.qdq import run_logits
    own = run_logits(fp32_onnx_path, np.concatenate(arrays)).argmax(1)
    min_agreement = quantize.min_agreement if quantize.min_agreement is not None else 1.0 - quantize.max_drop / 100.0
    return list(zip(arrays, (int(t) for t in own))), f"agreement with fp32 on {what}", round(100.0 * (1.0 - min_agreement), 6)


def build_target(target, prefix: str, onnx_path: Path, out: Path, calib: list[np.ndarray], recipe: Recipe,
                 validation_set: Callable[[], tuple]) -> dict:
    """Compile one (backend, precision) from the fp32 ONNX; returns the variant record (without checks).
    ``validation_set()``: (items, what they are, max_drop in points) for accuracy control, read once per
    model when an int8 target needs it (see control_set)."""
    name = variant_name(prefix, target.backend, target.precision)
    vdir = out / name
    vdir.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    if target.backend == "openvino":
        from edgepipe.compile import openvino_ir
        xml = vdir / "model.xml"
        if target.precision == "int8":
            validation, vsource, vdrop = validation_set()
            files, info = openvino_ir.quantize_int8(onnx_path, xml, calib, validation=validation,
                                                    max_drop=vdrop,
                                                    fast_bias_correction=recipe.stages.quantize.fast_bias_correction,
                                                    mixed_precision=recipe.stages.quantize.mixed_precision,
                                                    isa=recipe.stages.quantize.isa, validation_kind=control_kind(vsource))
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
            validation, vsource, vdrop = validation_set()
            info = quantize_qdq(onnx_path, dst, calib, recipe.stages.quantize, validation=validation,
                                max_drop=vdrop, validation_kind=control_kind(vsource))
            info["validation"] = vsource
        else:
            raise UserError(f"target onnxruntime/{target.precision}: ONNX Runtime variants are fp32 or int8 (QDQ)")
        files, fmt = [dst], "onnx"
    else:  # tensorrt: engines are built on the device (`edgepipe build-engine`); ship the source ONNX(es)
        from edgepipe.compile import tensorrt_sources
        if target.precision == "int8":  # its own s8s8 QDQ ONNX, whatever the onnxruntime int8 target's mode
            validation, vsource, vdrop = validation_set()
            files = [vdir / "model.onnx"]
            info = dict(tensorrt_sources.int8_source(onnx_path, files[0], calib, recipe.stages.quantize,
                                                     validation=validation, max_drop=vdrop), validation=vsource)
            sources = {"weak": files[0], "strong": files[0]}
        elif target.precision == "fp16":  # fp32 ONNX for weak typing, fp16 ONNX for strong typing
            files = [onnx_path, vdir / "model.fp16.onnx"]
            info = {"fp16_onnx": tensorrt_sources.fp16_source(onnx_path, files[1], calib)}
            sources = {"weak": files[0], "strong": files[1]}
        else:
            raise UserError(f"target tensorrt/{target.precision}: TensorRT engines are fp16 or int8")
        fmt = "onnx"
        info.update(sources={k: v.relative_to(out).as_posix() for k, v in sources.items()},
                    engine=f"build on the device with `edgepipe build-engine DIR --precision {target.precision}`")
    return {"backend": target.backend, "precision": target.precision, "format": "engine" if target.backend == "tensorrt" else fmt,
            "files": relative_files(out, files), "compile": info,
            "status": "pending-build" if target.backend == "tensorrt" else "ok"}


def export_parity(onnx_path: Path, onnx_sha: str, ref_logits, parity_batch, parity_names, compare,
                  reference: str = "PyTorch") -> dict:
    """The exported fp32 ONNX (ONNX Runtime, CPU) against its reference (PyTorch, or the source ONNX) on the parity images."""
    from edgepipe.compile.qdq import run_logits
    parity = compare(ref_logits, run_logits(onnx_path, parity_batch), parity_names, "fp32")
    log(f"  {reference} -> ONNX parity: max abs {parity['max_abs']:.2e}, top-1 agreement {parity['top1_agreement']:.3f}"
        + ("" if parity["ok"] else "  OUT OF TOLERANCE"))
    return {"sha256": onnx_sha, "parity_vs_pytorch": parity}


def load_model_source(recipe: Recipe):
    """The recipe's model: an OnnxSource (model.onnx) or a PyTorch ModelSpec, labels and preprocessing resolved.
    Whatever cannot work (weights offline, labels that do not fit) fails here, before the output folder exists."""
    if recipe.model.onnx:
        from edgepipe.compile.onnx_source import load_onnx_source, refuse_torch_stages
        refuse_torch_stages(recipe)
        return load_onnx_source(recipe.model)
    import torch

    from edgepipe.train.models import build_from_config
    torch.manual_seed(0)  # random init (pretrained: false) is the same on every run, so steps stay cached
    return build_from_config(recipe.model)


def fp32_onnx(mspec, prefix: str, out: Path, pre: Preprocess, recipe: Recipe, cache: StepCache, versions: dict,
              parity_batch: np.ndarray) -> tuple[Path, dict]:
    """The fp32 ONNX every variant is compiled from (exported from PyTorch, or the user's ONNX file checked and
    copied) and its reference: logits on the parity images, MACs, model hash (and the PyTorch model, if any)."""
    from edgepipe.compile.onnx_source import OnnxSource
    onnx_path = out / f"{prefix}model.onnx"
    metadata = {"labels": mspec.labels, "preprocess": pre.to_dict(), "producer": "edgepipe"}
    if isinstance(mspec, OnnxSource):  # no PyTorch: the source file run in ONNX Runtime is the reference
        mhash = mspec.source["sha256"]
        cache.run(f"{prefix}import-onnx", hash_key(mhash, metadata, versions),
                  lambda: {"onnx": str(mspec.write_fp32(onnx_path, metadata))}, files=lambda r: [onnx_path])
        return onnx_path, {"logits": mspec.logits(parity_batch), "macs": mspec.macs(), "model": None, "model_hash": mhash}
    import torch

    from edgepipe.compile.export import export_onnx
    from edgepipe.train.models import count_macs
    model = mspec.model.eval()
    mhash = model_hash(model)
    cache.run(f"{prefix}export-onnx", hash_key(mhash, recipe.export.model_dump(), pre.to_dict(), versions),
              lambda: {"onnx": str(export_onnx(model, onnx_path, pre.crop, recipe.export.opset,
                                               recipe.export.dynamic_batch, recipe.export.simplify, metadata))},
              files=lambda r: [onnx_path])
    with torch.no_grad():
        ref_logits = model(torch.from_numpy(parity_batch)).numpy()
    return onnx_path, {"logits": ref_logits, "macs": count_macs(model, (1, 3, pre.crop, pre.crop)),
                       "model": model, "model_hash": mhash}


# ---------------------------------------------------------------- run

def run(recipe: Recipe, out_dir: str | os.PathLike) -> dict:
    preflight(recipe)
    spec = load_model_source(recipe)
    if not getattr(spec, "dynamic_batch", True):  # an ONNX file whose batch is fixed at 1
        recipe = recipe.model_copy(deep=True)
        recipe.export.dynamic_batch = False
    out = prepare_out_dir(Path(out_dir))
    with OutputLock(out):
        remove_stale_parts(out)
        return _run_locked(recipe, out, spec)


def _run_locked(recipe: Recipe, out: Path, spec) -> dict:
    import torch

    from edgepipe.compile import parity

    t_start = time.perf_counter()
    write_text(out / "recipe.resolved.yaml", dump_recipe(recipe))
    versions = tool_versions()
    versions["edgepipe_code"] = code_hash()
    cache = StepCache(out, log)
    torch.manual_seed(0)

    log(f"[1/5] model {spec.name}")
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
    eval_items = None
    if recipe.data.evaluation:
        from edgepipe.runtime.data import load_items
        eval_items, _ = load_items(recipe.data.evaluation, spec.labels)  # unlabeled: agreement only
    if eval_items and recipe.data.on_bad_image == "stop":
        from edgepipe.runtime.evaluate import read_image
        report_bad_images([str(p) for p, _ in eval_items if read_image(p) is None], len(eval_items), "stop")
    from edgepipe.data_plan import plan_data
    plan = plan_data(recipe, out, spec.labels, eval_items)
    calib_paths = plan.calibration
    calib, _ = load_arrays(calib_paths, pre, recipe.data.on_bad_image)
    check_crops, parity_names = load_crops(plan.check, pre, recipe.data.on_bad_image)
    parity_batch = pre.normalize(check_crops)  # the crops themselves travel as the reference set
    log("  " + plan.describe() + (f"; evaluation: {len(eval_items)} images" if eval_items else ""))
    compare = functools.partial(parity.compare, kind=plan.kind)  # the bounds depend on the kind of image

    variants: dict[str, dict] = {}
    references: dict[str, dict] = {}
    exports: dict[str, dict] = {}
    # content hashes of the data sets, for the step keys: once per run, not once per target or variant
    calib_fp = data_fingerprint(calib_paths)
    validation_fp = hash_key(data_fingerprint([p for p, _ in plan.control]), [t for _, t in plan.control])
    eval_fp = data_fingerprint([p for p, _ in eval_items]) if eval_items else None
    log("[3/5] export + compile")
    for prefix, mspec in models.items():
        onnx_path, references[prefix] = fp32_onnx(mspec, prefix, out, pre, recipe, cache, versions, parity_batch)
        mhash, ref_logits = references[prefix]["model_hash"], references[prefix]["logits"]
        onnx_sha = file_entry(out, onnx_path)["sha256"]
        exports[f"{prefix}model.onnx"] = export_parity(onnx_path, onnx_sha, ref_logits, parity_batch, parity_names, compare,
                                                       "PyTorch" if references[prefix]["model"] is not None else "source ONNX")
        # accuracy-control items: once per model, and only when an int8 target is compiled (not when reused)
        control = functools.cache(lambda onnx_path=onnx_path: control_set(plan, pre, onnx_path, recipe.stages.quantize))
        for target in recipe.targets:
            if target.pruned is not None and target.pruned != bool(prefix):
                continue
            if target.precision == "int8" and recipe.stages.quantize.method == "qat":
                continue  # only the "-int8-qat" variants (below)
            name = variant_name(prefix, target.backend, target.precision)
            key = hash_key(onnx_sha, target.model_dump(exclude={"device"}), recipe.stages.quantize.model_dump(),
                           calib_fp, versions, validation_fp)   # the device does not change the compiled files
            rec = cache.run(f"compile-{name}", key, lambda: build_target(target, prefix, onnx_path, out, calib, recipe, control),
                            files=lambda r: [out / f for f in r["files"]])
            variants[name] = dict(rec, source_onnx_sha256=onnx_sha, model_hash=mhash, macs=references[prefix]["macs"])
            if target.device:  # OpenVINO device the runtime uses unless --device says otherwise
                variants[name]["device"] = target.device
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
    if references[""]["model"] is not None:
        torch_ref = measure_torch(references[""]["model"], pre, eval_items, recipe)
    else:  # an ONNX source: the reference is the user's file in ONNX Runtime
        from edgepipe.benchmarks.measure import measure_source_onnx
        torch_ref = measure_source_onnx(spec, pre, eval_items, recipe)
    reference_count = max(1, min(recipe.data.reference_images, len(parity_names)))  # the first checked images
    for name, v in variants.items():
        if v["status"] != "ok":
            continue
        key = hash_key([f["sha256"] for f in manifest["variants"][name]["files"]], recipe.data.evaluation,
                       eval_fp, recipe.bench.model_dump(), parity_names, reference_count, versions)

        def check(name=name, v=v):
            return measure_variant(out, name, parity_batch, parity_names, references[_reference_key(name, references)]["logits"],
                                   v["precision"], eval_items, recipe, compare, reference_count)
        result = cache.run(f"measure-{name}", key, check)
        manifest["variants"][name].update(result)
        if not result["parity"]["ok"]:
            manifest["variants"][name]["status"] = "failed"
            log(f"  {name}: parity out of tolerance -> marked failed")

    log("[5/5] report")
    from edgepipe.benchmarks.report import write_reports
    from edgepipe.runtime.serving import choose_defaults
    manifest["reference_set"] = write_reference_set(out, plan.kind, check_crops, parity_names, references, variants,
                                                    reference_count)
    for name, v in manifest["variants"].items():
        v["reference_logits"] = _reference_key(name, references)
    manifest["checks"] = {"images": plan.kind, "check_images": len(parity_names), "heldout_source": plan.heldout_source,
                          "calibration_images": len(calib_paths), "control_images": len(plan.control),
                          "control_overlaps_check": plan.control_overlaps_check}
    for v in manifest["variants"].values():
        v["agreement_with_torch"] = agreement_with_reference(v, torch_ref.get("predictions") or {})
    over = budget_failures(manifest, recipe, torch_ref)
    for name, why in over.items():
        log(f"  {name}: outside the recipe's budgets ({why}) -> not served")
        manifest["variants"][name]["budget"] = why
    choose_defaults(manifest, (torch_ref.get("accuracy") or {}).get("top1"), recipe.stages.quantize.max_drop,
                    eligible=lambda name, v: name not in over)
    manifest["reference"] = {"torch_eager_ms": torch_ref["latency_ms"], "accuracy": torch_ref.get("accuracy")}
    write_json(out / MANIFEST_NAME, manifest)
    report = write_reports(out, recipe, manifest, torch_ref)
    log(f"done in {time.perf_counter() - t_start:.0f}s: {len(cache.ran)} step(s) run, {len(cache.reused)} reused")
    return report


def write_reference_set(out: Path, kind: str, crops: np.ndarray, names: list[str], references: dict, variants: dict,
                        count: int) -> dict:
    """The first ``count`` checked (held-out) images as uint8 crops, with the fp32 logits each variant is
    compared with (the unpruned model, the pruned one, a QAT model), for `edgepipe verify` on the device."""
    ref_dir = out / "reference"
    ref_dir.mkdir(exist_ok=True)

    def save(path: Path, array: np.ndarray) -> dict:
        import io
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        write_bytes(path, buf.getvalue())
        return file_entry(out, path)

    logits = {}
    for key in sorted({_reference_key(name, references) for name in variants}):
        logits[key] = save(ref_dir / f"{key or 'model'}-logits.npy", references[key]["logits"][:count].astype(np.float32))
    return {"inputs": save(ref_dir / "inputs.npy", crops[:count]), "logits": logits, "names": names[:count],
            "images": kind, "count": count, "layout": "NHWC uint8, resized and cropped, model colour order"}


def _reference_key(name: str, references: dict) -> str:
    """Which fp32 logits a variant is checked against: its own model's (QAT), else the pruned or unpruned one."""
    return name if name in references else ("pruned-" if name.startswith("pruned-") else "")


def agreement_with_reference(v: dict, reference_predictions: dict) -> float | None:
    from edgepipe.benchmarks.report import top1_agreement
    agreement = top1_agreement(v.get("predictions") or {}, reference_predictions)
    return agreement if agreement is not None else (v.get("parity") or {}).get("top1_agreement")


def budget_failures(manifest: dict, recipe: Recipe, torch_ref: dict) -> dict[str, str]:
    """Variants that break a budget of the recipe that `edgepipe run` can judge (agreement, top-1, drop, p90),
    by the rules `edgepipe bench` applies; throughput, per-class and ratio budgets are judged by bench."""
    from edgepipe.benchmarks import budgets
    ref_top1 = (torch_ref.get("accuracy") or {}).get("top1")
    failures = {}
    for name, v in manifest["variants"].items():
        if v.get("status") != "ok":
            continue
        top1 = (v.get("accuracy") or {}).get("top1")
        row = {"name": name, "backend": v["backend"], "top1": top1, "agreement_with_fp32": v.get("agreement_with_torch"),
               "top1_drop_pts": (ref_top1 - top1) * 100 if top1 is not None and ref_top1 is not None else None,
               "p90_ms": (v.get("latency_ms") or {}).get("p90")}
        for b in (b for b in recipe.budgets if budgets.matches(b, row)):
            for check in budgets.checks_of(b):
                field, kind, _ = budgets.CHECKS[check]
                if row.get(field) is not None and budgets.point_check(row[field], getattr(b, check), kind, None)["verdict"] == "fail":
                    failures[name] = f"{check} {getattr(b, check)}, measured {row[field]:.4g}"
    return failures


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
