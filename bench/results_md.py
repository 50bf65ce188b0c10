"""Shared by the benchmarks: replace one `## ` section of bench/RESULTS.md, leave the others."""
from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n"


def write_section(title: str, text: str, path: Path = RESULTS) -> None:
    """Put `text` (which starts with `## {title}`) in place of the section of that title, or
    append it; sections are delimited by their `## ` headings."""
    old = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    body = text.rstrip() + "\n\n"
    new = pattern.sub(lambda _: body, old) if pattern.search(old) else old.rstrip() + "\n\n" + body
    path.write_text(new.rstrip() + "\n")
