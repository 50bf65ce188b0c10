"""A search's study across runs of the driver: `<root>/search.json` holds the search a run started with,
and `--resume` is refused when the search has changed since (the restored searcher continues the Optuna
study it saved, which a changed space, sampler or objective would not match) or when Tune's saved state
cannot be restored. Torch-free and Ray-free."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from detsweep.storage import join, read_text, write_bytes_atomic
from detsweep.sweep.resume import cut_short_tune_state
from detsweep.sweep.spec import Sweep
from detsweep.sweep.typed import SweepError

SEARCH_FILE = "search.json"


def _plain_search(sweep: Sweep) -> dict[str, Any]:
    return json.loads(json.dumps({"search": dataclasses.asdict(sweep.search), "grid": sweep.grid}))


def save_search(root: str, sweep: Sweep) -> None:
    """`<root>/search.json`: the search a run starts with (the trials are sampled as it runs)."""
    write_bytes_atomic(json.dumps(_plain_search(sweep), indent=1).encode(), join(root, SEARCH_FILE))


def check_search_resume(root: str, sweep: Sweep) -> None:
    """Refuse a --resume whose search differs from the one the run started with: the restored searcher
    continues the study it saved, which a changed space, sampler or objective would not match."""
    cut = cut_short_tune_state(root)
    if cut is not None:
        raise SweepError(f"--resume: {cut.path} is cut short: the driver stopped while Ray was writing Tune's state, "
                         f"and Tune cannot restore a search from it (the finished trials are in results.parquet); "
                         f"pass --fresh to start over, or --output-dir for another folder")
    uri = join(root, SEARCH_FILE)
    text = read_text(uri)
    if text is None:
        raise SweepError(f"--resume: {uri} is missing, so the search this run started with is unknown (a grid run, "
                         f"or an older detsweep); pass --fresh to start over, or --output-dir for another folder")
    saved, now = json.loads(text), _plain_search(sweep)
    for section in ("search", "grid"):
        for key in sorted({*saved.get(section, {}), *now[section]}):
            was, new = saved.get(section, {}).get(key), now[section].get(key)
            if was != new:
                raise SweepError(f"--resume: the search changed since the run in {root} started: {section}.{key} "
                                 f"was {was!r}, is now {new!r}; pass --fresh to start over, or --output-dir for "
                                 f"another folder")
