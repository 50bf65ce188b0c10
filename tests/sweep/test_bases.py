"""`weights: base:NAME`: a base named in the sweep file or sweeps/bases/, validated at load time, keyed
by what its pretraining depends on, and its pretraining planned as one more trial."""
from __future__ import annotations

import dataclasses

import pytest

from detsweep.sweep import SweepError, expand, parse_sweep
from detsweep.sweep.bases import base_key, base_trials, find_base
from detsweep.sweep.grid import root_of

TINY = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1,
        "dim_feedforward": 64, "num_queries": 5}
BASE = {"data": {"kind": "synthetic", "train_images": 8, "val_images": 4, "image_size": 64},
        "train": {"epochs": 3, "lr": 2.0e-4}}


def _sweep(tmp_path, **changes):
    raw = {"name": "s", "storage": str(tmp_path), "model": {"detr": {**TINY, "weights": "base:src"}},
           "bases": {"src": BASE}, "grid": {"regime": ["full", "lora_only"]}, **changes}
    return parse_sweep(raw, "f.yaml")


def test_trials_that_use_a_base_share_one_pretraining_trial(tmp_path):
    sweep = _sweep(tmp_path)
    trials = expand(sweep)
    (base,) = base_trials(trials, sweep, root_of(trials[0].storage))
    assert base.regime == "full" and base.detector.weights == "none" and base.train.epochs == 3
    assert base.data.train_images == 8 and base.resources.ddp_workers == 1
    assert base.detector.num_queries == 5  # the architecture is the trials' own
    assert base.storage.startswith(str(tmp_path / "_bases" / "src-"))  # beside the sweep: --fresh keeps it
    assert {t.base_run for t in trials} == {f"{base.storage}/train-{base.trial_id}"}


def test_the_key_changes_with_what_the_pretraining_depends_on(tmp_path):
    sweep = _sweep(tmp_path)
    (trial, _) = expand(sweep)
    base = find_base(sweep, "src", "x")
    key = base_key(base, trial.model, trial.detector)
    assert key == base_key(base, trial.model, dataclasses.replace(trial.detector, weights="other"))
    assert key != base_key(base, trial.model, dataclasses.replace(trial.detector, num_queries=6))
    assert key != base_key(dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=4)),
                           trial.model, trial.detector)


@pytest.mark.parametrize("changes,message", [
    ({"bases": {}}, "f.yaml: model.detr.weights: base 'nope' is neither in the sweep's `bases:` nor a file "
                    "sweeps/bases/nope.yaml; known bases are "),
    ({"bases": {"src": {**BASE, "train": {"epochs": 0}}}}, "f.yaml: bases.src: train.epochs: 0 must be > 0"),
    ({"bases": {"src": {**BASE, "layers": 3}}}, "f.yaml: bases.src.layers: unknown key; allowed keys are"),
])
def test_bad_bases_are_one_line_at_load_time(tmp_path, changes, message):
    model = {"detr": {**TINY, "weights": "base:nope" if changes.get("bases") == {} else "base:src"}}
    with pytest.raises(SweepError) as err:
        _sweep(tmp_path, model=model, **changes)
    assert str(err.value).startswith(message)
