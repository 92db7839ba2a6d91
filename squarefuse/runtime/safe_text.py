"""Text from user data (class names, video paths and ids) made safe for where we write it.

- CSV files, which people open in a spreadsheet: there a cell that starts with `=`, `+`, `-`, `@`,
  a tab or a carriage return is a formula (OWASP's "CSV injection": `=HYPERLINK(...)` runs when
  the file is opened). `csv_writer` writes every CSV file we make; it prefixes such cells with `'`,
  which spreadsheets take as "text follows" and do not show. Numbers stay numbers (`-0.5`).
  `csv_value` undoes the prefix where we read our own files back.
- Log lines and printed tables: `printable` escapes newlines and other control characters, so a
  file name cannot break a table row or fake a log line.
- matplotlib text: `plot_text` escapes `$`, so a name is drawn as written, never parsed as math
  (an unknown `$\\command$` in a class name used to make the whole plot, and the eval, fail).
- Markdown (report.md): `markdown_text` backslash-escapes what a renderer reads as HTML, a link or
  a code span, so a run folder named `<img src=x onerror=...>` is shown, not rendered;
  `markdown_code` makes a code span (a path, a command) that holds any text as written.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from typing import IO, Any

__all__ = ["csv_value", "csv_writer", "markdown_code", "markdown_text", "plot_text", "printable", "spreadsheet_cell"]

# What a spreadsheet reads as the start of a formula (OWASP), and our guard character itself, so
# that every guarded cell starts with exactly one `'` that `csv_value` can take off again.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
# What Markdown reads as raw HTML (`<`, `&`), a link or image (`[`, `]`), a code span, an escape.
_MARKDOWN_SPECIAL = re.compile(r"([\\`<>&\[\]])")


def spreadsheet_cell(value: Any) -> Any:
    """`value` as a CSV cell that a spreadsheet shows as written and never runs as a formula.

    Numbers (int, float, or text such as `-0.5` or `1e-05`) and None are returned unchanged;
    any other value as text, with `'` in front when it starts like a formula (or with `'`).
    """
    if value is None or isinstance(value, int | float):
        return value
    text = str(value)
    if text.startswith(_FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_value(cell: str) -> str:
    """The value `spreadsheet_cell` wrote as `cell`: for our own files read back (ids, paths)."""
    return cell[1:] if cell.startswith("'") else cell


class SafeCsvWriter:
    """`csv.writer` whose rows go through `spreadsheet_cell` (see the module docstring)."""

    def __init__(self, f: IO[str], **kwargs: Any) -> None:
        self._writer = csv.writer(f, **kwargs)

    def writerow(self, row: Iterable[Any]) -> None:
        self._writer.writerow([spreadsheet_cell(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def csv_writer(f: IO[str], **kwargs: Any) -> SafeCsvWriter:
    """The writer for every CSV file we make: `csv.writer(f, **kwargs)` with formula cells guarded."""
    return SafeCsvWriter(f, **kwargs)


def printable(value: Any) -> str:
    """`str(value)` with newlines, tabs and other control characters escaped (`\\n`, `\\x1b`), so it
    stays on its line in a log or a printed table."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def plot_text(value: Any) -> str:
    """`str(value)` for matplotlib: drawn as plain text, `$` included, never as math."""
    return str(value).replace("$", r"\$")


def markdown_text(value: Any) -> str:
    """`printable(value)` with the characters that Markdown reads as HTML, a link or a code span
    backslash-escaped: shown as written in a rendered report and still readable in a terminal."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", printable(value))


def markdown_code(value: Any) -> str:
    """`printable(value)` as a Markdown code span: shown as written, HTML included (the backtick fence is
    longer than any run of backticks inside, as CommonMark allows)."""
    text = printable(value)
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
