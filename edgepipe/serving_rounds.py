"""The latencies the build's serving choice compares, measured so that load on the build host cannot flip it.

Each variant's p90 from `measure_stage` is measured on its own, one after the other: a pip install or a
compile beside the build slows whichever variant happens to be timed then (int8 measured slower than fp32,
fp32 served). Here the variants of one backend are timed against its most faithful variant in interleaved
rounds (A B, B A, ...), as relative latency budgets are judged (benchmarks/budgets.py): load hits both sides
of a round alike, and the median ratio over the rounds, with its confidence interval, is what the serving
policy (runtime/serving.py) compares, on the faithful variant's p90 scale. Cached like every step.
"""
from __future__ import annotations

import numpy as np

from edgepipe.runtime.manifest import Manifest
from edgepipe.runtime.serving import PRECISION_RANK
from edgepipe.steps import hash_key


def interleaved_p90(ctx, manifest: Manifest, x1: np.ndarray, eligible) -> tuple[dict[str, float], dict]:
    """({variant: p90 on the faithful variant's scale}, {backend: what was measured}) for every backend with
    two or more variants that ``eligible(name, variant)`` accepts."""
    from edgepipe.benchmarks.budgets import BudgetFile
    groups: dict[str, list[str]] = {}
    for name, v in manifest.variants.items():
        if v.status == "ok" and v.p90_ms is not None and eligible(name, v):
            groups.setdefault(v.backend, []).append(name)
    bf = BudgetFile(round_iterations=max(5, min(30, ctx.recipe.bench.iterations // 3)))
    p90, measured = {}, {}
    for backend, names in groups.items():
        if len(names) < 2:
            continue
        variants = manifest.variants
        base = max(names, key=lambda n: (PRECISION_RANK.get(variants[n].precision, 0),
                                         variants[n].made_from != "pruned", -variants[n].p90_ms))
        others = [n for n in names if n != base]
        key = hash_key(sorted((n, [f.sha256 for f in variants[n].files]) for n in names), base, bf.rounds,
                       bf.round_iterations, bf.confidence, ctx.versions)
        ratios = ctx.cache.run(f"serving-rounds-{backend}", key,
                               lambda base=base, others=others: _rounds(ctx.out, base, others, x1, bf))
        p90[base] = variants[base].p90_ms
        for name, r in ratios.items():
            p90[name] = variants[base].p90_ms * r["p90"]["median"]
        measured[backend] = {"against": base, "rounds": bf.rounds, "iterations_per_round": bf.round_iterations,
                             "p90_ratio": {n: r["p90"] for n, r in ratios.items()}}
    return p90, measured


def _rounds(out, base: str, others: list[str], x1: np.ndarray, bf) -> dict:
    """Each of ``others`` against ``base``: p50/p90 ratios (median and CI) over interleaved rounds."""
    from edgepipe.benchmarks.bench import interleaved_ratios, timer
    from edgepipe.log import progress
    from edgepipe.runtime.model import Classifier
    clfs = {n: Classifier(out, variant=n) for n in [base, *others]}
    result = {}
    for name in others:
        result[name] = interleaved_ratios(timer(lambda c=clfs[name]: c.logits(x1)), timer(lambda: clfs[base].logits(x1)),
                                          bf.rounds, bf.round_iterations, bf.confidence)
        r = result[name]["p90"]
        progress(f"  {name} / {base}: p90 ratio {r['median']:.3f} (CI {r['ci'][0]:.3f}-{r['ci'][1]:.3f}) "
                 f"over {bf.rounds} interleaved rounds")
    return result
