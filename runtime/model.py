"""Classifier: a verified manifest variant + its preprocessing + one backend."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

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
        raise ManifestError("no variant in the manifest is verified (failed, unverified or pending-build); re-run `edgepipe run` or pick one with --variant")
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
    """Load a model folder written by `edgepipe run` and classify BGR frames.

    Everything about the serving model (manifest, variant, labels, preprocessing, backend) lives in one
    snapshot, so :meth:`reload` can verify and load a new variant completely before swapping it in with a
    single assignment; if anything about the new one is wrong, the old one keeps serving.
    """

    def __init__(self, model_dir: str | os.PathLike, variant: str | None = None, backend: str = "auto"):
        self.model_dir = Path(model_dir)
        self._backend_choice = backend
        self._active = self._prepare(variant, backend)

    def _prepare(self, variant: str | None, backend: str) -> SimpleNamespace:
        """Read the manifest, hash-check the variant's files, load and test them; touches nothing serving now."""
        manifest = load_manifest(self.model_dir)
        name, backend_name = choose_variant(manifest, variant, backend)
        spec = manifest["variants"][name]
        files = verify_files(self.model_dir, spec, name)  # before anything is loaded
        pre = Preprocess.from_manifest(manifest["preprocess"])
        labels = list(manifest["labels"])
        backend_obj = create_backend(backend_name)
        backend_obj.load(files, dict(spec, model_dir=str(self.model_dir)))
        _check_outputs(backend_obj, pre, labels, name)
        return SimpleNamespace(manifest=manifest, variant_name=name, backend_name=backend_name, variant=spec,
                               files=files, labels=labels, preprocess=pre, backend=backend_obj)

    def reload(self, variant: str | None = None, backend: str | None = None) -> str:
        """Switch to ``variant`` (None: the manifest's default, re-read from disk) without a gap in service.

        The new variant is verified (sha256), loaded and test-run first; only then does it replace the
        serving one. On any error the error is raised and the previous variant keeps serving.
        Returns the name of the variant now serving.
        """
        self._active = self._prepare(variant, backend or self._backend_choice)
        return self._active.variant_name

    manifest = property(lambda self: self._active.manifest)
    variant_name = property(lambda self: self._active.variant_name)
    backend_name = property(lambda self: self._active.backend_name)
    variant = property(lambda self: self._active.variant)
    files = property(lambda self: self._active.files)  # the variant's files, hash-checked when loaded
    labels = property(lambda self: self._active.labels)
    preprocess = property(lambda self: self._active.preprocess)
    backend = property(lambda self: self._active.backend)

    @property
    def dynamic_batch(self) -> bool:
        return self.variant["input_shape"][0] in (-1, None)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._active.backend.infer(batch)

    def classify(self, bgr: np.ndarray, top_k: int = 1) -> list[tuple[int, str, float]]:
        active = self._active  # one snapshot: a concurrent reload() cannot mix two variants in one answer
        probs = softmax(active.backend.infer(active.preprocess(bgr)))[0]
        idx = np.argsort(-probs)[:top_k]
        return [(int(i), active.labels[i], float(probs[i])) for i in idx]


def _check_outputs(backend, pre: Preprocess, labels: list, name: str) -> None:
    """One warm-up inference that also checks the model's output count against the labels."""
    logits = backend.infer(np.zeros(pre.input_shape, np.float32))
    if logits.ndim != 2 or logits.shape[1] != len(labels):
        raise ManifestError(f"variant {name!r} outputs shape {tuple(logits.shape)} but the manifest "
                            f"has {len(labels)} labels; the artifact folder is inconsistent")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
