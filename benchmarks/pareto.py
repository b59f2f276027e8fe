"""pareto.png: accuracy against p90 latency for every variant x backend.

Made to be read at a glance: the axes fit the measured variants (a budget or reference outside them is
written at the edge, never allowed to stretch the chart), labels are placed where they overlap nothing,
variants that failed a check are grey and never on the Pareto front, latency ticks are plain milliseconds,
and the variant to ship per target is a large star with a bold label. Needs matplotlib (edgepipe[bench]);
without it the report is written without the picture.
"""
from __future__ import annotations

from pathlib import Path

from edgepipe.atomic import atomic_path
from edgepipe.benchmarks.budgets import resolve_of

BACKEND_COLORS = {"openvino": "#1f77b4", "onnxruntime": "#ff7f0e", "tensorrt": "#2ca02c"}
PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}
GREY = "#9e9e9e"
MIN_ACCURACY_SPAN = 0.02  # accuracy axes show at least 2 points: a 0.2-point gap must not look like a cliff


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


def axis_limits(xs: list[float], ys: list[float], accuracy: bool) -> tuple[tuple, tuple, bool]:
    """(x limits, y limits, log x?) fitted to the plotted points only."""
    log_x = max(xs) / max(min(xs), 1e-9) > 4
    if log_x:
        xlim = (min(xs) / 1.35, max(xs) * 1.6)
    else:
        pad = (max(xs) - min(xs)) * 0.15 or max(xs) * 0.15
        xlim = (max(0.0, min(xs) - pad), max(xs) + 2.5 * pad)
    span = max(max(ys) - min(ys), MIN_ACCURACY_SPAN if accuracy else 0.0) or abs(max(ys)) * 0.1 or 1.0
    mid = (max(ys) + min(ys)) / 2
    lo, hi = mid - 0.5 * span, mid + 0.5 * span
    ylim = (lo - 0.3 * span, hi + 0.3 * span)
    if accuracy:
        ylim = (max(ylim[0], 0.0 if lo >= 0 else ylim[0]), min(ylim[1], 1.0 + 0.3 * span))
    return xlim, ylim, log_x


def _overlaps(box, boxes, pad: float = 2.0) -> bool:
    return any(box.x0 - pad < b.x1 and b.x0 - pad < box.x1 and box.y0 - pad < b.y1 and b.y0 - pad < box.y1
               for b in boxes)


# label offsets in points, tried in this order: right, left, above, below, then further out
_OFFSETS = [(dx * k, dy * k) for k in (1, 2, 3.2, 4.5) for dx, dy in
            ((10, -4), (-10, -4), (0, 11), (0, -16), (10, 10), (-10, 10), (10, -16), (-10, -16))]


def place_labels(ax, points: list[tuple[float, float, str, dict, float]], obstacles=()) -> list:
    """Annotate each (x, y, text, style, marker radius in pixels), in the order given, where its box overlaps
    no marker, no other label, no artist in ``obstacles`` and stays in the axes: the first free spot of
    _OFFSETS, else the least crowded one. A label far from its point gets a thin leader line. Returns the
    Annotation artists."""
    from matplotlib.transforms import Bbox
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    markers = []
    for x, y, _, _, radius in points:
        px, py = ax.transData.transform((x, y))
        markers.append(Bbox.from_extents(px - radius, py - radius, px + radius, py + radius))
    placed = [a.get_window_extent(renderer) for a in obstacles]
    artists = []
    for x, y, text, style, radius in points:
        best = None  # (clashes, annotation, box, index of the offset)
        grow = radius / 7  # clear a big marker (the star) as far as a small one
        for i, (dx, dy) in enumerate((dx * grow, dy * grow) for dx, dy in _OFFSETS):
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), va="center", zorder=6,
                              ha="left" if dx > 0 else "right" if dx < 0 else "center", **style)
            box = ann.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            clashes = sum(_overlaps(box, [b]) for b in placed + markers) + (0 if inside else 100)
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, ann, box, i)
            else:
                ann.remove()
            if clashes == 0:
                break
        _, ann, box, i = best
        if i >= 4:  # not right beside, above or below its point: a leader line says whose label it is
            ax.annotate("", (x, y), xytext=ann.xyann, textcoords="offset points", zorder=5,
                        arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0, "shrinkB": 5})
        placed.append(box)
        artists.append(ann)
    return artists


def _plain_ms_ticks(ax, log_x: bool) -> None:
    """Latency ticks as plain numbers (2, 5, 10 ms), never 4×10⁰."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    if log_x:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(fmt)


def _edge_notes(ax, notes: list[tuple[str, str, str]]) -> list:
    """References and budgets outside the fitted axes: one line each, stacked at the edge they lie beyond
    (an arrow says which way), so they never stretch the chart nor overlap each other."""
    arrows = {"below": "↓", "above": "↑", "left": "←", "right": "→"}
    corner = {"below": (0.99, 0.02, "right", "bottom", 1), "above": (0.99, 0.98, "right", "top", -1),
              "left": (0.01, 0.02, "left", "bottom", 1), "right": (0.99, 0.02, "right", "bottom", 1)}
    stacked: dict = {}
    artists = []
    for text, where, color in notes:
        x, y, ha, va, step = corner[where]
        key = (x, ha)  # notes sharing a corner stack upwards (or downwards from the top)
        n = stacked.get((key, va), 0)
        stacked[(key, va)] = n + 1
        artists.append(ax.text(x, y + step * 0.045 * n, f"{arrows[where]} {text}", transform=ax.transAxes, ha=ha,
                               va=va, fontsize=8, color=color, zorder=7,
                               bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": 1}))
    return artists


def plot_pareto(report: dict, budget_file, path: Path) -> Path | None:
    """Write pareto.png; None (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("edgepipe bench: pareto.png not written: it needs matplotlib: pip install 'edgepipe[bench]'", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drawn = draw(report, budget_file)
    if drawn is None:
        return None
    with atomic_path(path, suffix=".png") as tmp:
        drawn["figure"].savefig(tmp, format="png")
    plt.close(drawn["figure"])
    return Path(path)


def _draw_lines(ax, refs, hlines, vlines, xlim, ylim) -> list[tuple]:
    """The reference lines (PyTorch eager, roofline) and budget lines inside the axes; the notes (text, edge,
    colour) for those beyond them."""
    notes = []
    for x, label, style in refs:
        if not xlim[0] <= x <= xlim[1]:
            notes.append((f"{label}: {x:.3g} ms", "left" if x < xlim[0] else "right", "dimgray"))
            continue
        ax.axvline(x, color="dimgray", ls=style, lw=1.1, zorder=1)
        ax.text(x, 0.985, f" {label} {x:.2f} ms ", transform=ax.get_xaxis_transform(), rotation=90, va="top",
                ha="right", fontsize=8, color="dimgray", zorder=1)
    for y, label in hlines:
        if ylim[0] <= y <= ylim[1]:
            ax.axhline(y, color="green", ls="--", lw=1, zorder=1)
            ax.text(0.01, y, f"budget: {label}", transform=ax.get_yaxis_transform(), fontsize=8, color="green",
                    va="bottom", ha="left")
        else:
            notes.append((f"budget {label}", "below" if y < ylim[0] else "above", "green"))
    for x, label in vlines:
        if xlim[0] <= x <= xlim[1]:
            ax.axvline(x, color="green", ls="--", lw=1, zorder=1)
            ax.text(x, 0.015, f" budget: {label} ", transform=ax.get_xaxis_transform(), rotation=90, va="bottom",
                    ha="left", fontsize=8, color="green")
        else:
            value = "" if label.endswith(" ms") else f" ({x:.3g} ms)"  # a ratio budget: say where it lies
            notes.append((f"budget {label}{value}", "left" if x < xlim[0] else "right", "green"))
    return notes


def _label_of(r: dict, bad: bool, shipped_on: str | None) -> tuple[str, dict]:
    """A point's label text and style: why a failed one is grey, where a shipped one ships."""
    if bad:
        status = r.get("status", "ok")
        why = "fails a budget" if status == "ok" else "failed the parity check" if status == "failed" else status
        return f"{r['id']} ({why})", {"fontsize": 8, "color": "dimgray"}
    if shipped_on:
        served = "ships" if shipped_on == r.get("native_backend", r["backend"]) else f"ships on {shipped_on}"
        return f"{r['id']} ({served})", {"fontsize": 9, "fontweight": "bold"}
    return r["id"], {"fontsize": 8}


def _legend(ax, pts, failed: set, front: bool, ship: bool) -> None:
    """Backends and precisions present, the front, failed points and shipped variants, beside the axes."""
    handles = []
    for backend, color in BACKEND_COLORS.items():
        if any(r["backend"] == backend and r["id"] not in failed for _, _, r in pts):
            handles.append(ax.scatter([], [], color=color, marker="s", label=backend))
    for prec, marker in PRECISION_MARKERS.items():
        if any(r["precision"] == prec for _, _, r in pts):
            handles.append(ax.scatter([], [], color="white", edgecolor="black", marker=marker, label=prec))
    if front:
        handles.append(ax.plot([], [], color="crimson", lw=1.4, alpha=0.6, label="Pareto front\n(passing variants)")[0])
    if failed:
        handles.append(ax.scatter([], [], color=GREY, marker="o", label="failed a check"))
    if ship:
        handles.append(ax.scatter([], [], s=160, marker="*", facecolor="gold", edgecolor="black", label="ships on its backend"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0, frameon=False)


def draw(report: dict, budget_file) -> dict | None:
    """The chart as a matplotlib figure: {"figure", "axes", "labels" (Annotation per variant), "front" (ids),
    "notes" (texts at the edges)}; None when no variant has a value to plot."""
    import matplotlib.pyplot as plt
    ykey, ylabel = _y_metric(report)
    accuracy = ykey != "throughput_fps"
    pts = sorted(((r["p90_ms"], r.get(ykey), r) for r in report["variants"] if r.get(ykey) is not None),
                 key=lambda p: (p[0], -p[1]))
    if not pts:
        return None
    failed = {c["row"] for c in report.get("budgets") or [] if c["verdict"] != "pass"}
    failed |= {r["id"] for _, _, r in pts if r.get("status", "ok") != "ok"}
    ship = {rid: backend for backend, rid in (report.get("best_per_target") or {}).items() if rid}
    ref = report["reference"]
    refs = [(x, label, style) for x, label, style in (((ref.get("torch_eager_latency_ms") or {}).get("p90"), "PyTorch eager p90", ":"),
                                                     (ref.get("roofline_ms"), "roofline floor", "-.")) if x]
    hlines, vlines = _budget_lines(report, budget_file, ykey)

    fig, ax = plt.subplots(figsize=(10, 6), dpi=120)
    # the axes fit the variants; a reference or budget beyond them is noted at the edge, never stretches them
    xlim, ylim, log_x = axis_limits([p[0] for p in pts], [p[1] for p in pts], accuracy)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    _plain_ms_ticks(ax, log_x)

    notes = _draw_lines(ax, refs, hlines, vlines, xlim, ylim)

    ok_pts = [(lat, y, r["id"]) for lat, y, r in pts if r["id"] not in failed]
    front = pareto_front(ok_pts)
    if front:
        xs = [p[0] for p in front] + [xlim[1]]
        ys = [p[1] for p in front] + [front[-1][1]]
        ax.step(xs, ys, where="post", color="crimson", lw=1.4, alpha=0.6, zorder=2)
    on_front = {p[2] for p in front}
    labels = []
    for lat, y, r in pts:
        bad = r["id"] in failed
        color = GREY if bad else BACKEND_COLORS.get(r["backend"], "gray")
        ax.scatter(lat, y, s=70, color=color, marker=PRECISION_MARKERS.get(r["precision"], "D"), zorder=4,
                   edgecolor="crimson" if r["id"] in on_front else ("dimgray" if bad else "black"),
                   linewidth=1.6 if r["id"] in on_front else 0.6, alpha=0.8 if bad else 1.0)
        if r["id"] in ship:
            ax.scatter(lat, y, s=420, marker="*", facecolor="gold", edgecolor="black", linewidth=0.8, zorder=3)
        text, style = _label_of(r, bad, ship.get(r["id"]))
        labels.append((lat, y, text, dict(style, bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 0.6}),
                       13.0 if r["id"] in ship else 7.0))
    ax.set_xlabel("p90 latency at batch 1, ms (lower is better)" + (", log scale" if log_x else ""))
    ax.set_ylabel(ylabel + " (higher is better)")
    machine = report.get("machine") or {}
    ax.set_title(f"{report['model']}: accuracy against latency\n{machine.get('cpu', '?')}, {machine.get('threads', '?')} threads"
                 + (f", {report['data']['images']} images" if report["data"].get("images") else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8, 1))  # the final layout, before text is measured in pixels
    edge = _edge_notes(ax, notes)
    # the variants that ship are labeled first (nearest their point), failed ones last
    order = sorted(labels, key=lambda lab: (not lab[3].get("fontweight"), lab[3].get("color") == "dimgray"))
    placed = place_labels(ax, order, obstacles=edge)

    _legend(ax, pts, failed, bool(front), bool(ship))
    ax.grid(True, alpha=0.3, which="major")
    ax.grid(True, alpha=0.12, which="minor")
    return {"figure": fig, "axes": ax, "labels": placed, "front": [p[2] for p in front], "notes": edge}
