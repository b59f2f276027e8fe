"""What every `--help` of edgepipe shows: defaults next to each flag, and the environment variables."""
from __future__ import annotations

import argparse

ENVIRONMENT = """environment variables:
  EDGEPIPE_THREADS=N     CPU threads for inference in OpenVINO and ONNX Runtime (unset: the library's default, every core)
  EDGEPIPE_OV_HINT=HINT  OpenVINO performance hint: LATENCY (default) or THROUGHPUT
  EDGEPIPE_OV_DEVICE=D   OpenVINO device: CPU (default), GPU, NPU, AUTO, ...
  EDGEPIPE_LOG=LEVEL     debug, info (default), warning or error; -v / -q override it
  EDGEPIPE_DEBUG=1       print the Python traceback of an I/O error instead of one line (as -v does)
  OPENCV_IO_MAX_IMAGE_PIXELS=N  images with more pixels are refused unread (default 268435456 = 16384^2)"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps epilog line breaks and appends "(default: X)" to every option that has a real default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and action.nargs != 0 and "default:" not in text and "(default" not in text
                and default is not None and default is not argparse.SUPPRESS):  # nargs 0: switches, nothing to show
            text += " (default: %(default)s)"
        return text
