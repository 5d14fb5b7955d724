"""Tables as text: fixed-width for a terminal, markdown for docs. Every report that prints or
writes a table (bench, and the jobs that come after it) renders it here."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """Columns padded to their widest cell, ``align[i]`` 'l' or 'r' per column; a dashed rule
    under the header."""
    widths = _widths(headers, rows, align)

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(w) if a == "l" else cell.rjust(w)
            for cell, w, a in zip(cells, widths, align, strict=True)
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A markdown table, ``align[i]`` 'l' or 'r' per column."""
    widths = _widths(headers, rows, align)
    rule = [
        "-" * max(w, 3) if a == "l" else "-" * (max(w, 3) - 1) + ":"
        for w, a in zip(widths, align, strict=True)
    ]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(rule), *(line(r) for r in rows)])


def _widths(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[int]:
    for row in (headers, *rows):
        if len(row) != len(align):
            raise ValueError(f"row {list(row)} has {len(row)} cells, expected {len(align)}")
    return [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
