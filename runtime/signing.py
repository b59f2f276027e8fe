"""Signed artifact folders: who built this model, checked before anything loads.

The sha256 manifest proves integrity, not origin: whoever can write the folder can rewrite the hashes. So the
build host signs a statement about the folder with an ed25519 key (`edgepipe sign DIR --key KEY.pem`):

    signature.json = {"statement": {manifest_sha256, device_records, signer, key_id, signed_at, ...},
                      "algorithm": "ed25519", "signature": base64(sign(DOMAIN + canonical JSON(statement)))}

The manifest holds every file's sha256, so the signature covers every file the runtime loads. Device records
(devices/*.json, written by `edgepipe verify`) steer which variant auto serves; with trusted keys configured a
record counts only when the signature covers it (present when the folder was signed) or when this machine
wrote it (an HMAC with a key that never leaves the machine, in the user's config folder). A record copied in
from elsewhere or written by whoever can write the folder is ignored: the build host's default is served.

Trusted public keys, the first of these that is set: ``--trust KEY`` (verify, camera), EDGEPIPE_TRUSTED_KEYS
(paths separated by ``os.pathsep``; files or folders of *.pub/*.pem), the folder
``$XDG_CONFIG_HOME/edgepipe/trusted_keys`` (~/.config/edgepipe/trusted_keys). No keys: nothing is checked
(folders are served as before). Keys configured: an unsigned folder, or one signed by another key, or one
changed after signing is refused in one line before any model file is read.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from edgepipe.runtime.errors import ManifestError
from edgepipe.runtime.manifest import MANIFEST_NAME, Manifest

SIGNATURE_NAME = "signature.json"
SIGNATURE_FORMAT = 1
DOMAIN = b"edgepipe-folder-signature-v1\n"   # a signature made for anything else never verifies as a folder's
ENV_TRUSTED_KEYS = "EDGEPIPE_TRUSTED_KEYS"
RECORD_MAC_FIELD = "authentication"
MAX_SIGNATURE_BYTES = 1 << 20


class SignatureError(ManifestError):
    """The folder is unsigned, signed by an untrusted key, or changed after it was signed (exit 2)."""


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "edgepipe"


def crypto_modules():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError:
        raise SignatureError("signed folders need the cryptography package: pip install cryptography") from None
    return serialization, ed25519


def key_id(public_key) -> str:
    """Fingerprint of an ed25519 public key: sha256 of its 32 raw bytes, first 16 hex digits."""
    serialization, _ = crypto_modules()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ---------------------------------------------------------------- trusted keys

@dataclass(frozen=True)
class TrustedKey:
    name: str        # the key file's stem (e.g. "fleet-build" for fleet-build.pub)
    key_id: str
    public_key: object
    path: str


@dataclass(frozen=True)
class TrustStore:
    keys: tuple = ()
    source: str = "none"   # where the keys came from, for messages

    @property
    def active(self) -> bool:
        return bool(self.keys)

    def find(self, kid: str) -> TrustedKey | None:
        return next((k for k in self.keys if k.key_id == kid), None)


NO_TRUST = TrustStore()   # explicitly nothing to check (the build host measuring the folder it is writing)


def _public_key(path: Path) -> TrustedKey:
    serialization, ed25519 = crypto_modules()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"trusted key {path} cannot be read ({exc.strerror or exc})") from None
    if b"PRIVATE KEY" in data:
        raise SignatureError(f"trusted key {path} is a private key; trust the public key instead "
                             "(`edgepipe keygen` writes NAME.pub next to NAME.pem)")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SignatureError(f"trusted key {path} is not a PEM public key; make one with `edgepipe keygen NAME` "
                             "or `openssl pkey -in KEY.pem -pubout -out KEY.pub`") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"trusted key {path} is not an ed25519 key; edgepipe signs with ed25519 only")
    return TrustedKey(path.stem, key_id(key), key, str(path))


def _key_files(entry: str) -> list[Path]:
    path = Path(entry).expanduser()
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".pub", ".pem") and p.is_file())
    if path.is_file():
        return [path]
    raise SignatureError(f"trusted key {entry} does not exist; give a public key file (.pub) or a folder of them")


def load_trust(paths: list[str] | None = None) -> TrustStore:
    """The trusted keys: ``paths`` (--trust) if given, else EDGEPIPE_TRUSTED_KEYS, else the config folder."""
    if paths:
        entries, source = list(paths), "--trust"
    elif os.environ.get(ENV_TRUSTED_KEYS, "").strip():
        entries = [p for p in os.environ[ENV_TRUSTED_KEYS].split(os.pathsep) if p.strip()]
        source = ENV_TRUSTED_KEYS
    else:
        folder = config_dir() / "trusted_keys"
        if not folder.is_dir():
            return NO_TRUST
        entries, source = [str(folder)], str(folder)
    keys = [_public_key(p) for e in entries for p in _key_files(e)]
    if not keys and source != str(config_dir() / "trusted_keys"):
        raise SignatureError(f"{source} names no public key files (.pub/.pem); give the build host's public key")
    return TrustStore(tuple(keys), source)


# ---------------------------------------------------------------- verifying a folder

def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Verified:
    """A folder whose manifest a trusted key signed."""
    signer: str               # the trusted key's name here
    key_id: str
    signed_at: str
    manifest: Manifest
    device_records: dict = field(default_factory=dict)   # devices/<id>.json -> sha256 of its bytes, signed


def read_signature(model_dir: Path) -> dict | None:
    """signature.json parsed (structure checked, not the signature), or None when the folder has none."""
    path = Path(model_dir) / SIGNATURE_NAME
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_SIGNATURE_BYTES:
            raise ValueError("too large")
        sig = json.loads(path.read_text(encoding="utf-8"))
        statement = sig["statement"]
        if not isinstance(statement, dict) or sig.get("algorithm") != "ed25519" or not isinstance(sig.get("signature"), str):
            raise ValueError("not an ed25519 signature")
        for key in ("manifest_sha256", "key_id", "signer", "signed_at"):
            if not isinstance(statement.get(key), str):
                raise ValueError(f"statement.{key} missing")
        if not isinstance(statement.get("device_records", {}), dict):
            raise ValueError("statement.device_records is not an object")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SignatureError(f"{path} is not a valid edgepipe signature ({exc}); re-sign the folder with "
                             "`edgepipe sign DIR --key KEY.pem`") from None
    return sig


def verify_folder(model_dir, trust: TrustStore) -> Verified:
    """Check the folder's signature against ``trust`` (active) and parse the manifest from the bytes checked."""
    root = Path(model_dir)
    Manifest.load(root)  # the usual one-line errors for a missing folder or manifest
    data = (root / MANIFEST_NAME).read_bytes()
    sig = read_signature(root)
    if sig is None:
        raise SignatureError(f"{root} is not signed but trusted keys are configured ({trust.source}); sign it on "
                             f"the build host with `edgepipe sign DIR --key KEY.pem`")
    st = sig["statement"]
    key = trust.find(st["key_id"])
    if key is None:
        raise SignatureError(f"{root} is signed by key {st['key_id']} ({st['signer']!r}), which is not trusted here "
                             f"({trust.source}: {', '.join(k.key_id for k in trust.keys)}); refusing it")
    from cryptography.exceptions import InvalidSignature
    try:
        key.public_key.verify(base64.b64decode(sig["signature"], validate=True), DOMAIN + canonical(st))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{root}/{SIGNATURE_NAME} does not verify with trusted key {key.name} ({key.key_id}): "
                             "the signature or its statement was altered; refusing the folder") from None
    if hashlib.sha256(data).hexdigest() != st["manifest_sha256"]:
        raise SignatureError(f"{root}/{MANIFEST_NAME} changed after it was signed by {key.name} ({key.key_id}); "
                             "refusing it (rebuild and re-sign on the build host)")
    manifest = Manifest.from_dict(json.loads(data.decode("utf-8")), str(root / MANIFEST_NAME))
    return Verified(key.name, key.key_id, st["signed_at"], manifest, dict(st.get("device_records") or {}))


def load_manifest(model_dir, trust: TrustStore | None = None) -> tuple[Manifest, Verified | None]:
    """The folder's manifest, checked against the trusted keys when any are configured (None: from the
    environment / config folder); (manifest, None) when no keys are configured. Engines this machine built
    for a signed folder are laid over it (runtime/engine_records.py)."""
    from edgepipe.runtime.engine_records import with_built_engines
    trust = load_trust() if trust is None else trust
    if not trust.active:
        return with_built_engines(model_dir, Manifest.load(model_dir)), None
    verified = verify_folder(model_dir, trust)
    return with_built_engines(model_dir, verified.manifest, verified), verified


# ---------------------------------------------------------------- device records

def _device_secret(create: bool) -> bytes | None:
    """This machine's key for its own device records (32 random bytes, mode 0600, in the config folder)."""
    path = config_dir() / "device-record.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        if not create:
            return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        secret = secrets.token_bytes(32)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret.hex())
        return secret
    except FileExistsError:
        return _device_secret(False)
    except OSError:
        return None   # a read-only home: the record is written without a MAC (used only without trusted keys)


def _record_mac(secret: bytes, record: dict) -> str:
    body = {k: v for k, v in record.items() if k != RECORD_MAC_FIELD}
    return hmac.new(secret, canonical(body), hashlib.sha256).hexdigest()


def authenticate_record(record: dict) -> dict:
    """``record`` with a MAC by this machine's key, so serving can tell it from a record copied into the folder."""
    secret = _device_secret(create=True)
    if secret is None:
        return record
    return dict(record, **{RECORD_MAC_FIELD: {"method": "hmac-sha256", "key": "this machine's device-record.key",
                                               "mac": _record_mac(secret, dict(record))}})


def record_is_trusted(rel_path: str, data: bytes, record: dict, verified: Verified) -> bool:
    """A device record counts under trusted keys when the signature covers its bytes or this machine wrote it."""
    return verified.device_records.get(rel_path) == hashlib.sha256(data).hexdigest() or written_here(record)


def written_here(record: dict) -> bool:
    """Does ``record`` carry a MAC by this machine's device-record key (a record this machine wrote)?"""
    mac = (record.get(RECORD_MAC_FIELD) or {}).get("mac") if isinstance(record.get(RECORD_MAC_FIELD), dict) else None
    secret = _device_secret(create=False)
    return bool(secret and isinstance(mac, str) and hmac.compare_digest(mac, _record_mac(secret, record)))


def describe(model_dir, trust: TrustStore | None = None) -> dict:
    """Who signed the folder and whether the keys trusted here accept it (for `edgepipe info`)."""
    try:
        sig = read_signature(Path(model_dir))
    except SignatureError as exc:
        return {"signed": False, "error": str(exc)}
    if sig is None:
        return {"signed": False}
    st = sig["statement"]
    out = {"signed": True, "signer": st["signer"], "key_id": st["key_id"], "signed_at": st["signed_at"],
           "device_records_covered": len(st.get("device_records") or {})}
    try:
        trust = load_trust() if trust is None else trust
        if trust.active:
            verified = verify_folder(model_dir, trust)
            out.update(trusted=True, trusted_as=verified.signer)
        else:
            out["trusted"] = None   # no keys configured here
    except ManifestError as exc:
        out.update(trusted=False, error=str(exc))
    return out
