"""Text from a worker, made safe for a terminal: control characters escaped, visibly.

A worker's output, error messages, tracebacks, docstrings and names are hostile text under a
sandbox: raw escape sequences in them would set the window title, write the clipboard (OSC 52),
clear the screen or hide lines. Every such string is passed through `escape_controls` before it
is printed or put into an error; newlines and tabs stay (unless `keep_lines=False`), everything
else that steers a terminal becomes its Python escape (`\\x1b`, `\\x9b`, `\\u202e`).

Example:
    >>> escape_controls("title\\x1b]0;pwned\\x07\\tok\\n")
    'title\\\\x1b]0;pwned\\\\x07\\tok\\n'
"""

from __future__ import annotations

import functools
import re

__all__ = ["escape_any", "escape_controls"]

# C0, DEL, C1 (0x9b is a one-byte CSI), and the bidi/zero-width controls that make text
# display in another order than it reads.
_CONTROLS = "\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2066-\u2069"


@functools.cache
def _pattern(keep: str) -> re.Pattern[str]:
    return re.compile(f"(?![{re.escape(keep)}])[{_CONTROLS}]" if keep else f"[{_CONTROLS}]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str, *, keep_lines: bool = True, keep_cr: bool = False) -> str:
    """`text` with every terminal control character escaped.

    `keep_lines`: newlines and tabs stay as they are. `keep_cr`: so do carriage returns (for a
    trusted worker's progress bars; a hostile one could overwrite a line with them).
    """
    keep = ("\n\t" if keep_lines else "") + ("\r" if keep_cr else "")
    return _pattern(keep).sub(_escaped, text)


def escape_any(value: object, *, keep_lines: bool = True) -> str:
    """`str(value)`, escaped (for values a worker sent that are printed whatever their type)."""
    return escape_controls(value if isinstance(value, str) else str(value), keep_lines=keep_lines)
