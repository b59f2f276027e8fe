"""Which precision each layer of a TensorRT engine runs in, read the way NVIDIA's own tools read it.

Input: the engine inspector's JSON (``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` on an
engine built with ``ProfilingVerbosity.DETAILED``), which is also what ``trtexec --exportLayerInfo=FILE
--profilingVerbosity=detailed`` writes. Per layer: ``Name``, ``LayerType`` (the implementation, e.g.
``CaskConvolution``, ``Reformat``), ``ParameterType`` (the layer kind) and ``Inputs`` / ``Outputs`` tensors.
- TensorRT 10.x: each tensor has one ``"Format/Datatype"`` string, e.g. ``"Row major linear FP16 format"`` or
  ``"Thirty-two wide channel vectorized row major Int8 format."`` (TensorRT developer guide, engine inspector).
- TensorRT 11.x: the field is split into separate ``"Format"`` and ``"DataType"`` keys, and ``"Bindings"`` is
  replaced by ``"I/O Tensors"`` objects whose ``"DataType"`` is e.g. ``"Float"`` (docs.nvidia.com, TensorRT 11.x
  migration guide, "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x"). Both spellings of the key,
  ``DataType`` and ``Datatype``, are read.
A layer's precision is its FIRST INPUT's datatype, as trt-engine-explorer does (trex/layer.py: ``self.precision =
self.inputs[0].precision``): with Q/DQ on layer inputs only, an int8 convolution writes fp16 / fp32 but computes
int8. Layers that only move or reformat data (Reformat/CopyNode, NoOp, Shuffle, Constant) are counted apart.
"""
from __future__ import annotations

import json
import re

# datatype words of TensorRT's format descriptions and DataType names -> one spelling (BFloat16 before Float)
DATATYPE_WORDS = {
    "BFLOAT16": "BF16", "BF16": "BF16", "KBF16": "BF16",
    "FP32": "FP32", "FLOAT": "FP32", "FLOAT32": "FP32", "KFLOAT": "FP32",
    "FP16": "FP16", "HALF": "FP16", "FLOAT16": "FP16", "KHALF": "FP16",
    "INT8": "INT8", "KINT8": "INT8", "UINT8": "UINT8", "KUINT8": "UINT8",
    "FP8": "FP8", "KFP8": "FP8", "FP4": "FP4", "KFP4": "FP4", "INT4": "INT4", "KINT4": "INT4",
    "INT32": "INT32", "KINT32": "INT32", "INT64": "INT64", "KINT64": "INT64", "BOOL": "BOOL", "KBOOL": "BOOL",
}
# layer kinds that move or reformat data without computing on it (LayerType or ParameterType)
DATA_MOVEMENT = ("Reformat", "CopyNode", "NoOp", "Shuffle", "Constant", "Identity")
REFORMAT_NAME = re.compile(r"^Reformatting CopyNode\b", re.I)
HOW = "first input's datatype (as trt-engine-explorer trex/layer.py); data-movement layers counted apart"


def datatype_of(tensor) -> str | None:
    """A tensor entry's datatype: 11.x "DataType" (or "Datatype"), else 10.x "Format/Datatype"; None when neither says."""
    if not isinstance(tensor, dict):
        return None
    text = tensor.get("DataType") or tensor.get("Datatype") or tensor.get("Format/Datatype") or ""
    for word in re.findall(r"[A-Za-z0-9]+", str(text).replace("DataType.", "")):
        found = DATATYPE_WORDS.get(word.upper())
        if found:
            return found
    return None


def layer_kind(layer: dict) -> str:
    return str(layer.get("ParameterType") or layer.get("LayerType") or "")


def moves_data(layer: dict) -> bool:
    kinds = {str(layer.get("LayerType") or ""), str(layer.get("ParameterType") or "")}
    return bool(kinds & set(DATA_MOVEMENT)) or bool(REFORMAT_NAME.match(str(layer.get("Name") or "")))


def inspector_format(layers: list) -> str:
    tensors = [t for layer in layers if isinstance(layer, dict)
               for t in (layer.get("Inputs") or []) + (layer.get("Outputs") or [])]
    if any(isinstance(t, dict) and ("DataType" in t or "Datatype" in t) for t in tensors):
        return "11.x (Format, DataType)"
    if any(isinstance(t, dict) and "Format/Datatype" in t for t in tensors):
        return "10.x (Format/Datatype)"
    return "no tensor formats (not built with ProfilingVerbosity.DETAILED?)"


def layer_precisions(inspector_json: str) -> dict:
    """{available, format, layers, compute_layers, by_precision, data_movement, per_layer, read_as}: compute layers
    counted by their first input's precision, data-movement layers by kind. Never raises on bad input."""
    try:
        info = json.loads(inspector_json)
    except (TypeError, ValueError) as exc:
        return {"available": False, "why": f"engine inspector JSON unreadable: {exc}"}
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    if not isinstance(layers, list):
        return {"available": False, "why": "engine inspector JSON has no Layers list"}
    rows, counts, moves = [], {}, {}
    for layer in layers:
        if not isinstance(layer, dict):  # LAYER_NAMES_ONLY gives plain names
            rows.append({"name": str(layer), "precision": None, "role": "unknown"})
            counts["unknown"] = counts.get("unknown", 0) + 1
            continue
        inputs, outputs = layer.get("Inputs") or [], layer.get("Outputs") or []
        precision = datatype_of(inputs[0]) if inputs else None
        row = {"name": layer.get("Name"), "type": layer_kind(layer), "precision": precision,
               "output": datatype_of(outputs[0]) if outputs else None}
        if moves_data(layer):
            row["role"] = "data movement"
            kind = "Reformat" if REFORMAT_NAME.match(str(layer.get("Name") or "")) else layer_kind(layer)
            moves[kind] = moves.get(kind, 0) + 1
        else:
            row["role"] = "compute"
            counts[precision or "unknown"] = counts.get(precision or "unknown", 0) + 1
        rows.append(row)
    return {"available": bool(layers), "format": inspector_format(layers), "read_as": HOW, "layers": len(rows),
            "compute_layers": sum(counts.values()), "by_precision": counts, "data_movement": moves, "per_layer": rows}
