"""`--resume`: `<root>/trials.json` holds the trial list a run started with, and a resumed run is
refused when the sweep's trials have changed since (any key a trial uses, not the other family's)."""
from __future__ import annotations

import json
from typing import Any

from detsweep.storage import TRIALS_FILE, join, read_text, write_bytes_atomic
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


