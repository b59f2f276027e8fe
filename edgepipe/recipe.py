"""Recipes: YAML, typed per stage. Unknown keys are errors with a close-match suggestion; wrong types and
missing files are one clear line each, before any work starts. ``profiles:`` hold overrides selected with
``--profile``; ``--set a.b=c`` overrides single values. The resolved recipe is written to the output."""
from __future__ import annotations

import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError, field_validator

from edgepipe import UserError


class RecipeError(UserError):
    pass


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = "efficientnet_lite0"
    pretrained: bool = True
    checkpoint: Optional[str] = None      # a state_dict (.pt with tensors only) or .safetensors
    num_classes: Optional[int] = None     # None: keep the model's own head
    input_size: Optional[PositiveInt] = None  # deployed input size; None: the model's own (224 for ImageNet weights)


class CalibrationData(Section):
    source: str = "generated"   # "generated" (crops of photos the set-up installs) or a folder / CSV of images
    count: int = 300            # images to generate when source is "generated"
    limit: Optional[int] = None  # use at most this many (None: every image given; never silently capped)


class DataConfig(Section):
    calibration: CalibrationData = CalibrationData()
    evaluation: Optional[str] = None   # labeled CSV (file,class_index) or ImageFolder; unlabeled folder -> agreement only
    parity_images: int = 64            # how many calibration/evaluation images the parity checks use
    on_bad_image: Literal["skip", "stop"] = "skip"   # unreadable images: skip and list them, or stop before work
    # training data (stages.train): "fashion-mnist", an ImageFolder tree or a CSV
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
    threads: Optional[int] = None      # CPU threads for training (None: torch's default)
    workers: int = 2
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None
    input_size: Optional[PositiveInt] = None  # train at this size (default: model.input_size, else the model's own)
    freeze_backbone_epochs: int = 0
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


class QuantizeStage(Section):
    enabled: bool = True
    method: Literal["ptq", "qat", "both"] = "ptq"
    max_drop: Optional[float] = None   # top-1 points; enables accuracy control / mixed precision when labeled data exists
    mixed_precision: bool = True       # keep the most sensitive layers in float until max_drop is met
    qat_epochs: float = 1.0
    qat_lr: float = 1e-4
    qat_calibration_batches: int = 8   # batches that set the initial fake-quant ranges before QAT
    fast_bias_correction: bool = False
    activation_symmetric: bool = True  # QDQ for TensorRT: symmetric activations (zero point 0)
    qdq_mode: Literal["s8s8", "u8s8_reduce_range", "auto"] = "auto"


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


class Target(Section):
    backend: Literal["openvino", "onnxruntime", "tensorrt"]
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    pruned: Optional[bool] = None      # None: build for every model the stages produce


class BenchConfig(Section):
    warmup: int = 10
    iterations: int = 100
    threads: Optional[int] = None


class RatioBudget(Section):
    of: str                                        # torch_eager | roofline | <variant> | <variant>@<backend>
    ratio: float


class Budget(Section):
    variants: str = "*"                            # glob over variant names
    backends: str = "*"                            # glob over the backend a variant runs on (bench)
    top1_min: Optional[float] = None
    top5_min: Optional[float] = None
    top1_drop_max: Optional[float] = None          # points against the fp32 variant
    per_class_drop_max: Optional[float] = None     # points, worst class
    p90_ms_max: Optional[float] = None
    p90_ratio_max: Optional[RatioBudget] = None    # {of: torch_eager | roofline | <variant>, ratio: 0.5}
    throughput_fps_min: Optional[float] = None
    agreement_min: Optional[float] = None          # top-1 agreement with the fp32 variant


class Recipe(Section):
    name: str = "recipe"
    description: str = ""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    stages: StagesConfig = StagesConfig()
    export: ExportConfig = ExportConfig()
    targets: list[Target] = [Target(backend="onnxruntime"), Target(backend="openvino")]
    bench: BenchConfig = BenchConfig()
    budgets: list[Budget] = []
    profiles: dict[str, dict] = {}

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        if not v:
            raise ValueError("give at least one target (backend x precision)")
        return v


# ---------------------------------------------------------------- loading

def _section_type(annotation) -> type | None:
    """The Section class inside an annotation (Section, Optional[Section], list[Section])."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found:
            return found
    return None


def _check_keys(data: Any, cls: type[Section], where: str) -> None:
    if isinstance(data, list):
        for i, item in enumerate(data):
            _check_keys(item, cls, f"{where}[{i}]")
        return
    if not isinstance(data, dict):
        return
    fields = cls.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; allowed: {', '.join(fields)}"
            raise RecipeError(f"unknown key '{where + '.' if where else ''}{key}'{hint}")
        sub = _section_type(fields[key].annotation)
        if sub is not None:
            _check_keys(value, sub, f"{where + '.' if where else ''}{key}")


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
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


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
            close = difflib.get_close_matches(profile, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{where}: no profile {profile!r}{hint}; profiles: {', '.join(names) or 'none'}")
        _check_keys(profiles[profile], Recipe, "")
        data = _deep_merge(data, profiles[profile])
    for item in overrides:
        _apply_set(data, item)
    try:
        _check_keys(data, Recipe, "")
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        got_s = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
        raise RecipeError(f"{where}: {loc}: {err['msg']}{got_s}") from None
    try:
        _resolve_paths(recipe, Path(base_dir))
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    return recipe


def _resolve_paths(recipe: Recipe, base: Path) -> None:
    """Relative paths are relative to the recipe's folder; every given file must exist now."""
    def resolve(value: str | None, what: str, special=()) -> str | None:
        if value is None or value in special or value == "fashion-mnist":
            return value
        if value.startswith("fashion-mnist:"):
            if not re.fullmatch(r"fashion-mnist:(train|test)(:[1-9][0-9]*)?", value):
                raise RecipeError(f"{what}: {value!r}: write fashion-mnist:test or fashion-mnist:train, optionally :COUNT")
            return value
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = (base / p) if (base / p).exists() or not Path(value).exists() else Path(value)
        if not p.exists():
            raise RecipeError(f"{what}: {value} does not exist")
        return str(p.resolve())

    recipe.model.checkpoint = resolve(recipe.model.checkpoint, "model.checkpoint")
    recipe.data.calibration.source = resolve(recipe.data.calibration.source, "data.calibration.source", ("generated",))
    recipe.data.evaluation = resolve(recipe.data.evaluation, "data.evaluation")
    recipe.data.train = resolve(recipe.data.train, "data.train", ("fashion-mnist",))


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json", exclude={"profiles"})
    return yaml.safe_dump(data, sort_keys=False)
