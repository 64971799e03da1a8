"""One Markdown table writer for the benchmark scripts."""
from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[bool]) -> str:
    """Header line, alignment line (numeric columns right-aligned), one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if right else "---" for right in numeric) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def emit(text: str, out: str | None) -> str:
    """Print a benchmark's Markdown and, with `out`, write it to that file; returns the text."""
    print(text, end="")
    if out:
        with open(out, "w") as handle:
            handle.write(text)
    return text
