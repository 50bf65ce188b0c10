"""The dataset doctor, `python -m detsweep.data check`: every check of `check.py` on every split
(each image decoded), then a summary table, the findings, a per-class instance table, a JSON report
and an exit status: 0 clean (warnings allowed), 1 problems, 2 unusable."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detsweep.data.check import KINDS, DataError, SplitCheck
from detsweep.data.prepare import check_source
from detsweep.data.sources import SPLITS, Source

EXIT = {"clean": 0, "problems": 1, "unusable": 2}
_SEVERITY_TITLES = {"problem": "problems (data.on_invalid: error refuses the run; skip drops them)",
                    "warning": "warnings", "info": "notes"}


@dataclass
class Report:
    source: Source | None
    checks: dict[str, SplitCheck] = field(default_factory=dict)
    error: str | None = None  # the unusable input's one line

    @property
    def status(self) -> str:
        if self.error is not None:
            return "unusable"
        return "problems" if self.count("problem") else "clean"

    @property
    def exit_code(self) -> int:
        return EXIT[self.status]

    def findings(self, severity: str | None = None) -> list:
        return [f for sc in self.checks.values() for f in sc.findings.values()
                if severity is None or f.info.severity == severity]

    def count(self, severity: str) -> int:
        return len(self.findings(severity))


def diagnose(source: Source, *, decode: bool = True, workers: int | None = None, progress: bool = True) -> Report:
    """Every check on every split of `source`; an unusable file or folder gives a report with `error`."""
    report = Report(source)
    try:
        report.checks = check_source(source, splits=SPLITS, image_check="decode" if decode else "header",
                                     workers=workers, progress=progress, cache="off")
    except DataError as e:
        report.error = str(e)
    return report


def class_rows(checks: dict[str, SplitCheck]) -> list[dict[str, Any]]:
    """Per category (train's, then any other split's): id, name, non-crowd instances per split."""
    names: dict[int, str] = {}
    for sc in checks.values():
        for cid, name in sc.categories.items():
            names.setdefault(cid, name)
    return [{"id": cid, "name": names[cid],
             **{s: (checks[s].instances.get(cid, 0) if s in checks else None) for s in SPLITS}}
            for cid in sorted(names)]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in cells]


def format_report(report: Report) -> str:
    """The terminal report: the splits, a summary table, findings by severity, classes, the verdict."""
    lines = [f"dataset: {report.source.describe()}" if report.source else "dataset: ?"]
    if report.source:
        for name, split in report.source.splits.items():
            mode = report.checks[name].image_check if name in report.checks else "-"
            lines.append(f"  {name:<5}  {split.annotations}  images {split.images}  (image check: {mode})")
    if report.error:
        lines += ["", f"unusable: {report.error}", "result: unusable (exit 2)"]
        return "\n".join(lines)
    rows = [[name, sc.counts["images"], sc.counts["annotations"], sc.counts["crowd"],
             sc.counts["images_without_objects"], len(sc.categories),
             sum(f.count for f in sc.findings.values() if f.info.severity == "problem"),
             sum(f.count for f in sc.findings.values() if f.info.severity == "warning")]
            for name, sc in report.checks.items()]
    lines += [""] + _table(["split", "images", "boxes", "crowd", "no objects", "classes", "problems", "warnings"],
                           rows)
    for severity, title in _SEVERITY_TITLES.items():
        found = report.findings(severity)
        if found:
            lines += ["", f"{title}:"]
            lines += [f"  {f.split:<5}  {f.info.field}: {f.count} {f.info.what}, e.g. {', '.join(f.examples)}"
                      for f in found]
    classes = class_rows(report.checks)
    lines += ["", "instances per class (non-crowd):"]
    lines += ["  " + ln for ln in _table(["class", "id", *report.checks],
                                         [[c["name"], c["id"], *(c[s] for s in report.checks)] for c in classes])]
    n_p, n_w = report.count("problem"), report.count("warning")
    lines += ["", f"result: {report.status}: {n_p} kinds of problem, {n_w} kinds of warning "
                  f"(exit {report.exit_code})"]
    return "\n".join(lines)


def report_json(report: Report) -> dict[str, Any]:
    """The machine-readable report (`--json`)."""
    source = None
    if report.source:
        source = {"format": report.source.format, "detected": report.source.detected,
                  "root": str(report.source.root) if report.source.root else None,
                  "splits": {n: {"annotations": str(s.annotations), "images": str(s.images)}
                             for n, s in report.source.splits.items()}}
    splits = {name: {**sc.counts, "classes": len(sc.categories), "image_check": sc.image_check,
                     "findings": [{"kind": f.kind, "severity": f.info.severity, "file": f.file, "field": f.info.field,
                                   "what": f.info.what, "count": f.count, "examples": f.examples,
                                   "on_invalid_skip_drops": f.info.drops if f.info.severity == "problem" else None}
                                  for f in sc.findings.values()]}
              for name, sc in report.checks.items()}
    return {"status": report.status, "exit_code": report.exit_code, "error": report.error, "source": source,
            "splits": splits, "classes": class_rows(report.checks), "kinds": sorted(KINDS)}


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_json(report), indent=1) + "\n")
