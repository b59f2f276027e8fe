"""How a variant was made, typed: what its compile step recorded (Variant.compile), the sidecar `edgepipe
build-engine` writes for a TensorRT engine (Variant.tensorrt) and each exported ONNX (Manifest.export).

The manifest keeps these as plain JSON objects, free-form per compile target; the views here are the parts that
other steps read (the report, the TensorRT build plan), read by runtime/manifest.py read_view (fields read from
another key or as a nested view say so with json_field), tolerating fields an older edgepipe did not write.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgepipe.runtime.integrity import FileEntry
from edgepipe.runtime.measured import Check, json_field


@dataclass(frozen=True)
class QdqCheck:
    """compile/qdq_check.check_qdq's verdict on a QDQ ONNX: whether TensorRT accepts its structure, and why not."""
    ok: bool = False
    errors: list[str] = field(default_factory=list)

    def why(self, count: int) -> str:
        return "; ".join(self.errors[:count])


@dataclass(frozen=True)
class EngineSource:
    """An ONNX an engine is built from, and the precision of its float (non-Q/DQ) parts (None: not recorded)."""
    entry: FileEntry = json_field(key=(), view=FileEntry)   # the JSON object is the file entry, with "floats"
    floats: str | None = None


@dataclass(frozen=True)
class CompileFacts:
    """The parts of a variant's compile record (Variant.compile) that other steps read."""
    float_layers: list[str] = field(default_factory=list)    # int8 variants: layers kept in float
    method: str | None = None                                # the quantizer's call, e.g. nncf.quantize
    mode: str | None = None                                  # the quantizer's mode (e.g. accuracy control)
    calibration_images: int | None = None
    bounded_layers: int | None = None                        # isa portable: layers whose weight steps were widened
    channels_narrowed: int | None = None
    mixed_precision: dict = field(default_factory=dict)      # the mixed-precision search's report
    qdq_check: QdqCheck | None = json_field("tensorrt_qdq_check", QdqCheck, default=None)   # TensorRT's QDQ rules
    sources: dict[str, str] = field(default_factory=dict)    # TensorRT, pending build: typing -> ONNX path
    source_floats: dict[str, str] = field(default_factory=dict)  # typing -> float precision of that ONNX
    fp32_layers: list[str] = json_field(("fp16_onnx", "fp32_layers"), default_factory=list)  # near fp16 overflow: kept fp32


@dataclass(frozen=True)
class EngineLayers:
    """The engine inspector's summary in a sidecar (compile/tensorrt_layers.py layer_precisions)."""
    available: bool | None = None
    by_precision: dict | None = None          # compute layers per precision
    data_movement: dict | None = None         # reformat / shuffle layers per kind
    raw: str | None = None                    # the inspector's raw JSON, its file name in the folder
    per_layer: list = field(default_factory=list)   # {"name", "type", "precision", "output", "role"} per layer


@dataclass(frozen=True)
class EngineSidecar:
    """The parts of a TensorRT engine's sidecar (Variant.tensorrt) the build plan, the first-run check and the
    backend read."""
    typing: str = "weak"                      # records from before strong typing are weakly typed
    precision: str | None = None
    float_precision: str | None = None        # what the engine's float layers run in
    source_onnx: str | None = None
    batch: list[int] | None = None            # the optimization profile's MIN, OPT, MAX
    source_onnx_sha256: str | None = None
    source_files: dict[str, EngineSource] = json_field(view=EngineSource, each=True, default_factory=dict)  # typing -> ONNX
    qdq_check: QdqCheck | None = json_field(view=QdqCheck, default=None)   # older sidecars kept the QDQ verdict here
    profile: dict | None = None               # the optimization profile's min / opt / max shapes
    timing_cache: str | None = None           # its file name in the folder, and what happened to it
    timing_cache_state: str | None = None
    fp32_layers: dict | None = None           # layers near fp16 overflow pinned to fp32, and how
    layers: EngineLayers = json_field(view=EngineLayers, default_factory=EngineLayers)   # per-layer precisions


@dataclass(frozen=True)
class ExportedOnnx:
    """One fp32 ONNX `edgepipe run` exported (Manifest.export): its hash and its parity with its reference."""
    sha256: str | None = None
    parity: Check | None = json_field("parity_vs_pytorch", Check, default=None)


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights came from (ModelInfo.source): the parts other steps read."""
    onnx: str | None = None                   # the ONNX file it came as, if it did
    checkpoint: str | None = None             # a checkpoint file it was loaded from, if it was
