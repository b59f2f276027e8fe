"""Per-layer precisions of a TensorRT engine from the engine inspector's JSON, on recorded 10.x and 11.x output.

The fixtures in tests/data/tensorrt/ are written by hand from NVIDIA's documented formats (no TensorRT runs here):
- inspector-10.x-int8.json: the layer dictionary of the TensorRT developer guide's engine-inspector example
  (Name, LayerType, ParameterType, Inputs/Outputs with one "Format/Datatype" string such as "Thirty-two wide
  channel vectorized row major Int8 format.", Weights {Type, Count}, TacticName/TacticValue) and a top-level
  Bindings list; this is also what `trtexec --exportLayerInfo` writes.
- inspector-11.x-int8.json: the same engine as TensorRT 11 reports it: "Format" and "DataType" as separate keys
  (TensorRT 11.x migration guide, "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x"), no Bindings,
  plus one BFloat16 layer.
The network: input QuantizeLinear, conv1+relu (int8 -> int8), conv2 (int8 in, fp16 out) feeding a residual Add,
a Reformat, pooling, a flatten Shuffle, and the final Gemm (int8 in, fp32 logits out).
"""
from __future__ import annotations

import json

import pytest

from edgepipe.compile.tensorrt_layers import datatype_of, layer_precisions

from conftest import REPO

DATA = REPO / "tests" / "data" / "tensorrt"


@pytest.mark.parametrize("fixture, fmt", [("inspector-10.x-int8.json", "10.x"), ("inspector-11.x-int8.json", "11.x")])
def test_layer_precisions_from_the_first_input_with_data_movement_apart(fixture, fmt):
    got = layer_precisions((DATA / fixture).read_text())
    assert got["available"] and got["format"].startswith(fmt)
    by_name = {row["name"]: row for row in got["per_layer"]}
    # an int8 conv that writes fp16 into the residual Add, and the final Gemm that writes fp32 logits, are int8
    assert by_name["conv2"]["precision"] == "INT8" and by_name["conv2"]["output"] == "FP16"
    assert by_name["fc"]["precision"] == "INT8" and by_name["fc"]["output"] == "FP32"
    assert by_name["residual_add + relu2"]["precision"] == "FP16"
    assert by_name["Reformatting CopyNode for Input Tensor 0 to pool"]["role"] == "data movement"
    assert by_name["flatten"]["role"] == "data movement"
    expected = {"INT8": 3, "FP16": 2, "FP32": 1}
    if fmt == "11.x":
        expected["BF16"] = 1
    assert got["by_precision"] == expected
    assert got["data_movement"] == {"Reformat": 1, "Shuffle": 1}
    assert got["compute_layers"] == sum(expected.values()) and got["layers"] == got["compute_layers"] + 2


def test_the_two_formats_give_the_same_reading_of_the_same_engine():
    old, new = (layer_precisions((DATA / f).read_text()) for f in ("inspector-10.x-int8.json", "inspector-11.x-int8.json"))
    strip = [{k: v for k, v in row.items()} for row in new["per_layer"] if row["name"] != "softmax"]
    assert old["per_layer"] == strip


def test_datatype_spellings():
    assert datatype_of({"Format/Datatype": "Row major linear BFloat16 format"}) == "BF16"
    assert datatype_of({"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}) == "FP16"
    assert datatype_of({"Format": "Row major linear", "DataType": "Half"}) == "FP16"
    assert datatype_of({"Format": "Row major linear", "Datatype": "Half"}) == "FP16"
    assert datatype_of({"Format": "Row major linear", "Datatype": "DataType.FLOAT"}) == "FP32"
    assert datatype_of({"Format/Datatype": "Row major linear UInt8 format"}) == "UINT8"
    assert datatype_of({"Format": "Row major linear"}) is None and datatype_of("conv1") is None


def test_unreadable_or_name_only_output_is_reported_not_raised():
    assert layer_precisions("not json")["available"] is False
    assert layer_precisions(json.dumps({"Layers": 3}))["available"] is False
    names_only = layer_precisions(json.dumps({"Layers": ["conv1", "fc"], "Bindings": ["input", "logits"]}))
    assert names_only["by_precision"] == {"unknown": 2} and names_only["format"].startswith("no tensor formats")
