"""Shared by the benchmarks: replace one `## ` section of bench/RESULTS.md, leave the others; run
one measurement in a child process of its own."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n"


def child_json(cmd: list[str], what: str) -> dict:
    """Run `cmd` (a bench script in its worker mode) from the repo root and return the JSON object on
    its last stdout line; exit with its stderr's tail when it fails."""
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=RESULTS.parents[1])
    if out.returncode != 0:
        sys.exit(f"{what} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_section(title: str, text: str, path: Path = RESULTS) -> None:
    """Put `text` (which starts with `## {title}`) in place of the section of that title, or
    append it; sections are delimited by their `## ` headings."""
    old = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    body = text.rstrip() + "\n\n"
    new = pattern.sub(lambda _: body, old) if pattern.search(old) else old.rstrip() + "\n\n" + body
    path.write_text(new.rstrip() + "\n")
