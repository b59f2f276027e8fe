"""int8 weights that cannot saturate on x86 CPUs without VNNI, at close to 8-bit precision.

SSE4.2/AVX2/AVX-512 without VNNI multiply u8 activations by s8 weights with VPMADDUBSW, which adds the two
products of each pair of neighbouring input channels into a saturating 16-bit integer. 7-bit weights avoid it
for any input (2 x 255 x 64 < 2^15) but halve the weight resolution. Most input channels never reach the
activation maximum of their tensor, though, so most output channels can keep finer steps.

``bound_weight_ranges`` takes an NNCF model quantized with 8-bit weights (int8 Constant -> Convert ->
Multiply(scale) -> Convolution/MatMul) and, per output channel, widens the weight step just enough that any
two of its products — each weight times the largest activation level its input channel reached on the
calibration images, over ``headroom`` — sum within 32767. Any two: the bound does not depend on how a kernel
pairs channels. The rounding change moves each channel's mean output; the bias is corrected by it (weight
change times the calibration mean of each input channel). Depthwise (GroupConvolution) layers are left as
they are: their products are never summed in pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

LIMIT = 32767           # a signed 16-bit sum
HEADROOM = 1.25         # activations of unseen images may exceed the calibration maxima by this much
WEIGHTED = ("Convolution", "MatMul")
PASS_THROUGH = ("Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten")


@dataclass
class Layer:
    op: object                 # the Convolution / MatMul
    activation: object | None  # the FakeQuantize of its input (None: not found, every channel taken at 255)
    codes: object              # the int8 weight Constant
    scale: object              # the Multiply that dequantizes it
    transposed: bool           # MatMul weights stored (in, out)


def _input_fq(op):
    node = op.input_value(0).get_node()
    while node.get_type_name() in PASS_THROUGH:
        node = node.input_value(0).get_node()
    return node if node.get_type_name() == "FakeQuantize" else None


def int8_layers(model) -> list[Layer]:
    """The Convolution/MatMul layers whose weights NNCF stored as int8 codes times a per-channel scale."""
    import openvino as ov
    layers = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in WEIGHTED:
            continue
        mul = op.input_value(1).get_node()
        if mul.get_type_name() != "Multiply":
            continue
        convert = mul.input_value(0).get_node()
        codes = convert.input_value(0).get_node() if convert.get_type_name() == "Convert" else None
        if codes is None or codes.get_type_name() != "Constant" or codes.get_element_type() != ov.Type.i8:
            continue
        transposed = op.get_type_name() == "MatMul" and not op.get_attributes()["transpose_b"]
        layers.append(Layer(op, _input_fq(op), codes, mul, transposed))
    return layers


def activation_codes(fq, values: np.ndarray) -> np.ndarray:
    """Float FakeQuantize outputs -> the u8 code a VPMADDUBSW kernel multiplies (signed inputs shifted by 128)."""
    lo, hi = (fq.input_value(k).get_node().get_data().astype(np.float64) for k in (1, 2))
    levels = fq.get_attributes()["levels"]
    return np.clip(np.round((values - lo) / (hi - lo) * (levels - 1)), 0, 255)


def activation_statistics(model, layers: Sequence[Layer], calibration, batch: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer: (largest u8 code, mean float value) of each input channel over the calibration images.
    Reduced per channel inside OpenVINO (the codes are monotonic in the value per channel, so the largest is
    that of the channel's maximum or minimum), ``batch`` images per call when the batch size is dynamic."""
    import openvino as ov
    from openvino import opset13 as ops
    fqs = {id(layer.activation): layer.activation for layer in layers if layer.activation is not None}
    extremes: dict[int, list[np.ndarray]] = {}
    sums: dict[int, np.ndarray] = {}
    if fqs:
        outputs = []
        for fq in fqs.values():  # per channel (axis 1): max, min and mean over every other axis
            rank = fq.get_output_partial_shape(0).rank.get_length()
            axes = ops.constant(np.array([k for k in range(rank) if k != 1], dtype=np.int64))
            outputs += [op(fq.output(0), axes, False).output(0) for op in (ops.reduce_max, ops.reduce_min, ops.reduce_mean)]
        compiled = ov.Core().compile_model(ov.Model(outputs, model.get_parameters()), "CPU")
        request = compiled.create_infer_request()
        step = batch if model.get_parameters()[0].get_partial_shape()[0].is_dynamic else 1
        for start in range(0, len(calibration), step):
            x = np.concatenate(calibration[start:start + step])
            results = request.infer({0: x})
            for i, (key, fq) in enumerate(fqs.items()):
                hi, lo, mean = (results[compiled.output(3 * i + k)] for k in range(3))
                found = [hi, lo] if key not in extremes else [np.maximum(extremes[key][0], hi), np.minimum(extremes[key][1], lo)]
                extremes[key] = found
                sums[key] = mean * len(x) + sums.get(key, 0.0)
    maxima = {key: _largest_code(fqs[key], *found) for key, found in extremes.items()}
    stats = []
    for layer in layers:
        channels = channel_codes(layer)[0].shape[1]
        key = id(layer.activation)
        if key in maxima and maxima[key].size == channels:
            stats.append((maxima[key], sums[key] / len(calibration)))
        else:   # no quantized input found, or not one value per input channel: assume the worst code
            stats.append((np.full(channels, 255.0), None))
    return stats


def _largest_code(fq, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Per channel, the largest u8 code between the channel's minimum ``lo`` and maximum ``hi``."""
    shape = (1, -1) + (1,) * (fq.get_output_partial_shape(0).rank.get_length() - 2)  # channels on axis 1, as the FQ's ranges
    return np.maximum(activation_codes(fq, hi.reshape(shape)), activation_codes(fq, lo.reshape(shape))).reshape(-1)


def channel_codes(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scale) with output channels first: codes (O, I, ...), scale (O,)."""
    codes = layer.codes.get_data().astype(np.float64)
    scale = layer.scale.input_value(1).get_node().get_data().astype(np.float64)
    if layer.transposed:
        codes = codes.T
    return codes, np.broadcast_to(scale.reshape(-1), codes.shape[:1]).copy()


def _scale_shape(layer: Layer, channels: int) -> tuple:
    """Where the per-channel scale broadcasts against the stored codes."""
    if layer.transposed:
        return (1, channels)
    return (channels,) + (1,) * (len(layer.codes.get_output_shape(0)) - 1)


def worst_pair(codes: np.ndarray, maxima: np.ndarray) -> np.ndarray:
    """Per output channel, the largest sum of two same-sign products |code| x activation maximum: the worst any
    pairing of input channels can give (opposite signs partly cancel)."""
    a = maxima.reshape((1, -1) + (1,) * (codes.ndim - 2))
    flat = codes.shape[0], -1
    worst = np.zeros(codes.shape[0])
    for sign in (1, -1):
        products = np.sort(np.where(sign * codes > 0, np.abs(codes) * a, 0.0).reshape(flat), axis=1)
        worst = np.maximum(worst, products[:, -2:].sum(axis=1))
    return worst


def _bounded_channel(w: np.ndarray, top: float, worst: float, maxima: np.ndarray, limit: float) -> tuple[np.ndarray, float]:
    """The finest step (largest code <= 127) whose codes of ``w`` keep worst_pair within ``limit``; ``worst``:
    worst_pair at the 8-bit step ``top`` / 127, which gives the first candidate."""
    for largest in range(min(127, int(127 * limit / worst) + 1), 0, -1):
        step = top / largest
        codes = np.clip(np.round(w / step), -127, 127)
        if worst_pair(codes[None], maxima)[0] <= limit:
            return codes, step
    return np.zeros_like(w), top


def bound_weight_ranges(model, calibration, *, headroom: float = HEADROOM, fp32_model=None) -> dict:
    """Re-quantize, in place, every int8 Convolution/MatMul weight of ``model`` (see the module docstring).
    ``fp32_model``: the same network unquantized, to round the original weights (else the 8-bit codes are
    re-rounded). Returns what it did, for the compile record."""
    from openvino import opset13 as ops
    layers = int8_layers(model)
    originals = {}
    if fp32_model is not None:
        for op in fp32_model.get_ordered_ops():
            if op.get_type_name() in WEIGHTED and op.input_value(1).get_node().get_type_name() == "Constant":
                originals[op.get_friendly_name()] = op.input_value(1).get_node().get_data().astype(np.float64)
    readable = {layer.op.get_friendly_name() for layer in layers}
    unknown = [op.get_friendly_name() for op in model.get_ordered_ops()
               if op.get_type_name() in WEIGHTED and _input_fq(op) is not None and op.get_friendly_name() not in readable]
    if unknown:   # int8 weights in a form this module cannot read: they would be left unbounded
        raise RuntimeError(f"cannot bound the int8 weights of {unknown[:3]}: use stages.quantize.isa: portable-7bit")
    limit = LIMIT / headroom
    changed = total = 0
    largest = []
    for layer, (maxima, means) in zip(layers, activation_statistics(model, layers, calibration)):
        codes, scale = channel_codes(layer)
        per_channel = (-1,) + (1,) * (codes.ndim - 1)
        w = originals.get(layer.op.get_friendly_name())
        if w is not None and w.size == codes.size:
            w = (w.T if layer.transposed else w).reshape(codes.shape)
        else:
            w = codes * scale.reshape(per_channel)
        new_codes, new_scale = codes.copy(), scale.copy()
        worst = worst_pair(codes, maxima)
        over = np.flatnonzero(worst > limit)
        for o in over:
            new_codes[o], new_scale[o] = _bounded_channel(w[o], scale[o] * 127, worst[o], maxima, limit)
        total += len(scale)
        changed += len(over)
        largest.append(float(np.abs(new_codes).reshape(len(scale), -1).max(axis=1).mean()))
        if not len(over):
            continue
        if means is not None:
            _correct_bias(layer, new_codes * new_scale.reshape(per_channel) - codes * scale.reshape(per_channel), means, ops)
        stored_codes = (new_codes.T if layer.transposed else new_codes).astype(np.int8)
        stored_scale = new_scale.reshape(_scale_shape(layer, len(new_scale))).astype(np.float32)
        convert = layer.scale.input_value(0).get_node()
        convert.input(0).replace_source_output(ops.constant(stored_codes).output(0))
        layer.scale.input(1).replace_source_output(ops.constant(stored_scale).output(0))
    return {"weight_ranges": "bounded per channel", "headroom": headroom, "bounded_layers": len(layers),
            "channels_narrowed": f"{changed}/{total}", "mean_largest_weight_code": round(float(np.mean(largest)), 1) if largest else None}


def emulate_pair_sums(model, images) -> dict:
    """What a VPMADDUBSW kernel would sum: ``images`` run through the int8 ``model``; for every int8 1x1
    Convolution/MatMul with a quantized input, the u8 codes entering it times its weight codes, input channels
    paired (0, 1), (2, 3), ... as oneDNN's int8 weight layouts pair them. Counts the pair sums beyond +-32767
    (``saturating``, of ``pairs``) and the layers where any is. An emulation on any CPU: evidence for the pairing
    assumed; the bound ``bound_weight_ranges`` keeps holds for every pairing."""
    import openvino as ov
    layers, weights = [], []
    for layer in int8_layers(model):
        codes = channel_codes(layer)[0]
        if layer.activation is not None and int(np.prod(codes.shape[2:])) == 1:
            layers.append(layer)
            weights.append(codes.reshape(codes.shape[0], -1))
    probe = ov.Core().compile_model(ov.Model([layer.activation.output(0) for layer in layers], model.get_parameters()), "CPU")
    saturating = pairs = 0
    where: set[str] = set()
    for x in images:
        out = probe(x)
        for i, (layer, q) in enumerate(zip(layers, weights)):
            a = activation_codes(layer.activation, out[probe.output(i)])
            a = a.reshape(a.shape[1], -1) if a.ndim == 4 else a.reshape(-1, 1)      # (channels, positions)
            if q.shape[1] % 2:
                q, a = np.pad(q, ((0, 0), (0, 1))), np.pad(a, ((0, 1), (0, 0)))
            sums = q[:, 0::2, None] * a[None, 0::2] + q[:, 1::2, None] * a[None, 1::2]
            n = int((np.abs(sums) > LIMIT).sum())
            saturating, pairs = saturating + n, pairs + sums.size
            if n:
                where.add(layer.op.get_friendly_name())
    largest = float(np.mean([np.abs(q).max(axis=1).mean() for q in weights])) if weights else None
    return {"saturating": saturating, "pairs": pairs, "layers_saturating": len(where), "layers": len(layers),
            "mean_largest_weight_code": largest}


def _correct_bias(layer: Layer, delta_w: np.ndarray, means: np.ndarray, ops) -> None:
    """Shift the layer's bias (its Add with a Constant) by minus the mean output change: sum over input channels
    (and kernel taps) of the weight change times the channel's calibration mean."""
    shift = delta_w.reshape(delta_w.shape[0], delta_w.shape[1], -1).sum(axis=2) @ means
    for target in layer.op.output(0).get_target_inputs():
        add = target.get_node()
        if add.get_type_name() != "Add":
            continue
        for k in (0, 1):
            const = add.input_value(k).get_node()
            if const.get_type_name() == "Constant":
                bias = const.get_data()
                if bias.size == shift.size:
                    new = (bias.reshape(-1) - shift).astype(bias.dtype).reshape(bias.shape)
                    add.input(k).replace_source_output(ops.constant(new).output(0))
                    return
