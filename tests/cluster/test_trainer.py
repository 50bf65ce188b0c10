"""SweepTorchTrainer: Ray Train's TorchTrainer less the Ray Data actor, which detsweep (torch DataLoaders, no
`datasets`) never uses. Ray-free: the callback lists are built without a cluster. tests/ray's ASHA test checks
that a real run starts no DatasetManager actor."""
from __future__ import annotations

import ray.train as ray_train


def _names(trainer) -> list[str]:
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


def _pair(**kw):
    from ray.train.torch import TorchTrainer

    from detsweep.cluster.tuner import SweepTorchTrainer

    kw = {"scaling_config": ray_train.ScalingConfig(num_workers=1), **kw}
    return SweepTorchTrainer(lambda config: None, **kw), TorchTrainer(lambda config: None, **kw)


def test_without_datasets_only_the_datasets_callback_is_dropped():
    ours, theirs = _pair()
    assert "DatasetsCallback" in _names(theirs)  # Ray 2.60 adds it with no datasets: the actor we save
    assert _names(ours) == [n for n in _names(theirs) if n != "DatasetsCallback"]


def test_with_datasets_the_callbacks_are_torchtrainers():
    ours, theirs = _pair(datasets={"train": lambda: None})  # a GenDataset: called only when a run starts
    assert _names(ours) == _names(theirs) and "DatasetsCallback" in _names(ours)
