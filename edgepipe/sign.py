"""`edgepipe keygen NAME` and `edgepipe sign DIR --key KEY.pem`: ed25519 keys and signed artifact folders.

The statement signed holds the manifest's sha256 (the manifest holds every file's sha256) and the sha256 of
each device record present, so the signature covers every file the runtime loads and every record it may
follow. Before signing, every listed file is checked against the manifest: a folder that was already changed
is never signed. Verification lives in the runtime (runtime/signing.py). docs/verify.md.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from edgepipe import UserError
from edgepipe.runtime.device_records import RECORD_DIR
from edgepipe.runtime.integrity import verify_files
from edgepipe.runtime.manifest import MANIFEST_NAME, Manifest
from edgepipe.runtime.signing import (DOMAIN, SIGNATURE_FORMAT, SIGNATURE_NAME, canonical, key_id, crypto_modules)



def load_private_key(path) -> object:
    serialization, ed25519 = crypto_modules()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"signing key {path} cannot be read ({exc.strerror or exc}); make one with `edgepipe keygen NAME`") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UserError(f"signing key {path} is encrypted; give an unencrypted PEM key "
                        "(`openssl pkey -in KEY.pem -out plain.pem`) kept on the build host only") from None
    except ValueError:
        raise UserError(f"{path} is not a PEM private key; make one with `edgepipe keygen NAME` or "
                        "`openssl genpkey -algorithm ed25519 -out KEY.pem`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UserError(f"signing key {path} is not an ed25519 key; `openssl genpkey -algorithm ed25519 -out KEY.pem`")
    return key


def keygen(name: str, out_dir=".") -> tuple[Path, Path]:
    """NAME.pem (private, mode 0600: stays on the build host) and NAME.pub (public: goes to the devices)."""
    serialization, ed25519 = crypto_modules()
    out = Path(out_dir)
    private, public = out / f"{name}.pem", out / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise UserError(f"{path} exists; choose another NAME or remove it (a key is never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _check_files(root: Path, manifest: Manifest) -> int:
    """Every file the manifest lists that is present matches its sha256 (pending TensorRT engines are absent)."""
    count = 0
    for name, v in manifest.variants.items():
        files = [f for f in v.files if v.status != "pending-build" or (root / f.path).is_file()]
        count += len(verify_files(root, files, name))
    ref = manifest.reference_set
    if ref is not None:
        entries = [ref.inputs, *ref.logits.values()]
        count += len(verify_files(root, entries, "reference set"))
    return count


def sign_folder(model_dir, key_path, signer: str | None = None) -> dict:
    """Check the folder's files, then write DIR/signature.json; returns the statement signed."""
    from edgepipe.atomic import write_json
    root = Path(model_dir)
    key = load_private_key(key_path)
    Manifest.load(root)  # the usual one-line errors for a missing or damaged manifest
    data = (root / MANIFEST_NAME).read_bytes()  # the bytes checked are the bytes signed
    manifest = Manifest.from_dict(json.loads(data.decode("utf-8")), str(root / MANIFEST_NAME))
    files = _check_files(root, manifest)
    records = {f"{RECORD_DIR}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted((root / RECORD_DIR).glob("*.json")) if p.is_file()}
    statement = {"format": SIGNATURE_FORMAT, "manifest": MANIFEST_NAME,
                 "manifest_sha256": hashlib.sha256(data).hexdigest(), "files_checked": files,
                 "device_records": records, "signer": signer or Path(key_path).stem,
                 "key_id": key_id(key.public_key()),
                 "signed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": manifest.model.name}
    signature = base64.b64encode(key.sign(DOMAIN + canonical(statement))).decode()
    write_json(root / SIGNATURE_NAME, {"statement": statement, "algorithm": "ed25519", "signature": signature})
    return statement


def cmd_keygen(args) -> int:
    private, public = keygen(args.name, args.out)
    print(f"private key: {private} (keep it on the build host; sign with `edgepipe sign DIR --key {private}`)")
    print(f"public key:  {public} (copy it to each device's ~/.config/edgepipe/trusted_keys/ or pass --trust)")
    return 0


def cmd_sign(args) -> int:
    st = sign_folder(args.dir, args.key, args.name)
    print(f"signed {args.dir}/{MANIFEST_NAME} (sha256 {st['manifest_sha256'][:12]}..., {st['files_checked']} files "
          f"checked, {len(st['device_records'])} device records covered) with key {st['key_id']} ({st['signer']})")
    return 0


def add_commands(sub) -> None:
    """Register `keygen` and `sign` on the CLI's subparsers."""
    k = sub.add_parser("keygen", help="make an ed25519 key pair for signing artifact folders (NAME.pem, NAME.pub)")
    k.add_argument("name", nargs="?", default="edgepipe-signing", help="file name stem of the key pair")
    k.add_argument("--out", default=".", help="folder to write NAME.pem and NAME.pub into")
    k.set_defaults(fn=cmd_keygen)
    s = sub.add_parser("sign", help="sign an artifact folder's manifest (ed25519); devices with trusted keys "
                                    "refuse unsigned or changed folders")
    s.add_argument("dir", help="artifact folder with manifest.json")
    s.add_argument("--key", required=True, help="ed25519 private key (PEM), e.g. from `edgepipe keygen`")
    s.add_argument("--name", help="signer name recorded in the signature (default: the key file's stem)")
    s.set_defaults(fn=cmd_sign)
