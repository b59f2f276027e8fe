"""Structured (channel) pruning with Torch-Pruning, aimed at measured latency, not only MACs.

Iterative: each step removes more channels (uniformly per layer, rounded to multiples of ``round_to``, the
classifier left alone), then the model is exported to ONNX and timed at batch 1 on the chosen backend; a
short fine-tune follows. It stops as soon as every target the recipe gives is met (MACs reduction, latency
budget in ms, latency speed-up), then fine-tunes to recover accuracy.

A pruned model is saved without pickle: ``pruned.onnx`` (the whole network, loads with no Python model
code), ``pruned.safetensors`` (weights) and ``pruned.json`` (layer-shape spec + model name) from which
:func:`load_pruned` rebuilds a trainable nn.Module on the registry architecture.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgepipe import UserError
from edgepipe.atomic import write_json
from edgepipe.runtime.backends.base import open_onnx
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.runtime.timing import measure
from edgepipe.train import distributed
from edgepipe.train.models import head_module
from edgepipe.train.models import build_model, count_macs

SHAPE_ATTRS = {nn.Conv2d: ("in_channels", "out_channels", "groups"), nn.Linear: ("in_features", "out_features"),
               nn.BatchNorm2d: ("num_features",)}


def onnx_latency_ms(model: nn.Module, input_size: int, backend: str = "onnxruntime", threads: int | None = None,
                    iterations: int = 50) -> float:
    """Batch-1 p50 latency (ms) of ``model`` exported to ONNX, through the runtime backend ``backend`` (fp32, CPU)."""
    from edgepipe.compile.export import export_onnx
    x = np.random.default_rng(0).standard_normal((1, 3, input_size, input_size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "m.onnx", input_size, dynamic_batch=False)
        session = open_onnx(backend, path, threads=threads)
        return measure(lambda: session.infer(x), warmup=10, iterations=iterations)["p50"]


def _importance(kind: str):
    import torch_pruning as tp
    return tp.importance.TaylorImportance() if kind == "taylor" else tp.importance.MagnitudeImportance(p=2)


def prune_model(model: nn.Module, input_size: int, cfg, finetune: Callable[[nn.Module, float], None] | None = None,
                taylor_batch: Callable[[], tuple] | None = None, threads: int | None = None, log=print) -> dict:
    """Prune ``model`` in place until the targets in ``cfg`` (recipe.PruneStage) are met; returns the history.

    ``finetune(model, epochs)`` trains between steps and after the last one; ``taylor_batch()`` gives an
    (images, targets) batch for Taylor importance.
    """
    import torch_pruning as tp
    model.eval()
    example = torch.randn(1, 3, input_size, input_size)
    base_macs = count_macs(model, example.shape)
    measure_latency = cfg.latency_budget_ms is not None or cfg.latency_speedup is not None
    base_ms = onnx_latency_ms(model, input_size, cfg.backend, threads) if measure_latency else None
    log(f"  prune: start {base_macs / 1e6:.1f} M MACs" + (f", {base_ms:.3f} ms on {cfg.backend}" if base_ms else ""))
    pruner = tp.pruner.MetaPruner(model, example, importance=_importance(cfg.importance),
                                  pruning_ratio=cfg.max_pruning_ratio, iterative_steps=cfg.iterative_steps,
                                  round_to=cfg.round_to, ignored_layers=[head_module(model)],
                                  global_pruning=cfg.global_pruning)
    history, met = [], False
    for step in range(1, cfg.iterative_steps + 1):
        if cfg.importance == "taylor":
            if taylor_batch is None:
                raise UserError("stages.prune.importance: taylor needs training data (data.train)")
            x, y = taylor_batch()
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        pruner.step()
        model.zero_grad(set_to_none=True)
        macs = count_macs(model, example.shape)
        ms = onnx_latency_ms(model, input_size, cfg.backend, threads) if measure_latency else None
        reduction = 1 - macs / base_macs
        met = distributed.agree(reduction >= cfg.macs_reduction
                                and (cfg.latency_budget_ms is None or ms <= cfg.latency_budget_ms)
                                and (cfg.latency_speedup is None or base_ms / ms >= cfg.latency_speedup))
        history.append({"step": step, "macs": macs, "macs_reduction": round(reduction, 4), "latency_ms": ms,
                        "speedup": round(base_ms / ms, 3) if ms else None, "targets_met": met})
        log(f"  prune step {step}/{cfg.iterative_steps}: {macs / 1e6:.1f} M MACs (-{reduction:.0%})"
            + (f", {ms:.3f} ms ({base_ms / ms:.2f}x)" if ms else "") + (" -> targets met" if met else ""))
        if met:
            break
        if finetune and cfg.finetune_epochs > 0:
            finetune(model, cfg.finetune_epochs / cfg.iterative_steps)
    if not met:
        log("  prune: WARNING the targets were not met at stages.prune.max_pruning_ratio; raise it or the steps")
    if finetune and cfg.recovery_epochs > 0:
        finetune(model, cfg.recovery_epochs, "prune recovery")
    final_ms = onnx_latency_ms(model, input_size, cfg.backend, threads) if measure_latency else None
    return {"base_macs": base_macs, "macs": history[-1]["macs"], "macs_reduction": history[-1]["macs_reduction"],
            "base_latency_ms": base_ms, "latency_ms": final_ms, "backend": cfg.backend,
            "speedup": round(base_ms / final_ms, 3) if final_ms else None, "targets_met": met, "steps": history}


# ---------------------------------------------------------------- saving without pickle

def layer_shapes(model: nn.Module) -> dict:
    shapes = {}
    for name, mod in model.named_modules():
        for cls, attrs in SHAPE_ATTRS.items():
            if isinstance(mod, cls):
                shapes[name] = {a: int(getattr(mod, a)) for a in attrs}
    return shapes


def save_pruned(model: nn.Module, folder: Path, model_name: str, num_classes: int, input_size: int,
                labels: list[str], preprocess: Preprocess) -> list[Path]:
    """pruned.safetensors + pruned.json (+ pruned.onnx, the standalone network)."""
    from safetensors.torch import save_file

    from edgepipe.atomic import atomic_path
    from edgepipe.compile.export import export_onnx
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, spec, onnx_path = folder / "pruned.safetensors", folder / "pruned.json", folder / "pruned.onnx"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    export_onnx(model, onnx_path, input_size, metadata={"labels": labels, "producer": "edgepipe prune"})
    write_json(spec, {"format": "edgepipe-pruned/1", "model": model_name, "num_classes": num_classes,
                      "input_size": input_size, "labels": labels, "preprocess": dataclasses.asdict(preprocess),
                      "macs": count_macs(model, (1, 3, input_size, input_size)), "layers": layer_shapes(model)})
    return [weights, spec, onnx_path]


def load_pruned(folder: Path) -> tuple[nn.Module, dict]:
    """Rebuild the pruned nn.Module: registry architecture, layers resized per pruned.json, weights loaded
    strictly from pruned.safetensors (no pickle anywhere)."""
    from safetensors.torch import load_file
    folder = Path(folder)
    try:
        spec = json.loads((folder / "pruned.json").read_text())
        state = load_file(str(folder / "pruned.safetensors"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: not a pruned model folder (pruned.json + pruned.safetensors): {exc}") from None
    model = build_model(spec["model"], pretrained=False, num_classes=spec["num_classes"]).model
    modules = dict(model.named_modules())
    for name, attrs in spec["layers"].items():
        if name not in modules:
            raise UserError(f"{folder}/pruned.json names layer {name!r} that {spec['model']} does not have")
        for attr, value in attrs.items():
            setattr(modules[name], attr, value)
    for key, tensor in state.items():
        mod_name, _, attr = key.rpartition(".")
        mod = modules.get(mod_name)
        current = getattr(mod, attr, None) if mod is not None else None
        if isinstance(current, nn.Parameter):
            setattr(mod, attr, nn.Parameter(torch.empty_like(tensor), requires_grad=current.requires_grad))
        elif isinstance(current, torch.Tensor):
            mod.register_buffer(attr, torch.empty_like(tensor))
    model.load_state_dict(state, strict=True)
    return model.eval(), spec
