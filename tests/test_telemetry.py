"""edgepipe sends no usage telemetry: OpenVINO's converter and NNCF get their no-op stubs (checked in a fresh
interpreter, outside pytest, where NNCF would otherwise send)."""
from __future__ import annotations

import os
import subprocess
import sys

CHECK = """
import edgepipe
import nncf.telemetry.wrapper as nncf_telemetry
import openvino.tools.ovc.convert_impl as ovc
print(type(nncf_telemetry.telemetry).__name__, ovc.tm.__name__)  # NNCF's stub is a MagicMock
"""


def _run(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("NNCF_CI", "NNCF_DEV", "EDGEPIPE_OPENVINO_TELEMETRY")}
    out = subprocess.run([sys.executable, "-c", CHECK], env={**env, **env_extra}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_openvino_and_nncf_telemetry_are_stubs():
    nncf_kind, ovc_module = _run({})
    assert nncf_kind != "NNCFTelemetry" and ovc_module.endswith("telemetry_stub")


def test_telemetry_is_openvinos_business_when_asked():
    nncf_kind, ovc_module = _run({"EDGEPIPE_OPENVINO_TELEMETRY": "1"})
    assert nncf_kind == "NNCFTelemetry" and ovc_module == "openvino_telemetry"
