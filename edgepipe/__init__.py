"""edgepipe: put image classifiers on edge devices, small, fast and provably still accurate."""
import os
import sys

__version__ = "0.1.0"

# OpenVINO's model converter and NNCF send usage telemetry by default; edgepipe sends nothing (build hosts are
# often offline, and each event forked the whole build process, whose killed children printed tracebacks into
# the run's output). Both fall back to their no-op stubs when `openvino_telemetry` cannot be imported.
# EDGEPIPE_OPENVINO_TELEMETRY=1 leaves it to OpenVINO's own consent settings.
if os.environ.get("EDGEPIPE_OPENVINO_TELEMETRY") != "1":
    sys.modules.setdefault("openvino_telemetry", None)


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing file, ...). The CLI prints it as one line."""

    exit_code = 2
