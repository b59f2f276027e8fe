"""Budgets for `edgepipe bench`: load and check the YAML file (exit 2 on a bad one), judge every budget
against the measured rows, and measure relative latency budgets with interleaved rounds.

A relative budget (``p90_ratio_max: {of: torch_eager, ratio: 0.5}``) alternates the two measured things
in rounds (A then B, then B then A, ...); each round gives one ratio of p90s. The verdict uses a
distribution-free confidence interval of the median ratio: pass when the whole interval is within the
budget, fail when it is wholly outside, "inconclusive" when it straddles the budget; an inconclusive
budget is re-measured with more rounds (up to ``max_rounds``) and fails the gate if it stays so.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib.util
import math
import statistics
import typing
from pathlib import Path
from typing import Callable, Optional

import yaml

from edgepipe import UserError
from edgepipe.runtime.names import did_you_mean

# check key -> (the row field it reads, "min" or "max", unit shown in tables)
CHECKS = {
    "top1_min": ("top1", "min", ""),
    "top5_min": ("top5", "min", ""),
    "top1_drop_max": ("top1_drop_pts", "max", " pts"),
    "per_class_drop_max": ("worst_class_drop_pts", "max", " pts"),
    "agreement_min": ("agreement_with_fp32", "min", ""),
    "p90_ms_max": ("p90_ms", "max", " ms"),
    "throughput_fps_min": ("throughput_fps", "min", " fps"),
    "p90_ratio_max": (None, "max", "x"),
}
NEEDS_LABELS = ("top1_min", "top5_min", "top1_drop_max", "per_class_drop_max")
REFERENCES = ("torch_eager", "roofline")


class BudgetError(UserError):
    """The budget file is malformed or does not fit this artifact folder (exit 2)."""


# The budget schema in plain dataclasses: a device install (edgepipe[openvino]) has no pydantic, and
# `edgepipe bench --budgets` must work there. The recipe's `budgets:` section (build side) has the same fields.

@dataclasses.dataclass
class RatioBudget:
    of: str                                        # torch_eager | roofline | <variant> | <variant>@<backend>
    ratio: float


@dataclasses.dataclass
class Budget:
    variants: str = "*"                            # glob over variant names
    backends: str = "*"                            # glob over the backend a variant runs on
    top1_min: Optional[float] = None
    top5_min: Optional[float] = None
    top1_drop_max: Optional[float] = None          # points against the fp32 variant
    per_class_drop_max: Optional[float] = None     # points, worst class
    p90_ms_max: Optional[float] = None
    p90_ratio_max: Optional[RatioBudget] = None    # {of: torch_eager | roofline | <variant>, ratio: 0.5}
    throughput_fps_min: Optional[float] = None
    agreement_min: Optional[float] = None          # top-1 agreement with the fp32 variant


@dataclasses.dataclass
class BudgetFile:
    budgets: list[Budget] = dataclasses.field(default_factory=list)
    rounds: int = 6              # interleaved rounds for relative budgets
    max_rounds: int = 24         # re-measure an inconclusive budget up to this many rounds
    round_iterations: int = 30   # timed calls per measured thing per round
    confidence: float = 0.9      # of the interval around the median ratio


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number"}


def _convert(value, kind, where: str):
    """``value`` as ``kind`` (str, int, float, a dataclass, Optional[...] or list[...]); BudgetError naming
    ``where`` otherwise. Booleans are not numbers here."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]
        return None if value is None else _convert(value, next(a for a in args if a is not type(None)), where)
    if origin is list:
        if not isinstance(value, list):
            raise BudgetError(f"{where}: expected a list (got {value!r})")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    wanted = {str: str, int: int, float: (int, float)}[kind]
    ok = isinstance(value, wanted) and not isinstance(value, bool)
    if not ok:
        raise BudgetError(f"{where}: expected {_TYPE_NAMES[kind]} (got {value!r})")
    return kind(value)


def _build(cls, data, where: str):
    """A dataclass from a YAML mapping: unknown keys with a close match, missing required keys, types."""
    if not isinstance(data, dict):
        raise BudgetError(f"{where}: expected a mapping (got {data!r})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            hint = did_you_mean(key, fields, cutoff=0.5, otherwise=f"; allowed: {', '.join(fields)}")
            raise BudgetError(f"unknown key '{prefix}{key}'{hint}")
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BudgetError(f"{prefix}{name}: required")
    return cls(**{k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()})


def load_budgets(path: str | Path) -> BudgetFile:
    path = Path(path)
    if not path.is_file():
        raise BudgetError(f"budget file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BudgetError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict) or "budgets" not in data:
        raise BudgetError(f"{path}: expected a mapping with a 'budgets:' list, e.g. budgets: [{{variants: '*int8*', top1_min: 0.7}}]")
    try:
        bf = _build(BudgetFile, data, "")
    except BudgetError as exc:
        raise BudgetError(f"{path}: {exc}") from None
    for i, b in enumerate(bf.budgets):
        if not checks_of(b):
            raise BudgetError(f"{path}: budgets[{i}] sets no limit; give one of {', '.join(CHECKS)}")
        if b.p90_ratio_max is not None and b.p90_ratio_max.ratio <= 0:
            raise BudgetError(f"{path}: budgets[{i}].p90_ratio_max.ratio must be > 0")
    if not 0 < bf.confidence < 1 or bf.rounds < 2 or bf.max_rounds < bf.rounds or bf.round_iterations < 3:
        raise BudgetError(f"{path}: need 0 < confidence < 1, rounds >= 2, max_rounds >= rounds, round_iterations >= 3")
    return bf


def checks_of(b: Budget) -> list[str]:
    return [k for k in CHECKS if getattr(b, k) is not None]


def matches(b: Budget, row: dict) -> bool:
    return fnmatch.fnmatchcase(row["name"], b.variants) and fnmatch.fnmatchcase(row["backend"], b.backends)


def resolve_of(of: str, rows: list[dict]) -> str:
    """A ratio's ``of``: torch_eager, roofline, a row id (variant@backend) or a variant name (its own backend)."""
    if of in REFERENCES or any(r["id"] == of for r in rows):
        return of
    named = [r for r in rows if r["name"] == of]
    if named:
        return next((r["id"] for r in named if r["backend"] == r["native_backend"]), named[0]["id"])
    return ""


def validate(bf: BudgetFile, rows: list[dict], data: str | None, labeled: bool, where: str) -> None:
    """Everything that makes a budget unusable for this folder, found before anything is measured."""
    for i, b in enumerate(bf.budgets):
        if not any(matches(b, r) for r in rows):
            names = sorted({r["name"] for r in rows})
            close = difflib.get_close_matches(b.variants, names, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise BudgetError(f"{where}: budgets[{i}] variants '{b.variants}' backends '{b.backends}' matches nothing "
                              f"measurable here{hint}; variants: {', '.join(names)}")
        need = [k for k in checks_of(b) if k in NEEDS_LABELS]
        if need and not labeled:
            raise BudgetError(f"{where}: budgets[{i}].{need[0]} needs labeled --data (CSV file,class_index or an "
                              f"ImageFolder){'' if data is None else f'; {data} has no labels'}")
        if b.agreement_min is not None and data is None:
            raise BudgetError(f"{where}: budgets[{i}].agreement_min needs --data (images, labels not needed)")
        if b.p90_ratio_max is not None and b.p90_ratio_max.of == "torch_eager" and importlib.util.find_spec("torch") is None:
            raise BudgetError(f"{where}: budgets[{i}].p90_ratio_max is relative to torch_eager but PyTorch is not installed "
                              "here; install edgepipe[train] or compare with roofline or another variant")
        if b.p90_ratio_max is not None and not resolve_of(b.p90_ratio_max.of, rows):
            choices = list(REFERENCES) + sorted({r["name"] for r in rows} | {r["id"] for r in rows})
            close = difflib.get_close_matches(b.p90_ratio_max.of, choices, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise BudgetError(f"{where}: budgets[{i}].p90_ratio_max.of '{b.p90_ratio_max.of}' is unknown{hint}; "
                              f"use {', '.join(choices)}")


# ---------------------------------------------------------------- verdicts

def median_ci(samples: list[float], confidence: float = 0.9) -> tuple[float, float]:
    """Distribution-free interval for the median: order statistics x(k), x(n-k+1) with the binomial(n, 1/2)
    tail below (1 - confidence) / 2; [min, max] when there are too few samples for that confidence."""
    x = sorted(samples)
    n = len(x)
    tail, k = 0.0, 1
    for j in range(n // 2):
        tail += math.comb(n, j) / 2 ** n
        if tail > (1 - confidence) / 2:
            break
        k = j + 1
    return x[k - 1], x[n - k]


def verdict(samples: list[float], limit: float, confidence: float = 0.9, kind: str = "max") -> str:
    lo, hi = median_ci(samples, confidence)
    if kind == "min":
        lo, hi, limit = -hi, -lo, -limit
    if hi <= limit:
        return "pass"
    if lo > limit:
        return "fail"
    return "inconclusive"


def judge_ratio(measure_round: Callable[[int], float], limit: float, rounds: int = 6, max_rounds: int = 24,
                confidence: float = 0.9, samples: Optional[list[float]] = None) -> dict:
    """Measure ``rounds`` ratios (after any ``samples`` already taken); while the verdict is inconclusive,
    double the rounds up to ``max_rounds``. ``history`` lists the verdict after each batch of rounds."""
    samples = list(samples or [])
    while len(samples) < rounds:
        samples.append(measure_round(len(samples)))
    history = [verdict(samples, limit, confidence)]
    while history[-1] == "inconclusive" and len(samples) < max_rounds:
        for _ in range(min(len(samples), max_rounds - len(samples))):
            samples.append(measure_round(len(samples)))
        history.append(verdict(samples, limit, confidence))
    lo, hi = median_ci(samples, confidence)
    med = statistics.median(samples)
    return {"verdict": history[-1], "history": history, "rounds": len(samples), "median": med, "ci": [lo, hi],
            "confidence": confidence, "samples": [round(s, 5) for s in samples]}


def interleaved_pair(a: Callable[[int], dict], b: Callable[[int], dict], iterations: int) -> Callable[[int], tuple]:
    """One round = time A and B back to back, the order alternating by round; returns both summaries."""
    def one_round(i: int) -> tuple[dict, dict]:
        if i % 2:
            vb, va = b(iterations), a(iterations)
        else:
            va, vb = a(iterations), b(iterations)
        return va, vb
    return one_round


def interleaved(a: Callable[[int], dict], b: Callable[[int], dict], iterations: int, stat: str = "p90") -> Callable[[int], float]:
    """Per round: A[stat] / B[stat] from interleaved_pair."""
    pair = interleaved_pair(a, b, iterations)

    def round_ratio(i: int) -> float:
        va, vb = pair(i)
        return va[stat] / vb[stat]
    return round_ratio


def evaluate(bf: BudgetFile, rows: list[dict], timer_for: Callable[[str, dict], tuple], log=print) -> list[dict]:
    """One check per (budget, matching row, limit). ``timer_for(of, row)`` -> (timer, None) or (None, reason)."""
    checks = []
    for i, b in enumerate(bf.budgets):
        for row in (r for r in rows if matches(b, r)):
            for key in checks_of(b):
                field, kind, unit = CHECKS[key]
                c = {"budget": i, "variants": b.variants, "row": row["id"], "check": key, "unit": unit, "kind": kind}
                if key == "p90_ratio_max":
                    of = resolve_of(b.p90_ratio_max.of, rows)
                    if of == row["id"]:
                        continue  # a variant against itself
                    c.update(_ratio_check(bf, b.p90_ratio_max.ratio, of, row, timer_for, log))
                else:
                    c["limit"] = getattr(b, key)
                    c["measured"] = row.get(field)
                    c.update(point_check(c["measured"], c["limit"], kind, row.get(field + "_note")))
                checks.append(c)
    return checks


def point_check(measured, limit, kind: str, note: str | None) -> dict:
    if measured is None:
        return {"verdict": "missing", "margin": None, "detail": note or "not measured"}
    margin = limit - measured if kind == "max" else measured - limit
    return {"verdict": "pass" if margin >= 0 else "fail", "margin": margin, "detail": note or ""}


def _ratio_check(bf: BudgetFile, limit: float, of: str, row: dict, timer_for, log) -> dict:
    out = {"limit": limit, "of": of}
    timer_a, why_a = timer_for(row["id"], row)
    timer_b, why_b = timer_for(of, row)
    if timer_a is None or timer_b is None:
        return dict(out, verdict="missing", measured=None, margin=None, detail=why_a or why_b)
    res = judge_ratio(interleaved(timer_a, timer_b, bf.round_iterations), limit, bf.rounds, bf.max_rounds, bf.confidence)
    log(f"  {row['id']} p90 / {of} p90: median {res['median']:.3f} (CI {res['ci'][0]:.3f}-{res['ci'][1]:.3f}, "
        f"{res['rounds']} rounds) vs {limit}: {' -> '.join(res['history'])}")
    detail = (f"{res['confidence']:.0%} CI of median [{res['ci'][0]:.3f}, {res['ci'][1]:.3f}] over {res['rounds']} "
              f"interleaved rounds" + (" (re-measured: " + " -> ".join(res["history"]) + ")" if len(res["history"]) > 1 else ""))
    return dict(out, verdict=res["verdict"], measured=res["median"], margin=limit - res["median"], detail=detail, ratio=res)
