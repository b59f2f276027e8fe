"""The train / prune / QAT stages of `edgepipe run`, each a cached step (see edgepipe/steps.py): a re-run with
the same model, recipe section, data and code reuses the saved weights instead of training again.

Outputs: train/model.safetensors (+ a per-configuration epoch checkpoint for --resume), prune/pruned.*
(see train/prune.py) and {prefix}qat/model.qdq.onnx, which the "-int8-qat" variants are compiled from.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from edgepipe import UserError
from edgepipe.log import progress
from edgepipe.runtime.manifest import name_prefix
from edgepipe.runtime.measured import Pruning
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.steps import code_hash, hash_key, tool_versions
from edgepipe.train.models import ModelSpec


def train_code_hash() -> str:
    import edgepipe.train
    return code_hash(edgepipe.train)


def preprocess_at(preprocess: Preprocess, size: int, source: str | None) -> Preprocess:
    """A model's preprocessing at another input size: the same resize/crop ratio, except for training data
    whose items fill the frame (a dataset registered with fills_frame, e.g. 28 px Fashion-MNIST: no crop)."""
    from edgepipe.datasets import fills_frame
    resize = size if fills_frame(source) else int(round(size * preprocess.resize / preprocess.crop))
    return dataclasses.replace(preprocess, crop=size, resize=resize)


def _data(recipe, pre: Preprocess):
    from edgepipe.train.data import load_train_data
    cfg = recipe.stages.train
    return load_train_data(recipe.data.train, pre, recipe.data.val_split, cfg.seed,
                           cfg.max_train_images, cfg.max_val_images, cfg.augment)


def _data_key(recipe) -> list:
    from edgepipe.train.data import data_fingerprint
    return [recipe.data.train, recipe.data.val_split, recipe.data.on_bad_image, data_fingerprint(recipe.data.train)]


def _train_cfg_key(recipe) -> dict:
    return recipe.stages.train.model_dump(exclude={"resume", "workers", "device", "enabled"})


def _fit_cfg(recipe, **update):
    return recipe.stages.train.model_copy(update=update)


# ---------------------------------------------------------------- train

def train_stage(spec: ModelSpec, recipe, out: Path, cache) -> ModelSpec:
    """Fine-tune ``spec`` (ImageNet weights) on data.train with a new head for the data's classes."""
    from safetensors.torch import load_file, save_file

    from edgepipe.atomic import atomic_path
    from edgepipe.datasets import dataset_names
    from edgepipe.train import distributed
    from edgepipe.train.finetune import fit, seed_everything
    from edgepipe.train.models import build_model, head_module, replace_head
    if not recipe.data.train:
        raise UserError("stages.train is enabled but data.train is not set; give a dataset "
                        f"({', '.join(dataset_names())}), an ImageFolder tree or a CSV")
    cfg = recipe.stages.train
    size = cfg.input_size or recipe.model.input_size or spec.preprocess.crop
    pre = preprocess_at(spec.preprocess, size, recipe.data.train)
    data = _data(recipe, pre)
    key = hash_key("train", recipe.model.model_dump(), spec.source, _train_cfg_key(recipe), _data_key(recipe),
                   pre.to_dict(), tool_versions(), train_code_hash())
    folder = Path(out) / "train"
    weights = folder / "model.safetensors"
    progress(f"  train data: {len(data.train)} train / {len(data.val)} val images, {len(data.labels)} classes, {size} px")

    def run() -> dict:
        import time
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        model = spec.model
        if head_module(model).out_features != len(data.labels):
            replace_head(model, len(data.labels))
        result = fit(model, data.train, data.val, cfg, checkpoint=folder / f"checkpoint-{key[:12]}.pt",
                     resume=cfg.resume, on_bad_image=recipe.data.on_bad_image, log=progress)
        if distributed.current().is_main:
            with atomic_path(weights, suffix=".safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        distributed.barrier(distributed.current())
        return {"labels": data.labels, "fit": result.as_dict(), "input_size": size,
                "train_images": len(data.train), "val_images": len(data.val),
                "seconds": round(time.perf_counter() - t0, 1)}

    rec = cache.run("train", key, run, files=lambda r: [weights])
    model = build_model(recipe.model.name, pretrained=False, num_classes=len(rec["labels"])).model
    model.load_state_dict(load_file(str(weights)), strict=True)
    source = {**spec.source, "fine_tuned_on": recipe.data.train, "val_top1": rec["fit"].get("val_top1"),
              "images_per_s": rec["fit"].get("images_per_s"), "device": rec["fit"].get("device"),
              "pretrained": recipe.model.pretrained, "train_images": rec.get("train_images"),
              "epochs": rec["fit"].get("epochs_done"), "input_size": rec.get("input_size"),
              "train_seconds": rec.get("seconds")}
    return ModelSpec(spec.name, model.eval(), pre, list(rec["labels"]), source)


# ---------------------------------------------------------------- prune

def prune_stage(spec: ModelSpec, recipe, out: Path, cache) -> tuple[ModelSpec, Pruning]:
    """Prune ``spec`` to the recipe's MACs / latency targets with fine-tuning; variants get prefix "pruned-".
    Returns the pruned model and what pruning did (ModelInfo.pruned)."""
    from edgepipe.train.models import model_hash
    from edgepipe.train import distributed
    from edgepipe.train.finetune import evaluate, fit
    from edgepipe.train.prune import load_pruned, prune_model, save_pruned
    cfg = recipe.stages.prune
    size = spec.preprocess.crop
    folder = Path(out) / "prune"
    key = hash_key("prune", model_hash(spec.model), cfg.model_dump(), _train_cfg_key(recipe),
                   _data_key(recipe) if recipe.data.train else None, recipe.bench.threads, tool_versions(),
                   train_code_hash())

    def run() -> dict:  # loads the training data only when the step really runs (not on a cache hit)
        import time

        import torch
        t0 = time.perf_counter()
        data = _data(recipe, spec.preprocess) if recipe.data.train else None
        model = copy.deepcopy(spec.model).cpu().eval()
        finetune = taylor = None
        if data is not None:
            teacher = copy.deepcopy(spec.model).cpu().eval() if cfg.distill_alpha > 0 else None

            def finetune(m, epochs, desc="prune fine-tune"):
                fit(m, data.train, None, _fit_cfg(recipe, epochs=epochs, lr=cfg.lr or recipe.stages.train.lr,
                                                   warmup_epochs=0.0, freeze_backbone_epochs=0, head_lr_scale=1.0),
                    on_bad_image=recipe.data.on_bad_image, log=progress, desc=desc, teacher=teacher,
                    distill_alpha=cfg.distill_alpha, distill_temperature=cfg.distill_temperature)

            def taylor():
                batch = [data.train[i] for i in range(min(len(data.train), recipe.stages.train.batch_size))]
                return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
        else:
            progress("  prune: no data.train, so no fine-tuning between and after the steps")
        info = prune_model(model, size, cfg, finetune, taylor, threads=recipe.bench.threads, log=progress)
        if data is not None:
            info["val_top1_before"] = evaluate(spec.model, data.val, recipe.stages.train.batch_size)
            info["val_top1"] = evaluate(model, data.val, recipe.stages.train.batch_size)
            progress(f"  prune: val top-1 {info['val_top1_before']:.4f} -> {info['val_top1']:.4f}")
        info.update(seconds=round(time.perf_counter() - t0, 1), global_pruning=cfg.global_pruning,
                    importance=cfg.importance, distill_alpha=cfg.distill_alpha if data is not None else None,
                    recovery_epochs=cfg.recovery_epochs if data is not None else 0)
        if distributed.current().is_main:
            save_pruned(model, folder, recipe.model.name, len(spec.labels), size, spec.labels, spec.preprocess)
        distributed.barrier(distributed.current())
        return info

    rec = cache.run("prune", key, run, files=lambda r: [folder / "pruned.safetensors", folder / "pruned.json",
                                                        folder / "pruned.onnx"])
    model, _ = load_pruned(folder)
    pruning = Pruning(**{f.name: rec.get(f.name) for f in dataclasses.fields(Pruning)})
    return ModelSpec(spec.name, model, spec.preprocess, list(spec.labels), dict(spec.source)), pruning


# ---------------------------------------------------------------- quantization-aware training

def qat_model(spec: ModelSpec, made_from: str, recipe, out: Path, cache, parity_batch: np.ndarray,
              pre: Preprocess) -> dict | None:
    """QAT of ``spec`` -> a QDQ ONNX the "-int8-qat" variants are compiled from (compile/targets, quantization
    "qat"), trained and exported at the deployed preprocessing ``pre`` (model.input_size may differ from the
    model's own). None when the recipe has no int8 target for this model.

    Returns {"onnx": QDQ path, "info": what QAT did, "logits": the QAT model on ``parity_batch`` (the variants'
    parity reference), "key": the step's cache key}."""
    from edgepipe.compile.qdq_check import check_qdq
    from edgepipe.train.models import model_hash
    from edgepipe.train.finetune import evaluate, fit
    from edgepipe.train.qat import calibrate, export_qdq, prepare_qat
    if not [t for t in recipe.targets if t.precision == "int8" and t.builds_from(made_from)]:
        return None
    if not recipe.data.train:
        raise UserError("stages.quantize.method qat needs training data: set data.train (or use method: ptq)")
    q = recipe.stages.quantize
    size = pre.crop
    prefix = name_prefix(made_from)
    folder = Path(out) / f"{prefix}qat"
    qdq, ref_file = folder / "model.qdq.onnx", folder / "parity_reference.npy"
    key = hash_key("qat", model_hash(spec.model), pre.to_dict(), q.model_dump(), _train_cfg_key(recipe),
                   _data_key(recipe), recipe.export.model_dump(), hashlib.sha256(parity_batch.tobytes()).hexdigest(),
                   tool_versions(), train_code_hash())

    made = {}  # the QAT model's logits when this run trains it (a reused step: read from its file, once)

    def run() -> dict:
        import torch
        data = _data(recipe, pre)
        model = prepare_qat(copy.deepcopy(spec.model).cpu().eval(), size, weight_bits=8 if q.isa == "vnni" else 7)
        loader = torch.utils.data.DataLoader(data.val if len(data.val) else data.train, batch_size=32)
        calibrate(model, [x for _, (x, y, _) in zip(range(q.qat_calibration_batches), loader)])
        before = evaluate(model, data.val) if len(data.val) else None
        fit(model, data.train, None, _fit_cfg(recipe, epochs=q.qat_epochs, lr=q.qat_lr, warmup_epochs=0.0, amp=False,
                                              freeze_backbone_epochs=0),
            on_bad_image=recipe.data.on_bad_image, log=progress, desc=f"{prefix}qat")
        after = evaluate(model, data.val) if len(data.val) else None
        export_qdq(model, qdq, size, recipe.export.opset, recipe.export.dynamic_batch,
                   metadata={"labels": spec.labels, "producer": "edgepipe qat"})
        from edgepipe.train.logits import torch_logits
        ref = made["logits"] = torch_logits(model.eval(), parity_batch)
        folder.mkdir(parents=True, exist_ok=True)
        from edgepipe.atomic import atomic_path
        with atomic_path(ref_file, suffix=".npy") as tmp:
            np.save(tmp, ref)
        progress(f"  {prefix}qat: val top-1 after calibration {before}, after QAT {after}")
        # the same TensorRT QDQ structure check as the post-training int8 variants (in report.md)
        return {"val_top1_calibrated": before, "val_top1": after, "tensorrt_qdq_check": check_qdq(qdq),
                "epochs": q.qat_epochs, "lr": q.qat_lr}

    info = cache.run(f"{prefix}qat", key, run, files=lambda r: [qdq, ref_file])
    info = {"method": "qat (torch.ao fake-quant, symmetric int8, per-channel weights)", **info}
    return {"onnx": qdq, "info": info, "logits": made["logits"] if made else np.load(ref_file), "key": key}
