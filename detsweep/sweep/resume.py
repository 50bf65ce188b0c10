"""`--resume`: `<root>/trials.json` holds the trial list a run started with, and a resumed run is
refused when the sweep's trials have changed since (any key a trial uses, not the other family's).
Also: whether Tune's own state in `<root>/tune` is whole enough for `Tuner.restore`. Ray-free."""
from __future__ import annotations

import dataclasses
import json
import pickletools
from typing import Any

import pyarrow.fs as pafs

from detsweep.storage import TRIALS_FILE, TUNE_DIR, exists, filesystem, join, read_text, write_bytes_atomic
from detsweep.sweep.spec import TrialConfig
from detsweep.sweep.typed import SweepError


def plain_trials(trials: list[TrialConfig]) -> list[dict[str, Any]]:
    """Each trial's id and config as plain JSON values (tuples become lists)."""
    return json.loads(json.dumps([{"trial_id": t.trial_id, "config": t.to_dict()} for t in trials]))


_ABSENT = object()  # a key one of two configs lacks


def _shown(value: Any) -> str:
    return "absent" if value is _ABSENT else repr(value)


def _first_difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, old value, new value) of the first place where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*new, *(k for k in old if k not in new)]:
            found = _first_difference(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{key}.{k}" if key else k)
            if found:
                return found
        return None
    return None if old == new else (key, old, new)


# Trial config keys (dotted) a resumed run may change: how failures are handled and how much of the
# data the driver re-checks (--skip-image-check), not what a trial is.
RESUME_MAY_CHANGE = ("fault_tolerance", "data.image_check")


def trials_change(saved: list[dict[str, Any]], trials: list[TrialConfig]) -> str | None:
    """How `trials` differ from a saved trial list (order aside, `RESUME_MAY_CHANGE` sections
    aside), in a few words; None if they don't."""

    def what(config: dict[str, Any]) -> dict[str, Any]:
        config = json.loads(json.dumps(config))  # a deep copy of plain JSON values
        for dotted in RESUME_MAY_CHANGE:
            *parents, leaf = dotted.split(".")
            section = config
            for part in parents:
                section = section.get(part) if isinstance(section, dict) else None
            if isinstance(section, dict):
                section.pop(leaf, None)
        return config

    old = {t["trial_id"]: what(t["config"]) for t in saved}
    new = {t["trial_id"]: what(t["config"]) for t in plain_trials(trials)}
    gone = [tid for tid in old if tid not in new]
    if gone:
        return f"trial {gone[0]!r} is no longer in it"
    added = [tid for tid in new if tid not in old]
    if added:
        return f"trial {added[0]!r} is new"
    for tid, config in new.items():
        found = _first_difference(old[tid], config)
        if found:
            key, was, now = found
            if key.startswith("detector."):  # named as in the sweep file
                key = f"model.{config['family']}.{key.removeprefix('detector.')}"
            return f"trial {tid!r}: {key} was {_shown(was)}, is now {_shown(now)}"
    return None


def _trials_uri(root: str) -> str:
    return join(root, TRIALS_FILE)


def save_trials(root: str, trials: list[TrialConfig], concurrency: int | None) -> None:
    """Write `<root>/trials.json` atomically, local path or URI (`storage.write_atomic`)."""
    text = json.dumps({"max_concurrent_trials": concurrency, "trials": plain_trials(trials)}, indent=1)
    write_bytes_atomic(text.encode(), _trials_uri(root))


def load_trials(root: str) -> dict[str, Any] | None:
    """`<root>/trials.json` as saved by `save_trials`, or None when there is none."""
    uri = _trials_uri(root)
    text = read_text(uri)
    if text is None:
        return None
    try:
        saved = json.loads(text)
        entries = saved.get("trials") if isinstance(saved, dict) else None
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("trial_id"), str) and isinstance(e.get("config"), dict)
                for e in entries):
            raise ValueError("no list of {trial_id, config}")
        return saved
    except ValueError as e:
        raise SweepError(f"--resume: {uri} is not a trial list saved by detsweep ({e}); pass --fresh to "
                         f"start over, or --output-dir for another folder") from None


def check_resume(root: str, trials: list[TrialConfig]) -> int | None:
    """Refuse to resume a run whose trials differ from the sweep's now. Returns the concurrency the
    run started with (Tuner.restore keeps it), None if unknown. Every run writes trials.json before
    Tune writes anything, so a run without one cannot be checked and is refused: resuming it with
    other trial ids would fail every unfinished trial."""
    saved = load_trials(root)
    if saved is None:
        raise SweepError(f"--resume: {_trials_uri(root)} is missing, so the trials this run started with are "
                         f"unknown (a run from an older detsweep); pass --fresh to start over, or --output-dir "
                         f"for another folder")
    change = trials_change(saved["trials"], trials)
    if change:
        raise SweepError(f"--resume: the sweep changed since the run in {root} started: {change}; pass --fresh "
                         f"to start over, or --output-dir for another folder")
    return saved.get("max_concurrent_trials")




TUNER_FILE = "tuner.pkl"  # the Tuner itself, pickled once when the run starts


def _whole_pickle(data: bytes) -> None:
    """Raise ValueError unless `data` is a whole pickle (its opcodes up to STOP), without unpickling it:
    Tune's pickles name Ray's classes, and this check runs before Ray is imported."""
    if not data:
        raise ValueError("empty")
    for _ in pickletools.genops(data):
        pass


# The files of Tune's state that `Tuner.restore` reads (the newest of each kind, by its timestamped name),
# and how to tell one is whole. Ray copies them from the driver's staging folder into storage one file at a
# time, in place: a driver killed during that copy leaves one empty or cut short.
_TUNE_STATE = (("experiment_state-", json.loads), ("basic-variant-state-", _whole_pickle),
               ("searcher-state-", _whole_pickle), (TUNER_FILE, _whole_pickle))


@dataclasses.dataclass(frozen=True)
class CutShort:
    """A file of Tune's state that is empty or cut short."""

    path: str
    tuner: bool  # it is tuner.pkl: Tuner.restore cannot even start; the others make Tune restart the trials


def cut_short_tune_state(root: str) -> CutShort | None:
    """The first of Tune's state files in `<root>/tune` that is not whole, or None (also when there is none)."""
    fs, path = filesystem(join(root, TUNE_DIR))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    for prefix, check in _TUNE_STATE:
        newest = max((i for i in infos if i.base_name.startswith(prefix)), key=lambda i: i.base_name, default=None)
        if newest is None:
            continue
        with fs.open_input_stream(newest.path) as stream:
            data = stream.read()
        try:
            check(data)
        except ValueError:
            return CutShort(newest.path, tuner=prefix == TUNER_FILE)
    return None


def tune_restorable(root: str) -> bool:
    """Whether `Tuner.restore` can start on `<root>/tune`: its tuner.pkl is there, whole."""
    cut = cut_short_tune_state(root)
    return exists(join(root, TUNE_DIR, TUNER_FILE)) and not (cut is not None and cut.tuner)
