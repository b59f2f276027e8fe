"""Per-variant checks run by `edgepipe run` through the real runtime: parity against the PyTorch model,
accuracy on the evaluation set, batch-1 latency; and the PyTorch eager reference in the same run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgepipe.benchmarks.latency import measure
from edgepipe.runtime.evaluate import evaluate_items, read_image
from edgepipe.runtime.model import Classifier


def _labeled(items) -> bool:
    return bool(items) and all(t >= 0 for _, t in items)


def measure_variant(out: Path, name: str, parity_batch: np.ndarray, parity_names: list[str], ref_logits: np.ndarray,
                    precision: str, eval_items, recipe, compare) -> dict:
    clf = Classifier(out, variant=name)  # the deployable path: hash check, backend load, output check
    if clf.dynamic_batch:
        logits = np.concatenate([clf.logits(parity_batch[i:i + 16]) for i in range(0, len(parity_batch), 16)])
    else:
        logits = np.concatenate([clf.logits(parity_batch[i:i + 1]) for i in range(len(parity_batch))])
    parity = compare(ref_logits, logits, parity_names, precision)
    result = {"parity": parity, "backend_used": clf.backend_name}
    if eval_items:
        bar = tqdm(total=len(eval_items), desc=f"  eval {name}", leave=False, unit="img")
        acc = evaluate_items(clf, eval_items, progress=bar.update)
        bar.close()
        result["predictions"] = acc.pop("predictions")
        result["accuracy"] = acc if _labeled(eval_items) else {"n": acc["n"]}
    x = parity_batch[:1].copy()
    result["latency_ms"] = measure(lambda: clf.logits(x), recipe.bench.warmup, recipe.bench.iterations)
    result["size_mb"] = round(sum((out / f["path"]).stat().st_size for f in clf.variant["files"]) / 1e6, 3)
    return result


def measure_torch(model, pre, eval_items, recipe) -> dict:
    """PyTorch eager fp32: batch-1 latency and (when labeled data is given) accuracy, same preprocessing."""
    import torch
    model = model.eval()
    x = torch.from_numpy(pre(np.full((pre.crop, pre.crop, 3), 127, np.uint8)))
    with torch.inference_mode():
        latency = measure(lambda: model(x), recipe.bench.warmup, max(30, recipe.bench.iterations // 2))
    result = {"latency_ms": latency, "predictions": {}}
    if not eval_items:
        return result
    n = top1 = top5 = 0
    per_class: dict[int, list[int]] = {}
    bar = tqdm(total=len(eval_items), desc="  eval pytorch", leave=False, unit="img")
    for i in range(0, len(eval_items), 16):
        chunk = [(p, t, read_image(p)) for p, t in eval_items[i:i + 16]]
        chunk = [(p, t, img) for p, t, img in chunk if img is not None]
        bar.update(16)
        if not chunk:
            continue
        with torch.inference_mode():
            logits = model(torch.from_numpy(pre.batch([img for _, _, img in chunk]))).numpy()
        for (p, t, _), row in zip(chunk, np.argsort(-logits, 1)[:, :5]):
            result["predictions"][Path(p).name] = int(row[0])
            n += 1
            top1 += int(row[0] == t)
            top5 += int(t in row)
            per_class.setdefault(t, [0, 0])
            per_class[t][0] += int(row[0] == t)
            per_class[t][1] += 1
    bar.close()
    if _labeled(eval_items) and n:
        result["accuracy"] = {"top1": top1 / n, "top5": top5 / n, "n": n,
                              "per_class_top1": {str(k): v[0] / v[1] for k, v in sorted(per_class.items())}}
    return result
