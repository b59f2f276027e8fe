"""The ground every backend, device and model stands on: the typed manifest, the compile-target registry, the
runtime backend map, one budget schema, and a resolved recipe that is never changed after it is written."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from edgepipe import UserError
from edgepipe.compile import targets
from edgepipe.recipe import Recipe, RecipeError, dump_recipe, load_recipe
from edgepipe.runtime.backends.base import AUTO_ORDER, BACKENDS
from edgepipe.runtime.errors import ManifestError
from edgepipe.runtime.manifest import MANIFEST_NAME, Manifest, Variant

import import_rules


def test_manifest_round_trips_through_its_dataclasses(tiny_artifacts):
    on_disk = json.loads((tiny_artifacts / MANIFEST_NAME).read_text())
    m = Manifest.load(tiny_artifacts)
    assert m.to_dict() == on_disk  # every field the writers put there is a typed field
    assert isinstance(m.variants["openvino-int8"], Variant)
    assert {(v.made_from, v.quantization) for v in m.variants.values()} == {("base", None), ("base", "ptq")}
    assert set(m.reference_set.logits) == {v.reference_logits for v in m.variants.values()}


def test_manifest_refuses_unknown_fields_with_a_close_match(tiny_artifacts, tmp_path):
    data = json.loads((tiny_artifacts / MANIFEST_NAME).read_text())
    data["variants"]["openvino-int8"]["precison"] = "int8"
    with pytest.raises(ManifestError, match=r"unknown field 'precison' \(did you mean precision\?\)"):
        Manifest.from_dict(data)
    data = json.loads((tiny_artifacts / MANIFEST_NAME).read_text())
    data["variants"]["openvino-int8"]["made_from"] = "distilled"
    with pytest.raises(ManifestError, match="made_from must be one of base, pruned"):
        Manifest.from_dict(data)
    with pytest.raises(ManifestError, match="did you mean 'openvino-int8'"):
        Manifest.from_dict(json.loads((tiny_artifacts / MANIFEST_NAME).read_text())).variant("openvino-int9")


def test_every_registered_target_has_a_runtime_backend():
    assert {t.backend for t in targets.TARGETS.values()} <= set(BACKENDS)
    assert set(AUTO_ORDER) == set(BACKENDS)


def test_a_registered_target_compiles_to_a_variant_the_runtime_checks(tiny_artifacts, tmp_path):
    """Adding a target is one decorated function: here an ONNX Runtime fp16-named copy, registered for the test."""
    from edgepipe.runtime.integrity import verify_files

    @targets.register("onnxruntime", "fp16-test")
    def copy_target(job: targets.CompileJob) -> targets.Compiled:
        dst = job.folder / "model.onnx"
        dst.write_bytes(job.onnx.read_bytes())
        return targets.Compiled([dst], "onnx", {"note": "a copy"})
    try:
        job = targets.CompileJob(tiny_artifacts / "model.onnx", tmp_path / "onnxruntime-fp16-test", [], None)
        v = targets.get("onnxruntime", "fp16-test").compile(job, tmp_path, made_from="base", input_shape=[-1, 3, 224, 224])
        assert (v.backend, v.precision, v.format, v.status, v.compile) == ("onnxruntime", "fp16-test", "onnx", "ok", {"note": "a copy"})
        assert [f.path for f in v.files] == ["onnxruntime-fp16-test/model.onnx"]
        assert verify_files(tmp_path, v.files, "onnxruntime-fp16-test") == [tmp_path / "onnxruntime-fp16-test" / "model.onnx"]
        assert Variant.from_dict(v.to_dict()) == v
        with pytest.raises(ValueError, match="registered twice"):
            targets.register("onnxruntime", "fp16-test")(copy_target)
    finally:
        targets.TARGETS.pop(("onnxruntime", "fp16-test", None))


def test_variant_names_have_one_owner_and_a_device_build_asks_the_serving_policy():
    """Names come from runtime/manifest.py; the default `edgepipe build-engine` records after verify is the serving
    policy's pick among what passed on this machine (shown with ONNX Runtime: TensorRT cannot run here)."""
    from edgepipe.runtime.manifest import ModelInfo, exported_onnx, variant_name
    from edgepipe.runtime.preprocess import Preprocess
    from edgepipe.runtime.serving import verified_default
    assert variant_name("tensorrt", "int8", "pruned", "qat") == "pruned-tensorrt-int8-qat"
    assert (variant_name("openvino", "fp16"), exported_onnx("base"), exported_onnx("pruned")) == (
        "openvino-fp16", "model.onnx", "pruned-model.onnx")
    variants = {variant_name("onnxruntime", p): Variant("onnxruntime", p, "onnx", [], [1, 3, 8, 8]) for p in ("fp32", "int8")}
    manifest = Manifest(model=ModelInfo(name="m", num_classes=2), preprocess=Preprocess(), labels=["a", "b"], variants=variants)

    def result(verdict: str, p90: float) -> dict:
        return {"backend": "onnxruntime", "verdict": verdict, "latency_ms": {"p90": p90}}
    record = {"variants": {"onnxruntime-fp32": result("pass", 3.0), "onnxruntime-int8": result("pass", 1.0)}}
    assert verified_default(manifest, "onnxruntime", record) == "onnxruntime-int8"
    record["variants"]["onnxruntime-int8"] = result("fail", 1.0)
    assert verified_default(manifest, "onnxruntime", record) == "onnxruntime-fp32"
    record["variants"]["onnxruntime-fp32"] = result("fail", 3.0)
    assert verified_default(manifest, "onnxruntime", record) is None


def test_recipe_targets_are_checked_against_the_registry():
    assert Recipe.model_validate({"targets": [{"backend": "openvino", "precision": "fp16"}]}).targets[0].precision == "fp16"
    with pytest.raises(Exception, match="did you mean openvino"):
        Recipe.model_validate({"targets": [{"backend": "openvno"}]})
    with pytest.raises(Exception, match="onnxruntime variants are fp32, int8"):
        Recipe.model_validate({"targets": [{"backend": "onnxruntime", "precision": "fp16"}]})
    with pytest.raises(UserError, match="tensorrt variants are fp16, int8"):
        targets.get("tensorrt", "fp32")


def test_recipe_budgets_use_the_bench_schema_and_reject_unknown_keys(tmp_path):
    from edgepipe.benchmarks.budgets import Budget
    path = tmp_path / "r.yaml"
    path.write_text("budgets:\n  - {variants: '*int8*', agreement_min: 0.9}\n")
    assert load_recipe(path).budgets == [Budget(variants="*int8*", agreement_min=0.9)]
    path.write_text("budgets:\n  - {agreemnt_min: 0.9}\n")
    with pytest.raises(RecipeError, match="did you mean 'agreement_min'"):
        load_recipe(path)


def test_resolved_recipe_is_written_once_and_is_what_ran(tiny_artifacts, tiny_recipe):
    """recipe.resolved.yaml is the recipe with every default settled: loading it again gives the same recipe."""
    resolved = (tiny_artifacts / "recipe.resolved.yaml").read_text()
    assert resolved == dump_recipe(load_recipe(tiny_recipe))
    assert yaml.safe_load(resolved)["data"]["evaluation"] is None


def test_a_misspelt_class_folder_is_an_error_not_an_unlabeled_set(imagenet_sample, tmp_path):
    from edgepipe.runtime.data import load_items
    labels = [f"class{i}" for i in range(3)]
    image = next(imagenet_sample.glob("*.JPEG"))
    for folder in ("class0", "class1"):
        (tmp_path / "set" / folder).mkdir(parents=True)
        shutil.copy(image, tmp_path / "set" / folder / "a.jpg")
    items, labeled = load_items(tmp_path / "set", labels)
    assert labeled and sorted(t for _, t in items) == [0, 1]
    (tmp_path / "set" / "clas2").mkdir()
    shutil.copy(image, tmp_path / "set" / "clas2" / "a.jpg")
    with pytest.raises(UserError, match="'clas2' is not a label name of this model \\(did you mean 'class2'\\?\\)"):
        load_items(tmp_path / "set", labels)
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(image, loose / "frame.jpg")
    assert load_items(loose, labels) == ([(loose / "frame.jpg", -1)], False)


# Imports that break the table and are removed by the rest of issue 25: edgepipe/cli.py passes
# train.models.rebuild to benchmarks.bench.main, then bench.py's fallback import goes.
PENDING: set[str] = set()   # known violations still to fix: none


def _unlined(violation: str) -> str:
    where, _, rest = violation.partition(" ")
    return where.split(":")[0] + " " + rest.split(" (")[0]


def test_the_code_follows_the_import_table_of_the_architecture_doc():
    """docs/architecture.md's layer table is the rule: runtime/ imports no torch, pydantic, train, compile or
    benchmarks; compile/ only runtime; train/ compile and runtime; benchmarks/ runtime and compile."""
    layers = {layer.name: layer for layer in import_rules.read_layers()}
    assert {"runtime", "compile", "train", "benchmarks", "base", "app"} <= set(layers)
    assert {"torch", "pydantic"} <= set(layers["runtime"].never)
    assert set(layers["compile"].may_import) == {"runtime", "base"}
    found = import_rules.violations()
    assert [v for v in found if _unlined(v) not in PENDING] == []
    assert {_unlined(v) for v in found} <= PENDING


def test_the_import_check_catches_a_forbidden_import(tmp_path):
    """A synthetic tree with one file per forbidden kind of import (top level, inside a function, relative)."""
    for folder in import_rules.CHECKED:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "edgepipe" / "atomic.py").write_text("import os\n")
    (tmp_path / "train" / "models.py").write_text("import torch\n")
    (tmp_path / "runtime" / "ok.py").write_text("import numpy\nfrom edgepipe.atomic import write_json\n"
                                                "from edgepipe import UserError\nfrom . import ok\n")
    (tmp_path / "runtime" / "bad.py").write_text("import numpy\n\ndef f():\n    import torch.nn\n"
                                                 "    from edgepipe.train.models import build_model\n")
    (tmp_path / "compile" / "bad.py").write_text("from ..benchmarks import latency\n")
    (tmp_path / "benchmarks" / "latency.py").write_text("")
    (tmp_path / "benchmarks" / "bad.py").write_text("from edgepipe.train import models\n")
    (tmp_path / "train" / "ok.py").write_text("from edgepipe.compile import bad\nfrom edgepipe.runtime import ok\n")
    assert import_rules.violations(tmp_path) == [
        "runtime/bad.py:4 imports torch.nn (layer runtime never imports it)",
        "runtime/bad.py:5 imports edgepipe.train.models (layer runtime may not import layer train)",
        "compile/bad.py:1 imports edgepipe.benchmarks.latency (layer compile may not import layer benchmarks)",
        "benchmarks/bad.py:1 imports edgepipe.train.models (layer benchmarks may not import layer train)",
    ]
