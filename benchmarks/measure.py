"""Per-variant checks run by `edgepipe run` through the real runtime: parity against the PyTorch model,
accuracy on the evaluation set, batch-1 latency; and the PyTorch eager reference in the same run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgepipe.runtime.timing import measure, measure_stable
from edgepipe.runtime.evaluate import DecodedSet
from edgepipe.runtime.model import Classifier
from edgepipe.runtime.signing import NO_TRUST


def measure_variant(out: Path, name: str, *, parity_batch: np.ndarray, parity_names: list[str], ref_logits: np.ndarray,
                    precision: str, compare, reference_count: int, evaluation: DecodedSet | None = None,
                    warmup: int = 10, iterations: int = 100) -> dict:
    """Variant ``name`` of the folder ``out`` on ``parity_batch`` against ``ref_logits`` (``compare``: the rule
    and its tolerances for ``precision``), on ``evaluation`` (data.evaluation, decoded once for every variant),
    and its batch-1 latency (``warmup``, ``iterations``: recipe bench). ``reference_count``: the first parity
    images are the reference set; the variant's result on them alone (``reference_check``) is what `edgepipe
    verify` on a device must reproduce."""
    # the deployable path: hash check, backend load, output check (the folder being built is not signed yet)
    clf = Classifier(out, variant=name, trust=NO_TRUST)
    step = 16 if clf.dynamic_batch else 1
    logits = np.concatenate([clf.logits(parity_batch[i:i + step]) for i in range(0, len(parity_batch), step)])
    parity = compare(ref_logits, logits, parity_names, precision)
    n = reference_count
    on_reference = compare(ref_logits[:n], logits[:n], parity_names[:n], precision)
    result = {"parity": parity, "backend_used": clf.backend_name,
              "reference_check": {k: on_reference[k] for k in ("n", "top1_agreement", "mean_abs", "rel_mean_abs", "max_abs", "ok")}}
    if evaluation:
        bar = tqdm(total=len(evaluation), desc=f"  eval {name}", leave=False, unit="img")
        acc = evaluation.score(clf.logits, clf.preprocess, 8 if clf.dynamic_batch else 1, bar.update)
        bar.close()
        result["predictions"] = acc.pop("predictions")
        result["accuracy"] = dict(acc, variant=name, backend=clf.backend_name) if evaluation.labeled else {"n": acc["n"]}
    x = parity_batch[:1].copy()
    # the same stable percentiles as `edgepipe bench`: the serving choice compares these p90s
    result["latency_ms"] = measure_stable(lambda: clf.logits(x), warmup, iterations)
    result["size_mb"] = round(sum((out / f.path).stat().st_size for f in clf.variant.files) / 1e6, 3)
    return result


def measure_torch(model, pre, evaluation: DecodedSet | None = None, *, warmup: int = 10, iterations: int = 100) -> dict:
    """PyTorch eager fp32: batch-1 latency (half of ``iterations``, at least 30) and (when labeled data is given)
    accuracy, same preprocessing."""
    import torch
    model = model.eval()
    x = torch.from_numpy(pre(np.full((pre.crop, pre.crop, 3), 127, np.uint8)))
    with torch.inference_mode():
        latency = measure(lambda: model(x), warmup, max(30, iterations // 2))
    result = {"latency_ms": latency, "predictions": {}}
    if not evaluation:
        return result
    def logits(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    bar = tqdm(total=len(evaluation), desc="  eval pytorch", leave=False, unit="img")
    acc = evaluation.score(logits, pre, batch_size=16, progress=bar.update)
    bar.close()
    result["predictions"] = acc.pop("predictions")
    if evaluation.labeled:
        result["accuracy"] = {k: acc[k] for k in ("top1", "top5", "n", "per_class_top1")}
    return result


def measure_source_onnx(source, pre, evaluation: DecodedSet | None = None, *, warmup: int = 10,
                        iterations: int = 100) -> dict:
    """The reference when the model came as an ONNX file (compile.onnx_source.OnnxSource): that file in ONNX
    Runtime, with the same batch-1 latency and accuracy fields measure_torch gives."""
    x = pre(np.full((pre.crop, pre.crop, 3), 127, np.uint8))
    latency = measure(lambda: source.logits(x), warmup, max(30, iterations // 2))
    result = {"latency_ms": latency, "predictions": {}, "reference": f"source ONNX {Path(source.path).name} in ONNX Runtime"}
    if not evaluation:
        return result
    bar = tqdm(total=len(evaluation), desc="  eval source onnx", leave=False, unit="img")
    acc = evaluation.score(source.logits, pre, batch_size=16, progress=bar.update)
    bar.close()
    result["predictions"] = acc.pop("predictions")
    if evaluation.labeled:
        result["accuracy"] = {k: acc[k] for k in ("top1", "top5", "n", "per_class_top1")}
    return result
