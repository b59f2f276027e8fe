"""TensorRT without a GPU, honestly: the API names the code uses against NVIDIA's real bindings of every supported
TensorRT version (compile/tensorrt_api.json, extracted from the tensorrt-cu12-bindings wheels by
tools/trt_api_surface.py), the real cuda-bindings wheel with no driver, the ONNX files a tensorrt target ships
(real pipeline run), and the TensorRT-free decisions of build-engine against that run's real manifest.
No TensorRT is imported or imitated here."""
from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgepipe import UserError
from edgepipe.compile import tensorrt_engine, tensorrt_layers, tensorrt_plan
from edgepipe.compile.qdq_check import OPSET_CEILING, check_qdq
from edgepipe.compile.tensorrt_plan import (check_version, choose_source, parse_version, profile_shapes, source_files,
                                            timing_cache_name, typing_mode, weak_typing_available)
from edgepipe.runtime.backends import trt as trt_backend
from edgepipe.runtime.backends.base import _importable, is_installed
from edgepipe.runtime.backends.trt import CudaError, batch_chunks, cuda_call
from edgepipe.runtime.errors import BackendUnavailable, IntegrityError
from edgepipe.runtime.integrity import FileEntry
from edgepipe.runtime.manifest import Manifest

from conftest import REPO, run_edgepipe

API = json.loads((REPO / "compile" / "tensorrt_api.json").read_text())["versions"]
TRT_SOURCES = [REPO / "compile" / "tensorrt_engine.py", REPO / "runtime" / "backends" / "trt.py"]
# variable names the code gives TensorRT objects (see the module docstrings) -> their C++ class (and its bases)
TRT_CLASSES = {"builder": ("IBuilder",), "network": ("INetworkDefinition",), "parser": ("IParser",),
               "config": ("IBuilderConfig",), "profile": ("IOptimizationProfile",), "cache": ("ITimingCache",),
               "engine": ("ICudaEngine",), "inspector": ("IEngineInspector",), "runtime": ("IRuntime",),
               "inp": ("ITensor",), "context": ("IExecutionContext",), "layer": ("ILayer",)}
TRT_OBJECTS = set(TRT_CLASSES)
# {name: classes} over every version: registration the compiler inlined is missing from one version's members
# (tools/trt_api_surface.py), the union is what the bindings attribute a name to
MEMBERS_ANY_VERSION: dict[str, set[str]] = {}
for _table in API.values():
    for _cls, _names in _table["members"].items():
        for _name in _names:
            MEMBERS_ANY_VERSION.setdefault(_name, set()).add(_cls)
# members whose registration is inlined in every wheel, so only another class shows the name (OnnxParser.num_errors
# is in TensorRT's Python API reference; IErrorRecorder has one too)
MEMBERS_ANY_VERSION["num_errors"] = MEMBERS_ANY_VERSION.get("num_errors", set()) | {"IParser"}

TRT_RECIPE = """
name: trt-tiny
model: {name: efficientnet_lite0, input_size: 64}
data:
  calibration: {source: generated, count: 4}
  parity_images: 2
targets:
  - {backend: onnxruntime, precision: fp32}
  - {backend: tensorrt, precision: int8}
  - {backend: tensorrt, precision: fp16}
bench: {warmup: 1, iterations: 3}
"""


# ---------------------------------------------------------------- API surface (no TensorRT needed)

def trt_uses(source: str, skip_functions=()) -> set[tuple[str, ...]]:
    """("trt", A), ("trt", A, B) for trt.A / trt.A.B, ("obj", attr) for attributes of TensorRT objects and
    ("cuda", attr) for attributes of cuda-python's runtime module ``rt``, outside ``skip_functions``."""
    uses: set[tuple[str, ...]] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef) and child.name in skip_functions:
                continue
            if isinstance(child, ast.Attribute):
                base = child.value
                if isinstance(base, ast.Name) and base.id == "trt":
                    uses.add(("trt", child.attr))
                elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "trt":
                    uses.add(("trt", base.attr, child.attr))
                elif isinstance(base, ast.Name) and base.id in TRT_OBJECTS:
                    uses.add(("obj", child.attr, base.id))
                elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "self" \
                        and base.attr in TRT_OBJECTS:
                    uses.add(("obj", child.attr, base.attr))
                elif isinstance(base, ast.Name) and base.id == "rt" or (isinstance(base, ast.Attribute) and base.attr == "rt"):
                    uses.add(("cuda", child.attr))
            visit(child)
    visit(ast.parse(source))
    return uses


def missing_in(version: str, uses: set[tuple[str, ...]]) -> list[str]:
    table = API[version]
    enum_values = {v for values in table["enums"].values() for v in values}
    known = set(table["names"]) | set(table["module"])
    missing = []
    for use in uses:
        if use[0] == "trt" and len(use) == 2 and use[1] not in table["module"]:
            missing.append(f"trt.{use[1]}")
        elif use[0] == "trt" and len(use) == 3:
            scope, name = use[1], use[2]
            ok = name in table["enums"][scope] if scope in table["enums"] else name in known | enum_values
            if scope not in table["module"] or not ok:
                missing.append(f"trt.{scope}.{name}")
        elif use[0] == "obj" and use[1] not in known:
            missing.append(f".{use[1]}")
        elif use[0] == "obj" and MEMBERS_ANY_VERSION.get(use[1]) and not MEMBERS_ANY_VERSION[use[1]] & set(TRT_CLASSES[use[2]]):
            missing.append(f"{use[2]}.{use[1]} (on {', '.join(sorted(MEMBERS_ANY_VERSION[use[1]]))} only)")
    return sorted(missing)


def code_uses(version: str) -> set[tuple[str, ...]]:
    weak = weak_typing_available(parse_version(version))
    skip = () if weak else tensorrt_engine.WEAK_TYPING_ONLY
    return set().union(*(trt_uses(p.read_text(), skip) for p in TRT_SOURCES))


def test_api_table_covers_jetpack6_and_the_newest_release():
    versions = sorted(API, key=parse_version)
    assert versions[0].startswith("10.3.") and parse_version(versions[-1])[0] == tensorrt_plan.NEWEST_MAJOR
    for v in versions:  # every version in the table is one build-engine accepts
        check_version(v)


@pytest.mark.parametrize("version", sorted(API, key=parse_version))
def test_every_tensorrt_name_the_code_uses_exists_in_that_version(version):
    uses = code_uses(version)
    assert len([u for u in uses if u[0] != "cuda"]) >= 30, "the AST walk found too few TensorRT uses: it checks nothing"
    assert missing_in(version, uses) == [], f"TensorRT {version} lacks these names the code uses"


def test_api_check_catches_names_tensorrt_11_removed():
    """The check can fail: the precision flags and platform_has_fast_fp16 exist in 10.x, not in 11.x."""
    snippet = "def f(trt, builder, config):\n    config.set_flag(trt.BuilderFlag.FP16)\n    return builder.platform_has_fast_fp16\n"
    uses = trt_uses(snippet)
    assert missing_in("10.3.0", uses) == []
    newest = max(API, key=parse_version)
    assert missing_in(newest, uses) == [".platform_has_fast_fp16", "trt.BuilderFlag.FP16"]
    # and the weak-typing code would fail on 11.x if it were not gated
    ungated = set().union(*(trt_uses(p.read_text()) for p in TRT_SOURCES))
    assert "trt.BuilderFlag.INT8" in missing_in(newest, ungated)


def test_api_check_catches_a_method_on_the_wrong_class_and_knows_the_parser_flags():
    snippet = "def f(trt, config, engine, network):\n    config.build_serialized_network(network, config)\n    engine.set_input_shape('x', (1,))\n"
    for version in API:
        assert {m.split(" ")[0] for m in missing_in(version, trt_uses(snippet))} == \
            {"config.build_serialized_network", "engine.set_input_shape"}, version
    flags = {v: API[v]["enums"].get("OnnxParserFlag") for v in API}
    assert all("NATIVE_INSTANCENORM" in f for f in flags.values()), flags  # every version, 10.3 included
    assert "ENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA" in flags["10.12.0.36"]
    assert "ENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA" not in flags["10.3.0"]


def test_weak_typing_gate_matches_the_real_bindings():
    for version, table in API.items():
        flags = table["enums"]["BuilderFlag"]
        assert ("FP16" in flags and "INT8" in flags) == weak_typing_available(parse_version(version)), version
        assert "STRONGLY_TYPED" in table["enums"]["NetworkDefinitionCreationFlag"], version


def test_cuda_python_names_exist_in_the_installed_cuda_bindings():
    from cuda.bindings import runtime
    uses = {u[1] for u in set().union(*(trt_uses(p.read_text()) for p in TRT_SOURCES)) if u[0] == "cuda"}
    assert {"cudaMallocHost", "cudaFreeHost", "cudaMemcpyAsync", "cudaGetDeviceProperties"} <= uses
    assert sorted(u for u in uses if not hasattr(runtime, u)) == []


# ---------------------------------------------------------------- versions, typing, profiles, chunks, cache names

def test_versions_and_typing_modes():
    assert typing_mode(parse_version("10.3.0")) == "weak" and typing_mode(parse_version("10.11.0.33")) == "weak"
    assert typing_mode(parse_version("10.12.0.36")) == "strong" and typing_mode(parse_version("11.4.0.106")) == "strong"
    assert typing_mode(parse_version("10.3.0"), "strong") == "strong"
    assert typing_mode(parse_version("10.16.1.11"), "weak") == "weak"
    with pytest.raises(UserError, match="strongly typed networks only"):
        typing_mode(parse_version("11.0.0.114"), "weak")
    with pytest.raises(BackendUnavailable, match="JetPack 6.1"):
        check_version("8.6.2")
    with pytest.raises(BackendUnavailable, match="newer than edgepipe knows"):
        check_version("12.0.0")


def test_profiles_and_chunks_accept_what_eval_and_bench_send():
    assert profile_shapes((-1, 3, 64, 64), (1, 4, 8)) == ((1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))
    assert profile_shapes((1, 3, 64, 64), (1, 1, 1)) is None
    with pytest.raises(UserError, match="static batch of 1"):
        profile_shapes((1, 3, 64, 64), (1, 1, 8))
    with pytest.raises(UserError, match="beyond the batch"):
        profile_shapes((-1, 3, -1, -1), (1, 1, 8))
    for n, (lo, hi) in [(32, (1, 8)), (8, (1, 1)), (20, (1, 8)), (3, (4, 8)), (1, (1, 1))]:
        chunks = batch_chunks(n, lo, hi)
        covered = [i for start, stop, _ in chunks for i in range(start, stop)]
        assert covered == list(range(n))                                  # every image once, in order
        assert all(lo <= size <= hi and size >= stop - start for start, stop, size in chunks)  # inside the profile
    assert batch_chunks(20, 1, 8) == [(0, 8, 8), (8, 16, 8), (16, 20, 4)]
    assert batch_chunks(3, 4, 8) == [(0, 3, 4)]  # padded up to the profile's min


def test_timing_cache_is_named_by_version_and_gpu():
    names = {timing_cache_name(v, cc, "Orin") for v in ("10.3.0", "11.4.0.106") for cc in ("8.7", "8.9")}
    assert len(names) == 4 and timing_cache_name("10.3.0", "8.7", "Orin") == "tensorrt-timing-10.3.0-sm87-orin.cache"
    # AGX Orin, Orin NX and Orin Nano are all sm87: their caches must not collide (TensorRT refuses the other's)
    assert timing_cache_name("10.3.0", "8.7", "NVIDIA Jetson AGX Orin") != timing_cache_name("10.3.0", "8.7", "NVIDIA Jetson Orin Nano")
    assert timing_cache_name("10.3.0", "8.7", "Orin", 16) != timing_cache_name("10.3.0", "8.7", "Orin", 8)  # same name, other SMs
    assert trt_backend.engine_mismatch({"version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "multiprocessors": 16},
                                       "10.3.0", {"gpu": "Orin", "compute_capability": "8.7", "multiprocessors": 8})


def test_inspector_json_that_cannot_be_read_is_reported_not_raised():
    assert tensorrt_layers.layer_precisions("not json")["available"] is False


# ---------------------------------------------------------------- cuda-python: the real wheel, no GPU

def cuda_device_count():
    from cuda.bindings import runtime
    err, count = runtime.cudaGetDeviceCount()
    return err, count


def test_cuda_error_becomes_one_line_with_the_fix():
    err, count = cuda_device_count()
    if int(err) == 0 and count:
        pytest.skip("a CUDA GPU is visible here")
    from cuda.bindings import runtime
    with pytest.raises(CudaError) as info:
        cuda_call(runtime.cudaGetDeviceCount(), "cudaGetDeviceCount")
    line = str(info.value)
    assert "\n" not in line and err.name in line and ("pip install" in line or "nvidia-smi" in line or "CUDA_VISIBLE" in line)
    with pytest.raises(CudaError, match=err.name):
        trt_backend.gpu_info()


def test_auto_falls_back_when_a_tensorrt_piece_is_missing():
    assert not _importable("edgepipe_no_such_package.sub")  # a missing parent package is "not installed", not an error
    if importlib.util.find_spec("tensorrt") is None:
        assert not is_installed("tensorrt")


# ---------------------------------------------------------------- what a tensorrt target ships (real pipeline run)

@pytest.fixture(scope="module")
def trt_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("trt-run")
    (work / "recipe.yaml").write_text(TRT_RECIPE)
    proc = run_edgepipe("run", work / "recipe.yaml", "--out", work / "out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work / "out"


def zero_points(model) -> list[np.ndarray]:
    inits = {t.name: t for t in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]


def test_tensorrt_int8_target_ships_an_s8s8_qdq_onnx_whatever_the_cpu(trt_run):
    manifest = json.loads((trt_run / "manifest.json").read_text())
    v = manifest["variants"]["tensorrt-int8"]
    assert v["status"] == "pending-build" and [f["path"] for f in v["files"]] == ["tensorrt-int8/model.onnx", "tensorrt-int8/model.fp16.onnx"]
    assert v["compile"]["sources"] == {"weak": "tensorrt-int8/model.onnx", "strong": "tensorrt-int8/model.fp16.onnx"}
    assert v["compile"]["source_floats"] == {"weak": "fp32", "strong": "fp16"}
    assert v["compile"]["mode"] == "s8s8" and v["compile"]["tensorrt_qdq_check"]["ok"]
    model = onnx.load(str(trt_run / "tensorrt-int8" / "model.onnx"))
    zps = zero_points(model)
    assert len(zps) >= 2 * v["compile"]["tensorrt_qdq_check"]["counts"]["quantized_layers"]
    assert all(z.dtype == np.int8 for z in zps) and all(not z.any() for z in zps)
    assert check_qdq(model)["ok"]
    # the strongly typed twin: fp16 float parts, fp16 scales (relative change <= 2^-11 where fp16 is normal),
    # passes the check, and ONNX Runtime agrees with the fp32 QDQ graph on the real model
    fp16 = v["compile"]["fp16_onnx"]
    assert fp16["tensorrt_qdq_check"]["ok"] and fp16["scales_fp16"]["max_relative_change"] <= 2 ** -11
    half = onnx.load(str(trt_run / "tensorrt-int8" / "model.fp16.onnx"))
    assert check_qdq(half)["ok"] and sum(t.data_type == onnx.TensorProto.FLOAT16 for t in half.graph.initializer) > 10
    # ONNX Runtime with graph optimizations off (see test_tensorrt_int8_fp16.run why). Tolerance: fp16 rounding moves
    # some activations across an int8 step, so the two QDQ files differ by a fraction of the logits' spread (0.07 to
    # 0.10 measured on this 4-image-calibrated model); and the fp16 file is no further from the fp32 model than the
    # fp32 QDQ file is (verify's drift rule: x1.25 + 0.02)
    from test_tensorrt_int8_fp16 import run
    x = np.random.default_rng(0).standard_normal((8, *manifest["input"]["shape"][1:])).astype(np.float32)
    fp32, ref, got = (run(trt_run / p, x) for p in ("model.onnx", "tensorrt-int8/model.onnx", "tensorrt-int8/model.fp16.onnx"))
    spread = np.mean(np.std(fp32, axis=1))
    assert np.abs(ref - got).mean() <= 0.15 * spread
    assert np.abs(got - fp32).mean() <= 1.25 * np.abs(ref - fp32).mean() + 0.02 * spread


def test_tensorrt_fp16_target_ships_an_fp16_onnx_that_runs(trt_run):
    import onnxruntime as ort
    manifest = json.loads((trt_run / "manifest.json").read_text())
    v = manifest["variants"]["tensorrt-fp16"]
    assert [f["path"] for f in v["files"]] == ["model.onnx", "tensorrt-fp16/model.fp16.onnx"]
    assert v["compile"]["sources"] == {"weak": "model.onnx", "strong": "tensorrt-fp16/model.fp16.onnx"}
    fp16 = v["compile"]["fp16_onnx"]
    assert fp16["largest_activation"] < fp16["fp16_limit"] or fp16["fp32_layers"]
    model = onnx.load(str(trt_run / "tensorrt-fp16" / "model.fp16.onnx"))
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer) > len(model.graph.initializer) // 2
    x = np.random.default_rng(0).standard_normal((2, *manifest["input"]["shape"][1:])).astype(np.float32)
    runs = [ort.InferenceSession(str(trt_run / p), providers=["CPUExecutionProvider"]) for p in ("model.onnx", "tensorrt-fp16/model.fp16.onnx")]
    ref, half = (s.run(None, {s.get_inputs()[0].name: x})[0] for s in runs)
    assert half.dtype == np.float32 and np.abs(ref - half).max() < 0.02 * np.abs(ref).max() + 1e-3


def test_source_choice_on_the_real_manifest(trt_run):
    manifest = Manifest.load(trt_run)
    strong = choose_source(manifest, trt_run, "int8", "strong")
    assert strong.entry.path == "tensorrt-int8/model.fp16.onnx" and strong.float_precision == "fp16"
    weak = choose_source(manifest, trt_run, "int8", "weak")
    assert weak.qdq_check.ok and weak.entry.path == "tensorrt-int8/model.onnx" and weak.float_precision == "fp16"
    assert choose_source(manifest, trt_run, "fp16", "strong").float_precision == "fp16"
    assert choose_source(manifest, trt_run, "fp16", "strong").entry.path == "tensorrt-fp16/model.fp16.onnx"
    assert choose_source(manifest, trt_run, "fp16", "weak").entry.path == "model.onnx"
    # --rebuild: the variant is now an engine record (its ONNX only in the sidecar) and there is no onnxruntime-fp32
    rebuilt = copy.deepcopy(manifest)
    pending = rebuilt.variants["tensorrt-fp16"]
    engine = dataclasses.replace(pending, format="engine", files=[FileEntry("tensorrt-fp16/model.engine", "0")],
                                 compile={}, tensorrt={"source_files": source_files(pending)})
    rebuilt.variants["tensorrt-fp16"] = engine
    del rebuilt.variants["onnxruntime-fp32"]
    for typing, path in (("weak", "model.onnx"), ("strong", "tensorrt-fp16/model.fp16.onnx")):
        assert choose_source(rebuilt, trt_run, "fp16", typing).entry.path == path
    # the fallback ONNX Runtime variant is the one made from the same model, whatever the names
    pruned = copy.deepcopy(manifest)
    pruned.variants["smaller-engine"] = dataclasses.replace(engine, made_from="pruned", tensorrt={})
    pruned.variants["smaller-ort"] = dataclasses.replace(pruned.variants["onnxruntime-fp32"], made_from="pruned")
    assert choose_source(pruned, trt_run, "fp16", "weak", "smaller-engine").variant == "smaller-ort"
    pruned.variants["unpruned-engine"] = dataclasses.replace(engine, tensorrt={})
    assert choose_source(pruned, trt_run, "fp16", "weak", "unpruned-engine").variant == "onnxruntime-fp32"
    # refusals: a QDQ source whose TensorRT check failed, no fp16 ONNX for strong typing, a modified file
    failed = copy.deepcopy(manifest)
    failed.variants["tensorrt-int8"].compile["tensorrt_qdq_check"] = {"ok": False, "errors": ["zero point type uint8, TensorRT needs int8"]}
    with pytest.raises(UserError, match="uint8"):
        choose_source(failed, trt_run, "int8", "strong")
    no_fp16 = copy.deepcopy(manifest)
    del no_fp16.variants["tensorrt-fp16"]
    with pytest.raises(UserError, match="--typing weak"):
        choose_source(no_fp16, trt_run, "fp16", "strong")
    assert choose_source(no_fp16, trt_run, "fp16", "weak").variant == "onnxruntime-fp32"
    tampered = copy.deepcopy(manifest)
    files = tampered.variants["tensorrt-int8"].files
    files[0] = dataclasses.replace(files[0], sha256="0" * 64)
    with pytest.raises(IntegrityError):
        choose_source(tampered, trt_run, "int8", "weak")


def test_qdq_check_applies_the_parsers_rules(trt_run):
    base = onnx.load(str(trt_run / "tensorrt-int8" / "model.onnx"))

    def broken(change) -> dict:
        model = copy.deepcopy(base)
        change(model)
        return check_qdq(model)

    def newer_opset(m):
        next(o for o in m.opset_import if o.domain in ("", "ai.onnx")).version = OPSET_CEILING + 1

    def dynamic_height(m):
        m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"

    def dq_without_q(m):  # an activation DequantizeLinear fed by the float tensor its Q should quantize
        producer = {o: n for n in m.graph.node for o in n.output}
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and producer.get(n.input[0]) is not None)
        dq.input[0] = producer[dq.input[0]].input[0]

    def weight_through_identity(m):  # still int8 per-channel: stays ok
        gemm = next(n for n in m.graph.node if n.op_type in ("Gemm", "MatMul"))
        m.graph.node.append(onnx.helper.make_node("Identity", [gemm.input[1]], ["w_identity"], name="w_identity"))
        gemm.input[1] = "w_identity"

    def float_weight_through_transpose(m):
        gemm = next(n for n in m.graph.node if n.op_type in ("Gemm", "MatMul"))
        producer = {o: n for n in m.graph.node for o in n.output}
        w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == producer[gemm.input[1]].input[0]))
        m.graph.initializer.append(numpy_helper.from_array(w.T.astype(np.float32), "w_float_t"))
        m.graph.node.append(onnx.helper.make_node("Transpose", ["w_float_t"], ["w_t"], name="w_t", perm=[1, 0]))
        gemm.input[1] = "w_t"

    assert check_qdq(base)["ok"]
    assert any(f"> {OPSET_CEILING}" in e for e in broken(newer_opset)["errors"])
    assert any("dynamic" in e for e in broken(dynamic_height)["errors"])
    assert any("no QuantizeLinear produces" in e for e in broken(dq_without_q)["errors"])
    assert broken(weight_through_identity)["ok"]
    assert any("has no int8 Q/DQ" in e for e in broken(float_weight_through_transpose)["errors"])


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_engine_without_gpu_is_one_line_exit_2(trt_run):
    """The real CLI with the real cuda-bindings wheel and no usable driver: every missing piece in one line."""
    err, count = cuda_device_count()
    if int(err) == 0 and count:
        pytest.skip("a CUDA GPU is visible here")
    proc = run_edgepipe("build-engine", trt_run, "--precision", "int8", "--batch", "1,4,8")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "TensorRT is not installed" in lines[0] and err.name in lines[0] and "cuda-python" in lines[0]
    wrong = run_edgepipe("build-engine", trt_run, "--precision", "int8", "--variant", "onnxruntime-fp32")
    assert wrong.returncode == 2 and "not a TensorRT variant" in wrong.stderr and "tensorrt-int8" in wrong.stderr


def small_conv_onnx(path: Path, opset: int) -> Path:
    """Conv -> GlobalAveragePool -> Flatten -> Gemm, built with onnx.helper (dynamic batch, 16x16 RGB)."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w", (8, 3, 3, 3)), ("b", (8,)), ("fc_w", (10, 8)), ("fc_b", (10,)))]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10), str(path))
    return path


def test_int8_source_is_tensorrts_form_whatever_the_recipe_and_refuses_what_tensorrt_cannot_parse(tmp_path):
    from edgepipe.compile.tensorrt_sources import int8_source
    calib = list(np.random.default_rng(1).standard_normal((4, 1, 3, 16, 16)).astype(np.float32))
    # it takes no QDQ mode or activation symmetry (u8s8_reduce_range, asymmetric: what the CPU targets may use)
    info = int8_source(small_conv_onnx(tmp_path / "ok.onnx", 17), tmp_path / "ok-int8.onnx", calib)
    zps = zero_points(onnx.load(str(tmp_path / "ok-int8.onnx")))
    assert info["mode"] == "s8s8" and info["tensorrt_qdq_check"]["ok"] and len(zps) >= 4
    assert all(z.dtype == np.int8 and not z.any() for z in zps)
    with pytest.raises(UserError, match=f"opset 21 > {OPSET_CEILING}"):
        int8_source(small_conv_onnx(tmp_path / "new.onnx", 21), tmp_path / "new-int8.onnx", calib)
