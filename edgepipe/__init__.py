"""edgepipe: put image classifiers on edge devices, small, fast and provably still accurate."""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing file, ...). The CLI prints it as one line."""

    exit_code = 2
