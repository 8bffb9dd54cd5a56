"""Plain-text and markdown tables."""
from __future__ import annotations


def _is_number(text):
    stripped = text.replace(",", "").replace("×", "").replace("%", "").replace("+", "").replace("-", "", 1)
    return stripped.replace(".", "", 1).isdigit()


def format_table(headers, rows):
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]

    def line(cells, align_numbers=True):
        out = []
        for cell, width in zip(cells, widths):
            out.append(cell.rjust(width) if align_numbers and _is_number(cell) else cell.ljust(width))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line([str(h) for h in headers], False), rule] + [line(r) for r in rows])


def markdown_table(headers, rows):
    rows = [[str(cell) for cell in row] for row in rows]
    align = []
    for i in range(len(headers)):
        numeric = bool(rows) and all(_is_number(r[i]) or r[i] in ("", "n/a") for r in rows)
        align.append("---:" if numeric else "---")
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)
