"""How a variant was made, typed: what its compile step recorded (Variant.compile), the sidecar `edgepipe
build-engine` writes for a TensorRT engine (Variant.tensorrt) and each exported ONNX (Manifest.export).

The manifest keeps these as plain JSON objects, free-form per compile target; the views here are the parts that
other steps read (the report, the TensorRT build plan), tolerating fields an older edgepipe did not write.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgepipe.runtime.integrity import FileEntry
from edgepipe.runtime.measured import Check, _FromDict


@dataclass(frozen=True)
class QdqCheck(_FromDict):
    """compile/qdq_check.check_qdq's verdict on a QDQ ONNX: whether TensorRT accepts its structure, and why not."""
    ok: bool = False
    errors: list[str] = field(default_factory=list)

    def why(self, count: int) -> str:
        return "; ".join(self.errors[:count])


@dataclass(frozen=True)
class EngineSource:
    """An ONNX an engine is built from, and the precision of its float (non-Q/DQ) parts (None: not recorded)."""
    entry: FileEntry
    floats: str | None = None


@dataclass(frozen=True)
class CompileFacts:
    """The parts of a variant's compile record (Variant.compile) that other steps read."""
    float_layers: list[str] = field(default_factory=list)    # int8 variants: layers kept in float
    method: str | None = None                                # the quantizer's call, e.g. nncf.quantize
    calibration_images: int | None = None
    bounded_layers: int | None = None                        # isa portable: layers whose weight steps were widened
    channels_narrowed: int | None = None
    mixed_precision: dict = field(default_factory=dict)      # the mixed-precision search's report
    qdq_check: QdqCheck | None = None                        # "tensorrt_qdq_check": TensorRT's QDQ rules
    sources: dict[str, str] = field(default_factory=dict)    # TensorRT, pending build: typing -> ONNX path
    source_floats: dict[str, str] = field(default_factory=dict)  # typing -> float precision of that ONNX
    fp32_layers: list[str] = field(default_factory=list)     # "fp16_onnx": layers near fp16 overflow, kept fp32

    @classmethod
    def of(cls, info: dict | None) -> CompileFacts:
        info = info or {}
        return cls(float_layers=list(info.get("float_layers") or []), method=info.get("method"),
                   calibration_images=info.get("calibration_images"), bounded_layers=info.get("bounded_layers"),
                   channels_narrowed=info.get("channels_narrowed"), mixed_precision=dict(info.get("mixed_precision") or {}),
                   qdq_check=QdqCheck.from_dict(info.get("tensorrt_qdq_check")),
                   sources=dict(info.get("sources") or {}), source_floats=dict(info.get("source_floats") or {}),
                   fp32_layers=list((info.get("fp16_onnx") or {}).get("fp32_layers") or []))


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
    source_files: dict[str, EngineSource] = field(default_factory=dict)   # typing -> the ONNX to rebuild from
    qdq_check: QdqCheck | None = None         # older sidecars kept the QDQ verdict here
    profile: dict | None = None               # the optimization profile's min / opt / max shapes
    timing_cache: str | None = None           # its file name in the folder, and what happened to it
    timing_cache_state: str | None = None
    fp32_layers: dict | None = None           # layers near fp16 overflow pinned to fp32, and how
    layers: dict = field(default_factory=dict)   # the engine inspector's per-layer precisions

    @classmethod
    def of(cls, side: dict | None) -> EngineSidecar:
        side = side or {}
        files = {typing: EngineSource(FileEntry(e["path"], e["sha256"], e.get("bytes")), e.get("floats"))
                 for typing, e in (side.get("source_files") or {}).items()}
        return cls(typing=side.get("typing", "weak"), precision=side.get("precision"),
                   float_precision=side.get("float_precision"), source_onnx=side.get("source_onnx"),
                   batch=side.get("batch"), source_onnx_sha256=side.get("source_onnx_sha256"), source_files=files,
                   qdq_check=QdqCheck.from_dict(side.get("qdq_check")), profile=side.get("profile"),
                   timing_cache=side.get("timing_cache"), timing_cache_state=side.get("timing_cache_state"),
                   fp32_layers=side.get("fp32_layers"), layers=dict(side.get("layers") or {}))


@dataclass(frozen=True)
class ExportedOnnx:
    """One fp32 ONNX `edgepipe run` exported (Manifest.export): its hash and its parity with its reference."""
    sha256: str | None = None
    parity: Check | None = None

    @classmethod
    def of(cls, entry: dict | None) -> ExportedOnnx:
        entry = entry or {}
        return cls(entry.get("sha256"), Check.from_dict(entry.get("parity_vs_pytorch")))
