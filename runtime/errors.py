"""Errors the runtime raises; all are :class:`edgepipe.UserError`, printed as one line by the CLIs."""
from edgepipe import UserError


class ManifestError(UserError):
    """manifest.json is missing, malformed or inconsistent with the model."""


class IntegrityError(ManifestError):
    """A file's sha256 differs from the manifest: refused before loading."""


class BackendUnavailable(UserError):
    """The backend's library is not installed here."""


class InputMismatch(UserError, ValueError):
    """Input of the wrong shape/dtype reached a backend, or a frame is not an image (also a ValueError)."""


class OutputFailed(UserError):
    """The machine refused to write an output (disk full, file too large, read-only, I/O error): exit 1, as the
    CLIs' OSError lines; the message names the file."""

    exit_code = 1
