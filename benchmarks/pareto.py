"""pareto.png: accuracy against p90 latency for every variant x backend, the Pareto front (nothing both
faster and more accurate) marked, budgets drawn as lines, the PyTorch eager / roofline references, rows
that fail a budget crossed out and the variant to ship per target starred."""
from __future__ import annotations

from pathlib import Path

from edgepipe.atomic import atomic_path
from edgepipe.benchmarks.budgets import resolve_of

BACKEND_COLORS = {"openvino": "#1f77b4", "onnxruntime": "#ff7f0e", "tensorrt": "#2ca02c"}
PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """(latency, accuracy, id) points not dominated by a faster-or-equal and more accurate one."""
    front, best = [], float("-inf")
    for lat, acc, rid in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((lat, acc, rid))
            best = acc
    return front


def _y_metric(report: dict) -> tuple[str, str]:
    if report["data"]["labeled"]:
        return "top1", "top-1 accuracy"
    if report["data"]["images"]:
        return "agreement_with_fp32", "top-1 agreement with the fp32 variant"
    return "throughput_fps", "throughput, img/s (no --data: accuracy not measured)"


def _budget_lines(report: dict, budget_file, ykey: str) -> tuple[list, list]:
    """(horizontal, vertical) budget lines as (value, label)."""
    rows = {r["id"]: r for r in report["variants"]}
    ref = report["reference"]
    refs_ms = {"torch_eager": (ref.get("torch_eager_latency_ms") or {}).get("p90"), "roofline": ref.get("roofline_ms")}
    fp32_top1 = next((r.get("top1") for r in report["variants"] if r.get("precision") == "fp32" and r.get("top1") is not None), None)
    hlines, vlines = [], []
    for b in (budget_file.budgets if budget_file else []):
        tag = f" [{b.variants}]" if b.variants != "*" else ""
        if ykey == "top1" and b.top1_min is not None:
            hlines.append((b.top1_min, f"top-1 ≥ {b.top1_min}{tag}"))
        if ykey == "top1" and b.top1_drop_max is not None and fp32_top1 is not None:
            hlines.append((fp32_top1 - b.top1_drop_max / 100, f"drop ≤ {b.top1_drop_max} pts{tag}"))
        if ykey == "agreement_with_fp32" and b.agreement_min is not None:
            hlines.append((b.agreement_min, f"agreement ≥ {b.agreement_min}{tag}"))
        if b.p90_ms_max is not None:
            vlines.append((b.p90_ms_max, f"p90 ≤ {b.p90_ms_max} ms{tag}"))
        if b.p90_ratio_max is not None:
            of = resolve_of(b.p90_ratio_max.of, report["variants"])  # what the budget check compared against
            base = refs_ms.get(of) or (rows.get(of) or {}).get("p90_ms")
            if base:
                vlines.append((b.p90_ratio_max.ratio * base, f"p90 ≤ {b.p90_ratio_max.ratio}×{of}{tag}"))
    return hlines, vlines


def _set_limits(ax, xs: list[float], ys: list[float]) -> None:
    """Fix the axes first, so labels can be placed in pixels: log x when the range is wide."""
    if xs and max(xs) / max(min(xs), 1e-9) > 4:
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.25, max(xs) * 1.25)
    elif xs:
        pad = (max(xs) - min(xs)) * 0.1 or max(xs) * 0.1
        ax.set_xlim(max(0.0, min(xs) - pad), max(xs) + 2 * pad)
    if ys:
        span = max(ys) - min(ys) or abs(max(ys)) * 0.05 or 1.0
        ax.set_ylim(min(ys) - 0.25 * span, max(ys) + 0.25 * span)


def plot_pareto(report: dict, budget_file, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ykey, ylabel = _y_metric(report)
    pts = sorted(((r["p90_ms"], r.get(ykey), r) for r in report["variants"] if r.get(ykey) is not None),
                 key=lambda p: (p[0], -p[1]))
    ref = report["reference"]
    torch_p90 = (ref.get("torch_eager_latency_ms") or {}).get("p90")
    refs = [(x, label, style) for x, label, style in ((torch_p90, "PyTorch eager p90", ":"),
                                                     (ref.get("roofline_ms"), "roofline floor", "-.")) if x]
    hlines, vlines = _budget_lines(report, budget_file, ykey)
    failed = {c["row"] for c in report.get("budgets") or [] if c["verdict"] != "pass"}
    ship = {rid: backend for backend, rid in (report.get("best_per_target") or {}).items() if rid}
    fig, ax = plt.subplots(figsize=(10.5, 6), dpi=110)
    _set_limits(ax, [p[0] for p in pts] + [x for x, _, _ in refs] + [x for x, _ in vlines],
                [p[1] for p in pts] + [y for y, _ in hlines])
    placed: list = []
    for lat, y, r in pts:
        ax.scatter(lat, y, s=90, color=BACKEND_COLORS.get(r["backend"], "gray"),
                   marker=PRECISION_MARKERS.get(r["precision"], "D"), zorder=3, edgecolor="black", linewidth=0.5)
        # a label that would overlap an earlier one (in pixels) is moved down a line
        px, py = ax.transData.transform((lat, y))
        near = sum(1 for qx, qy in placed if abs(qy - py) < 14 and abs(qx - px) < 150)
        placed.append((px, py))
        if r["id"] in failed:
            ax.scatter(lat, y, s=140, marker="x", color="red", linewidth=2, zorder=4)
        label = (("★ " if r["id"] in ship else "") + r["id"] + ("" if r.get("status", "ok") == "ok" else f" ({r['status']})")
                 + (f": ship on {ship[r['id']]}" if r["id"] in ship else "") + (" (fails a budget)" if r["id"] in failed else ""))
        ax.annotate(label, (lat, y), textcoords="offset points", xytext=(9, 4 - 11 * near), fontsize=8,
                    fontweight="bold" if r["id"] in ship else "normal",
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 0.5}, zorder=5)
    front = pareto_front([(lat, y, r["id"]) for lat, y, r in pts])
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="crimson", lw=1.5, alpha=0.7,
                label="Pareto front", zorder=2)
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=260, facecolors="none", edgecolors="crimson", lw=1.5, zorder=4)
    for x, label, style in refs:
        ax.axvline(x, color="dimgray", ls=style, lw=1.2)
        left_half = ax.transAxes.inverted().transform(ax.transData.transform((x, 0)))[0] < 0.5
        ax.text(x, 0.02, f" {label}\n {x:.2f} ms" if left_half else f"{label} \n{x:.2f} ms ", fontsize=8, color="dimgray",
                transform=ax.get_xaxis_transform(), ha="left" if left_half else "right")
    for y, label in hlines:
        ax.axhline(y, color="green", ls="--", lw=1)
        ax.text(0.99, y, f"budget: {label}", transform=ax.get_yaxis_transform(), fontsize=8, color="green", va="bottom", ha="right")
    for x, label in vlines:
        ax.axvline(x, color="green", ls="--", lw=1)
        ax.text(x, 0.98, f" budget: {label}", transform=ax.get_xaxis_transform(), fontsize=8, color="green", va="top", rotation=90)
    for backend, color in BACKEND_COLORS.items():
        if any(r["backend"] == backend for _, _, r in pts):
            ax.scatter([], [], color=color, marker="s", label=backend)
    for prec, marker in PRECISION_MARKERS.items():
        if any(r["precision"] == prec for _, _, r in pts):
            ax.scatter([], [], color="white", edgecolor="black", marker=marker, label=prec)
    ax.scatter([], [], s=160, facecolors="none", edgecolors="crimson", label="on the front")
    if failed:
        ax.scatter([], [], s=80, marker="x", color="red", linewidth=2, label="fails a budget")
    if ship:
        ax.scatter([], [], marker="$★$", s=80, color="black", label="best for its target")
    ax.set_xlabel("p90 latency at batch 1, ms (lower is better)")
    ax.set_ylabel(ylabel + " (higher is better)")
    ax.set_title(f"{report['model']}: accuracy against latency on {report['machine']['cpu']}", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
