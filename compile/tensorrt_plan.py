"""What `edgepipe build-engine` will do, decided without TensorRT: supported versions, typing mode, the
source ONNX, the optimization profile, the timing cache's name and whether an engine is up to date (a built
engine's per-layer precisions are read in compile/tensorrt_layers.py). Everything here is plain Python, so it is
tested on machines without a GPU; compile/tensorrt_engine.py only carries out the plan with TensorRT.

Typing modes (NVIDIA's "strongly typed networks"):
- weak: precision from builder flags (``BuilderFlag.FP16`` / ``INT8``); TensorRT 10.x only (deprecated in
  10.12, removed in 11.0). fp16 is built from the fp32 ONNX, int8 from the QDQ ONNX.
- strong: precision from the ONNX itself (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``); preferred from
  10.12, the only mode in 11+. fp16 is built from the fp16 ONNX `edgepipe run` exports, int8 from the QDQ ONNX.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from edgepipe import UserError
from edgepipe.runtime.errors import BackendUnavailable
from edgepipe.runtime.compiled import QdqCheck
from edgepipe.runtime.integrity import FileEntry, verify_files
from edgepipe.runtime.manifest import Manifest, Variant, exported_onnx, variant_name

MIN_VERSION = (10, 3)        # JetPack 6.1 / 6.2
NEWEST_MAJOR = 11            # newest release line checked against compile/tensorrt_api.json
STRONG_PREFERRED = (10, 12)  # weak typing deprecated from here
WEAK_REMOVED = (11, 0)       # BuilderFlag.FP16 / INT8 gone
TYPINGS = ("auto", "weak", "strong")
PRECISIONS = ("fp16", "int8")
# the ONNX Runtime variant (backend, precision) an engine may be built from when the tensorrt target's own
# source is missing: one made from the same model, post-training quantized for int8
FALLBACK_VARIANT = {"int8": ("onnxruntime", "int8"), "fp16": ("onnxruntime", "fp32")}


def parse_version(text: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", str(text).split("+")[0])
    return tuple(int(x) for x in nums[:4])


def check_version(text: str) -> tuple[int, ...]:
    """The version as a tuple; BackendUnavailable (one line) when edgepipe does not support it."""
    v = parse_version(text)
    if v[:2] < MIN_VERSION:
        raise BackendUnavailable(f"TensorRT {text} is too old: edgepipe builds with TensorRT {MIN_VERSION[0]}.{MIN_VERSION[1]} "
                                 f"to {NEWEST_MAJOR}.x; on a Jetson flash JetPack 6.1 or newer (TensorRT 10.3)")
    if v[0] > NEWEST_MAJOR:
        raise BackendUnavailable(f"TensorRT {text} is newer than edgepipe knows (TensorRT {MIN_VERSION[0]}.{MIN_VERSION[1]} to "
                                 f"{NEWEST_MAJOR}.x); install TensorRT {NEWEST_MAJOR}.x: pip install 'tensorrt-cu12>={NEWEST_MAJOR},<{NEWEST_MAJOR + 1}'")
    return v


def weak_typing_available(version: tuple[int, ...]) -> bool:
    return tuple(version[:2]) < WEAK_REMOVED


def typing_mode(version: tuple[int, ...], requested: str = "auto") -> str:
    """"weak" or "strong" for this TensorRT version and --typing."""
    if requested not in TYPINGS:
        raise UserError(f"--typing {requested!r}: choose {', '.join(TYPINGS)}")
    if requested == "auto":
        return "strong" if tuple(version[:2]) >= STRONG_PREFERRED else "weak"
    if requested == "weak" and not weak_typing_available(version):
        raise UserError(f"--typing weak: TensorRT {'.'.join(map(str, version))} builds strongly typed networks only "
                        f"(builder precision flags were removed in 11.0); use --typing strong or auto")
    return requested


def parse_batch(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise UserError(f"--batch {text!r}: give MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, e.g. 1,1,8")
    return values


def profile_shapes(input_shape: tuple, batch: tuple[int, int, int], onnx_name: str = "the ONNX") -> tuple | None:
    """(min, opt, max) shapes of the optimization profile, or None for a static-batch input that --batch matches.
    Only the batch may be dynamic (the QDQ check refuses other dynamic dimensions)."""
    shape = tuple(int(d) for d in input_shape)
    if any(d < 0 for d in shape[1:]):
        raise UserError(f"{onnx_name} has dynamic dimensions {list(shape)} beyond the batch; export with a fixed image size")
    if shape[0] < 0:
        return tuple((b, *shape[1:]) for b in batch)
    if batch != (shape[0],) * 3:
        raise UserError(f"{onnx_name} has a static batch of {shape[0]}; use --batch {shape[0]},{shape[0]},{shape[0]} "
                        f"or export with export.dynamic_batch: true")
    return None


def timing_cache_name(version: str, compute_capability: str, gpu: str = "", multiprocessors: int | None = None) -> str:
    """One cache per TensorRT version, GPU architecture and GPU: TensorRT refuses a cache made on a device with
    other CUDA properties, and AGX Orin, Orin NX and Orin Nano are all sm87 (a folder rsynced between two of them
    would rebuild its cache every time). The SM count separates modules that report the same name."""
    safe = re.sub(r"[^0-9A-Za-z.]+", "_", str(version))
    name = re.sub(r"[^0-9A-Za-z]+", "-", str(gpu)).strip("-").lower() or "gpu"
    sms = f"-{int(multiprocessors)}sm" if multiprocessors else ""
    return f"tensorrt-timing-{safe}-sm{str(compute_capability).replace('.', '')}-{name}{sms}.cache"


@dataclass
class Source:
    variant: str         # the variant whose record lists the ONNX (or "export" for the exported fp32 ONNX)
    path: Path
    entry: FileEntry     # the file's manifest entry
    typing: str
    qdq_check: QdqCheck | None
    floats: str = "fp32"      # the precision of the file's float (non-Q/DQ) tensors
    fp32_layers: list[str] = dataclasses.field(default_factory=list)  # layers near fp16 overflow: kept fp32

    @property
    def float_precision(self) -> str:
        """What the engine's float layers run in: weak typing sets the FP16 flag (near-overflow layers pinned to
        fp32); a strongly typed network keeps the file's types."""
        return "fp16" if self.typing == "weak" else self.floats


def source_floats(record: Variant, typing: str) -> str:
    """The float precision of a TensorRT record's own ONNX for ``typing``: what the target recorded, else what
    its kind is (older int8 records ship one fp32 QDQ file; the strongly typed fp16 source is fp16)."""
    side = record.engine.source_files.get(typing)
    known = (side.floats if side else None) or record.compiled.source_floats.get(typing)
    return known or ("fp16" if record.precision == "fp16" and typing == "strong" else "fp32")


def near_overflow_layers(record: Variant | None) -> list[str]:
    """The ONNX node names `edgepipe run` found near fp16 overflow on the calibration images (kept fp32)."""
    return record.compiled.fp32_layers if record else []


def _entries_by_typing(record: Variant | None) -> dict[str, FileEntry]:
    """{typing: file entry} a tensorrt record offers: an engine's sidecar, or a pending-build record's ONNX."""
    if record is None:
        return {}
    found = {typing: side.entry for typing, side in record.engine.source_files.items()}
    onnx = [f for f in record.files if f.path.endswith(".onnx")]
    sources = record.compiled.sources
    for typing, rel in sources.items():
        entry = next((f for f in onnx if f.path == rel), None)
        if entry:
            found.setdefault(typing, entry)
    if onnx and not sources and record.precision == "int8":  # records written before the typing split
        found.setdefault("weak", onnx[0])
        found.setdefault("strong", onnx[0])
    elif onnx and not sources:
        found.setdefault("weak", onnx[0])
    return found


def _qdq_verdict(manifest: Manifest, entry: FileEntry, record: Variant | None) -> QdqCheck | None:
    """The QDQ check stored with this file: in its own record, or in any variant that lists the same file."""
    if record is not None:
        own = record.compiled.qdq_check or record.engine.qdq_check
        if own:
            return own
    for v in manifest.variants.values():
        if any(f.sha256 == entry.sha256 for f in v.files):
            check = v.compiled.qdq_check
            if check:
                return check
    return None


def _fallback_variant(manifest: Manifest, made_from: str, precision: str) -> str | None:
    """The ONNX Runtime variant of the same model an engine of ``precision`` may be built from (PTQ for int8)."""
    backend, wanted = FALLBACK_VARIANT[precision]
    return next((n for n, v in manifest.variants.items() if v.backend == backend and v.precision == wanted
                 and v.made_from == made_from and v.quantization != "qat"), None)


def choose_source(manifest: Manifest, root: Path, precision: str, typing: str, name: str | None = None) -> Source:
    """The ONNX to build ``name`` (default tensorrt-<precision>) from, hash-checked; for int8 only a QDQ ONNX
    whose TensorRT check passed. Looks in the variant itself (pending-build record or an engine's sidecar),
    then in the ONNX Runtime variant of the same model, then (fp16, weak typing) in the exported fp32 ONNX."""
    name = name or variant_name("tensorrt", precision)
    record = manifest.variants.get(name)
    made_from = record.made_from if record else "base"  # a pruned model's variants have their own ONNX
    candidates: list[tuple[str, FileEntry, Variant | None]] = []
    entry = _entries_by_typing(record).get(typing)
    if entry:
        candidates.append((name, entry, record))
    fallback = _fallback_variant(manifest, made_from, precision)
    usable_fallback = precision == "int8" or typing == "weak"  # an fp32 ONNX is no strongly typed fp16 source
    if fallback and usable_fallback and (record is None or record.quantization != "qat"):  # a QAT engine needs its own QDQ
        onnx = [f for f in manifest.variants[fallback].files if f.path.endswith(".onnx")]
        if onnx:
            candidates.append((fallback, onnx[0], manifest.variants[fallback]))
    exported = exported_onnx(made_from)
    export = manifest.exports.get(exported)
    if precision == "fp16" and typing == "weak" and export and export.sha256:
        candidates.append(("export", FileEntry(exported, export.sha256), None))
    if not candidates:
        if precision == "fp16" and typing == "strong":
            raise UserError(f"{root}: no fp16 ONNX for a strongly typed fp16 engine; add a target {{backend: tensorrt, precision: fp16}} "
                            f"to the recipe and re-run `edgepipe run` (it exports one), or on TensorRT 10.x use --typing weak")
        raise UserError(f"{root}: no ONNX to build a {precision} engine from; add a target {{backend: tensorrt, precision: {precision}}} "
                        f"to the recipe and re-run `edgepipe run`")
    variant, entry, rec = candidates[0]
    path = verify_files(root, [entry], variant)[0]
    check = None
    if precision == "int8":
        check = _qdq_verdict(manifest, entry, rec)
        if not check or not check.ok:
            why = (check.why(2) if check else "") or "no TensorRT QDQ check is recorded for it"
            raise UserError(f"{entry.path} is not a QDQ ONNX TensorRT accepts ({why}); add a target "
                            f"{{backend: tensorrt, precision: int8}} and re-run `edgepipe run` (it ships an s8s8 QDQ ONNX)")
    floats = source_floats(rec, typing) if variant == name else "fp32"  # the exported / ONNX Runtime files are fp32
    return Source(variant, path, entry, typing, check, floats, near_overflow_layers(record))


def source_files(record: Variant | None) -> dict[str, dict]:
    """The {typing: file entry and its float precision} to keep in an engine's sidecar, so --rebuild (either
    typing) finds its ONNX."""
    return {typing: dict(entry_record(e), floats=source_floats(record, typing))
            for typing, e in _entries_by_typing(record).items()}


def entry_record(entry: FileEntry) -> dict:
    """A file entry as the sidecar stores it (plain JSON: the sidecar is a free-form dict of the variant)."""
    return {k: v for k, v in dataclasses.asdict(entry).items() if v is not None}


def up_to_date(existing: Variant | None, engine_path: Path, mismatch: str | None, source: Source, batch, typing: str) -> bool:
    if existing is None:
        return False
    side = existing.engine
    return (existing.format == "engine" and existing.status == "ok" and engine_path.is_file() and mismatch is None
            and side.source_onnx_sha256 == source.entry.sha256 and side.batch == list(batch)
            and side.typing == typing)
