"""A Train worker's setup on a GPU node, with CUDA stood in for on CPU: a fractional-GPU trial caps its
caching allocator at its share, so two trials on one GPU cannot take each other's memory."""
from __future__ import annotations

import pytest
import torch

from detsweep.cluster import worker
from detsweep.sweep import expand, parse_sweep


def _trial(tmp_path, gpus: float):
    sweep = parse_sweep({"name": "s", "storage": str(tmp_path),
                         "resources": {"ddp_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": gpus}}, "f.yaml")
    (trial,) = expand(sweep)
    return trial


@pytest.mark.parametrize("gpus,expected", [(0.5, [(0.5 * worker.GPU_SHARE_MARGIN, "cuda:0")]), (1.0, [])])
def test_a_fractional_trial_caps_its_memory_at_its_share(tmp_path, monkeypatch, gpus, expected):
    import ray.train.torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: "cuda:0")
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert worker._setup(_trial(tmp_path, gpus), rank=0) == "cuda:0"
    assert calls == expected
