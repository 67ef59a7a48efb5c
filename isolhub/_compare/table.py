"""Plain-text tables for the comparison report's text form.

Example:
    >>> print("\\n".join(table(("name", "max abs"), [("fc.weight", "0.5"), ("b", "0")])))
      name       max abs
      fc.weight  0.5
      b          0
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["table"]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """The lines of a table: `headers` then `rows`, columns padded to their widest cell."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = []
    for row in (headers, *rows):
        cells = [f"{str(x):<{w}}" for x, w in zip(row, widths, strict=True)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines
