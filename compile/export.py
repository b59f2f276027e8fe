"""PyTorch -> ONNX: opset >= 17, full onnx.checker, optional onnxslim simplification, dynamic or static
batch, labels and preprocessing stored in the model's metadata_props."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from edgepipe import UserError
from edgepipe.atomic import atomic_path

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model: torch.nn.Module, path: str | Path, input_size: int = 224, opset: int = 17,
                dynamic_batch: bool = True, simplify: bool = True, metadata: dict | None = None) -> Path:
    import onnx
    if opset < 17:
        raise UserError(f"export.opset {opset} is too old; use 17 or newer")
    model = model.eval().cpu()
    dummy = torch.randn(1, 3, input_size, input_size)
    with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None)
        proto = onnx.load(str(tmp))
        if simplify:
            proto = _simplify(proto)
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        proto.producer_name = "edgepipe"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return Path(path)


def _simplify(proto):
    try:
        import onnxslim
    except ImportError:
        return proto
    try:
        return onnxslim.slim(proto)
    except Exception as exc:  # simplification is an optimisation; keep the exported graph if it fails
        warnings.warn(f"onnxslim failed ({exc}); keeping the unsimplified graph")
        return proto
