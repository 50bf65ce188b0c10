"""Pareto front of a sweep's results: ``python -m detsweep.frontier RESULTS.parquet`` (see cli.py).

Modules, each importing only those before it:
pareto (objectives, dominance, ranks, hypervolume, seed replicates; numpy) → front (read a results
table, rank it: `Frontier`) → plots (PNG) and report (report.md, terminal summary) → cli (flags, writes).
"""
from detsweep.frontier.cli import DEFAULT_OBJECTIVES, METADATA_KEY, main, write_outputs
from detsweep.frontier.front import Frontier, FrontierError, compute_frontier, read_results
from detsweep.frontier.pareto import Objective, parse_objectives

__all__ = ["DEFAULT_OBJECTIVES", "METADATA_KEY", "Frontier", "FrontierError", "Objective", "compute_frontier",
           "main", "parse_objectives", "read_results", "write_outputs"]
