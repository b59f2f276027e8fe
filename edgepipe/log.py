"""How much edgepipe prints: progress lines at INFO, details at DEBUG, warnings and errors always.

The level comes from ``-v`` / ``-q`` on the command line, else from ``EDGEPIPE_LOG`` (debug, info, warning,
error), else INFO. Library code prints progress through :func:`progress` so ``-q`` silences it everywhere.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
ENV = "EDGEPIPE_LOG"

logger = logging.getLogger("edgepipe")


def env_level(environ=os.environ) -> int:
    """The level EDGEPIPE_LOG asks for (INFO when unset); a value it does not know is an error (UserError)."""
    raw = (environ.get(ENV) or "info").strip().lower()
    if raw not in LEVELS:
        from edgepipe import UserError
        raise UserError(f"{ENV}={raw!r} is not a log level; use one of {', '.join(LEVELS)}")
    return LEVELS[raw]


def level_from(verbose: int = 0, quiet: int = 0, environ=os.environ) -> int:
    """-v: DEBUG; -q: WARNING; -qq: ERROR; neither: EDGEPIPE_LOG (default INFO)."""
    if verbose:
        return logging.DEBUG
    if quiet:
        return logging.WARNING if quiet == 1 else logging.ERROR
    return env_level(environ)


def configure(level: int) -> None:
    """Set edgepipe's level; warnings of the libraries underneath (NNCF, ONNX Runtime quantization) show at
    -v only when they are informational."""
    logger.setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if level <= logging.DEBUG else logging.WARNING)
    # importing NNCF's torch backend makes torch warn "No CUDA runtime is found" on every CPU-only host
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.NOTSET if level <= logging.DEBUG else logging.ERROR)


@contextlib.contextmanager
def library_output():
    """Keep what a library prints itself (NNCF's rich progress bars) out of our output, unless -v; when the
    call fails, what it printed follows on stderr."""
    if logger.getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        sys.stderr.write(buf.getvalue())
        raise


def progress(msg: str) -> None:
    """A progress line on stdout, unless the level is above INFO (-q)."""
    if logger.getEffectiveLevel() <= logging.INFO:
        print(msg, flush=True)


def debug(msg: str) -> None:
    """A detail line on stdout, shown only at DEBUG (-v or EDGEPIPE_LOG=debug)."""
    if logger.getEffectiveLevel() <= logging.DEBUG:
        print(msg, flush=True)


def _initial_level() -> None:
    raw = (os.environ.get(ENV) or "").strip().lower()
    if raw in LEVELS:  # a bad value is reported by the CLI; library users keep INFO
        logger.setLevel(LEVELS[raw])
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


_initial_level()
