"""The budgeted fallback of a QDQ int8 model (compile/qdq.py fallback_search) on a built folder, as it is and with
one layer's int8 weight scales perturbed (docs/compile.md, "Budgeted fallback").

    .venv/bin/python benchmarks/studies/qdq_fallback.py out/default --imagenet ../shared/data/imagenet-sample

Reads the folder (never writes it): quantizes its fp32 ONNX with the ONNX Runtime int8 target's settings
(stages.quantize defaults) on the folder's calibration crops; the budget: top-1 drop <= --max-drop points on the
even rows of the labeled set; then for plain int8 and for a copy with LAYER's weight scales multiplied by
random factors in [0.5, 1.5]: the doctor's ranking, the layers the fallback keeps in float, top-1 and
agreement with fp32 on the odd rows (held out from the search) and on the last 200 held-out crops, and batch-1
latency of fp32 / int8 / int8+fallback alternated.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np

from edgepipe.compile.mixed_precision import AccuracyControl
from edgepipe.compile.qdq import fallback_search, float_layers_cost, quantize_qdq, run_logits, write_fallback
from edgepipe.runtime.data import load_labeled
from edgepipe.runtime.manifest import Manifest

LAYER = "/_blocks.6/_expand_conv/Conv"


def scale_layer_weights(src: Path, dst: Path, layer: str, seed: int = 0) -> None:
    """``layer``'s per-channel weight scales times random factors in [0.5, 1.5]: a deliberately broken int8 file."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(src))
    made_by = {o: n for n in model.graph.node for o in n.output}
    weight_dq = made_by[next(n for n in model.graph.node if n.name == layer).input[1]]
    init = next(t for t in model.graph.initializer if t.name == weight_dq.input[1])
    values = numpy_helper.to_array(init)
    values = values * np.random.default_rng(seed).uniform(0.5, 1.5, values.shape).astype(values.dtype)
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(dst))


def arrays(paths, pre) -> np.ndarray:
    return np.stack([pre(cv2.imread(str(p)))[0] for p in paths]).astype(np.float32)


def scores(model: Path, x: np.ndarray, own: np.ndarray, labeled=None) -> dict:
    out = {"crop_agreement": round(float(np.mean(run_logits(model, x).argmax(1) == own)), 4)}
    if labeled is not None:
        xs, own_l, labels = labeled
        pred = run_logits(model, xs).argmax(1)
        out.update(imagenet_top1=round(float(np.mean(pred == labels)), 4),
                   imagenet_agreement=round(float(np.mean(pred == own_l)), 4))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--imagenet", type=Path, required=True, help="folder with labels.csv: even rows steer the "
                    "fallback (labels, --max-drop), odd rows are held out for the figures")
    ap.add_argument("--max-drop", type=float, default=1.0, help="top-1 points (stages.quantize.max_drop)")
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    manifest = Manifest.load(args.folder)
    pre, fp32 = manifest.preprocess, args.folder / "onnxruntime-fp32" / "model.onnx"
    calibration = list(arrays(sorted((args.folder / "calibration").glob("*.jpg")), pre)[:, None])
    crops = arrays(sorted((args.folder / "heldout").glob("*.jpg"))[200:], pre)
    own_crops = run_logits(fp32, crops).argmax(1)
    items = load_labeled(args.imagenet / "labels.csv")
    x, y = arrays([p for p, _ in items[0::2]], pre), np.array([t for _, t in items[0::2]])
    xs = arrays([p for p, _ in items[1::2]], pre)
    labeled = (xs, run_logits(fp32, xs).argmax(1), np.array([t for _, t in items[1::2]]))
    control = AccuracyControl(list(zip(x[:, None], y)), args.max_drop, "labels")
    results = {"budget": f"top-1 drop <= {args.max_drop} points on {len(x)} labeled ImageNet images (even rows)",
               "fp32": scores(fp32, crops, own_crops, labeled)}
    with tempfile.TemporaryDirectory(prefix="qdq-fallback-") as tmp:
        plain = Path(tmp) / "int8.onnx"
        quantize_qdq(fp32, plain, calibration, mixed_precision=False)
        broken = Path(tmp) / "perturbed.onnx"
        scale_layer_weights(plain, broken, LAYER)
        for name, model in (("default", plain), ("perturbed", broken)):
            search = fallback_search(fp32, model, control)
            row = {"int8": scores(model, crops, own_crops, labeled), "ranking": search.report["ranking"][:3],
                   "float_layers": search.float_layers, "steps": [{k: s[k] for k in ("float_layers", "drop_points")}
                                                                   for s in search.report["steps"]]}
            fixed = write_fallback(fp32, model, search.float_layers, Path(tmp) / f"{name}-fallback.onnx")
            row["int8+fallback"] = scores(fixed, crops, own_crops, labeled)
            row["search"] = {k: search.report[k] for k in ("target_met", "fp32_top1", "int8_top1", "final_top1", "seconds")}
            row["speed"] = float_layers_cost(model, fixed, x[:1], runs=args.runs, fp32=fp32)
            results[name] = row
            print(name, json.dumps(row, indent=1), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
