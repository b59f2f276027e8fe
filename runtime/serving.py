"""The one serving policy: which variant to serve, at build time (`edgepipe run`, `edgepipe bench`) and on
the device (`--backend auto` in Classifier, camera.py, eval, bench, verify).

Build time: per backend, the fastest (p90) variant that passed its checks and its accuracy budget, unless a
more faithful one (higher precision, else unpruned, else higher top-1) is within ``MIN_SPEEDUP`` of it.
On the device: when `edgepipe verify` left a record for this machine, the fastest variant that passed there
(the same rule over the latencies measured there); otherwise the build host's measured default. A variant
that failed on this machine is never chosen automatically.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from edgepipe.runtime.backends.base import AUTO_ORDER, BACKENDS, DEVICE_BACKENDS, can_load, is_installed, missing_package
from edgepipe.runtime.device_records import device_record_for_this_machine, variant_fingerprint
from edgepipe.runtime.errors import BackendUnavailable, ManifestError
from edgepipe.runtime.manifest import Manifest, Variant, unknown_variant
from edgepipe.runtime.measured import Row

MIN_SPEEDUP = 0.10  # a less faithful variant is served only when its p90 is at least this much lower
DEFAULT_MAX_DROP = 1.0  # top-1 points against the fp32 reference when the recipe sets none
PRECISION_RANK = {"fp32": 3, "fp16": 2, "int8": 1}


def _quality(r: Row) -> tuple:
    """Higher is more faithful to the fp32 model: higher precision, then unpruned, then measured top-1."""
    return (PRECISION_RANK.get(r.precision, 0), r.made_from != "pruned", -1.0 if r.top1 is None else r.top1)


def fastest_per_backend(rows: list[Row], eligible=lambda r: True, min_speedup: float = MIN_SPEEDUP) -> dict:
    """Per backend, among the rows with status ok that ``eligible`` accepts, the fastest p90 -- unless a more
    faithful row (precision, unpruned, top-1) is within ``min_speedup`` of it: a speed-up inside measurement
    noise is not worth accuracy. None for a backend with no such row."""
    by_backend: dict = {}
    for r in rows:
        ok = by_backend.setdefault(r.backend, [])
        if r.status == "ok" and r.p90_ms is not None and eligible(r):
            ok.append(r)
    chosen = {}
    for backend, ok in by_backend.items():
        if not ok:
            chosen[backend] = None
            continue
        fastest = min(ok, key=lambda r: r.p90_ms)
        close = [r for r in ok if r.p90_ms * (1.0 - min_speedup) <= fastest.p90_ms]
        chosen[backend] = max(close, key=lambda r: (_quality(r), -r.p90_ms)).id
    return chosen


def within_accuracy(v: Variant, reference_top1: float | None, max_drop: float) -> bool:
    """Top-1 within ``max_drop`` points of the fp32 reference when both are measured; else the checks' verdict."""
    if reference_top1 is None or v.top1 is None:
        return bool(v.check and v.check.ok)
    return (reference_top1 - v.top1) * 100 <= max_drop + 1e-9


def serving_defaults(variants: dict[str, Variant], reference_top1: float | None = None, max_drop: float | None = None,
                     eligible=lambda name, v: True, p90: dict[str, float] | None = None) -> tuple[dict[str, str], str]:
    """(backend -> the variant served on it, the default variant): the manifest's defaults and default_variant
    from the build host's measurements. ``eligible(name, variant)``: extra rules, e.g. the recipe's budgets.
    ``p90``: latencies that replace the variants' own (the build's interleaved rounds, robust to load)."""
    max_drop = DEFAULT_MAX_DROP if max_drop is None else max_drop
    p90 = p90 or {}
    rows = [replace(r, p90_ms=p90.get(r.id, r.p90_ms)) for r in (Row.of_variant(name, v) for name, v in variants.items())]
    chosen = fastest_per_backend(rows, lambda r: within_accuracy(variants[r.id], reference_top1, max_drop)
                                 and eligible(r.id, variants[r.id]))
    defaults = {backend: name for backend, name in chosen.items() if name}
    ranked = sorted(defaults.values(), key=lambda n: p90.get(n, variants[n].p90_ms))
    return defaults, ranked[0] if ranked else next(iter(variants))


# ---------------------------------------------------------------- on the device

@dataclass(frozen=True)
class Choice:
    variant: str
    backend: str
    reason: str                  # one sentence a user can read
    verified_here: bool | None   # True: passed `edgepipe verify` on this machine; None: not verified here


def _runnable(v: Variant, backend: str) -> bool:
    return can_load(backend, v.format) and is_installed(backend)


def choose(manifest: Manifest, variant: str | None = None, backend: str = "auto", record: dict | None = None,
           device: str | None = None) -> Choice:
    """The variant and backend to serve here. ``record``: this machine's device record (device_records.py) or None.
    ``device``: an accelerator asked for by name (GPU, NPU, AUTO, ...) makes auto choose among the variants of
    the backend that runs on named devices (OpenVINO)."""
    variants = manifest.variants
    if backend == "auto" and device and device.upper() != "CPU":
        backend = DEVICE_BACKENDS[0]
    if backend != "auto" and backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    if backend != "auto" and not is_installed(backend):
        raise BackendUnavailable(f"--backend {backend}: {missing_package(backend)} is not installed here; "
                                 f"pip install 'edgepipe[{backend}]' (or choose --backend auto)")
    results = (record or {}).get("variants", {})
    if variant is not None:
        return _explicit(variants, variant, backend, results.get(variant))
    usable = {n: v for n, v in variants.items() if v.servable}
    if not usable:
        raise ManifestError("no variant in the manifest is verified and within the recipe's budgets (failed, "
                            "unverified, pending-build or over budget); re-run `edgepipe run` or pick one with --variant")
    failed_here = {n for n, r in results.items() if r.get("verdict") == "fail"}
    backends = AUTO_ORDER if backend == "auto" else (backend,)

    passed = [Row(n, n, r["backend"], variants[n].precision, made_from=variants[n].made_from,
                  p90_ms=(r.get("latency_ms") or {}).get("p90"))
              for n, r in results.items() if r.get("verdict") == "pass" and n in usable and r.get("backend") in backends
              and _runnable(variants[n], r["backend"])]
    if passed:
        best = {b: n for b, n in fastest_per_backend(passed).items() if n}
        name = min(best.values(), key=lambda n: results[n]["latency_ms"]["p90"])
        return Choice(name, results[name]["backend"], f"fastest variant that passed `edgepipe verify` on this machine "
                      f"(p90 {results[name]['latency_ms']['p90']:.2f} ms here)", True)

    candidates = [n for n in usable if n not in failed_here]
    benched = _bench_pick(manifest, (record or {}).get("bench"), candidates, backends)
    if benched:
        return benched
    default = manifest.default_variant
    if default in candidates and variants[default].backend in backends and _runnable(variants[default], variants[default].backend):
        return Choice(default, variants[default].backend, "the build host's measured default (not verified on this "
                      "machine: run `edgepipe verify`)", None)
    for name in backends:
        if not is_installed(name):
            continue
        per_backend = manifest.defaults.get(name)
        native = [n for n in candidates if variants[n].backend == name]
        pick = per_backend if per_backend in native else (native[0] if native else None)
        if pick:
            why = "the build host's default for " if pick == per_backend else "the first verified variant for "
            return Choice(pick, name, why + f"{name} (not verified on this machine: run `edgepipe verify`)", None)
    if default in candidates and backend != "auto" and _runnable(variants[default], backend):
        return Choice(default, backend, f"the build host's default, run on {backend}", None)
    wanted = "any of " + ", ".join(AUTO_ORDER) if backend == "auto" else backend
    left = ", ".join(n + " [" + variants[n].backend + "]" for n in candidates) or "none"
    extra = f"; failed `edgepipe verify` here: {', '.join(sorted(failed_here))}" if failed_here else ""
    absent = sorted({variants[n].backend for n in candidates if variants[n].backend in BACKENDS
                     and not is_installed(variants[n].backend)})
    fix = ("; install one: " + " or ".join(f"pip install 'edgepipe[{b}]'" for b in absent)) if absent else ""
    raise BackendUnavailable(f"no variant in the manifest runs on {wanted} installed here (variants: {left}{extra}){fix}")


def verified_default(manifest: Manifest, backend: str, record: dict) -> str | None:
    """The variant of ``backend`` this policy serves by this machine's device ``record``: what a build on the
    device (`edgepipe build-engine`) records as that backend's default once `edgepipe verify` has run. None when
    no variant of it passed here."""
    try:
        choice = choose(manifest, None, backend, record)
    except (BackendUnavailable, ManifestError):
        return None
    return choice.variant if choice.verified_here else None


def _bench_pick(manifest: Manifest, bench: dict | None, candidates: list[str], backends) -> Choice | None:
    """What `edgepipe bench` recommended on this machine (its files unchanged since), first in AUTO_ORDER."""
    picks = (bench or {}).get("recommends") or {}
    for backend in (b for b in backends if isinstance(picks.get(b), dict)):
        name = picks[backend].get("variant")
        if (name in candidates and _runnable(manifest.variants[name], backend)
                and picks[backend].get("fingerprint") == variant_fingerprint(manifest.variants[name])):
            return Choice(name, backend, f"recommended by `edgepipe bench` on this machine (p90 "
                          f"{picks[backend].get('p90_ms') or float('nan'):.2f} ms here; not verified on this machine: "
                          "run `edgepipe verify`)", None)
    return None


def _explicit(variants: dict[str, Variant], variant: str, backend: str, result: dict | None) -> Choice:
    if variant not in variants:
        raise unknown_variant(variant, variants)
    fmt = variants[variant].format
    verified = None if result is None else result.get("verdict") == "pass"
    why = "chosen with --variant" + ("" if verified is None else (", passed `edgepipe verify` here" if verified else
                                                                  ", FAILED `edgepipe verify` on this machine"))
    if backend != "auto":
        if not can_load(backend, fmt):
            raise BackendUnavailable(f"backend {backend!r} cannot run variant {variant!r} (format {fmt})")
        return Choice(variant, backend, why, verified)
    native = variants[variant].backend
    for name in [native] + [b for b in AUTO_ORDER if b != native]:
        if can_load(name, fmt) and is_installed(name):
            return Choice(variant, name, why, verified)
    raise BackendUnavailable(f"no installed backend can run variant {variant!r} (format {fmt}); "
                             f"install {native}: pip install 'edgepipe[{native}]'")


def choose_for_dir(model_dir, manifest: Manifest, variant: str | None = None, backend: str = "auto",
                   device: str | None = None) -> Choice:
    """:func:`choose` with this machine's device record from ``model_dir`` (when `edgepipe verify` wrote one)."""
    return choose(manifest, variant, backend, device_record_for_this_machine(Path(model_dir), manifest), device)
