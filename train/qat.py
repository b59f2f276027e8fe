"""Quantization-aware training with torch.ao fake quantization, exported as a QDQ ONNX.

Placement follows what TensorRT's explicit quantization expects (and ONNX Runtime / OpenVINO run): the
input of every Conv / Linear gets a per-tensor symmetric int8 fake-quant, its weight a per-channel
symmetric int8 one; BatchNorm is folded into the conv first, so the exported graph is Q/DQ -> Conv with
nothing between. All scales are symmetric (zero point 0, signed int8), which TensorRT requires.

The weight fake-quant is a parametrization (torch.nn.utils.parametrize), so the layer's own forward
(e.g. EfficientNet-Lite's static "same" padding) is kept. torch.onnx exports the fake-quant ops as
QuantizeLinear/DequantizeLinear pairs.

Weights use 7 of the 8 bits by default (int8 storage, |q| <= 64): x86 CPUs without VNNI (SSE4.2, AVX2,
AVX-512 before Cascade Lake) multiply u8 x s8 pairs into a saturating 16-bit sum (VPMADDUBSW), which 8-bit
weights overflow; ONNX Runtime and OpenVINO run such layers there. 7-bit weights are exact on every ISA
(the same as NNCF's overflow fix and onnxruntime's reduce_range) and are still TensorRT's symmetric int8.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

INT8 = dict(quant_min=-128, quant_max=127, dtype=torch.qint8)
WEIGHT_BITS = 7  # portable default (module docstring); 8 only for targets known to have VNNI/AMX, Arm or TensorRT


def _weight_observer(bits: int):
    """Per-channel symmetric observer whose scales leave the int8 weights within ``bits`` bits: the scale is
    widened by 2**(8 - bits), so the fake-quant op (and its ONNX export) keeps the int8 range -128..127."""
    from torch.ao.quantization import MovingAveragePerChannelMinMaxObserver

    class ReducedRangeObserver(MovingAveragePerChannelMinMaxObserver):
        def calculate_qparams(self):
            scale, zero_point = super().calculate_qparams()
            return scale * 2 ** (8 - bits), zero_point
    return ReducedRangeObserver


def _fake_quant(per_channel: bool, bits: int = 8):
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
    if per_channel:
        return FakeQuantize(observer=_weight_observer(bits), qscheme=torch.per_channel_symmetric, ch_axis=0, **INT8)
    return FakeQuantize(observer=MovingAverageMinMaxObserver, qscheme=torch.per_tensor_symmetric, **INT8)


class WeightFakeQuant(nn.Module):
    def __init__(self, bits: int = WEIGHT_BITS):
        super().__init__()
        self.fq = _fake_quant(per_channel=True, bits=bits)

    def forward(self, weight):
        return self.fq(weight)


def _quantize_input(module, args):
    return (module.input_quant(args[0]),) + tuple(args[1:])


@torch.no_grad()
def fold_batchnorm(model: nn.Module, input_size: int) -> int:
    """Fold every BatchNorm2d that directly consumes a Conv2d's output into that conv (eval statistics);
    the BN becomes Identity. The pairs are found by running the model once. Returns how many were folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    model.eval()
    produced_by, pairs, hooks = {}, [], []
    names = {mod: name for name, mod in model.named_modules()}
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(lambda m, i, o: produced_by.__setitem__(id(o), m)))
        elif isinstance(mod, nn.BatchNorm2d):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, i: pairs.append((produced_by[id(i[0])], m)) if id(i[0]) in produced_by else None))
    try:
        model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    for conv, bn in pairs:
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = w, b
        parent_name, _, attr = names[bn].rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
    return len(pairs)


def prepare_qat(model: nn.Module, input_size: int, *, weight_bits: int = WEIGHT_BITS) -> nn.Module:
    """Fold BN, then add int8 fake quantization to every Conv2d / Linear (in place; returns the model).
    ``weight_bits`` 7 (default) is exact on every x86 ISA; 8 only for a known VNNI/AMX, Arm or TensorRT target."""
    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits {weight_bits}: 7 (any CPU) or 8 (VNNI/AMX, Arm, TensorRT)")
    warnings.filterwarnings("ignore", module="torch.ao.quantization")
    fold_batchnorm(model, input_size)
    for mod in list(model.modules()):
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and not parametrize.is_parametrized(mod, "weight"):
            parametrize.register_parametrization(mod, "weight", WeightFakeQuant(weight_bits))
            mod.input_quant = _fake_quant(per_channel=False)
            mod.register_forward_pre_hook(_quantize_input)
    return model


def set_observers(model: nn.Module, observe: bool, fake_quant: bool = True) -> None:
    from torch.ao.quantization import FakeQuantize
    for mod in model.modules():
        if isinstance(mod, FakeQuantize):
            (mod.enable_observer if observe else mod.disable_observer)()
            (mod.enable_fake_quant if fake_quant else mod.disable_fake_quant)()


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> None:
    """Set the initial ranges from real images (observers on, fake quantization off)."""
    model.eval()
    set_observers(model, observe=True, fake_quant=False)
    for x in batches:
        model(x)
    set_observers(model, observe=True, fake_quant=True)


def export_qdq(model: nn.Module, path: Path, input_size: int, opset: int = 17, dynamic_batch: bool = True,
               metadata: dict | None = None) -> Path:
    """Freeze the ranges and export: fake-quant ops become QuantizeLinear/DequantizeLinear pairs."""
    from edgepipe.compile.export import export_onnx
    fit_weight_scales(model)
    set_observers(model, observe=False, fake_quant=True)
    export_onnx(model.eval(), path, input_size, opset, dynamic_batch, simplify=True, metadata=metadata)
    fold_weight_quantizers(path)
    return Path(path)


@torch.no_grad()
def fit_weight_scales(model: nn.Module) -> None:
    """Weight scales from the final weights (the moving averages trail the last optimizer steps), so every
    exported int8 weight stays within its bit width."""
    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight"):
            weight = mod.parametrizations.weight
            for fq in (p.fq for p in weight if isinstance(p, WeightFakeQuant)):
                fq.activation_post_process.reset_min_max_vals()
                fq.enable_observer()
                fq(weight.original.detach())


def fold_weight_quantizers(path):
    """Store quantized weights as int8: a QuantizeLinear of a constant weight becomes an int8 initializer
    (the DequantizeLinear stays), so the QDQ file is about 4x smaller and runtimes need not re-quantize."""
    import onnx
    from onnx import numpy_helper

    from edgepipe.atomic import atomic_path
    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, folded = [], 0
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) == 3 and all(n in inits for n in node.input):
            w, scale, zp = (numpy_helper.to_array(inits[n]) for n in node.input)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and w.ndim > 1:
                shape = [1] * w.ndim
                shape[axis] = -1
                scale, zp = scale.reshape(shape), zp.reshape(shape)
            info = np.iinfo(zp.dtype)
            q = np.clip(np.rint(w.astype(np.float32) / scale) + zp.astype(np.int32), info.min, info.max).astype(zp.dtype)
            graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
            folded += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
    return folded

