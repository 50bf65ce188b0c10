"""The -q progress view's ETA: epochs left times seconds per epoch, also for a trial evaluated (and so
reported) only every k epochs, and for a resumed trial, whose first report is past epoch 0 (the worker's
`resumed_from_epoch` says where it started, where the result has it)."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from detsweep.cluster import progress


@pytest.fixture
def clock(monkeypatch):
    now = {"t": 0.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: now["t"])
    return now


def _report(cb, trial, done, at, clock, **extra):
    clock["t"] = at
    cb.on_trial_result(0, [], trial, {"epochs_completed": done, "loss": 1.0, "ap": 0.1, "ap50": 0.2, **extra})


def test_eta_of_a_trial_evaluated_every_ten_epochs(clock):
    out, trial = io.StringIO(), SimpleNamespace(config={"trial_id": "base"})
    cb = progress.ProgressCallback({"base": 100}, stream=out)
    cb.on_trial_start(0, [], trial)
    _report(cb, trial, 10, 600.0, clock)  # 60 s per epoch: 90 left = 90 min (once read as 900 min)
    _report(cb, trial, 20, 1200.0, clock)
    lines = out.getvalue().splitlines()
    assert lines[1].endswith("epoch 10/100, loss 1.000, AP 0.1000, AP50 0.2000, ETA 90m00s")
    assert lines[2].endswith("epoch 20/100, loss 1.000, AP 0.1000, AP50 0.2000, ETA 80m00s")


def test_eta_of_a_resumed_trial_uses_the_rate_between_its_reports(clock):
    out, trial = io.StringIO(), SimpleNamespace(config={"trial_id": "t"})
    cb = progress.ProgressCallback({"t": 10}, stream=out)
    clock["t"] = 100.0
    cb.on_trial_start(0, [], trial)
    _report(cb, trial, 7, 130.0, clock)  # resumed at 6: its first report cannot know that
    _report(cb, trial, 8, 160.0, clock)  # 30 s per epoch from here on
    _report(cb, trial, 10, 220.0, clock)
    lines = out.getvalue().splitlines()
    assert lines[2].endswith("epoch 8/10, loss 1.000, AP 0.1000, AP50 0.2000, ETA 1m00s")
    assert lines[3].endswith("epoch 10/10, loss 1.000, AP 0.1000, AP50 0.2000")  # done: no ETA


def test_eta_of_a_resumed_base_at_its_first_report(clock):
    """The long demo's base, resumed from its epoch-80 checkpoint (0-based 79), reports epoch 90 after 15 min:
    90 s per epoch, 10 left (once read as 90 epochs in 15 min: "ETA 1m40s")."""
    out, trial = io.StringIO(), SimpleNamespace(config={"trial_id": "base"})
    cb = progress.ProgressCallback({"base": 100}, stream=out)
    cb.on_trial_start(0, [], trial)
    _report(cb, trial, 90, 900.0, clock, resumed_from_epoch=79)
    assert out.getvalue().splitlines()[1].endswith("epoch 90/100, loss 1.000, AP 0.1000, AP50 0.2000, ETA 15m00s")
