"""Where a trial's workers go and how they talk: one node for a trial that fits one (a 2-GPU DDP
trial never straddles nodes), and NCCL only where gradients are all-reduced between GPUs."""
from __future__ import annotations

import pytest

from detsweep.sweep.plan import placement_strategy, process_group_backend


def _trial(workers: int, cpus: float, gpus: float, backend: str = "auto") -> dict:
    return {"resources": {"ddp_workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus,
                          "backend": backend}}


G5_12X = {"CPU": 48.0, "GPU": 4.0}
G5_X = {"CPU": 4.0, "GPU": 1.0}


@pytest.mark.parametrize("trial,nodes,expected", [
    (_trial(2, 4, 1), [G5_12X], "STRICT_PACK"),         # fits one node: both ranks on it
    (_trial(2, 4, 1), [G5_X, G5_X], "PACK"),            # no node holds both: Ray's best effort
    (_trial(4, 8, 1), [G5_12X, G5_12X], "STRICT_PACK"),
    (_trial(1, 2, 0.5), [G5_X], "PACK"),                # one worker: nothing to keep together
    (_trial(2, 1, 0), [{"CPU": 2.0}], "STRICT_PACK"),   # CPU trials too (the laptop)
    (_trial(2, 1, 0), [], "PACK"),                      # no node known yet (autoscaling from zero)
])
def test_placement_strategy_packs_a_trial_that_fits_one_node(trial, nodes, expected):
    assert placement_strategy(trial, nodes) == expected


@pytest.mark.parametrize("trial,expected", [
    (_trial(2, 4, 1), "nccl"),
    (_trial(1, 4, 1), "gloo"),       # world size 1: no gradient all-reduce, no NCCL communicator
    (_trial(1, 2, 0.5), "gloo"),     # a shared GPU must not hold an NCCL communicator per trial
    (_trial(2, 1, 0), "gloo"),
    (_trial(1, 4, 1, "nccl"), "nccl"),  # an explicit choice is kept
])
def test_process_group_backend(trial, expected):
    assert process_group_backend(trial) == expected


@pytest.mark.parametrize("resources,set_to,expected", [
    ({"cpus_per_worker": 8, "gpus_per_worker": 1}, None, 7),     # a GPU trial: decoding overlaps the GPU's work
    ({"cpus_per_worker": 16, "gpus_per_worker": 1}, None, 8),    # at most 8
    ({"cpus_per_worker": 1, "gpus_per_worker": 0.5}, None, 0),   # no spare CPU
    ({"cpus_per_worker": 4, "gpus_per_worker": 0}, None, 0),     # CPU trials train on their cores
    ({"cpus_per_worker": 8, "gpus_per_worker": 1}, 2, 2),        # a set value is kept
])
def test_loader_workers_default_from_the_trials_cpus(tmp_path, resources, set_to, expected):
    from detsweep.sweep import expand, parse_sweep
    from detsweep.sweep.plan import loader_workers

    sweep = parse_sweep({"name": "s", "storage": str(tmp_path), "data": {"loader_workers": set_to},
                         "resources": {"ddp_workers": 1, **resources}}, "f.yaml", check_paths=False)
    (trial,) = expand(sweep)
    assert loader_workers(trial) == expected


def test_trial_actors_go_to_the_head_where_it_has_the_resource(tmp_path):
    from detsweep.cluster.tuner import TRIAL_ACTOR_RESOURCES, trial_actor_resources
    from detsweep.sweep import expand, parse_sweep
    from detsweep.sweep.plan import HEAD_RESOURCE, max_concurrent

    assert trial_actor_resources({"CPU": 8.0}) == TRIAL_ACTOR_RESOURCES  # a laptop: nothing to wait for
    assert trial_actor_resources({"CPU": 8.0, HEAD_RESOURCE: 32.0}) == {**TRIAL_ACTOR_RESOURCES, HEAD_RESOURCE: 1}
    sweep = parse_sweep({"name": "s", "storage": str(tmp_path), "grid": {"train.seed": list(range(6))},
                         "resources": {"ddp_workers": 1, "cpus_per_worker": 1}}, "f.yaml")
    trials = expand(sweep)
    assert max_concurrent(trials, {"CPU": 48.0}) == 6
    assert max_concurrent(trials, {"CPU": 48.0, HEAD_RESOURCE: 4.0}) == 4  # the head holds 4 trial actors
