"""Guest- and client-chosen text made safe to show: on a terminal, in a log line, in ``ps``.

A cell can print terminal escape sequences (``\\x1b]52;c;...\\x07`` rewrites the clipboard,
others retitle the window or fake prompts); a REST client chooses the kernel id; a Hub user
name is anyone's. None of it reaches a terminal or a log line as control characters.
"""

from __future__ import annotations

import json
import re

# C0 controls but tab and newline, DEL, C1 controls (\x9b is a one-byte CSI), and the
# Unicode line/paragraph separators and bidi overrides that reorder what a terminal shows.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` for a terminal: control characters (except newline and tab) become ``?``;
    a carriage return before a newline is dropped."""
    return _CONTROL.sub("?", text.replace("\r\n", "\n"))


def escaped(value: object) -> str:
    """``value`` as a JSON string body: quotes, backslashes and every non-ASCII or
    control character escaped (for log lines, audit records and ``ps``)."""
    return json.dumps(str(value))[1:-1]
