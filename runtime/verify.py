"""`edgepipe verify DIR`: prove each variant on the machine it will run on, torch-free.

The artifact folder carries a reference set (Manifest.reference_set): held-out images, resized and
cropped as uint8, with the fp32 model's logits for them. On the device every variant this machine can run
is fed those exact inputs and compared with the fp32 logits by per-precision tolerances; its batch-1 latency
is measured here. The result is a device record, ``devices/<machine id>.json`` in the folder, that the
serving policy (serving.py) reads: auto then serves the fastest variant that passed on *this* machine.

An int8 model can be right on the build host and wrong on the device (x86 CPUs without VNNI saturate
u8 x s8 products in 16 bits); a TensorRT engine exists only on the device. Both are proven only here.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgepipe import UserError
from edgepipe.atomic import write_json
from edgepipe.runtime.backends.base import can_load, is_installed
from edgepipe.runtime.device_records import (RECORD_FORMAT, device_record_for_this_machine, machine_facts, machine_id,
                                             record_path, variant_fingerprint)
from edgepipe.runtime.errors import ManifestError
from edgepipe.runtime.integrity import verify_entry
from edgepipe.runtime.manifest import Manifest, unknown_variant
from edgepipe.runtime.model import Classifier
from edgepipe.runtime.preprocess_check import check_for_verify
from edgepipe.runtime.serving import choose
from edgepipe.runtime.signing import authenticate_record, load_manifest, load_trust
from edgepipe.runtime.timing import measure

# Per precision and kind of image (real photos, or crops generated from the few bundled photos): minimum
# top-1 agreement with the fp32 logits, maximum mean logit error relative to the spread of the fp32 logits
# (mean over images of their standard deviation across classes), maximum absolute logit error (None: not
# checked). Generated crops are often near ties between classes, so their agreement bound is lower; the
# relative logit error separates a healthy int8 model from one whose sums saturated (x86 without VNNI) on
# either kind. One flipped image of slack is allowed on top of the agreement bound, so a check on a few
# dozen images is not decided by a single near tie. Measurements behind the bounds: docs/compile.md.
TOLERANCE = {
    ("fp32", "real"): {"min_top1_agreement": 0.98, "max_rel_mean_abs": None, "max_abs": 5e-3},
    ("fp32", "generated"): {"min_top1_agreement": 0.98, "max_rel_mean_abs": None, "max_abs": 5e-3},
    ("fp16", "real"): {"min_top1_agreement": 0.97, "max_rel_mean_abs": 0.05, "max_abs": None},
    ("fp16", "generated"): {"min_top1_agreement": 0.95, "max_rel_mean_abs": 0.05, "max_abs": None},
    ("int8", "real"): {"min_top1_agreement": 0.92, "max_rel_mean_abs": 0.18, "max_abs": None},
    ("int8", "generated"): {"min_top1_agreement": 0.78, "max_rel_mean_abs": 0.18, "max_abs": None},
}
# On the device a variant must also compute what it computed on the build host: its relative logit error on
# the reference set may exceed the build host's by this factor (plus DRIFT_SLACK) at most.
DRIFT_FACTOR, DRIFT_SLACK = 1.25, 0.01


def tolerance(precision: str, kind: str) -> dict:
    kind = kind if kind in ("real", "generated") else "generated"
    return dict(TOLERANCE.get((precision, kind), TOLERANCE[("int8", kind)]))


def compare_logits(reference: np.ndarray, candidate: np.ndarray, precision: str, kind: str,
                   names: list[str] | None = None, **override) -> dict:
    """Agreement and logit error of ``candidate`` against the fp32 ``reference``, with the verdict.
    ``override``: tolerance fields to replace (min_top1_agreement, max_rel_mean_abs, max_abs)."""
    if reference.shape != candidate.shape:
        return {"ok": False, "error": f"output shape {candidate.shape} differs from reference {reference.shape}"}
    names = names or [str(i) for i in range(len(reference))]
    tol = dict(tolerance(precision, kind), **{k: v for k, v in override.items() if v is not None})
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    ref_top, cand_top = reference.argmax(1), candidate.argmax(1)
    n, flips = len(reference), int(np.sum(ref_top != cand_top))
    spread = float(np.mean(np.std(reference.astype(np.float64), axis=1))) or 1.0
    span = float(np.ptp(reference)) or 1.0  # logits of a 1000-class model span ~20: the error relative to it
    result = {"n": int(n), "images": kind, "top1_agreement": 1.0 - flips / n, "max_abs": float(diff.max()),
              "mean_abs": float(diff.mean()), "rel_mean_abs": float(diff.mean() / spread),
              "max_rel_to_span": float(diff.max() / span),
              "flipped": [{"image": nm, "reference": int(r), "got": int(c)}
                          for nm, r, c in zip(names, ref_top, cand_top) if r != c],
              "tolerance": tol}
    allowed_flips = int(np.floor(n * (1.0 - tol["min_top1_agreement"]) + 1e-9)) + (1 if tol["min_top1_agreement"] < 1 else 0)
    result["ok"] = bool(flips <= allowed_flips
                        and (tol["max_rel_mean_abs"] is None or result["rel_mean_abs"] <= tol["max_rel_mean_abs"])
                        and (tol["max_abs"] is None or result["max_abs"] <= tol["max_abs"]))
    return result


# ---------------------------------------------------------------- the reference set

def load_reference(model_dir: Path, manifest: Manifest) -> dict:
    """The folder's reference set, hash-checked: {"inputs": uint8 NHWC, "logits": {key: float32}, "names", "kind"}."""
    ref = manifest.reference_set
    if ref is None:
        raise ManifestError(f"{model_dir} has no reference set in its manifest (built by an older edgepipe); "
                            "re-run `edgepipe run` to add one")
    entries = {"inputs": ref.inputs, **{f"logits:{k}": e for k, e in ref.logits.items()}}
    arrays = {}
    for key, entry in entries.items():
        path, _ = verify_entry(model_dir, entry, "reference set")   # size, type and sha256 before np.load
        try:
            arrays[key] = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ManifestError(f"reference set file {entry.path} cannot be read ({exc})") from None
    inputs = arrays.pop("inputs")
    logits = {k.split(":", 1)[1]: v.astype(np.float32) for k, v in arrays.items()}
    if inputs.dtype != np.uint8 or inputs.ndim != 4 or any(len(v) != len(inputs) for v in logits.values()):
        raise ManifestError("the reference set's inputs and logits do not match; re-run `edgepipe run`")
    return {"inputs": inputs, "logits": logits, "names": list(ref.names or []), "kind": ref.images or "generated"}


# ---------------------------------------------------------------- verify

def _latency(fn, warmup: int, iterations: int) -> dict:
    """Batch-1 p50 / p90 in ms, as a device record keeps them."""
    lat = measure(fn, warmup, iterations)
    return {"p50": round(lat["p50"], 3), "p90": round(lat["p90"], 3), "iterations": lat["iterations"]}


def verify_variant(model_dir: Path, name: str, ref: dict, *, backend: str = "auto", device: str | None = None,
                   warmup: int = 10, iterations: int = 50, trust=None) -> dict:
    """Load one variant through the real runtime (hash and signature checks included), run the reference set,
    time batch 1. ``trust``: signing.TrustStore (None: the keys configured here)."""
    kwargs = {"device": device} if device else {}
    clf = Classifier(model_dir, variant=name, backend=backend, trust=trust, **kwargs)
    x = clf.preprocess.normalize(ref["inputs"])
    step = 16 if clf.dynamic_batch else 1
    logits = np.concatenate([clf.logits(x[i:i + step]) for i in range(0, len(x), step)])
    v = clf.variant
    key = v.reference_logits
    if key not in ref["logits"]:
        raise ManifestError(f"variant {name!r} names reference logits {key!r} that the reference set lacks; re-run `edgepipe run`")
    host = v.host_check
    drift = {}
    if host and host.rel_mean_abs is not None and v.precision != "fp32":
        drift["max_rel_mean_abs"] = min(tolerance(v.precision, ref["kind"])["max_rel_mean_abs"],
                                        host.rel_mean_abs * DRIFT_FACTOR + DRIFT_SLACK)
    check = compare_logits(ref["logits"][key], logits, v.precision, ref["kind"], ref["names"], **drift)
    if drift:
        check["build_host_rel_mean_abs"] = host.rel_mean_abs
    one = np.ascontiguousarray(x[:1])
    return {"backend": clf.backend_name, "device": device or v.device,
            "precision": v.precision, "fingerprint": variant_fingerprint(v),
            "verdict": "pass" if check["ok"] else "fail", "check": check,
            "latency_ms": _latency(lambda: clf.logits(one), warmup, iterations)}


def runnable_here(manifest: Manifest, backend: str = "auto") -> dict[str, str]:
    """variant -> why it is skipped here ('' when it can run)."""
    out = {}
    for name, v in manifest.variants.items():
        if v.status not in ("ok", "failed"):
            out[name] = f"status {v.status} (e.g. a TensorRT engine not built yet on this device)"
        elif backend != "auto" and not can_load(backend, v.format):
            out[name] = f"{backend} cannot run format {v.format}"
        elif backend != "auto" and not is_installed(backend):
            out[name] = f"{backend} is not installed here"
        elif backend == "auto" and not is_installed(v.backend):
            out[name] = f"{v.backend} is not installed here"
        else:
            out[name] = ""
    return out


def verify_model_dir(model_dir, *, variants: list[str] | None = None, backend: str = "auto", device: str | None = None,
                     iterations: int = 50, write: bool = True, log=print, trust=None) -> dict:
    """Verify ``variants`` (default: every variant this machine can run); write and return the device record.
    A previous record of this machine keeps the results of variants not verified this time. ``trust``:
    signing.TrustStore (None: the keys configured here); with keys, an unsigned folder is refused."""
    model_dir = Path(model_dir)
    trust = load_trust() if trust is None else trust
    manifest, verified = load_manifest(model_dir, trust)
    ref = load_reference(model_dir, manifest)
    skip = runnable_here(manifest, backend)
    names = variants or list(manifest.variants)
    unknown = [n for n in names if n not in manifest.variants]
    if unknown:
        raise unknown_variant(unknown[0], manifest.variants, str(model_dir))
    facts = machine_facts()
    mid = machine_id(facts)
    previous = device_record_for_this_machine(model_dir, manifest, verified) or {}
    results = dict(previous.get("variants", {}))
    for name in names:
        if skip[name]:
            if variants:  # asked for by name: say why it cannot run here
                raise UserError(f"variant {name!r} cannot be verified here: {skip[name]}")
            log(f"  {name}: skipped ({skip[name]})")
            continue
        res = verify_variant(model_dir, name, ref, backend=backend, device=device, iterations=iterations, trust=trust)
        if manifest.variants[name].status == "failed":
            res["note"] = "failed its checks on the build host: never served automatically"
        results[name] = res
        c = res["check"]
        if "error" in c:
            log(f"  {name} [{res['backend']}]: FAIL  {c['error']}")
            continue
        log(f"  {name} [{res['backend']}]: {res['verdict'].upper()}  agreement {c['top1_agreement']:.3f} "
            f"(min {c['tolerance']['min_top1_agreement']}), relative logit error {c['rel_mean_abs']:.3g}"
            + (f" (max {c['tolerance']['max_rel_mean_abs']:.3g})" if c["tolerance"]["max_rel_mean_abs"] is not None else "")
            + f", p90 {res['latency_ms']['p90']:.2f} ms")
    record = {"format_version": RECORD_FORMAT, "machine_id": mid,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": facts,
              "reference_set": {"count": int(len(ref["inputs"])), "images": ref["kind"]}, "variants": results,
              "preprocessing": check_for_verify(model_dir, manifest, ref, results, trust, log)}
    if "bench" in previous:
        record["bench"] = previous["bench"]  # what `edgepipe bench` recommends here (benchmarks/bench_record.py)
    try:
        choice = choose(manifest, None, backend, record, device)
        record["serve"] = {"variant": choice.variant, "backend": choice.backend, "reason": choice.reason,
                           "verified_here": choice.verified_here}
    except UserError as exc:
        record["serve"] = {"variant": None, "reason": str(exc)}
    if write:
        path = record_path(model_dir, mid)
        try:
            path.parent.mkdir(exist_ok=True)
            write_json(path, authenticate_record(record))  # a MAC: serving can tell it was written here
        except OSError as exc:
            raise UserError(f"cannot write the device record {path}: {exc.strerror or exc}; verify a writable copy "
                            "of the folder") from None
        record["path"] = str(path)
    return record


def main(args) -> int:
    """CLI: exit 0 when the variant served here (or the one named with --variant) passed, 1 when it did not."""
    record = verify_model_dir(args.dir, variants=[args.variant] if args.variant else None, backend=args.backend,
                              device=getattr(args, "device", None), iterations=args.iterations,
                              trust=load_trust(getattr(args, "trust", None)))
    m = record["machine"]
    print(f"machine {record['machine_id']}: {m['cpu']} ({', '.join(m['isa']) or 'no ISA flags read'})"
          + (f", GPU {', '.join(m['gpus'])}" if m["gpus"] else "")
          + f"; reference set: {record['reference_set']['count']} {record['reference_set']['images']} images")
    if "path" in record:
        print(f"device record: {record['path']}")
    if args.variant:
        ok = record["variants"][args.variant]["verdict"] == "pass"
        print(f"{args.variant}: {'pass' if ok else 'FAIL'}")
        return 0 if ok else 1
    serve = record["serve"]
    if serve.get("variant") and serve.get("verified_here"):
        print(f"serves here: {serve['variant']} on {serve['backend']}: {serve['reason']}")
        return 0
    print(f"edgepipe: no variant passed verification on this machine: {serve.get('reason', '')}".rstrip(": "))
    return 1
