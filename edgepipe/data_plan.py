"""Which images calibrate int8, which check the variants, which steer accuracy control — never the same ones.

A check run on the images a model was calibrated on proves nothing, so every run splits its data:
- calibration: data.calibration (generated crops of the bundled photos by default);
- held out: data.evaluation when given, else a fifth of a calibration folder, else generated crops made with
  another seed. The first data.parity_images of them are the *check* set (parity of every variant, and the
  reference set that travels with the artifacts); the rest steer accuracy control (stages.quantize.max_drop /
  min_agreement), by their labels when they have them, else by agreement with the fp32 model's top-1.
Images found in both the calibration and the held-out set (same bytes) are dropped from the held-out set.
Generated crops are written for the user to look at; the plan keeps their bytes (``encoded``), so the run
decodes them from memory instead of reading the files back.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from edgepipe import UserError
from edgepipe.datasets import ResolvedData, resolve_data
from edgepipe.runtime.integrity import sha256_file

HOLD_OUT_EVERY = 5          # a calibration folder without data.evaluation: every 5th image is held out
MIN_FOLDER_FOR_SPLIT = 10   # fewer images than this cannot spare any: held-out crops are generated instead
HELDOUT_SEED = 1            # generated held-out crops: another seed than the calibration crops (seed 0)


@dataclass(frozen=True)
class DataPlan:
    calibration: list[Path]
    check: list[Path]                   # parity of every variant + the reference set
    control: list[tuple[Path, int]]     # accuracy control: (image, class index, or -1 when unlabeled)
    kind: str                           # "real" or "generated": what the check verdicts rest on
    heldout_source: str                 # where the held-out images come from, for the report
    control_overlaps_check: bool        # too few held-out images to keep the two apart
    encoded: dict[Path, bytes] = field(default_factory=dict)   # generated crops: file -> its bytes, kept in memory

    def sha256(self, path) -> str | None:
        """The content hash of one of the plan's images (None: no such file)."""
        return _sha256(path, self.encoded)

    def describe(self) -> str:
        return (f"calibration: {len(self.calibration)} images; held out ({self.heldout_source}, {self.kind} images): "
                f"{len(self.check)} for the checks, {len(self.control)} for accuracy control"
                + (" (the same images)" if self.control_overlaps_check else ""))


def _sha256(path, encoded: dict[Path, bytes]) -> str | None:
    if Path(path) in encoded:
        return hashlib.sha256(encoded[Path(path)]).hexdigest()
    return sha256_file(path) if Path(path).is_file() else None


def _generated(out: Path, count: int, seed: int, folder: str) -> dict[Path, bytes]:
    from edgepipe.compile.calibration import generated_images
    prefix = "calib" if folder == "calibration" else folder  # held-out crops are not called calib_*
    return generated_images(out / folder, count=count, seed=seed, prefix=prefix)


def calibration_source_images(recipe, out: Path, source: str, encoded: dict[Path, bytes]) -> list[Path]:
    """The images of ``source`` (data.calibration.source as a path, or "generated": then their bytes are added
    to ``encoded``)."""
    from edgepipe.runtime.data import list_images
    cfg = recipe.data.calibration
    if source == "generated":
        encoded.update(made := _generated(out, cfg.count, 0, "calibration"))
        paths = list(made)
    else:
        paths = list_images(source)
    if not paths:
        raise UserError(f"data.calibration.source {cfg.source}: no images found; the int8 targets need calibration images")
    return paths


def plan_data(recipe, out: Path, labels: list[str], eval_items: list | None,
              data: ResolvedData | None = None) -> DataPlan:
    """Split the recipe's data into calibration / check / control sets (see the module docstring).
    ``eval_items``: data.evaluation as (path, class index or -1) pairs, already read; ``data``: the recipe's
    data as image files (default: :func:`edgepipe.datasets.resolve_data`, which writes referenced datasets)."""
    cfg = recipe.data
    data = data or resolve_data(recipe, out)
    encoded: dict[Path, bytes] = {}
    paths = calibration_source_images(recipe, out, data.calibration_source, encoded)
    if eval_items:
        heldout = [(Path(p), t) for p, t in eval_items]
        source, kind = f"data.evaluation {cfg.evaluation}", "real"
    elif data.calibration_source != "generated" and len(paths) >= MIN_FOLDER_FOR_SPLIT:
        heldout = [(Path(p), -1) for p in paths[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY]]
        paths = [p for i, p in enumerate(paths) if (i + 1) % HOLD_OUT_EVERY]
        source, kind = f"every {HOLD_OUT_EVERY}th image of data.calibration.source", "real"
    else:  # without accuracy control only the checked images are needed
        q = recipe.stages.quantize
        count = cfg.heldout if (q.max_drop is not None or q.min_agreement is not None) else min(cfg.heldout, cfg.parity_images)
        encoded.update(made := _generated(out, count, HELDOUT_SEED, "heldout"))
        heldout = [(p, -1) for p in made]
        source, kind = f"{count} generated crops (seed {HELDOUT_SEED})", "generated"
    if cfg.calibration.limit:
        paths = paths[:cfg.calibration.limit]
    calib_hashes = {_sha256(p, encoded) for p in paths}
    heldout = [(p, t) for p, t in heldout if (digest := _sha256(p, encoded)) is None or digest not in calib_hashes]
    if not heldout:
        raise UserError("every held-out image is also a calibration image; give data.evaluation images that are not "
                        "in data.calibration.source")
    check = [p for p, _ in heldout[:cfg.parity_images]]
    control = heldout[cfg.parity_images:]
    overlap = not control
    return DataPlan(calibration=paths, check=check, control=control or heldout, kind=kind, heldout_source=source,
                    control_overlaps_check=overlap, encoded=encoded)
