"""manifest.json, typed: one per artifact folder, written by `edgepipe run` and `edgepipe build-engine`, read by
the runtime, bench and verify. Every reader and writer goes through these dataclasses.

    m = Manifest.load("out/default")          # validated: a damaged or hand-edited file is one ManifestError
    v = m.variants["openvino-int8"]           # Variant: backend, precision, files (FileEntry), status, measurements
    m.dump("out/default")                     # atomic

The manifest lists every file with its sha256 (runtime/integrity.py checks them before anything loads), the
preprocessing, the labels, each variant (what it was made from, how it was compiled, what was measured) and the
reference set that `edgepipe verify` reproduces on the device. Unknown fields are refused with a close match.
The free-form parts (how a variant was compiled, its engine sidecar, what was measured) are read here, and only
here, into the typed views of runtime/compiled.py and runtime/measured.py (read_view).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from edgepipe.runtime.compiled import CompileFacts, EngineSidecar, ExportedOnnx, WeightsSource
from edgepipe.runtime.errors import ManifestError
from edgepipe.runtime.integrity import FileEntry
from edgepipe.runtime.measured import Accuracy, Check, CheckImages, FineTuning, FloatFallback, Latency, Pruning
from edgepipe.runtime.names import did_you_mean, refuse_unknown
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.runtime.safe_files import load_json

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2          # 2: typed variants that say what they were made from (made_from, quantization)
STATUSES = ("ok", "unverified", "failed", "pending-build")
RENAMED = {"agreement_with_torch": "agreement_with_fp32"}   # old field name -> new: older folders still load
MADE_FROM = ("base", "pruned")          # which model's fp32 ONNX a variant was compiled from
QUANTIZATION = ("ptq", "qat")           # how an int8 variant got its scales (None for float variants)
ENGINE_TYPINGS = ("weak", "strong")      # Variant.tensorrt["typing"]: builder precision flags or the ONNX's types
ENGINE_FLOATS = ("fp32", "fp16", "bf16")  # Variant.tensorrt["float_precision"]: what an engine's float layers run in



def name_prefix(made_from: str) -> str:
    """What the names of a model's variants, files and steps start with: "" for the base model, "pruned-"."""
    if made_from not in MADE_FROM:
        raise ValueError(f"made_from {made_from!r}: one of {', '.join(MADE_FROM)}")
    return "" if made_from == "base" else f"{made_from}-"


def variant_name(backend: str, precision: str, made_from: str = "base", quantization: str | None = None) -> str:
    """The one naming of variants: [pruned-]BACKEND-PRECISION[-qat], e.g. openvino-int8, pruned-tensorrt-fp16."""
    return f"{name_prefix(made_from)}{backend}-{precision}" + ("-qat" if quantization == "qat" else "")


def exported_onnx(made_from: str) -> str:
    """The fp32 ONNX `edgepipe run` exports of a model (its key in Manifest.export), every variant's source."""
    return f"{name_prefix(made_from)}model.onnx"

@dataclass
class Variant:
    """One deployable variant: a backend x precision compiled from one model, and what was measured on it."""
    backend: str
    precision: str
    format: str
    files: list[FileEntry]
    input_shape: list[int]                      # N, C, H, W; -1 for a dynamic batch
    status: str = "ok"                          # see STATUSES; only "ok" variants are served
    made_from: str = "base"                     # see MADE_FROM
    quantization: str | None = None             # see QUANTIZATION
    compile: dict = field(default_factory=dict)  # how it was compiled (quantizer settings, layers kept in float, ...)
    macs: int | None = None
    source_onnx_sha256: str | None = None
    model_hash: str | None = None
    versions: dict = field(default_factory=dict)
    device: str | None = None                   # OpenVINO device the runtime uses unless told otherwise
    tensorrt: dict | None = None                # engine build facts (`edgepipe build-engine`); typing and
                                                # float_precision checked against ENGINE_TYPINGS / ENGINE_FLOATS
    # measured by `edgepipe run` through the runtime
    parity: dict | None = None
    reference_check: dict | None = None         # parity on the reference set alone: what verify reproduces
    reference_logits: str | None = None         # key into Manifest.reference_set.logits
    backend_used: str | None = None
    latency_ms: dict | None = None
    size_mb: float | None = None
    accuracy: dict | None = None
    predictions: dict | None = None
    agreement_with_fp32: float | None = None    # top-1 agreement with the fp32 reference model's predictions
    budget: str | None = None                   # the recipe budget it breaks (then it is never served)

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, data, where: str = "variant") -> "Variant":
        return _variant(data, where)

    @property
    def servable(self) -> bool:
        return self.status == "ok" and self.budget is None

    # typed views of what was measured (runtime/measured.py); None when it was not
    check = property(lambda self: read_view(Check, self.parity))
    host_check = property(lambda self: read_view(Check, self.reference_check))
    float_fallback = property(lambda self: read_view(FloatFallback, self.compiled.mixed_precision))
    latency = property(lambda self: read_view(Latency, self.latency_ms))
    scores = property(lambda self: read_view(Accuracy, self.accuracy))
    # typed views of how it was made (runtime/compiled.py); empty views when nothing was recorded
    compiled = property(lambda self: read_view(CompileFacts, self.compile) or CompileFacts())
    engine = property(lambda self: read_view(EngineSidecar, self.tensorrt) or EngineSidecar())
    top1 = property(lambda self: (self.scores or Accuracy()).top1)
    p90_ms = property(lambda self: (self.latency or Latency()).p90)


@dataclass
class ModelInfo:
    name: str
    num_classes: int
    source: dict = field(default_factory=dict)   # where the weights came from (package, file + sha256, ONNX, ...)
    recipe: str | None = None
    build: dict = field(default_factory=dict)    # how bench rebuilds the PyTorch reference: pretrained, checkpoint, weights
    pruned: dict | None = None                   # MACs / latency / accuracy before and after pruning

    weights = property(lambda self: read_view(WeightsSource, self.source) or WeightsSource())
    source_onnx = property(lambda self: self.weights.onnx)   # the ONNX file it came as, if it did
    source_checkpoint = property(lambda self: self.weights.checkpoint)
    fine_tuning = property(lambda self: read_view(FineTuning, self.source))   # None: not recorded
    pruning = property(lambda self: read_view(Pruning, self.pruned))          # None: not pruned


@dataclass
class ReferenceSet:
    """Held-out images (uint8 NHWC crops) and the fp32 logits each variant is compared with, for verify."""
    inputs: FileEntry
    logits: dict[str, FileEntry]
    names: list[str]
    images: str                                  # "real" or "generated": the tolerance depends on it
    count: int
    layout: str = "NHWC uint8, resized and cropped, model colour order"
    color: str | None = None                     # colour order of the crops (RGB/BGR); None: folders before it was recorded


@dataclass
class Manifest:
    model: ModelInfo
    preprocess: Preprocess
    labels: list[str]
    variants: dict[str, Variant]
    input: dict = field(default_factory=dict)
    output: dict = field(default_factory=lambda: {"name": "logits", "kind": "logits"})
    versions: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)   # fp32 ONNX file -> its parity against the reference model
    reference_set: ReferenceSet | None = None
    checks: dict | None = None                   # what the check / calibration / control images were
    defaults: dict[str, str] = field(default_factory=dict)   # backend -> the variant served on it
    default_variant: str | None = None
    reference: dict | None = None                # PyTorch eager latency and accuracy on the build host
    format_version: int = FORMAT_VERSION

    # ---------------------------------------------------------------- read / write
    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> "Manifest":
        """Read and validate ``model_dir/manifest.json`` (structure only; hashes are checked per variant)."""
        root = Path(model_dir)
        path = root / MANIFEST_NAME
        if root.name == MANIFEST_NAME and root.is_file():
            raise ManifestError(f"{root} is the manifest; give its folder instead: {root.parent}")
        if not root.is_dir():
            raise ManifestError(f"model folder {root} does not exist; pass the --out folder of `edgepipe run`")
        try:  # a FIFO or a folder in its place is refused by load_json (one line), not taken as absent
            data = load_json(path, "manifest", "re-run `edgepipe run` to rewrite it")
        except FileNotFoundError:
            raise ManifestError(f"no {MANIFEST_NAME} in {root}; pass the --out folder of `edgepipe run`") from None
        return cls.from_dict(data, str(path))

    def dump(self, model_dir: str | os.PathLike) -> Path:
        from edgepipe.atomic import write_json
        path = Path(model_dir) / MANIFEST_NAME
        write_json(path, self.to_dict())
        return path

    def to_dict(self) -> dict:
        data = _plain(self)
        data["preprocess"] = self.preprocess.to_dict()
        return data

    @classmethod
    def from_dict(cls, data, where: str = "manifest") -> "Manifest":
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object at the top level")
        _check_keys(cls, data, where)
        if "format_version" not in data:
            raise ManifestError(f"{where}: missing required field(s) format_version")
        if data["format_version"] != FORMAT_VERSION:
            raise ManifestError(f"{where}: format_version {data['format_version']!r} is not supported (expected {FORMAT_VERSION}); "
                                f"re-run `edgepipe run` with the same recipe and --out to rewrite it")
        labels = data["labels"]
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise ManifestError(f"{where}: labels must be a non-empty list of strings")
        variants = data["variants"]
        if not isinstance(variants, dict) or not variants:
            raise ManifestError(f"{where}: variants must be a non-empty object")
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict) or not all(isinstance(x, str) for x in defaults.values()):
            raise ManifestError(f"{where}: defaults must map backend names to variant names")
        if not isinstance(data.get("default_variant"), (str, type(None))):
            raise ManifestError(f"{where}: default_variant must be a variant name")
        named = [(f"defaults[{b!r}]", n) for b, n in defaults.items()] + [("default_variant", data.get("default_variant"))]
        for key, name in named:
            if name is not None and name not in variants:
                hint = did_you_mean(name, variants)
                raise ManifestError(f"{where}: {key} names variant {name!r}, which is not in variants{hint}; fix it or "
                                    "re-run `edgepipe run` to rewrite the manifest")
        for key in ("input", "output", "versions", "export", "checks", "reference"):
            if not isinstance(data.get(key) or {}, dict):
                raise ManifestError(f"{where}: {key} must be an object")
        model = data["model"]
        if not isinstance(model, dict):
            raise ManifestError(f"{where}: model must be an object")
        _check_keys(ModelInfo, model, f"{where}: model")
        return cls(
            model=ModelInfo(**model), preprocess=_preprocess(data["preprocess"], where), labels=list(labels),
            variants={name: _variant(v, f"{where}: variant {name!r}") for name, v in variants.items()},
            input=data.get("input") or {}, output=data.get("output") or {}, versions=data.get("versions") or {},
            export=data.get("export") or {}, reference_set=_reference_set(data.get("reference_set"), where),
            checks=data.get("checks"), defaults=dict(defaults), default_variant=data.get("default_variant"),
            reference=data.get("reference"), format_version=data["format_version"])

    # ---------------------------------------------------------------- questions readers ask
    def variant(self, name: str) -> Variant:
        """The variant called ``name``; an unknown name is one ManifestError with a close match."""
        if name not in self.variants:
            raise unknown_variant(name, self.variants)
        return self.variants[name]

    def of_backend(self, backend: str) -> dict[str, Variant]:
        return {n: v for n, v in self.variants.items() if v.backend == backend}

    @property
    def input_name(self) -> str:
        """The model input's name (the ONNX input every variant takes)."""
        return (self.input or {}).get("name", "input")

    @property
    def check_images(self) -> CheckImages | None:
        """Manifest.checks typed: what the run's checks rested on; None for a folder without it."""
        return read_view(CheckImages, self.checks)

    @property
    def serving_rounds(self) -> dict:
        """Per backend, the build's interleaved p90 rounds (edgepipe/serving_rounds.py)."""
        return (self.check_images or CheckImages()).serving_rounds

    @property
    def exports(self) -> dict[str, ExportedOnnx]:
        """Manifest.export typed: each exported fp32 ONNX (see exported_onnx) with its hash and parity."""
        return {name: read_view(ExportedOnnx, entry) or ExportedOnnx() for name, entry in self.export.items()}


def unknown_variant(name: str, variants, where: str = "this manifest") -> ManifestError:
    """The one error for a variant name that is not there: with a close match and the names there are."""
    return ManifestError(f"no variant {name!r} in {where}{did_you_mean(name, variants)}; available: {', '.join(variants)}")


# ---------------------------------------------------------------- parsing helpers

def read_view(cls, data):
    """The typed view ``cls`` (a dataclass of runtime/compiled.py or measured.py) of one of the manifest's JSON
    objects; None for none. Each field is read by its name, or as its json_field says (another key, a nested
    view); keys the view does not know are left out, and absent or null ones keep the field's default."""
    if not data:
        return None
    values = {}
    for f in dataclasses.fields(cls):
        key = f.metadata.get("key")
        value = data
        for part in (f.name,) if key is None else (key,) if isinstance(key, str) else key:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        view = f.metadata.get("view")
        if view is not None:
            value = {k: read_view(view, v) for k, v in value.items()} if f.metadata.get("each") else read_view(view, value)
            if value is None:
                continue
        values[f.name] = type(value)(value) if isinstance(value, (dict, list)) else value
    return cls(**values)


def _check_keys(cls, data: dict, where: str) -> None:
    """Every required field of ``cls`` present, and no field it does not have (with a close match)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ManifestError(f"{where}: missing required field(s) {', '.join(missing)}")
    refuse_unknown(data, fields, lambda key, hint: ManifestError(
        f"{where}: unknown field {key!r}{hint}; re-run `edgepipe run` to rewrite the manifest"), quote=False)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_size(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 16384


_PREPROCESS_FIELDS = ("resize", "crop", "mean", "std", "color")


def _preprocess(pre, where: str) -> Preprocess:
    if not isinstance(pre, dict) or [k for k in _PREPROCESS_FIELDS if k not in pre]:
        raise ManifestError(f"{where}: preprocess must give {', '.join(_PREPROCESS_FIELDS)}")
    if not _is_size(pre["resize"]) or not _is_size(pre["crop"]):
        raise ManifestError(f"{where}: preprocess resize/crop must be positive pixel counts (got {pre['resize']!r}, {pre['crop']!r})")
    for key in ("mean", "std"):
        if not isinstance(pre[key], list) or len(pre[key]) != 3 or not all(_is_number(x) for x in pre[key]):
            raise ManifestError(f"{where}: preprocess {key} must be 3 numbers (got {pre[key]!r})")
    if any(s == 0 for s in pre["std"]):
        raise ManifestError(f"{where}: preprocess std must be non-zero")
    if not isinstance(pre["color"], str) or pre["color"].upper() not in ("RGB", "BGR"):
        raise ManifestError(f"{where}: preprocess color must be RGB or BGR (got {pre['color']!r})")
    return Preprocess.from_manifest(pre)


def _file(entry, where: str) -> FileEntry:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"), str):
        raise ManifestError(f"{where} has a file entry without a path/sha256 string")
    size = entry.get("bytes")
    return FileEntry(entry["path"], entry["sha256"], size if isinstance(size, int) and not isinstance(size, bool) else None)


def _variant(v, where: str) -> Variant:
    if not isinstance(v, dict):
        raise ManifestError(f"{where} must be an object")
    v = {RENAMED.get(k, k): value for k, value in v.items()}
    _check_keys(Variant, v, where)
    for key in ("backend", "precision", "format", "status", "made_from"):
        if not isinstance(v.get(key, ""), str):
            raise ManifestError(f"{where}: {key} must be a string (got {v[key]!r})")
    if v.get("status", "ok") not in STATUSES:
        raise ManifestError(f"{where}: status {v['status']!r} is not one of {', '.join(STATUSES)}")
    if v.get("made_from", "base") not in MADE_FROM or v.get("quantization") not in (None, *QUANTIZATION):
        raise ManifestError(f"{where}: made_from must be one of {', '.join(MADE_FROM)} and quantization one of "
                            f"{', '.join(QUANTIZATION)} or null")
    shape = v["input_shape"]
    if not isinstance(shape, list) or len(shape) != 4 or not all(d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in shape):
        raise ManifestError(f"{where}: input_shape must be 4 integers (N, C, H, W; -1 for any), got {shape!r}")
    if not isinstance(v["files"], list) or not v["files"]:
        raise ManifestError(f"{where}: files must be a non-empty list")
    for key in ("compile", "versions", "tensorrt", "parity", "reference_check", "latency_ms", "accuracy", "predictions"):
        if not isinstance(v.get(key) or {}, dict):
            raise ManifestError(f"{where}: {key} must be an object")
    engine = v.get("tensorrt") or {}
    if engine.get("typing", "weak") not in ENGINE_TYPINGS or engine.get("float_precision", "fp32") not in ENGINE_FLOATS:
        raise ManifestError(f"{where}: tensorrt typing must be one of {', '.join(ENGINE_TYPINGS)} and float_precision one of "
                            f"{', '.join(ENGINE_FLOATS)}; rebuild the engine with `edgepipe build-engine`")
    return Variant(**{**v, "files": [_file(f, where) for f in v["files"]]})


def _reference_set(ref, where: str) -> ReferenceSet | None:
    if ref is None:
        return None
    where = f"{where}: reference_set"
    if not isinstance(ref, dict):
        raise ManifestError(f"{where} must be an object")
    _check_keys(ReferenceSet, ref, where)
    if not isinstance(ref["logits"], dict) or not isinstance(ref["names"], list) or not _is_size(ref["count"]):
        raise ManifestError(f"{where}: logits must be an object, names a list and count a positive number")
    return ReferenceSet(**{**ref, "inputs": _file(ref["inputs"], where),
                           "logits": {k: _file(e, where) for k, e in ref["logits"].items()}})


def _plain(obj):
    """Dataclasses -> JSON-ready dicts, leaving out fields that are None (absent means not known)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, Preprocess):
            return obj.to_dict()
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
