"""Classifier: a verified manifest variant + its preprocessing + one backend."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgepipe.runtime.backends.base import AUTO_ORDER, BACKENDS, can_load, create_backend, is_installed
from edgepipe.runtime.errors import BackendUnavailable, ManifestError
from edgepipe.runtime.manifest import load_manifest, verify_files
from edgepipe.runtime.preprocess import Preprocess


def choose_variant(manifest: dict, variant: str | None = None, backend: str = "auto") -> tuple[str, str]:
    """Pick (variant name, backend name) from what the manifest offers and what is installed here."""
    variants = manifest["variants"]
    if backend != "auto" and backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    if variant is not None:
        if variant not in variants:
            raise ManifestError(f"no variant {variant!r} in the manifest; available: {', '.join(variants)}")
        fmt = variants[variant]["format"]
        if backend != "auto":
            if not can_load(backend, fmt):
                raise BackendUnavailable(f"backend {backend!r} cannot run variant {variant!r} (format {fmt})")
            return variant, backend
        native = variants[variant]["backend"]
        order = [native] + [b for b in AUTO_ORDER if b != native]
        for name in order:
            if can_load(name, fmt) and is_installed(name):
                return variant, name
        raise BackendUnavailable(f"no installed backend can run variant {variant!r} (format {fmt}); "
                                 f"install {native}: pip install 'edgepipe[{native}]'")
    usable = {n: v for n, v in variants.items() if v.get("status", "ok") == "ok"}
    if not usable:
        raise ManifestError("every variant in the manifest is marked failed; nothing to serve")
    order = AUTO_ORDER if backend == "auto" else (backend,)
    for name in order:
        if not is_installed(name):
            continue
        default = manifest.get("defaults", {}).get(name) or manifest.get("default_variant")
        native = [n for n, v in usable.items() if v["backend"] == name]
        if default in native:
            return default, name
        if native:
            return native[0], name
    default = manifest.get("default_variant")
    if default in usable and backend != "auto" and can_load(backend, usable[default]["format"]) and is_installed(backend):
        return default, backend
    wanted = "any of " + ", ".join(AUTO_ORDER) if backend == "auto" else backend
    raise BackendUnavailable(f"no variant in the manifest runs on {wanted} installed here "
                             f"(variants: {', '.join(n + ' [' + v['backend'] + ']' for n, v in usable.items())})")


class Classifier:
    """Load a model folder written by `edgepipe run` and classify BGR frames."""

    def __init__(self, model_dir: str | os.PathLike, variant: str | None = None, backend: str = "auto"):
        self.model_dir = Path(model_dir)
        self.manifest = load_manifest(self.model_dir)
        self.variant_name, self.backend_name = choose_variant(self.manifest, variant, backend)
        self.variant = self.manifest["variants"][self.variant_name]
        self.labels = list(self.manifest["labels"])
        self.preprocess = Preprocess.from_manifest(self.manifest["preprocess"])
        files = verify_files(self.model_dir, self.variant, self.variant_name)  # before anything is loaded
        backend_obj = create_backend(self.backend_name)
        backend_obj.load(files, dict(self.variant, model_dir=str(self.model_dir)))
        self.backend = backend_obj
        self.batch_size = 1
        self._check_outputs()

    def _check_outputs(self) -> None:
        """One warm-up inference that also checks the model's output count against the labels."""
        logits = self.backend.infer(np.zeros(self.preprocess.input_shape, np.float32))
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise ManifestError(f"variant {self.variant_name!r} outputs shape {tuple(logits.shape)} but the manifest "
                                f"has {len(self.labels)} labels; the artifact folder is inconsistent")

    @property
    def dynamic_batch(self) -> bool:
        return self.variant["input_shape"][0] in (-1, None)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.backend.infer(batch)

    def classify(self, bgr: np.ndarray, top_k: int = 1) -> list[tuple[int, str, float]]:
        probs = softmax(self.backend.infer(self.preprocess(bgr)))[0]
        idx = np.argsort(-probs)[:top_k]
        return [(int(i), self.labels[i], float(probs[i])) for i in idx]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
