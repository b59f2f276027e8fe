"""train/: data loaders, fine-tuning, checkpoints, DDP, pruning and QAT, on real data and real runtimes.

Kept small (32 px, tens of images, a few steps) so the file runs in a few minutes on 2 cores.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from conftest import requires
from edgepipe import UserError, datasets
from edgepipe.recipe import PruneStage, TrainStage
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.train import data as tdata
from edgepipe.train.finetune import fit, load_training_state

pytestmark = requires("Fashion-MNIST", (datasets.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                      f"Debian package dataset-fashion-mnist (make setup) at {datasets.FASHION_MNIST_DIR}")

LITE = dict(mean=(127 / 255,) * 3, std=(128 / 255,) * 3, color="RGB")


def pre(size: int) -> Preprocess:
    return Preprocess(size, size, **LITE)


def cfg(**kw) -> TrainStage:
    base = dict(enabled=True, epochs=1, batch_size=16, lr=0.05, workers=0, device="cpu", seed=0, threads=1)
    return TrainStage(**{**base, **kw})


class Tiny(nn.Module):
    """A small CNN without BatchNorm or dropout, so multi-process and resumed runs can be compared exactly."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def tiny_sets(n: int = 32, size: int = 16):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
    targets = rng.integers(0, 10, n)
    return (tdata.ImageSet(images, targets, pre(size), augment=True, seed=0),
            tdata.ImageSet(images[:8], targets[:8], pre(size)))


# ---------------------------------------------------------------- data

def test_fashion_mnist_from_debian_idx_files(tmp_path):
    fashion = datasets.get_dataset("fashion-mnist")
    images, labels = fashion.load("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10
    assert fashion.labels[9] == "Ankle boot" and len(fashion.labels) == 10

    csv_path = datasets.materialize(datasets.parse_reference("fashion-mnist:test:20", "data.evaluation"), tmp_path)
    from edgepipe.runtime.data import load_labeled
    from edgepipe.runtime.evaluate import read_image
    items = load_labeled(csv_path)
    assert [t for _, t in items] == labels[:20].tolist()
    bgr = read_image(items[3][0])  # grey PNG -> 3 equal channels, the same pixels as the idx file
    assert bgr.shape == (28, 28, 3) and np.array_equal(bgr[:, :, 0], images[3]) and np.array_equal(bgr[:, :, 2], images[3])

    data = tdata.load_train_data("fashion-mnist", pre(32), val_split=0.1, max_train=64, max_val=16)
    x, y, i = data.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10 and len(data.train) == 64 and len(data.val) == 16
    assert data.labels == list(fashion.labels)
    # stages.train.augment: false trains on exactly the validation-style tensors; true flips/shifts some of them
    plain = tdata.load_train_data("fashion-mnist", pre(32), val_split=0.1, max_train=64, max_val=16, augment=False)
    reference = [pre(32).batch([np.repeat(images_i[:, :, None], 3, 2)])[0] for images_i in
                 fashion.load("train")[0][[int(j) for j in tdata._split(60000, 0.1, 0, 64, 16)[0][:8]]]]
    assert all(np.array_equal(plain.train[k][0].numpy(), reference[k]) for k in range(8))
    assert not all(np.array_equal(data.train[k][0].numpy(), reference[k]) for k in range(8))
    with pytest.raises(UserError, match="fashion-mnist:test"):
        datasets.parse_reference("fashion-mnist:validation", "data.evaluation")


def test_dataset_references_resolve_to_files_without_changing_the_recipe(tmp_path):
    from edgepipe.recipe import RecipeError, dump_recipe, load_recipe
    from edgepipe.runtime.data import load_labeled
    from edgepipe.train.stage import preprocess_at
    fm = Path(__file__).parent.parent / "recipes" / "fashion-mnist.yaml"
    recipe = load_recipe(fm, "quick", ["data.evaluation=fashion-mnist:test:30"])
    before = dump_recipe(recipe)
    resolved = datasets.resolve_data(recipe, tmp_path)
    assert dump_recipe(recipe) == before  # the resolved recipe is never rewritten
    assert len(load_labeled(resolved.evaluation)) == 30 and len(load_labeled(resolved.calibration_source)) == 200
    assert Path(resolved.evaluation).is_relative_to(tmp_path / "data")
    for bad, hint in [("fashion-mnst:test", "did you mean fashion-mnist:test?"), ("fashion-mnist", "fashion-mnist:test or"),
                      ("fashion-mnist:test:0", "at least 1")]:
        with pytest.raises(RecipeError, match=hint):
            load_recipe(fm, "quick", [f"data.evaluation={bad}"])
    # 28 px items fill the frame: no centre crop at another input size; an image folder keeps the model's ratio
    lite = Preprocess(resize=256, crop=224)
    assert preprocess_at(lite, 64, "fashion-mnist").resize == 64
    assert preprocess_at(lite, 64, str(tmp_path)).resize == 73


def test_a_registered_dataset_is_one_function(tmp_path):
    from edgepipe.runtime.data import load_labeled
    (tmp_path / "toy").mkdir()
    np.save(tmp_path / "toy" / "images.npy", np.random.default_rng(0).integers(0, 255, (12, 9, 11, 3), dtype=np.uint8))

    @datasets.register_dataset("toy-set", root=tmp_path / "toy", splits=("train", "val"), labels=("a", "b", "c"))
    def toy(split: str, root: Path):
        images = np.load(root / "images.npy")
        return images, np.arange(len(images), dtype=np.int64) % 3
    try:
        ref = datasets.parse_reference("toy-set:val:5", "data.evaluation")
        assert (ref.split, ref.count, str(ref)) == ("val", 5, "toy-set:val:5")
        items = load_labeled(datasets.materialize(ref, tmp_path / "out"))
        assert [t for _, t in items] == [0, 1, 2, 0, 1]
        data = tdata.load_train_data("toy-set", pre(8), val_split=0.25)
        assert data.labels == ["a", "b", "c"] and len(data.train) == 9 and len(data.val) == 3
        assert [f for f, _, _ in tdata.data_fingerprint("toy-set")] == [str(tmp_path / "toy" / "images.npy"), __file__]
        with pytest.raises(UserError, match="did you mean toy-set:val"):
            datasets.parse_reference("toy-sett:val", "data.evaluation")
    finally:
        datasets._DATASETS.pop("toy-set")


def _write_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            cv2.imwrite(str(root / cls / f"{i}.png"), rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    return root / "dog" / "broken.png"


def test_imagefolder_and_csv_report_a_corrupt_image_with_its_path(tmp_path):
    broken = _write_folder(tmp_path / "tree")
    paths, targets, labels = tdata.list_training_images(tmp_path / "tree")
    assert labels == ["cat", "dog"] and len(paths) == 17 and targets.count(1) == 9

    rows = [(str(p.relative_to(tmp_path / "tree")), t) for p, t in zip(paths, targets)]
    tdata.write_csv(tmp_path / "tree" / "list.csv", rows)
    (tmp_path / "tree" / "labels.txt").write_text("cat\ndog\n")
    csv_paths, csv_targets, csv_labels = tdata.list_training_images(tmp_path / "tree" / "list.csv")
    assert csv_labels == ["cat", "dog"] and csv_targets == targets

    data = tdata.load_train_data(str(tmp_path / "tree" / "list.csv"), pre(16), val_split=0.0)
    lines = []
    result = fit(Tiny(2), data.train, None, cfg(batch_size=4), on_bad_image="skip", log=lines.append)
    assert result.skipped_images == [str(broken)]
    assert any(str(broken) in line for line in lines)
    with pytest.raises(UserError, match="broken.png"):
        fit(Tiny(2), data.train, None, cfg(batch_size=4), on_bad_image="stop", log=lambda m: None)


# ---------------------------------------------------------------- fine-tuning and checkpoints

def test_finetune_lite0_from_imagenet_decreases_loss():
    from edgepipe.train.models import build_model
    model = build_model("efficientnet_lite0", pretrained=True, num_classes=10).model
    data = tdata.load_train_data("fashion-mnist", pre(32), val_split=0.1, max_train=96, max_val=32)
    data.train.augment = False
    x = torch.stack([data.train[i][0] for i in range(len(data.train))])
    y = torch.tensor([data.train[i][1] for i in range(len(data.train))])

    def loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model.eval()(x), y))
    before = loss()
    result = fit(model, data.train, data.val, cfg(epochs=3, batch_size=32, lr=0.05), log=lambda m: None)
    assert loss() < before * 0.9, (before, loss())
    assert result.images_per_s > 0 and result.val_top1 is not None and result.device == "cpu"


def test_checkpoint_is_atomic_and_resume_continues_to_the_same_weights(tmp_path):
    train, val = tiny_sets()
    torch.manual_seed(0)
    full = Tiny()
    init = {k: v.clone() for k, v in full.state_dict().items()}
    fit(full, train, val, cfg(epochs=3, batch_size=8), checkpoint=tmp_path / "full.pt", log=lambda m: None)

    class Stop(Exception):
        pass

    def stop_in_epoch_2(msg):  # Ctrl-C in the middle of an epoch: the progress line is logged after its checkpoint
        if "epoch 2/3 step 2/4" in msg:
            raise Stop

    interrupted = Tiny()
    interrupted.load_state_dict(init)
    with pytest.raises(Stop):
        fit(interrupted, train, val, cfg(epochs=3, batch_size=8), checkpoint=tmp_path / "run.pt", log=stop_in_epoch_2)
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*.part*"))
    state = load_training_state(tmp_path / "run.pt")  # weights_only=True
    assert (state["epoch"], state["step"]) == (1, 6)

    resumed = Tiny()
    resumed.load_state_dict(init)
    result = fit(resumed, train, val, cfg(epochs=3, batch_size=8), checkpoint=tmp_path / "run.pt", resume=True,
                 log=lambda m: None)
    assert (result.resumed_from_epoch, result.resumed_from_step) == (1, 6)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-6)


def test_distillation_pulls_the_student_towards_the_teacher_and_logs_progress_with_eta():
    from edgepipe.train.finetune import distillation_loss
    train, _ = tiny_sets()
    train.augment = False
    x = torch.stack([train[i][0] for i in range(len(train))])
    torch.manual_seed(1)
    teacher = Tiny()
    with torch.no_grad():
        teacher.fc.weight.mul_(20)  # a confident teacher whose answers differ from the labels
    torch.manual_seed(0)
    student = Tiny()

    def gap() -> float:
        with torch.no_grad():
            return float(distillation_loss(student(x), teacher(x), 4.0))
    before, lines = gap(), []
    fit(student, train, None, cfg(epochs=4, batch_size=8, lr=0.1), teacher=teacher, distill_alpha=1.0,
        log=lines.append)
    assert gap() < 0.7 * before, (before, gap())
    progress = [line for line in lines if "step 2/4" in line]
    assert progress and all("ETA" in line and "images/s" in line for line in progress)


def test_threads_auto_picks_a_measured_count_and_the_head_gets_its_own_learning_rate():
    from edgepipe.train.finetune import make_optimizer, pick_threads
    model, lines = Tiny(), []
    chosen = pick_threads(model, torch.randn(4, 3, 16, 16), candidates=[1, 2], steps=1, log=lines.append)
    assert chosen in (1, 2) and torch.get_num_threads() == chosen and "images/s" in lines[0]
    opt = make_optimizer(model, cfg(head_lr_scale=10.0))
    head = {id(p) for p in model.fc.parameters()}
    for group in opt.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1 and group["lr_scale"] == (10.0 if in_head.pop() else 1.0)
    from edgepipe.train import finetune
    finetune._PICKED_THREADS.clear()
    train, _ = tiny_sets()
    for _ in range(2):  # measured once per process, reused by the later fits (pruning steps, QAT)
        fit(Tiny(), train, None, cfg(threads="auto", batch_size=8), log=lines.append)
    assert sum(line.strip().startswith("threads:") for line in lines) == 2  # pick_threads above + the first fit
    finetune._PICKED_THREADS.clear()
    torch.set_num_threads(1)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_unsafe_pickle_checkpoint_is_refused(tmp_path):
    from edgepipe.train.checkpoint import load_state_dict
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Evil(str(marker))}, path)
    with pytest.raises(UserError, match="refused"):
        load_training_state(path)
    with pytest.raises(UserError, match="refused"):
        load_state_dict(path)
    assert not marker.exists()


# ---------------------------------------------------------------- DDP

def _ddp_worker(out: str) -> None:
    from edgepipe.train import distributed
    torch.manual_seed(0)
    model = Tiny()
    train, _ = tiny_sets()
    fit(model, train, None, cfg(epochs=2, batch_size=8, optimizer="sgd"), log=lambda m: None)
    if distributed.current().is_main:
        torch.save(model.state_dict(), out)


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    from edgepipe.train.distributed import spawn
    spawn(_ddp_worker, 2, str(tmp_path / "ddp.pt"))
    torch.manual_seed(0)
    single = Tiny()
    train, _ = tiny_sets()
    fit(single, train, None, cfg(epochs=2, batch_size=8, optimizer="sgd"), log=lambda m: None)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert any(not torch.equal(v, Tiny().state_dict()[k]) for k, v in ddp.items())  # it did train
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- pruning

def test_pruning_lite0_reaches_the_macs_target_with_round_to_and_reloads_without_the_class(tmp_path):
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    from edgepipe.train.models import build_model, count_macs
    from edgepipe.train.prune import load_pruned, prune_model, save_pruned
    model = build_model("efficientnet_lite0", pretrained=True, num_classes=10).model
    base = count_macs(model, (1, 3, 32, 32))
    info = prune_model(model, 32, PruneStage(enabled=True, macs_reduction=0.3, iterative_steps=3, max_pruning_ratio=0.5,
                                             round_to=8, finetune_epochs=0, recovery_epochs=0), log=lambda m: None)
    macs = count_macs(model, (1, 3, 32, 32))
    assert macs <= 0.7 * base and info["targets_met"] and info["macs"] == macs
    assert len(info["steps"]) < 3  # stopped as soon as the target was met
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(c, Conv2dStaticSamePadding) for c in convs)
    assert all(c.out_channels % 8 == 0 for c in convs)
    depthwise = [c for c in convs if c.groups > 1]
    assert depthwise and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert model._fc.out_features == 10

    save_pruned(model, tmp_path, "efficientnet_lite0", 10, 32, [str(i) for i in range(10)], Preprocess(resize=36, crop=32))
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x).numpy()
        again, spec = load_pruned(tmp_path)
        torch.testing.assert_close(again(x), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
    assert spec["macs"] == macs

    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import sys, numpy as np; sys.modules['efficientnet_lite_pytorch'] = None; sys.modules['torch'] = None\n"
            "import onnxruntime as ort\n"
            f"s = ort.InferenceSession(r'{tmp_path / 'pruned.onnx'}', providers=['CPUExecutionProvider'])\n"
            f"np.save(r'{tmp_path / 'y.npy'}', s.run(None, {{'input': np.load(r'{tmp_path / 'x.npy'}')}})[0])\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=1e-4, atol=1e-4)


def test_latency_aimed_pruning_stops_on_the_measured_speedup():
    from edgepipe.train.models import build_model
    from edgepipe.train.prune import prune_model
    model = build_model("efficientnet_lite0", pretrained=False, num_classes=10).model
    info = prune_model(model, 32, PruneStage(enabled=True, macs_reduction=0.0, latency_speedup=1.2, backend="openvino",
                                             iterative_steps=3, max_pruning_ratio=0.6, finetune_epochs=0,
                                             recovery_epochs=0), threads=1, log=lambda m: None)
    assert info["base_latency_ms"] > 0 and all(s["latency_ms"] > 0 for s in info["steps"])
    for s in info["steps"]:  # the decision follows the measurement of that step
        assert s["targets_met"] == (info["base_latency_ms"] / s["latency_ms"] >= 1.2)
    assert info["targets_met"] == info["steps"][-1]["targets_met"]
    assert info["targets_met"] or len(info["steps"]) == 3


# ---------------------------------------------------------------- QAT

def test_batchnorm_folding_keeps_the_outputs():
    from edgepipe.train.models import build_model
    from edgepipe.train.qat import fold_batchnorm
    model = build_model("efficientnet_lite0", pretrained=True, num_classes=10).model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert fold_batchnorm(model, 32) == 49
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_qat_exports_a_symmetric_int8_qdq_onnx_that_onnxruntime_and_openvino_run(tmp_path):
    import onnx
    import onnxruntime as ort
    import openvino as ov
    from onnx import numpy_helper

    from edgepipe.train.models import build_model
    from edgepipe.compile.qdq_check import check_qdq
    from edgepipe.train.qat import calibrate, export_qdq, prepare_qat
    model = build_model("efficientnet_lite0", pretrained=True, num_classes=10).model
    data = tdata.load_train_data("fashion-mnist", pre(32), val_split=0.1, max_train=64, max_val=32)
    prepare_qat(model, 32)
    calibrate(model, [torch.stack([data.val[i][0] for i in range(16)])])
    fit(model, data.train, None, cfg(epochs=1, batch_size=32, lr=0.001), log=lambda m: None)
    path = export_qdq(model, tmp_path / "qat.onnx", 32)
    check = check_qdq(path)  # TensorRT's form: int8 zero points, all 0, per-channel weights
    assert check["counts"]["dequantize_linear"] >= 2 * 49  # every conv: input and weight
    assert check["ok"], check["errors"]
    assert check["counts"]["quantized_layers"] == check["counts"]["weighted_layers"] == 50
    # 7-bit weights (int8 storage): no u8 x s8 pair sum can saturate 16 bits on x86 without VNNI (AVX2 etc.)
    proto = onnx.load(str(path))
    weights = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights if w.dtype == np.int8 and w.size > 1) <= 64

    x = torch.stack([data.val[i][0] for i in range(16)])
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    got_ort = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    compiled = ov.Core().compile_model(str(path), "CPU")
    got_ov = compiled(x.numpy())[compiled.output(0)]
    for got in (got_ort, got_ov):
        assert got.shape == ref.shape
        assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.8
        assert np.abs(got - ref).max() < 0.25 * np.ptp(ref)


def test_resume_flag_sets_the_recipe(tmp_path):
    from edgepipe.cli import build_parser
    args = build_parser().parse_args(["run", "recipes/fashion-mnist.yaml", "--out", str(tmp_path), "--resume"])
    assert args.resume is True
    from edgepipe.recipe import load_recipe
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "fashion-mnist.yaml", "quick", ["stages.train.resume=true"])
    assert recipe.stages.train.resume and recipe.data.evaluation == "fashion-mnist:test"  # the full 10k split
    with pytest.raises(UserError, match="fashion-mnist:test or fashion-mnist:train"):
        load_recipe(Path(__file__).parent.parent / "recipes" / "fashion-mnist.yaml", "quick", ["data.evaluation=fashion-mnist:val"])


def test_report_training_section_compares_ptq_and_qat_against_pruned_fp32():
    from edgepipe.benchmarks.report import _training_lines, training_summary
    from edgepipe.runtime.manifest import ModelInfo
    model = ModelInfo(name="m", num_classes=10,
                      source={"fine_tuned_on": "fashion-mnist", "pretrained": False, "train_images": 100,
                              "epochs": 1.0, "input_size": 64, "images_per_s": 50.0, "val_top1": 0.5},
                      pruned={"macs_reduction": 0.5, "speedup": 1.6, "backend": "onnxruntime",
                              "distill_alpha": 0.7, "global_pruning": False})
    pruned = {"made_from": "pruned"}
    rows = [{"name": "pruned-onnxruntime-fp32", "backend": "onnxruntime", "precision": "fp32", "quantization": None, "top1": 0.90, **pruned},
            {"name": "pruned-openvino-int8", "backend": "openvino", "precision": "int8", "quantization": "ptq", "top1": 0.895, **pruned},
            {"name": "pruned-openvino-int8-qat", "backend": "openvino", "precision": "int8", "quantization": "qat", "top1": 0.88, **pruned},
            {"name": "openvino-int8", "backend": "openvino", "precision": "int8", "quantization": "ptq", "top1": 0.7,
             "made_from": "base"}]  # not made from the pruned model: not in the pruned summary
    summary = training_summary(model, rows)
    assert set(summary["pruned_int8"]) == {"pruned-openvino-int8", "pruned-openvino-int8-qat"}
    assert summary["pruned_int8"]["pruned-openvino-int8"] == {"top1": 0.895, "method": "ptq", "drop_vs_pruned_fp32_pts": 0.5}
    assert summary["pruned_int8"]["pruned-openvino-int8-qat"]["method"] == "qat"
    text = "\n".join(_training_lines(summary, {"openvino": "pruned-openvino-int8"}))
    assert "random initialisation" in text and "knowledge distillation" in text and "per-layer" in text
    assert "pruned-openvino-int8 (PTQ): top-1 0.8950, 0.50 pts below pruned fp32 (0.9000) — served" in text
    assert training_summary(ModelInfo(name="m", num_classes=10), rows) is None


def test_qat_trains_and_exports_at_the_deployed_input_size(tmp_path):
    """model.input_size other than the model's own crop, without fine-tuning: QAT's QDQ ONNX takes the deployed
    size (the variants' parity batch), not the model's own 224 px."""
    from edgepipe.recipe import Recipe
    from edgepipe.steps import StepCache
    from edgepipe.train.models import build_model
    from edgepipe.train.stage import preprocess_at, qat_model
    import onnx
    recipe = Recipe.model_validate({
        "model": {"name": "efficientnet_lite0", "num_classes": 10, "input_size": 32},
        "data": {"train": "fashion-mnist", "val_split": 0.2},
        "stages": {"train": {"enabled": False, "max_train_images": 32, "max_val_images": 8, "batch_size": 16},
                   "quantize": {"method": "qat", "qat_epochs": 1, "qat_calibration_batches": 1}},
        "targets": [{"backend": "openvino", "precision": "int8"}]})
    spec = build_model("efficientnet_lite0", pretrained=True, num_classes=10)
    deployed = preprocess_at(spec.preprocess, 32, "fashion-mnist")
    assert spec.preprocess.crop == 224 and deployed.crop == 32
    check_batch = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    qat = qat_model(spec, "base", recipe, tmp_path, StepCache(tmp_path, lambda m: None), check_batch, deployed)
    dims = onnx.load(str(qat["onnx"])).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert qat["logits"].shape == (4, 10)
