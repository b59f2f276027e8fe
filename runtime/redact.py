"""Credentials never leave the process: a camera URL's password (``rtsp://admin:PASS@cam/...``), a token as the
URL's user name, or a secret query parameter (``?password=``, ``&token=`` ...) is shown as ``***`` in every
line printed and every file written (summary, stats, JSONL, errors). The real URL is only handed to the
library that opens it."""
from __future__ import annotations

import re

# scheme://user:password@  or  scheme://token@  (up to the last @ before the path)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^\s/?#'\"]*)@")
_SECRET_PARAM = re.compile(r"(?P<key>[?&;](?:password|passwd|pass|pwd|token|access_token|auth|api_?key|key|secret|"
                           r"sig|signature|credentials?)=)[^&#\s'\"]*", re.IGNORECASE)


def _userinfo(match: re.Match) -> str:
    user, colon, _ = match["info"].partition(":")
    return f"{match['scheme']}{user}:***@" if colon else f"{match['scheme']}***@"


def mask_secrets(text: str) -> str:
    """``text`` with every URL credential replaced by ``***`` (any text: a URL, a log line, an error)."""
    if "://" not in text and "=" not in text:
        return text
    return _SECRET_PARAM.sub(lambda m: m["key"] + "***", _USERINFO.sub(_userinfo, text))
