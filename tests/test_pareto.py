"""Issue 18: pareto.png readable at a glance -- axes fitted to the variants (budgets and references outside
them noted at the edge), labels that overlap nothing, failed variants grey and never on the front, plain
millisecond ticks, the shipped variant per target marked. Drawn from a report like `edgepipe bench` writes."""
from __future__ import annotations

import itertools

import matplotlib  # edgepipe[bench], part of [dev]: a missing one fails here, it does not skip
import pytest

from edgepipe.benchmarks.budgets import Budget, BudgetFile, RatioBudget
from edgepipe.benchmarks.pareto import draw, plot_pareto


def row(rid, backend, precision, p90, top1, status="ok"):
    name = rid.split("@")[0]
    return {"id": rid, "name": name, "backend": backend, "native_backend": name.split("-")[0], "precision": precision,
            "status": status, "p90_ms": p90, "top1": top1, "latency_ms": {"p50": p90 * 0.9, "p90": p90}}


def crowded_report() -> dict:
    """Near-identical accuracies and latencies (the labels' worst case), a failed variant that is the most
    accurate and fastest, and references far from the variants."""
    variants = [row("onnxruntime-fp32", "onnxruntime", "fp32", 3.6, 0.892),
                row("onnxruntime-fp32@openvino", "openvino", "fp32", 3.7, 0.892),
                row("openvino-fp32", "openvino", "fp32", 3.75, 0.892),
                row("openvino-int8", "openvino", "int8", 1.9, 0.890),
                row("onnxruntime-int8", "onnxruntime", "int8", 1.8, 0.899, status="failed"),
                row("pruned-openvino-fp32", "openvino", "fp32", 2.0, 0.886),
                row("pruned-openvino-int8", "openvino", "int8", 1.2, 0.884)]
    return {"model": "efficientnet_lite0", "machine": {"cpu": "Test CPU", "threads": 2},
            "data": {"labeled": True, "images": 500, "path": "val.csv"}, "variants": variants,
            "reference": {"torch_eager_latency_ms": {"p50": 15.0, "p90": 16.8}, "roofline_ms": 0.4},
            "budgets": [{"row": "pruned-openvino-int8", "verdict": "fail"}],
            "best_per_target": {"openvino": "openvino-int8", "onnxruntime": "onnxruntime-fp32"}}


def test_pareto_is_readable():
    budgets = BudgetFile(budgets=[Budget(top1_min=0.0), Budget(variants="*int8*", p90_ratio_max=RatioBudget("torch_eager", 0.5)),
                                  Budget(p90_ms_max=500.0)])
    drawn = draw(crowded_report(), budgets)
    ax, fig = drawn["axes"], drawn["figure"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    # axes fit the variants: a budget at top-1 0.0 and a 500 ms budget do not stretch them
    lo, hi = ax.get_ylim()
    assert 0.85 < lo < 0.884 and 0.899 < hi < 0.93
    x0, x1 = ax.get_xlim()
    assert 0.8 < x0 < 1.2 and 3.75 < x1 < 10
    notes = " ".join(t.get_text() for t in drawn["notes"])
    assert "top-1 ≥ 0.0" in notes and "p90 ≤ 500.0 ms" in notes and "PyTorch eager" in notes and "roofline" in notes
    # failed rows (parity failure, failed budget) are never on the front, even when they would dominate
    assert "onnxruntime-int8" not in drawn["front"] and "pruned-openvino-int8" not in drawn["front"]
    assert drawn["front"] == ["openvino-int8", "onnxruntime-fp32"]
    # labels: one per variant, inside the axes, none overlapping another label or an edge note
    boxes = [a.get_window_extent(renderer) for a in drawn["labels"]]
    assert len(boxes) == 7
    frame = ax.get_window_extent(renderer)
    for box in boxes:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    for a, b in itertools.combinations(boxes + [n.get_window_extent(renderer) for n in drawn["notes"]], 2):
        assert not a.overlaps(b), (a, b)
    texts = {a.get_text() for a in drawn["labels"]}
    assert "openvino-int8 (ships)" in texts and "onnxruntime-fp32 (ships)" in texts
    assert "onnxruntime-int8 (failed the parity check)" in texts and "pruned-openvino-int8 (fails a budget)" in texts
    # plain millisecond ticks, never 10^0 notation
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert ticks and all("10^" not in t and "\\times" not in t and "$" not in t for t in ticks), ticks
    assert {"1", "2"} <= set(ticks)
    matplotlib.pyplot.close(fig)


def test_png_written(tmp_path):
    path = plot_pareto(crowded_report(), None, tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_page_names_machine_date_and_commands(tmp_path):
    """docs/results.md is generated from bench reports: every figure sits next to its machine, date, command."""
    import json

    from edgepipe.benchmarks.results_page import main as results_main
    bench = tmp_path / "out" / "bench"
    bench.mkdir(parents=True)
    (tmp_path / "out" / "recipe.resolved.yaml").write_text("name: default\nmodel: {name: efficientnet_lite0}\n")
    report = dict(crowded_report(), dir=str(tmp_path / "out"), date="2026-11-29 03:00 UTC",
                  command="edgepipe bench out --data val.csv", settings={"budgets": None}, budgets=[])
    report["machine"].update(cores=2, isa=["avx2", "avx512_vnni"], seconds=12.0, load_average=[0.5, 0.4, 0.3])
    (bench / "report.json").write_text(json.dumps(report))
    plot_pareto(report, None, bench / "pareto.png")
    page = tmp_path / "docs" / "results.md"
    assert results_main([str(bench / "report.json"), "--out", str(page), "--built-with", "edgepipe run default --out out",
                         "--note", "a quiet machine"]) == 0
    text = page.read_text()
    assert "## default: efficientnet_lite0" in text and "Test CPU, 2 cores" in text and "avx512_vnni" in text
    assert "2026-11-29 03:00 UTC" in text and "`edgepipe bench out --data val.csv`" in text
    assert "`edgepipe run default --out out`" in text and "![accuracy against latency](pareto.png)" in text
    assert "0.5, 0.4, 0.3 on 2 cores" in text and "**Note**: a quiet machine" in text
    assert "| **openvino-int8** (ships) | openvino | int8 | ok | 0.8900 |" in text
    assert (page.parent / "pareto.png").read_bytes() == (bench / "pareto.png").read_bytes()
    assert results_main([str(tmp_path / "nope.json"), "--out", str(page)]) == 2
    # the many-cameras study's result file gets a section of its own, with its machine and date
    row = dict(cameras=16, mode="serve", classified_over_offered=0.934, worst_stream=0.92, aggregate_fps=224.1,
               age_p50_ms=80.5, age_p95_ms=150.2, peak_rss_mb=487, batch_histogram={"<=8": 650}, camera_cpu=0.1)
    cams = tmp_path / "cams.json"
    cams.write_text(json.dumps({"machine": {"cpu": "Cam CPU", "isa": ["avx2"], "cores": 2, "date": "2026-12-07 04:20"},
                                "model": "/x/default", "seconds": 30.0, "transport": "udp", "camera": "H.264 640x360",
                                "results": [row, dict(row, mode="separate", batch_histogram=None)]}))
    assert results_main([str(bench / "report.json"), "--out", str(page), "--cameras", str(cams)]) == 0
    text = page.read_text()
    assert "## Many cameras: default" in text and "Cam CPU, 2 cores" in text and "2026-12-07 04:20" in text
    assert "| 16 | serve | 0.93 (0.92) | 224.1 | 80.5 / 150.2 | 487 MB | <=8: 650 | 10% |" in text
    assert "--cameras 16 --seconds 30 --modes serve,separate" in text
    cams.write_text("{}")
    assert results_main([str(bench / "report.json"), "--out", str(page), "--cameras", str(cams)]) == 2
