"""The data stage of `edgepipe run`: every image a run uses, decoded once.

`prepare_data` resolves the recipe's data (dataset references become image files, edgepipe/datasets.py),
splits it into calibration / check / accuracy-control sets (edgepipe/data_plan.py), decodes each image once
and returns a frozen RunData that the compile, measure and report stages share.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepipe import UserError
from edgepipe.runtime.integrity import sha256_file
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.steps import hash_key


def log(msg: str) -> None:
    from edgepipe.log import progress
    progress(msg)


class Crops:
    """Each image decoded and cut to the model's crop once per run, whichever sets it is in (the check
    images and the accuracy-control images are data.evaluation images when that is given): from the bytes
    the data plan holds (generated crops), else from its file."""

    def __init__(self, pre: Preprocess):
        self.pre = pre
        self._crops: dict[str, np.ndarray | None] = {}
        self.encoded: dict[Path, bytes] = {}     # DataPlan.encoded, once the plan is made

    def __call__(self, path) -> np.ndarray | None:
        key = str(path)
        if key not in self._crops:
            from edgepipe.runtime.evaluate import decode_image, read_image
            img = decode_image(self.encoded[Path(path)]) if Path(path) in self.encoded else read_image(path)
            self._crops[key] = None if img is None else self.pre.crops([img])[0]
        return self._crops[key]


@dataclass(frozen=True)
class RunData:
    pre: Preprocess
    plan: object                        # edgepipe.data_plan.DataPlan
    calibration: list                   # preprocessed (1, 3, H, W) arrays
    check_crops: np.ndarray             # uint8 (N, H, W, 3): parity of every variant and the reference set
    check_names: list[str]
    evaluation: object                  # data.evaluation decoded (runtime.evaluate.DecodedSet), or None
    crops: Crops                        # where every crop of this run comes from
    fingerprints: dict = field(default_factory=dict)   # content hashes of calibration / control / evaluation sets

    def compare(self, reference: np.ndarray, candidate: np.ndarray, names: list[str], precision: str) -> dict:
        """Parity by the runtime's rule (the tolerances `edgepipe verify` applies on a device), with the bounds
        of this run's kind of check images."""
        from edgepipe.runtime.verify import compare_logits
        return compare_logits(reference, candidate, precision, self.plan.kind, names)

    @functools.cached_property
    def check_batch(self) -> np.ndarray:
        """The check images, normalized NCHW float32."""
        return self.pre.normalize(self.check_crops)


def prepare_data(recipe, out: Path, labels: list[str], pre: Preprocess) -> RunData:
    from edgepipe.data_plan import plan_data
    from edgepipe.datasets import resolve_data
    from edgepipe.runtime.evaluate import DecodedSet
    resolved = resolve_data(recipe, out)  # dataset references ("NAME:SPLIT[:N]") -> PNG files + labels.csv under out/data
    crops = Crops(pre)
    items, evaluation = None, None
    if resolved.evaluation:
        from edgepipe.runtime.data import load_items
        items, _ = load_items(resolved.evaluation, labels)  # unlabeled: agreement only
        evaluation = DecodedSet.decode(items, pre, crops)
        if recipe.data.on_bad_image == "stop":
            report_bad_images(evaluation.skipped, len(items), "stop")
    plan = plan_data(recipe, out, labels, items, resolved)
    crops.encoded = plan.encoded
    calibration, _ = load_arrays(plan.calibration, pre, recipe.data.on_bad_image, crops)
    check_crops, check_names = load_crops(plan.check, pre, recipe.data.on_bad_image, crops)
    log("  " + plan.describe() + (f"; evaluation: {len(items)} images" if items else ""))
    fingerprints = {
        "calibration": data_fingerprint(plan.calibration, plan.sha256),
        "control": hash_key(data_fingerprint([p for p, _ in plan.control], plan.sha256), [t for _, t in plan.control]),
        "evaluation": data_fingerprint([p for p, _ in items]) if items else None}
    return RunData(pre=pre, plan=plan, calibration=calibration, check_crops=check_crops, check_names=check_names,
                   evaluation=evaluation, crops=crops, fingerprints=fingerprints)


def load_crops(paths: list[Path], pre: Preprocess, on_bad: str = "skip",
               crops: Crops | None = None) -> tuple[np.ndarray, list[str]]:
    """Resized and cropped uint8 images (N, crop, crop, 3), see Preprocess.crops; unreadable ones are skipped
    and listed (``on_bad="skip"``) or stop the run. ``crops``: the run's crop cache."""
    from edgepipe.runtime.evaluate import DecodedSet
    decoded = DecodedSet.decode([(p, -1) for p in paths], pre, crops)
    report_bad_images(decoded.skipped, len(paths), on_bad)
    return decoded.crops, decoded.names


def load_arrays(paths: list[Path], pre: Preprocess, on_bad: str = "skip",
                crops: Crops | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Preprocessed (1, 3, H, W) images; unreadable ones are skipped and listed (``on_bad="skip"``) or stop the run."""
    crops, names = load_crops(paths, pre, on_bad, crops)
    batch = pre.normalize(crops)
    return [batch[i:i + 1] for i in range(len(batch))], names


def report_bad_images(bad: list[str], total: int, on_bad: str) -> None:
    if not bad:
        return
    if on_bad == "stop" or len(bad) == total:
        raise UserError(f"{len(bad)} of {total} image(s) cannot be read as images, e.g. {bad[0]}; fix or remove "
                        f"them" + (", or set data.on_bad_image: skip" if on_bad == "stop" else ""))
    log(f"  skipped {len(bad)} unreadable image(s): {', '.join(bad[:20])}" + (" ..." if len(bad) > 20 else ""))


def preflight(recipe) -> None:
    """Checks that need no model, so a bad data set fails in a second, before the output folder is touched."""
    from edgepipe.datasets import is_reference
    from edgepipe.runtime.data import IMAGE_EXTS, list_images
    cfg = recipe.data.calibration
    if recipe.data.parity_images < 1:
        raise UserError(f"data.parity_images is {recipe.data.parity_images}; the parity checks need at least 1 image")
    if cfg.source == "generated" and cfg.count < 1:
        raise UserError(f"data.calibration.count is {cfg.count}; give at least 1 (or a folder of images as source)")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"data.calibration.limit is {cfg.limit}; give at least 1, or leave it out to use every image")
    if cfg.source == "generated" or is_reference(cfg.source):
        return
    paths = list_images(cfg.source)[:cfg.limit]
    if not paths:
        raise UserError(f"data.calibration.source {cfg.source}: no images found (looked for "
                        f"{', '.join(sorted(IMAGE_EXTS))}); the parity checks and int8 targets need calibration images")
    if recipe.data.on_bad_image == "stop":
        from edgepipe.runtime.evaluate import read_image
        report_bad_images([str(p) for p in paths if read_image(p) is None], len(paths), "stop")


def data_fingerprint(paths: list[Path], sha256=None) -> str:
    """Content hash of a set of images (names + bytes), so a moved or copied output folder stays cached.
    ``sha256(path)``: where the hashes come from (DataPlan.sha256: bytes the plan holds), default the files."""
    sha256 = sha256 or (lambda p: sha256_file(p) if Path(p).is_file() else None)
    return hash_key([(Path(p).name, sha256(p)) for p in paths])


def accuracy_control(data: RunData, fp32_onnx: Path, quantize):
    """The AccuracyControl (compile/mixed_precision.py) that steers int8 when stages.quantize.max_drop or
    min_agreement is set, else None. Its items are held-out (preprocessed array, class index) pairs, never a
    calibration image (data_plan.py): scored by their labels when max_drop is set and all have one, else by
    the fp32 model's own top-1 -- agreement with fp32, whose 'accuracy' on its own predictions is 100%, so
    min_agreement a becomes a drop of 100 x (1 - a) points."""
    from edgepipe.compile.mixed_precision import AccuracyControl
    if quantize.max_drop is None and quantize.min_agreement is None:
        return None
    plan = data.plan
    arrays, _ = load_arrays([p for p, _ in plan.control], data.pre, crops=data.crops)
    targets = [t for _, t in plan.control]
    what = f"{len(arrays)} held-out images ({plan.heldout_source})"
    if quantize.max_drop is not None and len(targets) == len(arrays) and all(t >= 0 for t in targets):
        return AccuracyControl(list(zip(arrays, targets)), quantize.max_drop, "labels", f"labels of {what}")
    from edgepipe.compile.qdq import run_logits
    own = run_logits(fp32_onnx, np.concatenate(arrays)).argmax(1)
    min_agreement = quantize.min_agreement if quantize.min_agreement is not None else 1.0 - quantize.max_drop / 100.0
    return AccuracyControl(list(zip(arrays, (int(t) for t in own))), round(100.0 * (1.0 - min_agreement), 6),
                           "fp32 agreement", f"agreement with fp32 on {what}")
