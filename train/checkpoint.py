"""Safe checkpoints: safetensors or ``torch.load(weights_only=True)``; never a blind unpickle.
Writes are atomic so an interrupted run never leaves a half checkpoint that looks complete."""
from __future__ import annotations

from pathlib import Path

import torch

from edgepipe import UserError
from edgepipe.atomic import atomic_path
from edgepipe.runtime.integrity import sha256_file


def load_state_dict(path: str | Path) -> tuple[dict, str]:
    """Return (state_dict, sha256). Accepts .safetensors, or a torch file holding tensors only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    digest = sha256_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), digest
        except Exception as exc:
            raise UserError(f"checkpoint {path} is not a valid safetensors file ({str(exc)[:120]})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"checkpoint {path} refused: it is not a plain tensor checkpoint "
                        f"(weights_only load failed: {msg}); re-save it as a state_dict or safetensors") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} does not hold a state_dict of tensors")
    return obj, digest


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Atomically save a dict of tensors / plain values (loadable with weights_only=True)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)
