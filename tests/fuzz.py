"""Fuzz edgepipe's loaders: every random or damaged input must give a clean result or a one-line error.

    python tests/fuzz.py --model ARTIFACT_DIR --seconds 300 [--kinds recipe,manifest,image,video,model]

Kinds and the real code each goes through:

- recipe:   ``load_recipe`` on random bytes, damaged recipe text, or a recipe with a value of the wrong type;
- manifest: ``Classifier`` on a copy of ARTIFACT_DIR whose manifest.json is random or damaged;
- image:    ``read_image`` + the manifest's preprocessing on random or damaged JPEG/PNG bytes;
- video:    OpenCV's capture (what runtime/camera.py reads files with) + preprocessing on random or damaged mp4;
- model:    ``Classifier`` on a folder where one model file (.onnx, .xml, .bin) is random or damaged and its
            sha256 in the manifest updated to match, so the bytes reach ONNX Runtime / OpenVINO;
- record:   the serving policy (``choose_for_dir``) and ``edgepipe info``'s reader on a folder whose device
            record (devices/<this machine>.json) is random, damaged, of the wrong types, nested 100000 deep, a
            FIFO or a folder: the record is used or ignored with one line, never a hang or another exception;
- labels:   ``read_labels`` (the labels sidecar of an ONNX source) on random, damaged or deeply nested files.

"Clean" means the loader returns, or raises :class:`edgepipe.UserError` with a one-line message. Anything else
is a finding: another exception, a crash of the process (segfault), or no answer within ``--timeout``. Each
input runs in a worker process, so a crash or hang is recorded (the input is kept under ``--keep``) and the run
goes on. tests/test_reliability.py runs the same generators in-process, 30 seeded inputs per kind, in their
``safe`` form (no byte flips inside model graphs, image headers or video headers, which could make a library
allocate gigabytes or crash the test process); this script flips bytes everywhere unless given ``--safe``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

KINDS = ("recipe", "manifest", "image", "video", "model", "record", "labels")
# values of the wrong type or meaning, put in place of a valid one
WEIRD = [None, True, 0, -1, 2 ** 63, 1e308, float("nan"), "", "x", "../../etc/passwd", "/etc/passwd", "a\x00b",
         "é" * 3, [], {}, [1, 2, 3], {"k": None}, [[[]]]]
SEED_RECIPE = """name: fuzz
model: {name: efficientnet_lite0, pretrained: true, input_size: 224}
data:
  calibration: {source: generated, count: 16, limit: 8}
  parity_images: 8
  on_bad_image: skip
stages:
  train: {enabled: false, epochs: 1, lr: 0.01, optimizer: sgd}
  prune: {enabled: false, macs_reduction: 0.4}
  quantize: {enabled: true, method: ptq}
export: {opset: 17, dynamic_batch: true}
targets:
  - {backend: onnxruntime, precision: fp32}
  - {backend: openvino, precision: int8}
bench: {warmup: 2, iterations: 10}
budgets:
  - {variants: "*", top1_drop_max: 1.0}
profiles:
  quick: {bench: {iterations: 5}}
"""


# ---------------------------------------------------------------- generators

def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice((0, 1, 7, 64, 512, 4096, 65536)))


def mutate_bytes(rng: random.Random, data: bytes, start: int = 0, end: int | None = None) -> bytes:
    """Flip bytes, truncate, insert random bytes or duplicate a chunk, somewhere in ``data[start:end]``."""
    data = bytearray(data)
    lo, hi = min(start, len(data)), len(data) if end is None else min(end, len(data))
    op = rng.choice(("flip", "truncate", "insert", "duplicate")) if hi > lo else "insert"
    if op == "truncate":
        return bytes(data[:rng.randint(lo, hi)])
    if op == "flip":
        for _ in range(rng.randint(1, 32)):
            data[rng.randrange(lo, hi)] = rng.randrange(256)
        return bytes(data)
    i = rng.randint(lo, hi)
    if op == "insert":
        return bytes(data[:i] + rng.randbytes(rng.randint(1, 256)) + data[i:])
    j = rng.randint(i, min(hi, i + 4096))
    return bytes(data[:j] + data[i:j] + data[j:])


def _json_paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        if prefix[-1:] == ("labels",) and key != 0:
            continue  # 1000 labels would drown every other field
        yield from _json_paths(value, prefix + (key,))


def mutate_tree(rng: random.Random, obj):
    """A copy of a JSON/YAML tree with one value replaced by a value of another type, or one key removed/added."""
    obj = json.loads(json.dumps(obj))
    path = rng.choice([p for p in _json_paths(obj) if p])
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    op = rng.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    elif op < 0.25 and isinstance(parent, dict):
        parent[rng.choice(("extra", "modle", path[-1] + "_"))] = rng.choice(WEIRD)
    else:
        parent[path[-1]] = rng.choice(WEIRD)
    return obj


def rehash(model_dir: Path) -> None:
    """Rewrite every file entry's sha256/bytes in manifest.json to the files as they are now."""
    from edgepipe.runtime.integrity import sha256_file
    from edgepipe.runtime.manifest import MANIFEST_NAME
    path = Path(model_dir) / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for variant in manifest["variants"].values():
        for entry in variant["files"]:
            f = Path(model_dir) / entry["path"]
            if f.is_file():
                entry["sha256"], entry["bytes"] = sha256_file(f), f.stat().st_size
    path.write_text(json.dumps(manifest, indent=1))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _usable_variants(template: Path) -> dict:
    """The template's servable variants (name -> Variant), read through the typed manifest."""
    from edgepipe.runtime.manifest import Manifest
    return {n: v for n, v in Manifest.load(template).variants.items() if v.status == "ok"}


def make_input(kind: str, rng: random.Random, work: Path, template: Path, video: Path | None = None,
               safe: bool = True) -> tuple[Path, str | None]:
    """Write one fuzzed input of ``kind`` under ``work`` (an empty folder); return (target, variant) for check()."""
    work.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((template / "manifest.json").read_text())  # raw JSON: what gets damaged on purpose
    if kind == "recipe":
        import yaml
        style = rng.random()
        if style < 0.3:
            data = random_bytes(rng)
        elif style < 0.6:
            data = mutate_bytes(rng, SEED_RECIPE.encode())
        else:
            data = yaml.safe_dump(mutate_tree(rng, yaml.safe_load(SEED_RECIPE)), allow_unicode=True).encode()
        (work / "recipe.yaml").write_bytes(data)
        return work / "recipe.yaml", None
    if kind == "manifest":
        for variant in _usable_variants(template).values():
            for entry in variant.files:
                _link(template / entry.path, work / entry.path)
        style = rng.random()
        if style < 0.2:
            data = random_bytes(rng)
        elif style < 0.4:
            data = mutate_bytes(rng, json.dumps(manifest).encode())
        else:
            data = json.dumps(mutate_tree(rng, manifest)).encode()
        (work / "manifest.json").write_bytes(data)
        return work, None
    if kind == "image":
        import cv2
        photos = sorted(template.glob("calibration/*.jpg"))
        photo = cv2.imread(str(photos[0])) if photos else _frame()
        ext = rng.choice((".jpg", ".png"))
        real = cv2.imencode(ext, photo)[1].tobytes()
        data = random_bytes(rng) if rng.random() < 0.3 else mutate_bytes(rng, real, start=1024 if safe else 0)
        (work / f"image{ext}").write_bytes(data)
        return work / f"image{ext}", None
    if kind == "video":
        real = Path(video).read_bytes()
        # safe: only the frame data in the middle (the mp4 header and index hold the frame size)
        data = random_bytes(rng) if rng.random() < 0.3 else (
            mutate_bytes(rng, real, len(real) // 8, len(real) * 7 // 8) if safe else mutate_bytes(rng, real))
        (work / "video.mp4").write_bytes(data)
        return work / "video.mp4", None
    if kind == "model":
        name = rng.choice(list(_usable_variants(template)))
        manifest["variants"] = {name: manifest["variants"][name]}
        manifest.pop("defaults", None)
        manifest["default_variant"] = name
        entries = manifest["variants"][name]["files"]
        victim = rng.choice(entries)["path"]
        for entry in entries:
            if entry["path"] != victim:
                _link(template / entry["path"], work / entry["path"])
        real = (template / victim).read_bytes()
        style = rng.random()
        if style < 0.4:
            data = random_bytes(rng)
        elif style < 0.8 or safe:
            data = real[:rng.randint(0, len(real) - 1)]
        else:
            data = mutate_bytes(rng, real)
        (work / victim).parent.mkdir(parents=True, exist_ok=True)
        (work / victim).write_bytes(data)
        (work / "manifest.json").write_text(json.dumps(manifest))
        rehash(work)
        return work, name
    if kind == "record":
        _link(template / "manifest.json", work / "manifest.json")
        return _damaged_record(rng, work, template), None
    if kind == "labels":
        return _damaged_labels(rng, work, manifest["labels"]), None
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def _nested(rng: random.Random) -> bytes:
    n = rng.choice((65, 1000, 100000))
    return (b'{"variants": ' * n + b"1" + b"}" * n) if rng.random() < 0.5 else b"[" * n + b"]" * n


def _damaged_record(rng: random.Random, work: Path, template: Path) -> Path:
    """devices/<this machine>.json, valid for the template's variants, then damaged (or replaced by a special file)."""
    from edgepipe.runtime.device_records import machine_id, record_path, variant_fingerprint
    path = record_path(work, machine_id())
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format_version": 1, "machine_id": machine_id(), "variants": {
        n: {"backend": v.backend, "verdict": rng.choice(("pass", "fail")), "fingerprint": variant_fingerprint(v),
            "latency_ms": {"p90": rng.uniform(0.5, 50)}} for n, v in _usable_variants(template).items()}}
    style = rng.random()
    if style < 0.15:
        os.mkfifo(path) if style < 0.1 else path.mkdir()       # special files: rsync -a copies FIFOs
    else:
        path.write_bytes(_nested(rng) if style < 0.3 else random_bytes(rng) if style < 0.45 else
                         mutate_bytes(rng, json.dumps(record).encode()) if style < 0.6 else
                         json.dumps(mutate_tree(rng, record)).encode())
    return work


def _damaged_labels(rng: random.Random, work: Path, labels: list) -> Path:
    path = work / rng.choice(("labels.json", "labels.txt"))
    real = json.dumps(labels).encode() if path.suffix == ".json" else "\n".join(labels).encode()
    style = rng.random()
    if style < 0.1:
        os.mkfifo(path)
    elif style < 0.3:
        path.write_bytes(_nested(rng))
    elif style < 0.5:
        path.write_bytes(random_bytes(rng))
    elif style < 0.75:
        path.write_bytes(mutate_bytes(rng, real))
    else:
        path.write_text(json.dumps(mutate_tree(rng, {"labels": labels}).get("labels")))
    return path


# ---------------------------------------------------------------- checks (the real loaders)

def _frame():
    import numpy as np
    y, x = np.mgrid[0:240, 0:320]
    return np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def _check_recipe(path: Path, variant) -> str:
    from edgepipe.recipe import load_recipe
    load_recipe(path)
    return "ok"


def _check_classifier(path: Path, variant) -> str:
    from edgepipe.runtime.model import Classifier
    clf = Classifier(path, variant=variant)
    (index, label, score), = clf.classify(_frame())
    assert 0 <= index < len(clf.labels) and label == clf.labels[index]
    return f"ok {clf.variant_name}"


def _check_image(path: Path, variant) -> str:
    from edgepipe.runtime.evaluate import read_image
    from edgepipe.runtime.preprocess import Preprocess
    img = read_image(path)
    if img is None:
        return "skipped: unreadable image"
    batch = Preprocess()(img)
    assert batch.shape == (1, 3, 224, 224) and batch.dtype.name == "float32", batch.shape
    return "ok"


def _check_video(path: Path, variant) -> str:
    import cv2

    from edgepipe.runtime.preprocess import Preprocess
    pre = Preprocess()
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return "refused: cannot open"
        frames = 0
        for _ in range(64):
            ok, frame = cap.read()
            if not ok:
                break
            assert pre(frame).shape == (1, 3, 224, 224)
            frames += 1
        return f"ok {frames} frames"
    finally:
        cap.release()


def _check_record(path: Path, variant) -> str:
    from edgepipe.info import describe, folder_info
    from edgepipe.runtime.manifest import Manifest
    from edgepipe.runtime.serving import choose_for_dir
    from edgepipe.runtime.device_records import device_record_for_this_machine
    manifest = Manifest.load(path)
    choice = choose_for_dir(path, manifest)
    info = folder_info(path)
    assert choice.variant in manifest.variants and info["auto"]["variant"] == choice.variant
    describe(info)                                   # what `edgepipe info` prints
    used = device_record_for_this_machine(path, manifest) is not None
    return f"ok {choice.variant}" if used else "ignored: record unusable"


def _check_labels(path: Path, variant) -> str:
    from edgepipe.compile.onnx_source import read_labels
    labels = read_labels(path)
    assert labels and all(isinstance(x, str) and x for x in labels)
    return "ok"


CHECKS = {"recipe": _check_recipe, "manifest": _check_classifier, "image": _check_image, "video": _check_video,
          "model": _check_classifier, "record": _check_record, "labels": _check_labels}


def check(kind: str, target, variant: str | None = None) -> str:
    """Run the real loader on one input. Returns "ok ..." / "refused: <one line>"; anything else raises."""
    from edgepipe import UserError
    try:
        return CHECKS[kind](Path(target), variant)
    except UserError as exc:
        message = str(exc)
        if not message or "\n" in message:
            raise AssertionError(f"{kind}: error message is not one line: {message!r}") from exc
        return f"refused: {message}"


# ---------------------------------------------------------------- isolated long run

def _worker(conn) -> None:
    while True:
        task = conn.recv()
        try:
            conn.send(("ok", check(*task)))
        except Exception as exc:  # a finding: report it and keep serving
            conn.send(("error", f"{type(exc).__name__}: {str(exc)[:500]}"))


class Worker:
    """One process that runs checks; killed and replaced when it crashes or hangs."""

    def __init__(self):
        self.ctx = multiprocessing.get_context("spawn")
        self._start()

    def _start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()  # so a dead worker reads as end-of-file here at once

    def run(self, task, timeout: float) -> tuple[str, str]:
        if not self.proc.is_alive():  # died between tasks
            self._start()
        self.conn.send(task)
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except (EOFError, OSError):  # the worker died while answering
                pass
        hung = self.proc.is_alive()
        self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        self._start()
        return ("hang", f"no answer in {timeout:.0f}s") if hung else ("crash", f"worker died (exit code {code})")

    def close(self):
        self.proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a valid artifact folder (the template; it is never modified)")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120, help="seconds one input may take before it counts as a hang")
    p.add_argument("--video", help="a valid video to damage (default: a generated one)")
    p.add_argument("--keep", default="fuzz-findings", help="folder for the inputs that gave findings")
    p.add_argument("--safe", action="store_true", help="only the generators the tests use")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    template = Path(args.model)
    if not (template / "manifest.json").is_file():
        p.error(f"{template} has no manifest.json; pass an --out folder of `edgepipe run`")
    # damaged image headers can claim huge sizes; cap what OpenCV will allocate in the worker
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 26))
    work = Path(tempfile.mkdtemp(prefix="edgepipe-fuzz-"))
    video = args.video
    if video is None and "video" in kinds:
        from edgepipe.compile.calibration import make_demo_video
        video = make_demo_video(work / "seed.mp4", frames_per_photo=2, size=(320, 240))
    worker = Worker()
    counts = {k: Counter() for k in kinds}
    findings = []
    deadline = time.monotonic() + args.seconds
    i = 0
    try:
        while time.monotonic() < deadline:
            kind = kinds[i % len(kinds)]
            case = work / f"case-{i}"
            target, variant = make_input(kind, random.Random(f"{args.seed}-{i}"), case, template, video, safe=args.safe)
            status, detail = worker.run((kind, str(target), variant), args.timeout)
            counts[kind][detail.split(":")[0].split(" ")[0] if status == "ok" else status] += 1
            if status != "ok":
                kept = Path(args.keep) / f"{kind}-{args.seed}-{i}"
                shutil.copytree(case, kept, dirs_exist_ok=True)
                findings.append({"kind": kind, "input": i, "status": status, "detail": detail, "kept": str(kept)})
                print(f"FINDING {kind} #{i}: {status}: {detail} (input kept in {kept})", flush=True)
            shutil.rmtree(case, ignore_errors=True)
            i += 1
    finally:
        worker.close()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"inputs": i, "seconds": args.seconds, "findings": len(findings),
                      "outcomes": {k: dict(c) for k, c in counts.items()}}), flush=True)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
