"""What an ONNX graph's compute is made of: each Conv / Gemm / MatMul node by kind of layer, with its MACs at
batch 1. The MAC count of an ONNX source model, and the layer kinds `edgepipe bench` profiles time by."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

# activations ONNX Runtime fuses into the Conv before them (when that Conv feeds nothing else)
ACTIVATIONS = {"Clip", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh"}


def layer_kinds(model) -> tuple[dict[str, str], dict[str, int]]:
    """(name -> kind, kind -> MACs at batch 1) for Conv / Gemm / MatMul nodes. Names are the node name and
    its output name, and the output of an activation right after it (ORT names fused nodes that way)."""
    from onnx import shape_inference
    inferred = shape_inference.infer_shapes(model)
    shapes = {vi.name: [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    names: dict[str, str] = {}
    macs: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        if not w:
            continue
        if node.op_type == "Conv" and shapes.get(node.output[0]):
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            kind = ("depthwise conv" if group > 1 and group == w[0] else
                    "1x1 conv" if w[2:] == [1, 1] else f"{w[2]}x{w[3]} conv")
            macs[kind] += int(np.prod(w)) * int(np.prod(shapes[node.output[0]][2:]))
        elif node.op_type in ("Gemm", "MatMul"):
            kind = "fully connected"
            macs[kind] += int(np.prod(w))
        else:
            continue
        names[node.name] = names[node.output[0]] = kind
    consumers: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        for i in node.input:
            consumers[i] += 1
    for node in model.graph.node:
        if node.op_type in ACTIVATIONS and node.input and node.input[0] in names and consumers[node.input[0]] == 1:
            names.setdefault(node.output[0], names[node.input[0]])
    return names, dict(macs)
