"""Recipes: YAML, typed per stage. Unknown keys are errors with a close-match suggestion; wrong types and
missing files are one clear line each, before any work starts. ``profiles:`` hold overrides selected with
``--profile``; ``--set a.b=c`` overrides single values. The resolved recipe is written to the output."""
from __future__ import annotations

import contextlib
import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import PositiveInt, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from edgepipe import UserError
from edgepipe.benchmarks.budgets import Budget
from edgepipe.datasets import parse_reference
from edgepipe.recipe_keys import RecipeError, Section, check_keys as _check_keys


class PreprocessOverride(Section):
    """Overrides of the model's own preprocessing (unset values keep the model's)."""
    resize: Optional[PositiveInt] = None   # shorter side before the center crop
    crop: Optional[PositiveInt] = None     # square input size
    mean: Optional[tuple[float, float, float]] = None   # 0..1 scale, in the model's colour order
    std: Optional[tuple[float, float, float]] = None
    color: Optional[Literal["RGB", "BGR"]] = None


class ModelConfig(Section):
    name: str = "efficientnet_lite0"      # registered, torchvision or timm:NAME (`edgepipe models` lists them)
    onnx: Optional[str] = None            # an ONNX file as the model (instead of name): no PyTorch stages
    pretrained: bool = True               # the architecture's own ImageNet weights; false: random init
    weights: Optional[str] = None         # local file of those weights (offline machines) instead of a download
    checkpoint: Optional[str] = None      # a state_dict (.pt with tensors only) or .safetensors
    num_classes: Optional[int] = None     # None: keep the model's own head
    input_size: Optional[PositiveInt] = None  # deployed input size; None: the model's own (224 for ImageNet weights)
    labels: Optional[str] = None          # class names: a text file (one per line) or a JSON list
    preprocess: Optional[PreprocessOverride] = None

    @model_validator(mode="after")
    def _one_source(self):
        # PydanticCustomError: the message as written, without pydantic's "Value error, " prefix
        if self.onnx and (self.checkpoint or self.weights or self.num_classes):
            raise PydanticCustomError("model_source", "model.onnx is a complete model: drop checkpoint, weights and "
                                      "num_classes (its head and weights are in the file)")
        if self.weights and self.checkpoint:
            raise PydanticCustomError("model_source", "give model.weights (the architecture's pretrained file) or "
                                      "model.checkpoint (your fine-tuned state_dict), not both")
        if self.weights and not self.pretrained:
            raise PydanticCustomError("model_source", "model.weights is set but pretrained is false; drop one of them")
        return self


class CalibrationData(Section):
    source: str = "generated"   # "generated" (crops of photos the set-up installs) or a folder / CSV of images
    count: int = 300            # images to generate when source is "generated"
    limit: Optional[int] = None  # use at most this many (None: every image given; never silently capped)


class DataConfig(Section):
    calibration: CalibrationData = CalibrationData()
    evaluation: Optional[str] = None   # labeled CSV (file,class_index) or ImageFolder; unlabeled folder -> agreement only
    parity_images: int = 200           # held-out images the checks of every variant use (never calibration images)
    heldout: int = 400                 # generated held-out crops (checks + accuracy control) when no real ones are given
    reference_images: int = 64         # of the checked images, how many travel with the artifacts for `edgepipe verify`
    on_bad_image: Literal["skip", "stop"] = "skip"   # unreadable images: skip and list them, or stop before work
    # training data (stages.train): a dataset name (edgepipe/datasets.py), an ImageFolder tree or a CSV
    train: Optional[str] = None
    val_split: float = 0.1


class TrainStage(Section):
    enabled: bool = False
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    optimizer: Literal["sgd", "adamw"] = "sgd"
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    amp: bool = True                   # mixed precision (CUDA only)
    channels_last: bool = True         # NHWC memory format (faster on CUDA and, measured here, on CPU too)
    threads: Optional[PositiveInt | Literal["auto"]] = None  # CPU threads for training (None: torch's default; auto: measured)
    workers: int = 2
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None
    input_size: Optional[PositiveInt] = None  # train at this size (default: model.input_size, else the model's own)
    freeze_backbone_epochs: int = 0
    head_lr_scale: float = 1.0         # the new classifier head learns at this multiple of lr
    augment: bool = True               # random flip + shift of training images (off pays in a single pass: docs/train.md)
    resume: bool = False               # continue from the last epoch checkpoint (`edgepipe run --resume`)


class PruneStage(Section):
    enabled: bool = False
    macs_reduction: float = 0.4        # fraction of MACs to remove
    latency_budget_ms: Optional[float] = None   # prune until this batch-1 latency on `backend`
    backend: Literal["onnxruntime", "openvino"] = "onnxruntime"
    iterative_steps: int = 4
    round_to: int = 8                  # channel counts rounded to hardware-friendly multiples
    finetune_epochs: float = 1.0
    importance: Literal["magnitude", "taylor"] = "magnitude"
    latency_speedup: Optional[float] = None     # prune until batch-1 latency on `backend` is this many times lower
    max_pruning_ratio: float = 0.6     # channel ratio reached at the last iterative step (stops earlier when targets are met)
    recovery_epochs: float = 1.0       # fine-tuning after the last pruning step
    lr: Optional[float] = None         # fine-tuning learning rate (default: stages.train.lr)
    global_pruning: bool = False       # rank channels across all layers (True) or remove the same ratio per layer
    distill_alpha: float = 0.0         # fine-tuning loss: (1 - a) * CE + a * KD from the unpruned model (0: off)
    distill_temperature: float = 4.0


class QuantizeStage(Section):
    enabled: bool = True
    method: Literal["ptq", "qat", "both"] = "ptq"
    max_drop: Optional[float] = None   # top-1 points; enables accuracy control / mixed precision when labeled data exists
    # without labels: keep int8 at least this top-1 agreement with the fp32 model on held-out images
    # (accuracy control reverts the most sensitive layers to float until it is met)
    min_agreement: Optional[float] = None
    mixed_precision: bool = True       # keep the most sensitive layers in float until max_drop is met
    qat_epochs: float = 1.0
    qat_lr: float = 1e-4
    qat_calibration_batches: int = 8   # batches that set the initial fake-quant ranges before QAT
    fast_bias_correction: bool = False
    activation_symmetric: bool = True  # QDQ for TensorRT: symmetric activations (zero point 0)
    # auto: s8s8_reduce_range (isa portable) or s8s8 (isa vnni); all but u8s8_reduce_range are TensorRT's form
    qdq_mode: Literal["s8s8", "s8s8_reduce_range", "u8s8_reduce_range", "auto"] = "auto"
    # CPUs the int8 artifacts must be right on. portable: OpenVINO weight steps bounded per channel so that no
    # u8 x s8 pair reaches 2^15 at the calibrated activation maxima (compile/weight_ranges.py); ORT reduce_range
    # and QAT 7-bit; depthwise convs keep 8: right on SSE4.2/AVX2/AVX-512 without VNNI too. portable-7bit:
    # 7-bit weights everywhere, safe for any input. vnni: 8-bit weights, only for a known VNNI/AMX (or Arm)
    # target; without VNNI their u8 x s8 sums saturate (docs/compile.md)
    isa: Literal["portable", "portable-7bit", "vnni"] = "portable"


class StagesConfig(Section):
    train: TrainStage = TrainStage()
    prune: PruneStage = PruneStage()
    quantize: QuantizeStage = QuantizeStage()


class ExportConfig(Section):
    opset: int = 17
    dynamic_batch: bool = True
    simplify: bool = True

    @field_validator("opset")
    @classmethod
    def _opset(cls, v):
        if v < 17:
            raise ValueError("opset must be 17 or newer")
        return v


OV_HARDWARE = r"(?:CPU|GPU(?:\.\d+)?|NPU)"
OV_DEVICE = re.compile(rf"{OV_HARDWARE}|AUTO(?::{OV_HARDWARE}(?:,{OV_HARDWARE})*)?|(?:HETERO|MULTI):{OV_HARDWARE}(?:,{OV_HARDWARE})*")


class Target(Section):
    """One variant to compile: a (backend, precision) registered in compile/targets (compile.targets.TARGETS)."""
    backend: str
    precision: str = "fp32"
    pruned: Optional[bool] = None      # None: build for every model the stages produce
    device: Optional[str] = None       # OpenVINO only: CPU, GPU, GPU.1, NPU, AUTO[:A,B], HETERO:A,B (where it runs)

    def builds_from(self, made_from: str) -> bool:
        """Whether this target is compiled from the model ``made_from`` ("base" or "pruned")."""
        return self.pruned is None or self.pruned == (made_from == "pruned")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v):
        from edgepipe.compile import targets
        if v not in targets.backends():
            close = difflib.get_close_matches(v, targets.backends(), n=1)
            raise PydanticCustomError("target_backend", "Input should be one of {known}{hint}",
                                      {"known": ", ".join(targets.backends()), "hint": f" (did you mean {close[0]}?)" if close else ""})
        return v

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, v):
        from edgepipe.compile import targets
        known = sorted({t.precision for t in targets.TARGETS.values()})
        if v not in known:
            raise PydanticCustomError("target_precision", "Input should be one of {known}", {"known": ", ".join(known)})
        return v

    @model_validator(mode="after")
    def _registered(self):
        from edgepipe.compile import targets
        try:
            targets.get(self.backend, self.precision)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return self

    @field_validator("device")
    @classmethod
    def _device_name(cls, v):
        if v is not None and not OV_DEVICE.fullmatch(v.strip().upper()):
            raise ValueError(f"device: {v} is not an OpenVINO device; use CPU, GPU, GPU.1, NPU, AUTO, "
                             "AUTO:GPU,CPU or HETERO:GPU,CPU")
        return None if v is None else v.strip().upper()

    @model_validator(mode="after")
    def _device_backend(self):
        from edgepipe.compile import targets
        if self.device is not None and not targets.get(self.backend, self.precision).devices:
            raise ValueError(f"device: {self.device} is for OpenVINO targets; {self.backend} chooses its device itself")
        return self


class BenchConfig(Section):
    warmup: int = 10
    iterations: int = 100
    threads: Optional[int] = None


class Recipe(Section):
    name: str = "recipe"
    description: str = ""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    stages: StagesConfig = StagesConfig()
    export: ExportConfig = ExportConfig()
    targets: list[Target] = []     # none given: default_targets() (every model source gets the same ones)
    bench: BenchConfig = BenchConfig()
    budgets: list[Budget] = []     # the dataclasses of benchmarks/budgets.py: one schema for recipes and bench
    profiles: dict[str, dict] = {}

    @model_validator(mode="before")
    @classmethod
    def _default_targets(cls, data):
        if isinstance(data, dict) and "targets" not in data:
            quantize = ((data.get("stages") or {}).get("quantize") or {}) if isinstance(data.get("stages"), dict) else {}
            enabled = quantize.get("enabled", True) if isinstance(quantize, dict) else True
            data = dict(data, targets=default_targets(bool(enabled)))
        return data

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        if not v:
            raise ValueError("give at least one target (backend x precision)")
        return v


def default_targets(int8: bool = True) -> list[dict]:
    """The targets of a recipe that names none, whatever the model source (a torchvision name, a checkpoint or
    an ONNX file): ONNX Runtime fp32, OpenVINO fp32 and, unless stages.quantize is off, OpenVINO int8."""
    fp32 = [{"backend": "onnxruntime", "precision": "fp32"}, {"backend": "openvino", "precision": "fp32"}]
    return fp32 + ([{"backend": "openvino", "precision": "int8"}] if int8 else [])


# ---------------------------------------------------------------- loading

def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _apply_set(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key.path=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts):
        here, last = ".".join(parts[:i]) or "the recipe", i == len(parts) - 1
        if isinstance(node, list):
            if not re.fullmatch(r"-?[0-9]+", part):
                raise RecipeError(f"--set {assignment}: {here} is a list; index it with a number, e.g. {here}.0")
            index = int(part)
            if not -len(node) <= index < len(node):
                raise RecipeError(f"--set {assignment}: {here} has {len(node)} item(s), so index {index} does not exist")
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {assignment}: {here} is a value ({node!r}), not a section")
        elif part not in node and not last:
            # a section the file leaves out starts empty; a list (targets) starts as its default, to be indexed
            node[part] = _default_at(parts[:i + 1]) if re.fullmatch(r"-?[0-9]+", parts[i + 1]) else {}
        if last:
            node[index if isinstance(node, list) else part] = value
        else:
            node = node[index] if isinstance(node, list) else node[part]


def _default_at(parts: list[str]):
    """The built-in default at a dotted path (for --set into a list the file leaves out)."""
    node: Any = Recipe().model_dump(mode="json", exclude={"profiles"})
    for part in parts:
        if isinstance(node, dict) and part in node and isinstance(node[part], (dict, list)):
            node = node[part]
        else:
            return {}
    return copy.deepcopy(node)


def builtin_recipe(name: str) -> Path | None:
    path = Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml"
    if path.is_file():
        return path
    import importlib.resources
    try:
        res = importlib.resources.files("edgepipe.recipes") / f"{name}.yaml"
        return Path(str(res)) if res.is_file() else None
    except ModuleNotFoundError:
        return None


def load_recipe(path: str | Path, profile: str | None = None, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        path = builtin_recipe(str(path)) or path
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; try recipes/default.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RecipeError(f"{path}: invalid YAML{at}: {detail}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (model, data, stages, targets, ...)")
    return recipe_from_dict(data, profile, overrides, base_dir=path.parent, where=str(path))


def recipe_from_dict(data: dict, profile: str | None = None, overrides: list[str] = (), base_dir: Path = Path("."),
                     where: str = "recipe") -> Recipe:
    data = copy.deepcopy(data)
    profiles = data.get("profiles") or {}
    if profile is not None:
        if not isinstance(profiles, dict) or profile not in profiles:
            names = list(profiles) if isinstance(profiles, dict) else []
            hint = _profile_hint(profile, names)
            raise RecipeError(f"{where}: no profile {profile!r}{hint}; profiles: {', '.join(names) or 'none'}")
        _check_keys(profiles[profile], Recipe, "")
        data = _deep_merge(data, profiles[profile])
    try:
        _check_keys(data, Recipe, "")  # the file's own mistakes are named by the file
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    for item in overrides:  # ... and a --set's by that --set
        _apply_set(data, item)
        try:
            _check_keys(data, Recipe, "")
        except RecipeError as exc:
            raise RecipeError(f"--set {item}: {exc}") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        got_s = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
        raise RecipeError(f"{_blame(loc, overrides, where)}: {loc}: {err['msg']}{got_s}") from None
    try:
        _resolve_paths(recipe, Path(base_dir))
    except RecipeError as exc:
        raise RecipeError(f"{_blame(str(exc).split(':')[0], overrides, where)}: {exc}") from None
    return recipe


def _blame(loc: str, overrides, where: str) -> str:
    """`--set KEY=VALUE` when the last override touching ``loc`` (a dotted path) set it, else the recipe."""
    for item in reversed(list(overrides)):
        key = item.split("=", 1)[0].strip()
        if loc == key or loc.startswith(key + ".") or key.startswith(loc + "."):
            return f"--set {item}"
    return where


def _profile_hint(profile: str, own: list[str]) -> str:
    """' (did you mean ...?)' from this recipe's profiles, else from the built-in recipes' profiles."""
    close = difflib.get_close_matches(profile, own, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    folder = builtin_recipe("default")
    for path in sorted(folder.parent.glob("*.yaml")) if folder else []:
        with contextlib.suppress(Exception):
            names = list((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("profiles") or {})
            close = difflib.get_close_matches(profile, names, n=1)
            if close:
                return f" (did you mean --profile {close[0]} of the built-in recipe {path.stem}?)"
    return ""


def _resolve_paths(recipe: Recipe, base: Path) -> None:
    """Relative paths are relative to the recipe's folder; every given file must exist now."""
    def path(value: str) -> Path:
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = (base / p) if (base / p).exists() or not Path(value).exists() else Path(value)
        return p

    def resolve(value: str | None, what: str, special=()) -> str | None:
        if value is None or value in special:
            return value
        if not path(value).exists():
            raise RecipeError(f"{what}: {value} does not exist")
        return str(path(value).resolve())

    def resolve_data(value: str | None, what: str, special=(), split_required: bool = True) -> str | None:
        """A path, or a dataset reference ("NAME:SPLIT[:COUNT]", see edgepipe/datasets.py) kept as written."""
        try:
            if value and parse_reference(value, what, split_required=split_required, path_exists=path(value).exists()):
                return value
        except UserError as exc:
            raise RecipeError(str(exc)) from None
        return resolve(value, what, special)

    for key in ("checkpoint", "onnx", "weights", "labels"):
        setattr(recipe.model, key, resolve(getattr(recipe.model, key), f"model.{key}"))
    recipe.data.calibration.source = resolve_data(recipe.data.calibration.source, "data.calibration.source", ("generated",))
    recipe.data.evaluation = resolve_data(recipe.data.evaluation, "data.evaluation")
    recipe.data.train = resolve_data(recipe.data.train, "data.train", split_required=False)


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json", exclude={"profiles"})
    if recipe.model.onnx and "name" not in recipe.model.model_fields_set:
        del data["model"]["name"]  # an ONNX source is named after its file: re-running the file keeps that name
    return yaml.safe_dump(data, sort_keys=False)
