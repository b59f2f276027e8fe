"""A name that is not there, with the closest one that is: the one wording of every "unknown key / field
(did you mean ...?)" check, for the recipe and budgets (build side) as for the manifest and streams files (the
device). Plain Python, so the device install has it."""
from __future__ import annotations

import difflib
from typing import Callable, Iterable


def did_you_mean(name, known: Iterable[str], *, cutoff: float = 0.6, quote: bool = True, otherwise: str = "") -> str:
    """" (did you mean 'x'?)" for the one of ``known`` closest to ``name`` (difflib, ``cutoff``); ``otherwise``
    when none is close enough."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=cutoff)
    if not close:
        return otherwise
    return f" (did you mean {close[0]!r}?)" if quote else f" (did you mean {close[0]}?)"


def refuse_unknown(keys: Iterable, allowed, error: Callable[[object, str], Exception], **hint) -> None:
    """Raise ``error(key, did_you_mean(key, allowed, **hint))`` for the first of ``keys`` not in ``allowed``."""
    for key in keys:
        if key not in allowed:
            raise error(key, did_you_mean(key, allowed, **hint))
