"""Pretraining the bases a sweep fine-tunes from (`weights: base:NAME`), before the sweep's own trials:
each base is one trial through the very same Tune function, Train worker and engine, in its own folder
(`sweep/bases.py`). A base already built is reused, and the log says so; one whose pretraining was
interrupted (a killed driver, a stopped session) continues from its last Train checkpoint."""
from __future__ import annotations

import logging

from detsweep.cluster.tuner import fit_sweep
from detsweep.storage import delete_dir, exists
from detsweep.sweep.bases import interrupted, is_built
from detsweep.sweep.resume import cut_short_tune_state
from detsweep.sweep.spec import Sweep, TrialConfig

log = logging.getLogger(__name__)


class BaseFailed(RuntimeError):
    """A base's pretraining did not end `ok`: the trials that need it cannot run."""


def build_bases(bases: list[TrialConfig], *, quiet: bool) -> None:
    """Pretrain every base in `bases` that is not built yet, one after the other."""
    for base in bases:
        if is_built(base):
            log.info("base %s: cached in %s, reused", base.trial_id, base.storage)
            continue
        # An interrupted pretraining resumes from its Train checkpoint (its key fixes its config); a Tune
        # folder without the Tuner's state (killed before its first save) starts over.
        resume = interrupted(base)
        if resume:
            log.info("base %s: interrupted earlier, resuming from its last checkpoint in %s", base.trial_id,
                     base.storage)
            cut = cut_short_tune_state(base.storage)
            if cut is not None:  # Tune restarts its one trial, which continues from its Train checkpoint
                log.warning("base %s: %s is cut short (the driver stopped while Ray was writing it): Tune starts "
                            "the pretraining again, from its last Train checkpoint", base.trial_id, cut.path)
        else:
            if exists(base.storage):
                delete_dir(base.storage)
            log.info("base %s: pretraining (%d epochs) into %s", base.trial_id, base.train.epochs, base.storage)
        fit_sweep(Sweep(name=base.sweep), [base], root=base.storage, concurrency=1, resume=resume, quiet=quiet)
        if not is_built(base):
            raise BaseFailed(f"base {base.trial_id}: pretraining did not finish ok; see {base.storage}/results.parquet")
        log.info("base %s: built", base.trial_id)
