"""Text from outside (class names, candidate names) is data wherever it lands: Markdown tables
and prose, and the HTML they render to. Only what could break out is changed, so ordinary names
read the same in a terminal."""

from __future__ import annotations

import html

_ONE_CELL = str.maketrans({"|": "\\|", "`": "'", "\n": " ", "\r": " "})


def markdown_text(value: object) -> str:
    """``value`` as literal text on one line of Markdown (a table cell included): no table
    breaks, no HTML tags, no code spans."""
    return html.escape(str(value), quote=False).translate(_ONE_CELL)


def markdown_code(value: object) -> str:
    """``value`` as inline code (whose content renderers already show literally)."""
    return f"`{str(value).translate(_ONE_CELL)}`"


def one_line(value: object, chars: int) -> str:
    """``value`` as one line of at most ``chars`` characters for a terminal or a one-line error:
    control characters and runs of white space become one space, the end is cut with an ellipsis."""
    line = " ".join("".join(c if c.isprintable() else " " for c in str(value)).split())
    return line if len(line) <= chars else line[: chars - 1] + "…"
