"""ONNX -> OpenVINO IR: fp32, fp16 (weights compressed) and int8 through NNCF post-training quantization
on every calibration image the recipe gives (subset_size = all of them; never silently capped)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from edgepipe import UserError
from edgepipe.atomic import atomic_path
from edgepipe.compile.mixed_precision import AccuracyControl


def _save(model, xml_path: Path, compress_to_fp16: bool) -> list[Path]:
    import openvino as ov
    xml_path = Path(xml_path)
    bin_path = xml_path.with_suffix(".bin")
    # OpenVINO finds the .bin by the .xml's stem; the .bin is renamed into place first, the .xml last.
    with atomic_path(xml_path, suffix=".xml") as tmp_xml, atomic_path(bin_path, suffix=".bin") as tmp_bin:
        ov.save_model(model, str(tmp_xml), compress_to_fp16=compress_to_fp16)
        Path(str(tmp_xml)[:-4] + ".bin").replace(tmp_bin)
    return [xml_path, bin_path]


def convert(onnx_path: str | Path, xml_path: str | Path, precision: str = "fp32") -> list[Path]:
    import openvino as ov
    model = ov.convert_model(str(onnx_path))
    return _save(model, Path(xml_path), compress_to_fp16=(precision == "fp16"))


# stages.quantize.isa -> NNCF OverflowFix. u8 x s8 pairs must never saturate the 16-bit sums of SSE4.2/AVX2/
# AVX-512 without VNNI (VPMADDUBSW). portable: 8-bit codes, then each output channel's step widened just enough
# for its calibrated activation maxima (compile/weight_ranges.py). portable-7bit: every Convolution/MatMul
# weight in 7 bits, safe for any input. vnni: full 8 bits (VNNI/AMX sum in 32 bits). NNCF's own default (first
# layer only) leaves the rest exposed. docs/compile.md.
OVERFLOW_FIX = {"portable": "disable", "portable-7bit": "enable", "vnni": "disable"}


def quantize_int8(onnx_path: str | Path, xml_path: str | Path, calibration: Sequence[np.ndarray], *,
                  isa: str = "portable", fast_bias_correction: bool = False, mixed_precision: bool = True,
                  control: AccuracyControl | None = None) -> tuple[list[Path], dict]:
    """NNCF PTQ, or, given ``control`` (see AccuracyControl) and ``mixed_precision``, NNCF's
    accuracy-controlled PTQ: it ranks the quantized layers by their effect on the control metric and reverts
    the most sensitive to float until the drop is within ``control.max_drop``. The layers left in float are
    read back from the graph and reported.

    ``isa`` (stages.quantize.isa): "portable": weight steps bounded per channel, right on every x86 ISA;
    "portable-7bit": 7-bit weights, right for any input; "vnni": 8-bit, VNNI/AMX/Arm targets only.
    ``fast_bias_correction``: NNCF's fast bias correction instead of the full one.
    ``calibration`` is a sequence of preprocessed (1, 3, H, W) float32 arrays; all are used.
    Returns the written files and a dict describing what was done.
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from edgepipe.compile.mixed_precision import check_validation
    from edgepipe.log import library_output
    if isa not in OVERFLOW_FIX:
        raise UserError(f"stages.quantize.isa {isa!r}: choose {' or '.join(OVERFLOW_FIX)}")
    logging.getLogger("nncf").setLevel(logging.WARNING)
    model = ov.convert_model(str(onnx_path))
    calib = nncf.Dataset(list(calibration))
    common = dict(subset_size=len(calibration), preset=nncf.QuantizationPreset.PERFORMANCE,
                  fast_bias_correction=fast_bias_correction)
    # Activation ranges from the plain min/max over all calibration images: on EfficientNet-Lite0 (ReLU6
    # everywhere, so no outlier tails to clip) this kept top-1 at fp32 level in 2-fold cross-validation on the
    # ImageNet sample, where NNCF's default estimator lost 0.4 points and the quantile ones 23 (docs/compile.md).
    advanced = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
                                              overflow_fix=OverflowFix(OVERFLOW_FIX[isa]))
    info = {"calibration_images": len(calibration), "method": "nncf.quantize", "fast_bias_correction": fast_bias_correction,
            "preset": "performance", "activations_range_estimator": "minmax", "isa": isa,
            "overflow_fix": OVERFLOW_FIX[isa], "weight_bits": 7 if isa == "portable-7bit" else 8}
    if control is not None and mixed_precision:
        info.update(check_validation(calibration, control.items, control.kind))
        val = nncf.Dataset(list(control.items), lambda item: item[0])

        def validate(compiled, items) -> tuple[float, list[int]]:
            # the per-image hits too: without them NNCF runs every control image through each model once more
            out = compiled.output(0)
            hits = [int(np.argmax(compiled(x)[out]) == y) for x, y in list(items)]
            return float(np.mean(hits)), hits

        with library_output():  # NNCF's progress bars: only with -v
            model = nncf.quantize_with_accuracy_control(model, calib, val, validation_fn=validate,
                                                        max_drop=control.max_drop / 100.0, drop_type=nncf.DropType.ABSOLUTE,
                                                        advanced_quantization_parameters=advanced, **common)
        info["method"] = "nncf.quantize_with_accuracy_control"
        info["max_drop_points"] = control.max_drop
    else:
        with library_output():
            model = nncf.quantize(model, calib, advanced_parameters=advanced, **common)
    if isa == "portable":
        from edgepipe.compile.weight_ranges import bound_weight_ranges
        info.update(bound_weight_ranges(model, calibration, fp32_model=ov.convert_model(str(onnx_path))))
    info["float_layers"] = float_layers(model)
    return _save(model, Path(xml_path), compress_to_fp16=False), info


WEIGHTED_OV_OPS = ("Convolution", "GroupConvolution", "MatMul")


def float_layers(model) -> list[str]:
    """Weighted layers (Convolution/GroupConvolution/MatMul) whose data input is not fake-quantized."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in WEIGHTED_OV_OPS:
            src = op.input_value(0).get_node()
            if src.get_type_name() != "FakeQuantize":
                out.append(op.get_friendly_name())
    return out

