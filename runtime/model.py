"""Classifier: a verified manifest variant + its preprocessing + one backend."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edgepipe.runtime.backends.base import create_backend
from edgepipe.runtime.device_records import device_record_for_this_machine
from edgepipe.runtime.errors import ManifestError
from edgepipe.runtime.integrity import verify_files
from edgepipe.runtime.preprocess import Preprocess
from edgepipe.runtime.signing import TrustStore, load_manifest, load_trust
from edgepipe.runtime.scores import softmax, top_k as best_k
from edgepipe.runtime.serving import choose, choose_for_dir


class Classifier:
    """Load a model folder written by `edgepipe run` and classify BGR frames.

    Everything about the serving model (manifest, variant, labels, preprocessing, backend) lives in one
    snapshot, so :meth:`reload` can verify and load a new variant completely before swapping it in with a
    single assignment; if anything about the new one is wrong, the old one keeps serving.
    """

    def __init__(self, model_dir: str | os.PathLike, variant: str | None = None, backend: str = "auto", *,
                 device: str | None = None, trust: TrustStore | None = None, requests: int = 1):
        """``device``: where the backend runs the model (OpenVINO: CPU, GPU, NPU, AUTO, HETERO:...); None: the
        variant's recorded ``device`` (recipe target), else the backend's default. ``trust``: the public keys the
        folder must be signed by (None: those configured here, see runtime/signing.py; NO_TRUST: none).
        ``requests``: calls that may run at once (the server's engine workers; backends that cannot overlap
        calls take them in turn)."""
        self.model_dir = Path(model_dir)
        self._trust = load_trust() if trust is None else trust
        self._backend_choice = backend
        self._device = device
        self.requests = requests
        self._active = self._prepare(variant, backend)

    def _prepare(self, variant: str | None, backend: str) -> SimpleNamespace:
        """Read the manifest (signature-checked when keys are configured), hash-check the variant's files, load
        and test them; touches nothing serving now."""
        manifest, verified = load_manifest(self.model_dir, self._trust)
        if verified is None:
            choice = choose_for_dir(self.model_dir, manifest, variant, backend, self._device)
        else:  # only device records the signature covers or this machine wrote
            record = device_record_for_this_machine(self.model_dir, manifest, verified)
            choice = choose(manifest, variant, backend, record, self._device)
        name, backend_name = choice.variant, choice.backend
        spec = manifest.variants[name]
        files = verify_files(self.model_dir, spec.files, name)  # before anything is loaded
        pre = manifest.preprocess
        labels = list(manifest.labels)
        backend_obj = create_backend(backend_name)
        backend_obj.requests = self.requests
        backend_obj.load(files, spec, device=self._device)
        _check_outputs(backend_obj, pre, labels, name)
        return SimpleNamespace(manifest=manifest, choice=choice, variant_name=name, backend_name=backend_name, variant=spec,
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
    choice = property(lambda self: self._active.choice)  # serving.Choice: why this variant, verified here or not
    variant_name = property(lambda self: self._active.variant_name)
    backend_name = property(lambda self: self._active.backend_name)
    variant = property(lambda self: self._active.variant)  # the manifest's Variant
    files = property(lambda self: self._active.files)  # the variant's files, hash-checked when loaded
    labels = property(lambda self: self._active.labels)
    preprocess = property(lambda self: self._active.preprocess)
    backend = property(lambda self: self._active.backend)
    @property
    def device(self) -> str | None:
        """Where the backend runs the model, when it says (OpenVINO: "CPU", "AUTO", ...; ONNX Runtime: CPU/CUDA)."""
        device = getattr(self._active.backend, "device", None)
        return device if isinstance(device, str) else None

    @property
    def dynamic_batch(self) -> bool:
        """Batches of any size? (an NPU compiles the model for batch 1 even when the variant's batch is dynamic)"""
        shape = getattr(self._active.backend, "input_shape", None) or self.variant.input_shape
        return shape[0] in (-1, None)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._active.backend.infer(batch)

    def classify(self, bgr: np.ndarray, top_k: int = 1) -> list[tuple[int, str, float]]:
        active = self._active  # one snapshot: a concurrent reload() cannot mix two variants in one answer
        probs = softmax(active.backend.infer(active.preprocess(bgr)))[0]
        idx = best_k(probs, top_k)
        return [(int(i), active.labels[i], float(probs[i])) for i in idx]


def _check_outputs(backend, pre: Preprocess, labels: list, name: str) -> None:
    """One warm-up inference that also checks the model's output count against the labels."""
    logits = backend.infer(np.zeros(pre.input_shape, np.float32))
    if logits.ndim != 2 or logits.shape[1] != len(labels):
        raise ManifestError(f"variant {name!r} outputs shape {tuple(logits.shape)} but the manifest "
                            f"has {len(labels)} labels; the artifact folder is inconsistent")

