"""Whether Tune's own state in `<root>/tune` is whole enough for `Tuner.restore` (sweep/resume.py), on files the
tests write: Ray copies them into storage one at a time, in place, and a driver killed during a copy leaves one
empty or cut short."""
from __future__ import annotations

import json
import pickle

from detsweep.sweep.resume import CutShort, cut_short_tune_state, tune_restorable

STATE = {"runner_data": {"counter": 3}, "trial_data": ["t0", "t1"]}


def _tune(tmp_path, **files: bytes):
    tune = tmp_path / "tune"
    tune.mkdir(exist_ok=True)
    for name, data in files.items():
        (tune / name).write_bytes(data)
    return tune


def _whole(tmp_path):
    return _tune(tmp_path, **{"tuner.pkl": pickle.dumps({"param_space": STATE}),
                              "experiment_state-2026-01-01_00-00-00.json": json.dumps(STATE).encode(),
                              "basic-variant-state-2026-01-01_00-00-00.json": pickle.dumps(STATE)})


def test_whole_state_restores(tmp_path):
    _whole(tmp_path)
    assert cut_short_tune_state(str(tmp_path)) is None and tune_restorable(str(tmp_path))


def test_no_state_is_not_cut_short_and_not_restorable(tmp_path):
    assert cut_short_tune_state(str(tmp_path)) is None and not tune_restorable(str(tmp_path))
    _tune(tmp_path)  # Tune made its folder, the driver died before it pickled the Tuner
    assert cut_short_tune_state(str(tmp_path)) is None and not tune_restorable(str(tmp_path))


def test_a_searcher_state_cut_short_is_named_and_the_tuner_still_restores(tmp_path):
    tune = _whole(tmp_path)
    data = pickle.dumps(STATE)
    for cut in (b"", data[:-1], data[: len(data) // 2]):
        (tune / "basic-variant-state-2026-01-01_00-00-00.json").write_bytes(cut)
        name = str(tune / "basic-variant-state-2026-01-01_00-00-00.json")
        assert cut_short_tune_state(str(tmp_path)) == CutShort(name, tuner=False), len(cut)
        assert tune_restorable(str(tmp_path))


def test_only_the_newest_file_of_a_kind_counts(tmp_path):
    """A resumed run writes files of its own session; Tune reads the newest, so an older one cut short is harmless
    and a newer one cut short is not."""
    text = json.dumps(STATE).encode()
    tune = _whole(tmp_path)
    (tune / "experiment_state-2025-12-31_00-00-00.json").write_bytes(text[:5])
    assert cut_short_tune_state(str(tmp_path)) is None
    (tune / "experiment_state-2026-01-02_00-00-00.json").write_bytes(text[:-2])
    assert cut_short_tune_state(str(tmp_path)) == CutShort(str(tune / "experiment_state-2026-01-02_00-00-00.json"),
                                                           tuner=False)


def test_a_tuner_cut_short_cannot_restore(tmp_path):
    tune = _whole(tmp_path)
    (tune / "tuner.pkl").write_bytes(pickle.dumps({"param_space": STATE})[:10])
    assert cut_short_tune_state(str(tmp_path)) == CutShort(str(tune / "tuner.pkl"), tuner=True)
    assert not tune_restorable(str(tmp_path))
