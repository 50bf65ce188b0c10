"""The sweep file and its trials; imports neither torch nor ray, so a sweep loads, expands and plans
on a laptop without either. One way through its modules:

typed (YAML values → frozen dataclasses) → spec (the sections, TrialConfig) → cost (prices) → rules
(value rules) → load (`load_sweep`) → grid (`expand`) → search (a `search:` space, its sampled trials)
→ {plan (resources, concurrency, the plan table), resume (trials.json), study (search.json)}.
"""
from __future__ import annotations

from detsweep.sweep.grid import expand
from detsweep.sweep.load import load_sweep, parse_sweep
from detsweep.sweep.spec import Sweep, TrialConfig
from detsweep.sweep.typed import SweepError

__all__ = ["Sweep", "SweepError", "TrialConfig", "expand", "load_sweep", "parse_sweep"]
