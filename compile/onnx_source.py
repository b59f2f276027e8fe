"""An ONNX file as the model source, and the labels / preprocessing overrides every source shares.

The graph says what the model takes: the one image input (name, layout NCHW or NHWC, size, batch) and the
one output (number of classes). What edgepipe cannot serve is refused with one line before any work:
several inputs or outputs, an input that is not a 3-channel image, a batch dimension fixed above 1.
An NHWC model gets a Transpose in front, so every variant takes NCHW like the rest of edgepipe; the
source file itself stays the parity reference (run in ONNX Runtime). No PyTorch is needed on this path.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepipe import UserError
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.runtime.safe_files import MAX_JSON_DEPTH, json_depth, read_bounded

# per-channel QuantizeLinear/DequantizeLinear (the int8 QDQ targets) exist from opset 13: older graphs are
# converted with onnx's version converter, and the parity check against the source file covers the conversion
MIN_OPSET = 13
MAX_LABELS_BYTES = 16 << 20


# ---------------------------------------------------------------- labels and preprocessing (any source)

def read_labels(path: str | Path) -> list[str]:
    """Class names from a text file (one per line) or JSON (a list, or {"0": "name", ...} as id2label)."""
    path = Path(path)
    try:  # bounded: a FIFO, a device or gigabytes in its place are one line, not a hang
        raw = read_bounded(path, MAX_LABELS_BYTES, "model.labels")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"model.labels {path}: cannot read it as UTF-8 text ({exc}); give a text file with one name per line") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        if json_depth(raw) > MAX_JSON_DEPTH:
            raise UserError(f"model.labels {path}: JSON nested more than {MAX_JSON_DEPTH} deep; give a list of names")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"model.labels {path}: invalid JSON ({exc.msg} at line {exc.lineno}); give a list of names") from None
        if isinstance(data, dict):
            try:
                data = [data[k] for k in sorted(data, key=int)]
            except (TypeError, ValueError):
                raise UserError(f"model.labels {path}: a JSON object must map class indices to names") from None
        if not isinstance(data, list) or not all(isinstance(x, (str, int, float)) for x in data):
            raise UserError(f"model.labels {path}: expected a JSON list of names")
        labels = [str(x) for x in data]
    else:
        labels = [line.strip() for line in text.splitlines()]
        while labels and not labels[-1]:
            labels.pop()
    if not labels or not all(labels):
        raise UserError(f"model.labels {path}: empty file or an empty name; give one non-empty name per class")
    return labels


def check_label_count(labels: list[str], outputs: int, where: str, labels_path: str | None) -> None:
    if len(labels) != outputs:
        raise UserError(f"model.labels {labels_path} has {len(labels)} names but {where} has {outputs} outputs; "
                        f"give one name per output, in output order")


def apply_preprocess(base: Preprocess, override) -> Preprocess:
    """The model's preprocessing with the recipe's model.preprocess values on top (resize follows a new crop)."""
    given = {k: v for k, v in (override.model_dump() if override is not None else {}).items() if v is not None}
    if "crop" in given and "resize" not in given:  # keep the model's resize/crop ratio
        given["resize"] = round(given["crop"] * base.resize / base.crop)
    out = dataclasses.replace(base, **{k: tuple(float(x) for x in v) if k in ("mean", "std") else v
                                       for k, v in given.items()})
    if out.resize < out.crop:
        raise UserError(f"model.preprocess: resize {out.resize} is smaller than crop {out.crop}; "
                        "resize is the shorter side before the center crop, so it must be at least the crop")
    return out


# ---------------------------------------------------------------- the ONNX source

@dataclass
class OnnxSource:
    name: str
    path: Path              # the user's file, unchanged: the parity reference
    preprocess: Preprocess
    labels: list[str]
    layout: str             # "NCHW" or "NHWC" (of the source; variants are always NCHW)
    dynamic_batch: bool
    opset: int
    source: dict = field(default_factory=dict)

    def feed(self, nchw: np.ndarray) -> np.ndarray:
        """A preprocessed NCHW batch in the source's own layout."""
        return np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)) if self.layout == "NHWC" else nchw

    def logits(self, nchw: np.ndarray) -> np.ndarray:
        """The source ONNX in ONNX Runtime (CPU), batch by batch when its batch is fixed at 1."""
        import onnxruntime as ort
        if not hasattr(self, "_session"):
            self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        name = self._session.get_inputs()[0].name
        step = len(nchw) if self.dynamic_batch else 1
        x = self.feed(nchw.astype(np.float32))
        return np.concatenate([self._session.run(None, {name: x[i:i + step]})[0] for i in range(0, len(x), step)])

    def write_fp32(self, dst: Path, metadata: dict) -> Path:
        """The fp32 ONNX every variant is compiled from: the source (NCHW input in front if it was NHWC), with
        labels and preprocessing in its metadata, checked by onnx.checker."""
        import onnx

        from edgepipe.atomic import atomic_path
        proto = onnx.load(str(self.path))
        if self.opset < MIN_OPSET:
            proto = _upgrade_opset(proto, self.path.name, self.opset)
        if self.layout == "NHWC":
            _nchw_in_front(proto)
        keep = [p for p in proto.metadata_props if p.key not in metadata]
        del proto.metadata_props[:]
        proto.metadata_props.extend(keep)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        onnx.checker.check_model(proto, full_check=True)
        with atomic_path(dst, suffix=".onnx") as tmp:
            onnx.save(proto, str(tmp))
        return Path(dst)

    def macs(self) -> int | None:
        """Conv/Gemm/MatMul MACs at batch 1 from the graph (None when shapes cannot be inferred)."""
        import onnx

        from edgepipe.compile.onnx_layers import layer_kinds
        try:
            return int(sum(layer_kinds(onnx.load(str(self.path)))[1].values())) or None
        except Exception:
            return None


def _upgrade_opset(proto, name: str, opset: int):
    from onnx import version_converter
    try:
        return version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"model.onnx {name} is opset {opset}; int8 needs opset {MIN_OPSET} and onnx's converter "
                        f"failed ({first}); re-export with opset {MIN_OPSET} or newer") from None


def _dims(value_info) -> list:
    """Static dims as ints, symbolic / unknown ones as None."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _nchw_in_front(proto) -> None:
    """Rename the NHWC input, add an NCHW input and a Transpose feeding the old name."""
    import onnx
    from onnx import helper
    old = proto.graph.input[0]
    n, h, w, c = old.type.tensor_type.shape.dim
    inner = old.name + "_nhwc"
    for node in proto.graph.node:
        node.input[:] = [inner if i == old.name else i for i in node.input]
    new = helper.make_tensor_value_info(old.name, onnx.TensorProto.FLOAT, [n.dim_param or n.dim_value, 3,
                                                                          h.dim_value, w.dim_value])
    proto.graph.node.insert(0, helper.make_node("Transpose", [old.name], [inner], perm=[0, 2, 3, 1], name="nchw_to_nhwc"))
    proto.graph.input.remove(old)
    proto.graph.input.insert(0, new)


def inspect_onnx(path: Path) -> dict:
    """Input name/layout/size/batch, output count and opset of an ONNX classifier; one line for what is unusable."""
    import onnx
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(f"model.onnx {path}: not a readable ONNX model ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    where = f"model.onnx {path.name}"
    if len(inputs) != 1:
        raise UserError(f"{where} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); edgepipe serves "
                        "image classifiers with one image input: re-export with a single input")
    if len(proto.graph.output) != 1:
        raise UserError(f"{where} has {len(proto.graph.output)} outputs ({', '.join(o.name for o in proto.graph.output)}); "
                        "re-export with the class scores as the only output")
    inp = inputs[0]
    dims = _dims(inp)
    elem = inp.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise UserError(f"{where}: input {inp.name!r} is {onnx.TensorProto.DataType.Name(elem)}; edgepipe feeds float32 "
                        "images: re-export with a float32 input")
    if len(dims) != 4 or 3 not in (dims[1], dims[3]):
        raise UserError(f"{where}: input {inp.name!r} has shape {_shape_str(dims)}, not a 3-channel image batch "
                        "(N, 3, H, W) or (N, H, W, 3)")
    layout = "NCHW" if dims[1] == 3 else "NHWC"
    height, width = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    if dims[0] not in (None, 1):
        raise UserError(f"{where}: the batch dimension is fixed at {dims[0]}; re-export with batch 1 or a dynamic batch")
    if height is not None and width is not None and height != width:
        raise UserError(f"{where}: input is {height}x{width}; edgepipe's preprocessing center-crops a square: "
                        "re-export with a square input")
    out_dims = _dims(proto.graph.output[0])
    if len(out_dims) != 2 or out_dims[1] is None:
        raise UserError(f"{where}: output {proto.graph.output[0].name!r} has shape {_shape_str(out_dims)}; expected "
                        "(N, classes) class scores")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return {"input": inp.name, "layout": layout, "size": height, "dynamic_batch": dims[0] is None,
            "outputs": out_dims[1], "opset": opset,
            "metadata": {p.key: p.value for p in proto.metadata_props}}


def _shape_str(dims: list) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def load_onnx_source(cfg) -> OnnxSource:
    """The recipe's model section (``model.onnx`` set) as an OnnxSource, checked before any work."""
    from edgepipe.runtime.integrity import sha256_file
    path = Path(cfg.onnx)
    info = inspect_onnx(path)
    crop = (cfg.preprocess.crop if cfg.preprocess is not None else None) or cfg.input_size
    if info["size"] is None and crop is None:
        raise UserError(f"model.onnx {path.name}: the input height/width are not fixed in the graph; "
                        "give the size as model.preprocess.crop")
    if info["size"] is not None and crop is not None and crop != info["size"]:
        raise UserError(f"model.onnx {path.name} takes {info['size']}x{info['size']} images but the recipe asks for "
                        f"{crop}; drop model.preprocess.crop / model.input_size or re-export at that size")
    size = info["size"] or crop
    base = _metadata_preprocess(info["metadata"]) or Preprocess(resize=round(size / 0.875), crop=size)  # ImageNet mean/std
    preprocess = apply_preprocess(base, cfg.preprocess)
    if cfg.labels:
        labels = read_labels(cfg.labels)
        check_label_count(labels, info["outputs"], f"model.onnx {path.name}", cfg.labels)
    else:
        labels = _metadata_labels(info["metadata"], info["outputs"]) or [str(i) for i in range(info["outputs"])]
    name = cfg.name if "name" in cfg.model_fields_set else path.stem
    source = {"onnx": str(path), "sha256": sha256_file(path), "opset": info["opset"], "layout": info["layout"],
              "input": info["input"]}
    if cfg.labels:
        source["labels"] = str(cfg.labels)
    # ONNX Runtime must load it: the same check an old opset or an unsupported op fails
    import onnxruntime as ort
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.onnx {path.name} (opset {info['opset']}): ONNX Runtime cannot load it ({first}); "
                        "re-export it with a newer opset") from None
    if info["opset"] < MIN_OPSET:  # refused now rather than after the output folder exists
        import onnx
        _upgrade_opset(onnx.load(str(path)), path.name, info["opset"])
    return OnnxSource(name, path, preprocess, labels, info["layout"], info["dynamic_batch"], info["opset"], source)


def _metadata_labels(meta: dict, outputs: int) -> list[str] | None:
    """Labels an earlier edgepipe export (or any exporter using the same key) stored in the model."""
    try:
        labels = json.loads(meta.get("labels", "null"))
    except ValueError:
        return None
    return [str(x) for x in labels] if isinstance(labels, list) and len(labels) == outputs else None


def _metadata_preprocess(meta: dict) -> Preprocess | None:
    try:
        pre = json.loads(meta.get("preprocess", "null"))
        return Preprocess.from_manifest(pre) if isinstance(pre, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


def refuse_torch_stages(recipe) -> None:
    """Training, pruning and QAT change PyTorch weights; an ONNX source has none."""
    stages = [s for s, on in (("stages.train", recipe.stages.train.enabled), ("stages.prune", recipe.stages.prune.enabled),
                              ("stages.quantize.method: " + recipe.stages.quantize.method,
                               recipe.stages.quantize.enabled and recipe.stages.quantize.method != "ptq")) if on]
    if stages:
        raise UserError(f"{stages[0]} needs a PyTorch model but model.onnx is an ONNX file (no trainable weights); "
                        "disable it (post-training int8 works: stages.quantize.method: ptq) or start from a PyTorch model")
