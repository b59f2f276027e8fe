"""What was measured on a variant, typed: its check against the reference logits, its latency, its accuracy,
and the one row form of a measured variant that the serving policy, budgets, `edgepipe bench`, the run's report
and budget check, and `edgepipe info` read.

The manifest keeps these as plain JSON objects (Variant.parity, .latency_ms, .accuracy, .reference_check);
runtime/manifest.py reads them into these views (read_view), tolerating fields an older edgepipe did not write.
A field read from another JSON key, or as a nested view, says so with json_field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgepipe.runtime.manifest import Variant


def json_field(key: str | tuple[str, ...] | None = None, view: type | None = None, each: bool = False, **default):
    """A view field that runtime/manifest.py read_view reads from JSON ``key`` (a tuple: a nested key; (): the
    object itself) instead of its own name, and/or as the view ``view`` (``each``: a dict of them)."""
    return field(metadata={"key": key, "view": view, "each": each}, **default)


@dataclass(frozen=True)
class Check:
    """A variant's logits against the reference's on the same images (runtime.verify.compare_logits)."""
    ok: bool = False
    n: int | None = None
    images: str | None = None                 # "real" photos or "generated" crops
    top1_agreement: float | None = None
    max_abs: float | None = None
    mean_abs: float | None = None
    rel_mean_abs: float | None = None         # mean error over the spread of the reference logits
    max_rel_to_span: float | None = None
    flipped: list = field(default_factory=list)   # {"image", "reference", "got"} per flipped prediction
    tolerance: dict = field(default_factory=dict)
    error: str | None = None                  # why there are no figures (e.g. an output shape mismatch)
    build_host_rel_mean_abs: float | None = None  # on a device: the build host's figure it was held to

    def summary(self) -> dict:
        """The fields a report table shows."""
        return {"ok": self.ok, "n": self.n, "max_abs": self.max_abs, "mean_abs": self.mean_abs,
                "top1_agreement": self.top1_agreement}


@dataclass(frozen=True)
class Latency:
    """Batch-1 latency in ms (runtime.timing): percentiles, spread, and how many timed calls."""
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    mean: float | None = None
    min: float | None = None
    iqr: float | None = None
    iterations: int | None = None
    stable: bool | None = None                # measure_stable: did the p90 settle

    def percentiles(self) -> dict:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99}


@dataclass(frozen=True)
class Accuracy:
    """Top-1 / top-5 on labeled evaluation images (n of them); unlabeled data gives n only."""
    top1: float | None = None
    top5: float | None = None
    n: int | None = None


@dataclass(frozen=True)
class FineTuning:
    """How the model was fine-tuned (ModelInfo.source of a trained model; fine_tuned_on None: not fine-tuned)."""
    fine_tuned_on: str | None = None          # data.train: a dataset name, folder or CSV
    pretrained: bool | None = None            # from ImageNet weights (else a random initialisation)
    train_images: int | None = None
    epochs: float | None = None               # epochs done (early stopping may end a run sooner)
    input_size: int | None = None
    images_per_s: float | None = None         # training throughput
    val_top1: float | None = None
    train_seconds: float | None = None


@dataclass(frozen=True)
class Pruning:
    """What pruning did to the model (ModelInfo.pruned): MACs and batch-1 latency before and after, on which
    backend, and validation top-1 before and after the recovery fine-tune."""
    base_macs: int | None = None
    macs: int | None = None
    macs_reduction: float | None = None
    base_latency_ms: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    backend: str | None = None
    targets_met: bool | None = None
    val_top1: float | None = None
    val_top1_before: float | None = None
    global_pruning: bool | None = None
    importance: str | None = None
    distill_alpha: float | None = None
    recovery_epochs: float | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class ReferenceRun:
    """The model the variants are compared with, measured in the same run (benchmarks/measure.py): PyTorch
    eager fp32, or for a model that came as an ONNX file that file in ONNX Runtime (``reference`` says so);
    its batch-1 latency and, on the evaluation images, its per-image predictions and (labeled) accuracy."""
    latency_ms: dict
    predictions: dict = field(default_factory=dict)
    accuracy: dict | None = None              # top1, top5, n, per_class_top1; None without labeled images
    reference: str | None = None              # None: PyTorch eager fp32

    top1 = property(lambda self: self.accuracy["top1"] if self.accuracy else None)
    top5 = property(lambda self: self.accuracy["top5"] if self.accuracy else None)


@dataclass(frozen=True)
class CheckImages:
    """What a run's checks rested on (Manifest.checks): the kind and count of held-out check images, where they
    came from, how many calibrated and steered accuracy control, and the build's interleaved p90 rounds."""
    images: str | None = None                 # "real" or "generated"
    check_images: int | None = None
    heldout_source: str | None = None
    calibration_images: int | None = None
    control_images: int | None = None
    control_overlaps_check: bool | None = None
    serving_rounds: dict = field(default_factory=dict)   # per backend (edgepipe/serving_rounds.py)


@dataclass(frozen=True)
class FallbackSpeed:
    """What the layers kept in float cost: batch-1 median latency (ms) of the fp32, plain int8 and fallback
    files, alternated run by run on the build host (ONNX Runtime CPU); ``speedup_kept``: the share of int8's
    gain over fp32 the fallback file keeps (1.0: all of it)."""
    int8_ms: float | None = None
    mixed_ms: float | None = None
    fp32_ms: float | None = None
    cost_percent: float | None = None         # fallback vs plain int8
    speedup_kept: float | None = None
    runs: int | None = None
    where: str | None = None


@dataclass(frozen=True)
class FloatFallback:
    """Budgeted fallback of a QDQ int8 variant (compile/mixed_precision.py), Variant.compile["mixed_precision"]:
    the fewest layers kept in float, tried in the doctor's ranked order, until the drop against fp32 on held-out
    images (top-1 on labels, or agreement with fp32) is within ``max_drop_points``; and what that cost."""
    float_layers: list = field(default_factory=list)
    target_met: bool = False
    validation_kind: str | None = None        # "labels" or "fp32 agreement"
    validation_images: int | None = None
    max_drop_points: float | None = None
    fp32_top1: float | None = None            # top-1 or, for "fp32 agreement", 1.0
    int8_top1: float | None = None            # plain int8
    final_top1: float | None = None           # with float_layers in float
    final_drop_points: float | None = None
    ranked_by: str | None = None
    ranking: list = field(default_factory=list)   # the first {"layer", "injected"} of the ranking, worst first
    steps: list = field(default_factory=list)     # {"float_layers", "top1", "drop_points", "layers"?} per set tried
    seconds: float | None = None
    speed: FallbackSpeed | None = json_field(view=FallbackSpeed, default=None)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Row:
    """One measured variant on one backend. ``id`` is the variant's name on its own backend and
    ``name@backend`` on another; the budget checks (benchmarks/budgets.py CHECKS) read its fields by name."""
    id: str
    name: str
    backend: str
    precision: str
    status: str = "ok"
    made_from: str = "base"
    quantization: str | None = None
    native_backend: str | None = None         # the backend the variant was compiled for
    top1: float | None = None
    top5: float | None = None
    n: int | None = None
    agreement_with_fp32: float | None = None  # top-1 agreement with the fp32 reference
    top1_drop_pts: float | None = None        # top-1 points below the fp32 reference
    worst_class_drop_pts: float | None = None
    p90_ms: float | None = None
    throughput_fps: float | None = None
    macs: int | None = None
    size_mb: float | None = None

    @classmethod
    def of_variant(cls, name: str, v: "Variant", reference_top1: float | None = None) -> "Row":
        """The row of a manifest variant on its own backend, from what `edgepipe run` measured; the top-1 drop
        against ``reference_top1`` (the fp32 reference's top-1) when both are known."""
        acc = v.scores or Accuracy()
        lat = v.latency or Latency()
        drop = (reference_top1 - acc.top1) * 100 if acc.top1 is not None and reference_top1 is not None else None
        return cls(id=name, name=name, backend=v.backend, precision=v.precision, status=v.status, made_from=v.made_from,
                   quantization=v.quantization, native_backend=v.backend, top1=acc.top1, top5=acc.top5, n=acc.n,
                   agreement_with_fp32=v.agreement_with_fp32, top1_drop_pts=drop, p90_ms=lat.p90,
                   throughput_fps=round(1000.0 / lat.p50, 2) if lat.p50 else None, macs=v.macs, size_mb=v.size_mb)

    @classmethod
    def from_dict(cls, data: dict) -> "Row":
        """A row from its dict form (bench's rows carry more keys; those are left out; no name: the id's)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"name": data["id"], **{k: v for k, v in data.items() if k in names}})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
