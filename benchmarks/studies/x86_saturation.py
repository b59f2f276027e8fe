"""Does an OpenVINO int8 model saturate on x86 CPUs without VNNI? Emulated, on any CPU.

    .venv/bin/python benchmarks/studies/x86_saturation.py --model DIR --calibration labels.csv --held-out labels.csv
        [--isa portable portable-7bit vnni] [--limit 40] [--json out.json]

SSE4.2/AVX2/AVX-512 without VNNI compute int8 convolutions with VPMADDUBSW: each u8 activation code is
multiplied by its s8 weight code, and the products of neighbouring input channels are added in pairs into a
saturating 16-bit integer. This script builds the model's OpenVINO int8 variant once per `stages.quantize.isa`
from DIR/model.onnx and the calibration images (`quantize_int8`, as `edgepipe run` does), then runs the
held-out images through each, reads the u8 code entering every int8 Convolution/MatMul with one input channel
per kernel tap (1x1 convolutions and the classifier), pairs input channels (0, 1), (2, 3), ... as oneDNN's int8
weight layouts do, and counts the pair sums beyond +-32767. It also prints, per isa, top-1 agreement with
the fp32 ONNX on the held-out images and the mean largest weight code.

A count of 0 here is evidence, not proof: it rests on the pairing assumed. The bound the portable setting
enforces (compile/weight_ranges.py) does not depend on the pairing; `qemu-x86_64 -cpu Haswell` runs the real
AVX2 kernels (docs/compile.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="artifact folder of `edgepipe run` (its model.onnx and manifest.json)")
    p.add_argument("--calibration", required=True, help="labels.csv or folder of calibration images")
    p.add_argument("--held-out", required=True, help="labels.csv or folder of other images to run")
    p.add_argument("--isa", nargs="+", default=["portable", "portable-7bit", "vnni"])
    p.add_argument("--limit", type=int, default=40, help="held-out images to run (default: 40)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)

    import openvino as ov
    from edgepipe.compile.openvino_ir import quantize_int8
    from edgepipe.compile.qdq import run_logits
    from edgepipe.compile.weight_ranges import emulate_pair_sums
    from edgepipe.run_data import load_arrays
    from edgepipe.runtime.data import load_items
    from edgepipe.runtime.manifest import Manifest

    folder = Path(args.model)
    manifest = Manifest.load(folder)
    pre = manifest.preprocess

    def images(where):
        return [path for path, _ in load_items(where, manifest.labels)[0]]
    calibration, _ = load_arrays(images(args.calibration), pre)
    held_out, _ = load_arrays(images(args.held_out)[:args.limit], pre)
    reference = run_logits(folder / "model.onnx", np.concatenate(held_out)).argmax(1)
    results = {}
    work = tempfile.TemporaryDirectory()
    for isa in args.isa:
        xml = Path(work.name) / f"{isa}.xml"
        quantize_int8(folder / "model.onnx", xml, calibration, isa=isa)
        model = ov.Core().read_model(str(xml))
        compiled = ov.Core().compile_model(model, "CPU")
        agree = sum(int(compiled(x)[compiled.output(0)].argmax() == ref) for x, ref in zip(held_out, reference))
        found = emulate_pair_sums(model, held_out)
        results[isa] = dict(found, agreement_with_fp32=round(agree / len(held_out), 4), held_out_images=len(held_out))
        print(f"{isa:14s} saturating pairs {found['saturating']} of {found['pairs']} in {found['layers_saturating']}/"
              f"{found['layers']} layers; agreement with fp32 {agree / len(held_out):.3f} on {len(held_out)} images; "
              f"mean largest weight code {found['mean_largest_weight_code']:.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
