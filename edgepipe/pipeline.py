"""`edgepipe run RECIPE --out DIR`: model -> data -> export + compile -> measure -> report.

Each stage is a function over a frozen RunContext (the resolved recipe, written to DIR/recipe.resolved.yaml
before the first stage and never changed, the output folder, the step cache, the tool versions):

    models_stage     train / prune (train/stage.py): the models variants are compiled from ("base", "pruned")
    prepare_data     every image the run uses, decoded once (run_data.py)
    compile_stage    fp32 ONNX per model, then every recipe target through the registry (compile/targets)
    measure_stage    parity, accuracy and latency of every variant through the runtime
    report_stage     reference set, budgets, serving choice (runtime/serving.py), manifest.json, report.json/md

Each stage returns what it made (Models, RunData, Compiled, Measured, Served) and changes nothing another stage
made; one function, assemble_manifest, puts them together into the Manifest (the provisional one written after
compiling, and the final one).

Every step is cached by the hash of its inputs (steps.py), so a re-run with unchanged inputs reuses it and an
interrupted run resumes from the last completed step.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe.atomic import write_bytes, write_text
from edgepipe.compile import targets
from edgepipe.recipe import Recipe, dump_recipe
from edgepipe.run_data import RunData, accuracy_control, prepare_data, preflight
from edgepipe.runtime.integrity import FileEntry, sha256_file
from edgepipe.runtime.manifest import (FORMAT_VERSION, Manifest, ModelInfo, ReferenceSet, Variant, exported_onnx,
                                      name_prefix, variant_name)
from edgepipe.runtime.measured import CheckImages, Pruning, ReferenceRun, Row
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.steps import OutputLock, StepCache, code_hash, hash_key, prepare_out_dir, remove_stale_parts, tool_versions


def log(msg: str) -> None:
    """A progress line; -q / EDGEPIPE_LOG=warning silence it."""
    from edgepipe.log import progress
    progress(msg)


@dataclass(frozen=True)
class RunContext:
    recipe: Recipe      # resolved: every default settled, written out, never changed afterwards
    out: Path
    cache: StepCache
    versions: dict      # tool versions and the code hash: part of every step key


@dataclass(frozen=True)
class Models:
    """What models_stage made: the models variants are compiled from ("base", "pruned"), what pruning did, and
    the deployed preprocessing."""
    specs: dict
    pruning: Pruning | None
    pre: Preprocess


@dataclass(frozen=True)
class Reference:
    """What a model's variants are checked against: its logits on the check images (and its MACs, hash, and
    the PyTorch model when there is one)."""
    logits: np.ndarray
    macs: int | None = None
    model_hash: str | None = None
    model: object = None


@dataclass(frozen=True)
class Compiled:
    """What compile_stage made: every variant as compiled, the Reference of each model (and QAT model) its
    variants are checked against, and the exported fp32 ONNX files with their parity."""
    variants: dict[str, Variant]
    references: dict[str, Reference]
    exports: dict[str, dict]


@dataclass(frozen=True)
class Measured:
    """What measure_stage made: the reference model's own latency / accuracy / predictions, and per measured
    variant the Variant fields measured (parity, latency_ms, accuracy, ...)."""
    reference: ReferenceRun
    variants: dict[str, dict]


@dataclass(frozen=True)
class Served:
    """What report_stage decided: the reference set, what the check images were, the budgets each variant
    breaks, and the serving choice."""
    reference_set: ReferenceSet
    checks: CheckImages
    budgets: dict[str, str]
    defaults: dict[str, str]
    default_variant: str


# ---------------------------------------------------------------- run

def run(recipe: Recipe, out_dir: str | os.PathLike) -> dict:
    preflight(recipe)
    spec = load_model_source(recipe)
    if not getattr(spec, "dynamic_batch", True):  # an ONNX file whose batch is fixed at 1
        recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={"dynamic_batch": False})})
    out = prepare_out_dir(Path(out_dir))
    with OutputLock(out):
        remove_stale_parts(out)
        write_text(out / "recipe.resolved.yaml", dump_recipe(recipe))
        versions = dict(tool_versions(), edgepipe_code=code_hash())
        return run_stages(RunContext(recipe, out, StepCache(out, log), versions), spec)


def run_stages(ctx: RunContext, spec) -> dict:
    import torch
    clock = StageClock()
    torch.manual_seed(0)
    log(f"[1/5] model {spec.name}")
    models = clock("model", models_stage, ctx, spec)
    log("[2/5] data")
    data = clock("data", prepare_data, ctx.recipe, ctx.out, models.specs["base"].labels, models.pre)
    log("[3/5] export + compile")
    compiled = clock("compile", compile_stage, ctx, models, data)
    log("[4/5] parity + accuracy + latency per variant")
    measured = clock("measure", measure_stage, ctx, compiled, data, models.specs["base"])
    log("[5/5] report")
    report = clock("report", report_stage, ctx, models, compiled, measured, data)
    write_text(ctx.out / ".edgepipe" / "timings.json", json.dumps({"stages": clock.stages, "steps": ctx.cache.seconds}, indent=1))
    log(f"done in {clock.total('wall_s'):.0f}s (CPU {clock.total('cpu_s'):.0f}s: "
        + ", ".join(f"{k} {v['cpu_s']:.0f}" for k, v in clock.stages.items())
        + f"): {len(ctx.cache.ran)} step(s) run, {len(ctx.cache.reused)} reused")
    return report


class StageClock:
    """Wall and CPU seconds (every thread of this process) of each stage, for .edgepipe/timings.json and the
    last line: where a run's time goes."""

    def __init__(self):
        self.stages: dict[str, dict] = {}

    def __call__(self, name: str, fn, *args):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args)
        finally:
            self.stages[name] = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}

    def total(self, key: str) -> float:
        return sum(s[key] for s in self.stages.values())


def models_stage(ctx: RunContext, spec) -> Models:
    """The models variants are compiled from ({"base": ..., "pruned": ...}) and the deployed preprocessing."""
    recipe = ctx.recipe
    if recipe.stages.train.enabled:
        from edgepipe.train.stage import train_stage
        spec = train_stage(spec, recipe, ctx.out, ctx.cache)
    specs, pruning = {"base": spec}, None
    if recipe.stages.prune.enabled:
        from edgepipe.train.stage import prune_stage
        specs["pruned"], pruning = prune_stage(spec, recipe, ctx.out, ctx.cache)
    pre = spec.preprocess
    if recipe.model.input_size and recipe.model.input_size != pre.crop:  # deploy at another size than trained
        from edgepipe.train.stage import preprocess_at
        pre = preprocess_at(spec.preprocess, recipe.model.input_size, recipe.data.train)
    return Models(specs, pruning, pre)


# ---------------------------------------------------------------- compile

def compile_stage(ctx: RunContext, models: Models, data: RunData) -> Compiled:
    """Every variant of every model through the compile-target registry; the provisional manifest (variants
    "unverified", so a run killed before the end never leaves one that `--backend auto` serves) is written."""
    recipe, quantize = ctx.recipe, ctx.recipe.stages.quantize
    variants: dict[str, Variant] = {}
    references: dict[str, Reference] = {}
    exports: dict[str, dict] = {}
    qat_wanted = quantize.enabled and quantize.method in ("qat", "both")
    for made_from, mspec in models.specs.items():
        onnx_path, references[made_from] = fp32_onnx(ctx, mspec, made_from, data)
        ref = references[made_from]
        onnx_sha = sha256_file(onnx_path)
        exports[onnx_path.name] = export_parity(onnx_path, onnx_sha, ref.logits, data,
                                                "PyTorch" if ref.model is not None else "source ONNX")
        record = {"source_onnx_sha256": onnx_sha, "model_hash": ref.model_hash, "macs": ref.macs,
                  "versions": ctx.versions, "reference_logits": made_from}
        # accuracy-control items: once per model, and only when an int8 target is compiled (not when reused)
        control = functools.cache(lambda onnx_path=onnx_path: accuracy_control(data, onnx_path, quantize))
        wanted = [t for t in recipe.targets if t.builds_from(made_from)]
        for target in wanted:
            if target.precision == "int8" and quantize.method == "qat":
                continue  # only the "-int8-qat" variants (below)
            # the device does not change the compiled files
            key = hash_key(onnx_sha, target.model_dump(exclude={"device"}), quantize.model_dump(),
                           data.fingerprints["calibration"], ctx.versions, data.fingerprints["control"])
            job = targets.CompileJob(onnx_path, ctx.out / variant_name(target.backend, target.precision, made_from),
                                     data.calibration, quantize, control)
            variants[job.folder.name] = compile_variant(ctx, targets.get(target.backend, target.precision), job, key,
                                                        made_from, data, dict(record, device=target.device))
        if qat_wanted:
            from edgepipe.train.stage import qat_model
            qat = qat_model(mspec, made_from, recipe, ctx.out, ctx.cache, data.check_batch, data.pre)
            if qat is None:
                continue
            ref_key = f"{made_from}-qat"  # parity of a QAT variant: against the QAT model
            references[ref_key] = Reference(qat["logits"], ref.macs, ref.model_hash)
            qat_record = dict(record, source_onnx_sha256=sha256_file(qat["onnx"]), reference_logits=ref_key)
            for target in (t for t in wanted if t.precision == "int8"):
                job = targets.CompileJob(qat["onnx"], ctx.out / variant_name(target.backend, "int8", made_from, "qat"),
                                         [], quantize)
                v = compile_variant(ctx, targets.get(target.backend, "int8", "qat"), job,
                                    hash_key(qat["key"], target.model_dump(), ctx.versions), made_from, data,
                                    dict(qat_record, device=target.device))
                variants[job.folder.name] = dataclasses.replace(v, compile={**qat["info"], **v.compile})
    compiled = Compiled(variants, references, exports)
    provisional = assemble_manifest(ctx, models, compiled)
    unverified = {n: dataclasses.replace(v, status="unverified" if v.status == "ok" else v.status)
                  for n, v in provisional.variants.items()}
    dataclasses.replace(provisional, variants=unverified).dump(ctx.out)
    return compiled


def compile_variant(ctx: RunContext, target: targets.CompileTarget, job: targets.CompileJob, key: str,
                    made_from: str, data: RunData, record: dict) -> Variant:
    """One cached compile step: the target's Variant, plus the facts of the model it was made from."""
    name = job.folder.name
    shape = [-1 if ctx.recipe.export.dynamic_batch else 1, 3, data.pre.crop, data.pre.crop]
    compiled = ctx.cache.run(
        f"compile-{name}", key,
        lambda: target.compile(job, ctx.out, made_from=made_from, input_shape=shape).to_dict(),
        files=lambda r: [ctx.out / f["path"] for f in r["files"]])
    return dataclasses.replace(Variant.from_dict(compiled, f"compile step {name}"), **record)


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


def fp32_onnx(ctx: RunContext, mspec, made_from: str, data: RunData) -> tuple[Path, Reference]:
    """The fp32 ONNX every variant is compiled from (exported from PyTorch, or the user's ONNX file checked and
    copied) and its Reference on the check images."""
    from edgepipe.compile.onnx_source import OnnxSource
    recipe, pre = ctx.recipe, data.pre
    prefix, onnx_path = name_prefix(made_from), ctx.out / exported_onnx(made_from)
    metadata = {"labels": mspec.labels, "preprocess": pre.to_dict(), "producer": "edgepipe"}
    if isinstance(mspec, OnnxSource):  # no PyTorch: the source file run in ONNX Runtime is the reference
        mhash = mspec.source["sha256"]
        ctx.cache.run(f"{prefix}import-onnx", hash_key(mhash, metadata, ctx.versions),
                      lambda: {"onnx": str(mspec.write_fp32(onnx_path, metadata))}, files=lambda r: [onnx_path])
        return onnx_path, Reference(mspec.logits(data.check_batch), mspec.macs(), mhash)
    from edgepipe.compile.export import export_onnx
    from edgepipe.train.logits import torch_logits
    from edgepipe.train.models import count_macs, model_hash
    model = mspec.model.eval()
    mhash = model_hash(model)
    ctx.cache.run(f"{prefix}export-onnx", hash_key(mhash, recipe.export.model_dump(), pre.to_dict(), ctx.versions),
                  lambda: {"onnx": str(export_onnx(model, onnx_path, pre.crop, recipe.export.opset,
                                                   recipe.export.dynamic_batch, recipe.export.simplify, metadata))},
                  files=lambda r: [onnx_path])
    logits = torch_logits(model, data.check_batch)
    return onnx_path, Reference(logits, count_macs(model, (1, 3, pre.crop, pre.crop)), mhash, model)


def export_parity(onnx_path: Path, onnx_sha: str, ref_logits, data: RunData, reference: str = "PyTorch") -> dict:
    """The exported fp32 ONNX (ONNX Runtime, CPU) against its reference (PyTorch, or the source ONNX) on the check images."""
    from edgepipe.compile.qdq import run_logits
    parity = data.compare(ref_logits, run_logits(onnx_path, data.check_batch), data.check_names, "fp32")
    log(f"  {reference} -> ONNX parity: max abs {parity['max_abs']:.2e}, top-1 agreement {parity['top1_agreement']:.3f}"
        + ("" if parity["ok"] else "  OUT OF TOLERANCE"))
    return {"sha256": onnx_sha, "parity_vs_pytorch": parity}


def assemble_manifest(ctx: RunContext, models: Models, compiled: Compiled, measured: Measured | None = None,
                      served: Served | None = None) -> Manifest:
    """The one place the run's Manifest is put together, from what the stages made: as compiled; with what was
    measured (a variant out of tolerance is failed; agreement with the reference model's predictions); with
    the report stage's reference set, checks, budgets and serving choice."""
    recipe, spec, pre = ctx.recipe, models.specs["base"], models.pre
    build = {k: v for k, v in recipe.model.model_dump(include={"pretrained", "weights", "checkpoint", "num_classes"}).items()
             if v is not None}  # how bench rebuilds the PyTorch reference
    variants = compiled.variants
    if measured is not None:
        variants = {name: measured_variant(v, measured.variants.get(name), measured.reference)
                    for name, v in variants.items()}
    if served is not None:
        variants = {name: dataclasses.replace(v, budget=served.budgets.get(name)) for name, v in variants.items()}
    torch_ref = measured.reference if measured is not None else None
    return Manifest(
        model=ModelInfo(spec.name, len(spec.labels), spec.source, recipe.name, build,
                        dataclasses.asdict(models.pruning) if models.pruning else None),
        preprocess=pre, labels=list(spec.labels), variants=variants,
        input={"name": "input", "shape": [-1 if recipe.export.dynamic_batch else 1, 3, pre.crop, pre.crop], "dtype": "float32"},
        output={"name": "logits", "kind": "logits"}, versions=ctx.versions, export=compiled.exports,
        reference_set=served and served.reference_set, checks=served and dataclasses.asdict(served.checks),
        defaults=dict(served.defaults) if served else {}, default_variant=served and served.default_variant,
        reference={"torch_eager_ms": torch_ref.latency_ms, "accuracy": torch_ref.accuracy} if served else None,
        format_version=FORMAT_VERSION)


def measured_variant(v: Variant, measured: dict | None, torch_ref: ReferenceRun) -> Variant:
    """``v`` with what measure_stage measured on it (failed when out of tolerance) and its agreement with the
    reference model's predictions."""
    if measured is not None:
        v = dataclasses.replace(v, **measured, status=v.status if measured["parity"]["ok"] else "failed")
    return dataclasses.replace(v, agreement_with_fp32=agreement_with_reference(v, torch_ref.predictions))


# ---------------------------------------------------------------- measure

def measure_stage(ctx: RunContext, compiled: Compiled, data: RunData, base) -> Measured:
    """Parity, accuracy and latency of every compiled variant through the real runtime (from the provisional
    manifest compile_stage wrote), and the reference model's own latency and accuracy."""
    from edgepipe.benchmarks.measure import measure_source_onnx, measure_torch, measure_variant
    recipe, references = ctx.recipe, compiled.references
    timing = {"warmup": recipe.bench.warmup, "iterations": recipe.bench.iterations}
    ref_key = hash_key(references["base"].model_hash, data.pre.to_dict(), recipe.data.evaluation,
                       data.fingerprints["evaluation"], recipe.bench.model_dump(), ctx.versions)
    if references["base"].model is not None:  # cached: the same model on the same images measures the same
        torch_ref = ctx.cache.run("measure-reference", ref_key,
                                  lambda: measure_torch(references["base"].model, data.pre, data.evaluation, **timing))
    else:  # an ONNX source: the reference is the user's file in ONNX Runtime
        torch_ref = ctx.cache.run("measure-reference", ref_key,
                                  lambda: measure_source_onnx(base, data.pre, data.evaluation, **timing))
    count = reference_count(ctx, data)
    measured = {}
    for name, v in compiled.variants.items():
        if v.status != "ok":
            continue
        key = hash_key([f.sha256 for f in v.files], recipe.data.evaluation, data.fingerprints["evaluation"],
                       recipe.bench.model_dump(), data.check_names, count, ctx.versions)

        def check(name=name, v=v):
            return measure_variant(ctx.out, name, parity_batch=data.check_batch, parity_names=data.check_names,
                                   ref_logits=references[v.reference_logits].logits, precision=v.precision,
                                   compare=data.compare, reference_count=count, evaluation=data.evaluation, **timing)
        measured[name] = ctx.cache.run(f"measure-{name}", key, check)
        if not measured[name]["parity"]["ok"]:
            log(f"  {name}: parity out of tolerance -> marked failed")
    return Measured(ReferenceRun(**torch_ref), measured)


def reference_count(ctx: RunContext, data: RunData) -> int:
    """How many of the check images travel with the artifacts as the reference set (the first ones)."""
    return max(1, min(ctx.recipe.data.reference_images, len(data.check_names)))


# ---------------------------------------------------------------- report

def report_stage(ctx: RunContext, models: Models, compiled: Compiled, measured: Measured, data: RunData) -> dict:
    """The reference set, the budgets, the serving choice (runtime/serving.py); the final manifest.json and
    report.json / report.md."""
    from edgepipe.benchmarks.report import write_reports
    from edgepipe.runtime.serving import serving_defaults
    from edgepipe.serving_rounds import interleaved_p90
    recipe, plan, torch_ref = ctx.recipe, data.plan, measured.reference
    reference_set = write_reference_set(ctx.out, data, compiled, reference_count(ctx, data))
    checks = CheckImages(images=plan.kind, check_images=len(data.check_names), heldout_source=plan.heldout_source,
                         calibration_images=len(plan.calibration), control_images=len(plan.control),
                         control_overlaps_check=plan.control_overlaps_check)
    manifest = assemble_manifest(ctx, models, compiled, measured)
    over = budget_failures(manifest, recipe, torch_ref.top1)
    for name, why in over.items():
        log(f"  {name}: outside the recipe's budgets ({why}) -> not served")
    p90, rounds = interleaved_p90(ctx, manifest, data.check_batch[:1].copy(), lambda name, v: name not in over)
    defaults, default_variant = serving_defaults(
        {n: dataclasses.replace(v, budget=over.get(n)) for n, v in manifest.variants.items()},
        torch_ref.top1, recipe.stages.quantize.max_drop,
        eligible=lambda name, v: name not in over, p90=p90)
    served = Served(reference_set, dataclasses.replace(checks, serving_rounds=rounds), over, defaults, default_variant)
    manifest = assemble_manifest(ctx, models, compiled, measured, served)
    manifest.dump(ctx.out)
    return write_reports(ctx.out, recipe, manifest, torch_ref)


def write_reference_set(out: Path, data: RunData, compiled: Compiled, count: int) -> ReferenceSet:
    """The first ``count`` checked (held-out) images as uint8 crops, with the fp32 logits each variant is
    compared with (the unpruned model, the pruned one, a QAT model), for `edgepipe verify` on the device."""
    ref_dir = out / "reference"
    ref_dir.mkdir(exist_ok=True)

    def save(path: Path, array: np.ndarray) -> FileEntry:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        write_bytes(path, buf.getvalue())
        return FileEntry.of(out, path)

    logits = {key: save(ref_dir / f"{key}-logits.npy", compiled.references[key].logits[:count].astype(np.float32))
              for key in sorted({v.reference_logits for v in compiled.variants.values()})}
    return ReferenceSet(inputs=save(ref_dir / "inputs.npy", data.check_crops[:count]), logits=logits,
                        names=data.check_names[:count], images=data.plan.kind, count=count, color=data.pre.color)


def agreement_with_reference(v: Variant, reference_predictions: dict) -> float | None:
    from edgepipe.benchmarks.report import top1_agreement
    agreement = top1_agreement(v.predictions or {}, reference_predictions)
    return agreement if agreement is not None else (v.check.top1_agreement if v.check else None)


def budget_failures(manifest: Manifest, recipe: Recipe, reference_top1: float | None) -> dict[str, str]:
    """Variants that break a budget of the recipe that `edgepipe run` can judge (agreement, top-1, drop, p90),
    by the rules `edgepipe bench` applies; throughput, per-class and ratio budgets are judged by bench."""
    from edgepipe.benchmarks import budgets
    failures = {}
    for name, v in manifest.variants.items():
        if v.status != "ok":
            continue
        row = Row.of_variant(name, v, reference_top1).as_dict()
        for b in (b for b in recipe.budgets if budgets.matches(b, row)):
            for check in budgets.checks_of(b):
                field, kind, _ = budgets.CHECKS[check]
                if row.get(field) is not None and budgets.point_check(row[field], getattr(b, check), kind, None)["verdict"] == "fail":
                    failures[name] = f"{check} {getattr(b, check)}, measured {row[field]:.4g}"
    return failures
