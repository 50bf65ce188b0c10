"""The command, top of `detsweep.frontier`: flags, then read results.parquet, compute the front and
write frontier.parquet (+ replicates.parquet when seeds repeat), the PNG plots, report.md and report.html.

``python -m detsweep.frontier RESULTS.parquet [--objectives ap:max,...] [--out DIR] [--no-plots] [--no-html]``
Outputs go to a local folder or, for a URI (``s3://``, ``gs://``, ``file://``), through pyarrow.fs.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from detsweep.frontier.front import Frontier, compute_frontier, read_results, with_epoch
from detsweep.frontier.html import write_html
from detsweep.frontier.pareto import parse_objectives
from detsweep.frontier.plots import plot_frontier
from detsweep.frontier.report import render_markdown, render_stdout
from detsweep.storage import exists, filesystem, is_local, join, write_bytes_atomic, write_parquet_atomic

DEFAULT_OBJECTIVES = "ap:max,trainable_params:min,peak_vram_train_mb:min,ece:min"
METADATA_KEY = b"detsweep.frontier"  # schema metadata of frontier.parquet / replicates.parquet (JSON)


def _metadata(fr: Frontier, hypervolume: float | None) -> dict[bytes, bytes]:
    info = {"objectives": [str(o) for o in fr.objectives], "reference_point": fr.reference,
            "normalisation": [n.describe() for n in fr.norms], "hypervolume": hypervolume, "notes": fr.notes}
    return {METADATA_KEY: json.dumps(info).encode()}


def write_outputs(fr: Frontier, out: str | Path, plots: bool = True) -> list[str]:
    """Write frontier.parquet (+ replicates.parquet, PNGs) and report.md into ``out``, a local
    folder or a URI (through pyarrow.fs); return what was written. No plots when nothing is ranked."""
    out = str(out)
    written = [join(out, "frontier.parquet")]
    write_parquet_atomic(fr.table.replace_schema_metadata(_metadata(fr, fr.hypervolume)), written[0])
    replicates = join(out, "replicates.parquet")
    if fr.replicates is not None:
        meta = _metadata(fr, fr.replicates_hypervolume)
        write_parquet_atomic(fr.replicates.replace_schema_metadata(meta), replicates)
        written.append(replicates)
    elif exists(replicates):  # left by an earlier run that had seed replicates
        fs, path = filesystem(replicates)
        fs.delete_file(path)
    images = plot_frontier(fr) if plots and fr.valid.any() else {}
    for name, png in images.items():
        write_bytes_atomic(png, join(out, name))
        written.append(join(out, name))
    written.append(join(out, "report.md"))
    write_bytes_atomic(render_markdown(fr, list(images)).encode(), written[-1])
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detsweep.frontier",
        description="Pareto front of a sweep's results.parquet: writes frontier.parquet (pareto_rank, "
                    "dominated_by), replicates.parquet when seeds repeat, PNG plots and report.md.")
    p.add_argument("results", help="path or URI (s3://, gs://) of results.parquet")
    p.add_argument("--objectives", default=DEFAULT_OBJECTIVES,
                   help="comma-separated COLUMN:DIRECTION with DIRECTION in {max,min} (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="output folder, local or a URI written through pyarrow.fs (default: the results file's folder)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-html", action="store_true", help="skip report.html (the interactive, offline page)")
    p.add_argument("--use", choices=("best", "final"), default="best",
                   help="each trial's metrics at its best evaluation (eval.best_metric; default) or its final epoch")
    return p


def _output_folder(results: str, out: str | None) -> str:
    """``--out``, else the results file's folder; a local folder with ``~`` expanded."""
    if out is None:
        return str(Path(results).parent) if is_local(results) else results.rstrip("/").rsplit("/", 1)[0]
    return str(Path(out).expanduser()) if is_local(out) else out


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 for user errors, one line on stderr)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(levelname)s: %(message)s")
    # s3://, gs://, file:// are read through pyarrow.fs; a local path gets its ~ expanded.
    results = str(Path(args.results).expanduser()) if is_local(args.results) else args.results
    try:
        objectives = parse_objectives(args.objectives)
        fr = compute_frontier(with_epoch(read_results(results), args.use), objectives)
    except ValueError as e:  # FrontierError and bad objective specs: one line, exit 2
        print(f"detsweep.frontier: error: {e}", file=sys.stderr)
        return 2
    out = _output_folder(results, args.out)
    written = write_outputs(fr, out, plots=not args.no_plots)
    if not args.no_html:  # history.parquet and the checkpoint folders are in the results file's folder
        written.append(write_html(fr, _output_folder(results, None), out))
    sys.stdout.write(render_stdout(fr, written))
    return 0
