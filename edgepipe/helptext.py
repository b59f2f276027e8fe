"""What every `--help` of edgepipe shows: defaults next to each flag, and the environment variables."""
from __future__ import annotations

import argparse
import difflib
import sys

ENVIRONMENT = """environment variables:
  EDGEPIPE_THREADS=N     CPU threads for inference in OpenVINO and ONNX Runtime (unset: the library's default, every core)
  EDGEPIPE_OV_HINT=HINT  OpenVINO performance hint: LATENCY (default) or THROUGHPUT
  EDGEPIPE_OV_DEVICE=D   OpenVINO device: CPU (default), GPU, NPU, AUTO, ...
  EDGEPIPE_LOG=LEVEL     debug, info (default), warning or error; -v / -q override it
  EDGEPIPE_TRUSTED_KEYS=K  public keys (files/folders, ':'-separated) a folder must be signed by (docs/verify.md)
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse that answers a mistyped flag with its close match ("--dta: did you mean --data?"), like the
    recipe and budget keys do. Subcommands' parsers are of this class too (argparse copies the class)."""

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        super().error(message + self._flag_hints())

    def _flag_hints(self) -> str:
        given, parser = getattr(self, "_given", []), self
        for action in self._actions:  # at the top: the flags of the subcommand given
            if isinstance(action, argparse._SubParsersAction):
                chosen = next((a for a in given if a in action.choices), None)
                parser = action.choices[chosen] if chosen else parser
        known = {o for p in {self, parser} for a in p._actions for o in a.option_strings}
        hints = []
        for flag in dict.fromkeys(t.split("=", 1)[0] for t in given if t.startswith("--") and len(t) > 2):
            close = difflib.get_close_matches(flag, sorted(known), n=1) if flag not in known else []
            if close:
                hints.append(f"{flag}: did you mean {close[0]}?")
        return ("; " + "; ".join(hints)) if hints else ""
