"""`edgepipe export MODEL --to openvino --int8`: one command, no recipe file (like `yolo export format=openvino
int8=True`). The flags become a recipe in memory that goes through the same typed Recipe as a file (the same
validation, the same defaults), and `edgepipe run` builds it: DIR/recipe.resolved.yaml holds it, so
`edgepipe run DIR/recipe.resolved.yaml --out DIR` re-runs (and reuses) exactly that build.
"""
from __future__ import annotations

from pathlib import Path

from edgepipe import UserError
from edgepipe.recipe import Recipe, default_targets, recipe_from_dict


def export_recipe(model: str, to: str | None = None, int8: bool = False, calibration: str | None = None,
                  labels: str | None = None, overrides: list[str] = ()) -> Recipe:
    """The recipe the flags describe. ``model``: an .onnx file, or a registered / torchvision / timm:NAME model.
    ``to``: comma-separated backends (None: the default targets of any recipe); ``int8``: their int8 variants."""
    is_onnx = model.lower().endswith(".onnx") or Path(model).is_file()
    if is_onnx and not Path(model).is_file():
        raise UserError(f"{model} does not exist; give an ONNX file, or a model name from `edgepipe models`")
    section = {"onnx": str(Path(model).resolve())} if is_onnx else {"name": model}
    if labels:
        section["labels"] = labels
    data: dict = {"name": f"export-{Path(model).stem if is_onnx else model.replace(':', '-')}", "model": section}
    if to:
        backends = [b.strip() for b in to.split(",") if b.strip()]
        if not backends:
            raise UserError("--to: give one or more backends, e.g. --to openvino or --to openvino,onnxruntime")
        precision = "int8" if int8 else "fp32"
        from edgepipe.compile import targets
        for b in backends:
            try:
                targets.get(b, precision)
            except UserError as exc:
                raise UserError(f"--to {to}{' --int8' if int8 else ''}: {exc}") from None
        data["targets"] = [{"backend": b, "precision": precision} for b in backends]
    elif int8:
        data["targets"] = [t for t in default_targets(int8=True) if t["precision"] == "int8"]
    data["stages"] = {"quantize": {"enabled": int8 or not to}}
    if calibration:
        data["data"] = {"calibration": {"source": calibration}}
    return recipe_from_dict(data, overrides=list(overrides), base_dir=Path("."), where="edgepipe export")


def default_out(model: str) -> str:
    return str(Path("out") / (Path(model).stem if model.lower().endswith(".onnx") else model.replace(":", "-")))


def summary_lines(out: str | Path, report: dict) -> list[str]:
    """What was built, what the folder serves, and how to re-run, check and ship it."""
    lines = [f"  {r['name']}: {r['status']}" + (f", p90 {p90:.2f} ms" if (p90 := (r.get("latency_ms") or {}).get("p90")) else "")
             for r in report["variants"]]
    served = ", ".join(f"{b}: {n}" for b, n in report["defaults"].items()) or "nothing (no variant passed its checks)"
    return lines + [f"serves: {served}",
                    f"report: {out}/report.md  re-run: edgepipe run {out}/recipe.resolved.yaml --out {out}",
                    f"ship: edgepipe pack {out} --out {Path(str(out)).name}.tar.gz  (on the device: edgepipe unpack, then edgepipe verify)"]
