"""Issue 27: signed artifact folders. With trusted keys configured the runtime, verify and camera refuse an
unsigned folder, one signed by another key, or one changed after signing, in one line; without keys nothing
changes. Device records count under trusted keys only when signed or written by this machine.
Real ed25519 (cryptography), real OpenVINO through the real CLI."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_edgepipe


@pytest.fixture()
def env(tmp_path) -> dict:
    """A private config folder (no trusted keys, no device key) for every command."""
    return {"XDG_CONFIG_HOME": str(tmp_path / "config"), "EDGEPIPE_TRUSTED_KEYS": ""}


@pytest.fixture()
def folder(tiny_artifacts, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_artifacts, dst, ignore=shutil.ignore_patterns("devices", ".edgepipe*", "calibration", "heldout"))
    return dst


@pytest.fixture()
def keys(tmp_path, env) -> dict:
    out = {}
    for name in ("build", "other"):
        proc = run_edgepipe("keygen", name, "--out", tmp_path / "keys", env=env)
        assert proc.returncode == 0, proc.stderr
        out[name] = (tmp_path / "keys" / f"{name}.pem", tmp_path / "keys" / f"{name}.pub")
    assert oct((tmp_path / "keys" / "build.pem").stat().st_mode & 0o777) == "0o600"
    return out


def one_line_refusal(proc, *words) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def verify(folder, env, *extra):
    return run_edgepipe("verify", folder, "--variant", "openvino-fp32", "--iterations", "2", *extra, env=env)


def test_a_signed_folder_serves_and_a_changed_one_is_refused(folder, keys, env, tmp_path):
    private, public = keys["build"]
    proc = run_edgepipe("sign", folder, "--key", private, "--name", "fleet build host", env=env)
    assert proc.returncode == 0 and "signed" in proc.stdout, proc.stderr
    # trusted by --trust: verify passes, the camera serves
    assert verify(folder, env, "--trust", public).returncode == 0
    images = tmp_path / "frames"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.full((64, 64, 3), 120, np.uint8))
    cam = run_edgepipe("camera", "--model", folder, "--source", images, "--variant", "openvino-fp32",
                       "--max-frames", "1", "--trust", public, env=env)
    assert cam.returncode == 0, cam.stderr[-2000:]
    # info says who signed, and whether this machine trusts it
    info = json.loads(run_edgepipe("info", folder, "--json", env=dict(env, EDGEPIPE_TRUSTED_KEYS=str(public))).stdout)
    assert info["signature"]["signer"] == "fleet build host" and info["signature"]["trusted"] is True
    text = run_edgepipe("info", folder, env=env).stdout
    assert "signature: fleet build host" in text and "no trusted keys configured here" in text

    # one byte of a model file changed and its sha256 rewritten in the manifest: the signature no longer holds
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(f for f in manifest["variants"]["openvino-fp32"]["files"] if f["path"].endswith(".bin"))
    data = bytearray((folder / entry["path"]).read_bytes())
    data[len(data) // 2] ^= 1
    (folder / entry["path"]).unlink()
    (folder / entry["path"]).write_bytes(bytes(data))
    entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    one_line_refusal(verify(folder, env, "--trust", public), "changed after it was signed")
    one_line_refusal(run_edgepipe("camera", "--model", folder, "--source", images, "--max-frames", "1",
                                  env=dict(env, EDGEPIPE_TRUSTED_KEYS=str(public))), "changed after it was signed")
    # without trusted keys: today's behaviour (the files match the rewritten manifest)
    assert verify(folder, env).returncode == 0


def test_unsigned_or_foreign_folders_are_refused_when_keys_are_configured(folder, keys, env):
    _, public = keys["build"]
    trust_dir = Path(env["XDG_CONFIG_HOME"]) / "edgepipe" / "trusted_keys"
    assert verify(folder, env).returncode == 0  # no keys: an unsigned folder is served as before
    trust_dir.mkdir(parents=True)
    shutil.copy(public, trust_dir / "build.pub")  # the user's config folder
    one_line_refusal(verify(folder, env), "not signed", "edgepipe sign")
    one_line_refusal(run_edgepipe("eval", folder, "--data", folder, env=env), "not signed")
    # signed by a key this machine does not trust
    assert run_edgepipe("sign", folder, "--key", keys["other"][0], env=env).returncode == 0
    one_line_refusal(verify(folder, env), "not trusted here")
    # a signature whose statement was edited does not verify
    assert run_edgepipe("sign", folder, "--key", keys["build"][0], env=env).returncode == 0
    assert verify(folder, env).returncode == 0
    sig = json.loads((folder / "signature.json").read_text())
    sig["statement"]["signer"] = "someone else"
    (folder / "signature.json").write_text(json.dumps(sig))
    one_line_refusal(verify(folder, env), "does not verify")
    # a private key given as a trusted key, or a missing one: one line, never silently unchecked
    one_line_refusal(verify(folder, env, "--trust", keys["build"][0]), "private key")
    one_line_refusal(verify(folder, dict(env, EDGEPIPE_TRUSTED_KEYS=str(folder / "nope.pub"))), "does not exist")


def test_device_records_count_only_when_signed_or_written_here(folder, keys, env, monkeypatch):
    from edgepipe.runtime.model import Classifier
    from edgepipe.runtime.signing import load_trust
    private, public = keys["build"]
    assert run_edgepipe("sign", folder, "--key", private, env=env).returncode == 0
    assert verify(folder, env, "--trust", public).returncode == 0  # writes this machine's record, with its MAC
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    trust = load_trust([str(public)])
    assert Classifier(folder, trust=trust).choice.verified_here is True
    # the record rewritten by whoever can write the folder (no key of this machine): ignored under trust
    record_path = next((folder / "devices").glob("*.json"))
    record = json.loads(record_path.read_text())
    record.pop("authentication")
    record_path.write_text(json.dumps(record))
    assert Classifier(folder, trust=trust).choice.verified_here is None
    from edgepipe.runtime.signing import NO_TRUST
    assert Classifier(folder, trust=NO_TRUST).choice.verified_here is True  # no keys: read as before
    # signed after verify: the signature covers the record, so it counts without this machine's key
    assert run_edgepipe("sign", folder, "--key", private, env=env).returncode == 0
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder.parent / "another-config"))
    assert Classifier(folder, trust=trust).choice.verified_here is True


def test_an_engine_built_on_the_device_leaves_the_signed_manifest_alone(folder, keys, env, monkeypatch):
    """`edgepipe build-engine` in a signed folder records the engine in this machine's MAC'd engine record
    (runtime/engine_records.py), never in manifest.json: the signature still verifies and readers see the
    engine; a record edited by hand, or for an engine not built from a signed source, is ignored. (TensorRT is
    not installed here: the engine file is plain bytes that only have their hash checked.)"""
    from edgepipe.runtime.engine_records import save_built_engine, set_engine_default
    from edgepipe.runtime.errors import IntegrityError
    from edgepipe.runtime.integrity import FileEntry, verify_files
    from edgepipe.runtime.manifest import Variant
    from edgepipe.runtime.signing import load_manifest, load_trust
    private, public = keys["build"]
    data = json.loads((folder / "manifest.json").read_text())
    source = data["variants"]["onnxruntime-fp32"]["files"][0]
    data["variants"]["tensorrt-int8"] = dict(backend="tensorrt", precision="int8", format="engine", files=[source],
                                             input_shape=data["variants"]["onnxruntime-fp32"]["input_shape"],
                                             status="pending-build", quantization="ptq")
    (folder / "manifest.json").write_text(json.dumps(data, indent=2))
    assert run_edgepipe("sign", folder, "--key", private, env=env).returncode == 0
    signed_bytes = (folder / "manifest.json").read_bytes()
    monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
    monkeypatch.setenv("EDGEPIPE_TRUSTED_KEYS", str(public))
    engine = folder / "tensorrt-int8" / "model.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"bytes standing for a serialized engine")

    def built(source_sha: str) -> Variant:
        return Variant("tensorrt", "int8", "engine", [FileEntry.of(folder, engine)], [1, 3, 224, 224], status="ok",
                       quantization="ptq", tensorrt={"source_onnx_sha256": source_sha, "typing": "weak"})
    record = save_built_engine(folder, "tensorrt-int8", built(source["sha256"]))
    assert record.parent == folder / "devices" / "engines" and (folder / "manifest.json").read_bytes() == signed_bytes
    assert "tensorrt" not in load_manifest(folder, load_trust())[0].defaults   # default only once verified here
    assert set_engine_default(folder, "tensorrt-int8") == record
    assert (folder / "manifest.json").read_bytes() == signed_bytes
    manifest, verified = load_manifest(folder, load_trust())   # the signature still verifies
    v = manifest.variants["tensorrt-int8"]
    assert verified and v.status == "ok" and v.files[0].path == "tensorrt-int8/model.engine"
    assert manifest.defaults["tensorrt"] == "tensorrt-int8" and verify_files(folder, v.files, "tensorrt-int8")
    from edgepipe.info import folder_info   # `edgepipe info` shows the engine built here, not "pending-build"
    shown = {row["name"]: row for row in folder_info(folder)["variants"]}
    assert shown["tensorrt-int8"]["status"] == "ok" and folder_info(folder)["defaults"]["tensorrt"] == "tensorrt-int8"
    # edited by whoever can write the folder (the MAC no longer checks): ignored, the signed record stands
    text = json.loads(record.read_text())
    text["variants"]["tensorrt-int8"]["input_shape"] = [8, 3, 224, 224]
    record.write_text(json.dumps(text))
    assert load_manifest(folder, load_trust())[0].variants["tensorrt-int8"].status == "pending-build"
    # MAC'd here, but not built from a source ONNX the signature covers: ignored
    save_built_engine(folder, "tensorrt-int8", built("0" * 64))
    assert load_manifest(folder, load_trust())[0].variants["tensorrt-int8"].status == "pending-build"
    # the engine changed after its record was written: the integrity check refuses it before it is read
    save_built_engine(folder, "tensorrt-int8", built(source["sha256"]))
    engine.write_bytes(b"another engine")
    with pytest.raises(IntegrityError, match="model.engine"):
        verify_files(folder, load_manifest(folder, load_trust())[0].variants["tensorrt-int8"].files, "tensorrt-int8")
