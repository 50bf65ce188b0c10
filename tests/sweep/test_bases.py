"""`weights: base:NAME`: a base named in the sweep file or sweeps/bases/, validated at load time, keyed
by what its pretraining depends on, and its pretraining planned as one more trial."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from detsweep.data.synthetic import GENERATOR_VERSION
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
    assert base.eval.every == 1 and not base.eval.visuals  # 3 epochs: each evaluated
    assert base.storage.startswith(str(tmp_path / "_bases" / "src-"))  # beside the sweep: --fresh keeps it
    assert {t.base_run for t in trials} == {f"{base.storage}/train-{base.trial_id}"}


@pytest.mark.parametrize("epochs,every", [(3, 1), (16, 4), (40, 10), (100, 10)])
def test_a_base_is_evaluated_four_times_and_at_least_every_ten_epochs(tmp_path, epochs, every):
    sweep = _sweep(tmp_path, bases={"src": {**BASE, "train": {"epochs": epochs}}})
    (base,) = base_trials(expand(sweep), sweep, str(tmp_path))
    assert base.eval.every == every


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


FRCNN = {"backbone": "resnet18", "min_size": 64, "max_size": 64}


def _chained(tmp_path, detr_base: dict | None = None, frcnn_base: dict | None = None):
    """A DETR base that starts from a Faster R-CNN base (the demo's layout), used by DETR trials only."""
    bases = {"frcnn": {**BASE, "model": "fasterrcnn_r50_fpn", **(frcnn_base or {})},
             "detr": {**BASE, "weights": "base:frcnn", **(detr_base or {})}}
    return _sweep(tmp_path, model={"detr": {**TINY, "weights": "base:detr"}, "faster_rcnn": FRCNN}, bases=bases)


def test_a_base_that_starts_from_another_base_is_built_after_it(tmp_path):
    sweep = _chained(tmp_path)
    trials = expand(sweep)
    up, base = base_trials(trials, sweep, root_of(trials[0].storage))
    assert (up.model, up.family, up.detector.backbone, up.detector.min_size) == (
        "fasterrcnn_r50_fpn", "faster_rcnn", "resnet18", 64)  # the sweep's model.faster_rcnn settings
    assert up.detector.weights == "none" and up.base_run is None
    assert (base.model, base.detector.weights, base.detector.num_queries) == ("detr_r50", "base:frcnn", 5)
    assert base.base_run == f"{up.storage}/train-{up.trial_id}"  # its weights: the Faster R-CNN base's checkpoint
    assert {t.base_run for t in trials} == {f"{base.storage}/train-{base.trial_id}"}


def test_a_rebuilt_upstream_base_is_a_new_downstream_base(tmp_path):
    def ids(**changes):
        sweep = _chained(tmp_path, **changes)
        return [b.trial_id for b in base_trials(expand(sweep), sweep, str(tmp_path))]

    up, down = ids()
    up2, down2 = ids(frcnn_base={"train": {"epochs": 4, "lr": 2.0e-4}})
    assert up != up2 and down != down2  # the DETR base's key holds the Faster R-CNN base's
    # A base without an upstream keeps the key it had before bases could chain (its cache stays valid).
    sweep = _sweep(tmp_path)
    base = find_base(sweep, "src", "x")
    (trial, _) = expand(sweep)
    arch = {k: v for k, v in dataclasses.asdict(trial.detector).items() if k not in ("weights", "regimes")}
    section = {k: v for k, v in dataclasses.asdict(base).items() if k != "model"}
    before = hashlib.sha256(json.dumps({"base": section, "model": trial.model, "arch": arch,
                                        "generator": GENERATOR_VERSION}, sort_keys=True, default=str).encode())
    assert base_key(base, trial.model, trial.detector) == before.hexdigest()[:12]


@pytest.mark.parametrize("detr_base,frcnn_base,message", [
    ({"weights": "base:detr"}, None, "f.yaml: bases.detr.weights: base 'detr' starts from itself (detr -> detr); "
                                     "one of these bases needs other weights"),
    ({"model": "fasterrcnn_r50_fpn"}, None, "f.yaml: model.detr.weights: base 'detr' is a fasterrcnn_r50_fpn "
                                            "(its `model:`), but a detr_r50 starts from it; name a base of detr_r50"),
    (None, {"model": "yolo"}, "f.yaml: bases.frcnn: model: 'yolo' is not one of ['detr_r50', 'fasterrcnn_r50_fpn']"),
    (None, {"train": {"epochs": 0}}, "f.yaml: bases.frcnn: train.epochs: 0 must be > 0"),
])
def test_bad_base_chains_are_one_line_at_load_time(tmp_path, detr_base, frcnn_base, message):
    with pytest.raises(SweepError) as err:
        _chained(tmp_path, detr_base, frcnn_base)
    assert str(err.value).startswith(message)


def test_the_plan_says_whether_an_interrupted_base_resumes_or_starts_over(tmp_path):
    """A base folder whose Tuner Tune can restore resumes; one killed before Tune pickled its Tuner, or with that
    pickle cut short, starts over."""
    import pickle
    from pathlib import Path

    from detsweep.sweep.bases import describe

    sweep = _sweep(tmp_path)
    trials = expand(sweep)
    (base,) = base_trials(trials, sweep, root_of(trials[0].storage))
    assert describe(base).endswith(f"; pretrained first, into {base.storage}")
    tune = Path(base.storage) / "tune"
    tune.mkdir(parents=True)
    assert describe(base).endswith(f"; pretrained first, into {base.storage}")  # no tuner.pkl yet
    tuner = pickle.dumps({"tune_config": list(range(50))})
    (tune / "tuner.pkl").write_bytes(tuner)
    assert describe(base).endswith(f"; interrupted earlier, resumed from its last checkpoint in {base.storage}")
    (tune / "tuner.pkl").write_bytes(tuner[:-3])
    assert describe(base).endswith(f"; pretrained first, into {base.storage}")
