"""two_stage in the Train worker's own steps (restore, switch_stage, save_checkpoint), without a cluster: the
switch re-applies the regime with a fresh optimizer and DDP wrapper, the stage goes into the checkpoint, and a
trial restarted in stage 2 continues stage 2 exactly as the run that was never interrupted."""
from __future__ import annotations

import contextlib
import types

import pytest
import torch

from detsweep import engine
from detsweep.cluster import worker
from detsweep.models.trial import build_trial_model, stage_for
from tests.models.test_two_stage import LABELS, _batch, two_stage_trial

CPU = torch.device("cpu")


class FolderCheckpoint:
    """What `ray.train.get_checkpoint()` gives the worker: a folder through `as_directory()`."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    @contextlib.contextmanager
    def as_directory(self):
        yield self.folder


@pytest.fixture
def no_ray_wrap(monkeypatch):
    import ray.train.torch

    wrapped = []
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m, move_to_device=False: wrapped.append(m) or m)
    return wrapped


def _epoch(model, run, data, epoch: int) -> None:
    engine.train_one_epoch(model, data.train_loader, run.opt.optimizer, CPU, epoch=epoch,
                           lr_scheduler=run.opt.lr_scheduler)


def _checkpoint(trial, model, run, data, epoch: int) -> FolderCheckpoint:
    folder = worker.save_checkpoint(trial, model, run, data, epoch, metrics={"epoch": epoch},
                                    quality={"_detections": []}, kept=[])
    return FolderCheckpoint(folder)


def _build(trial):
    torch.manual_seed(0)  # as the worker's _setup seeds: a LoRA checkpoint loads onto the same base weights only
    return build_trial_model(trial, LABELS)[0]


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage2", ["full", "lora_only"])
def test_switch_then_restart_in_stage_2_continues_stage_2(tmp_path, no_ray_wrap, stage2):
    trial = two_stage_trial(tmp_path, {"regime": stage2, "lr": 1e-4}, epochs=4)
    data = types.SimpleNamespace(train_loader=[_batch()], label_map=types.SimpleNamespace(as_dict=lambda: {}))
    model = _build(trial)
    run = worker.restore(trial, model, data, CPU, None)
    assert run.stage == 1 and _trainable(model) == {"detr.class_embed.weight", "detr.class_embed.bias",
                                                   *(n for n in _trainable(model) if n.startswith("detr.bbox_embed."))}
    _epoch(model, run, data, 0)
    stage1_opt = run.opt.optimizer

    assert stage_for(trial, 1) != run.stage
    ddp = worker.switch_stage(trial, model, data, run, CPU, 1)
    assert ddp is model and no_ray_wrap == [model]  # re-wrapped for DDP at the switch
    assert run.stage == 2 and run.opt.optimizer is not stage1_opt and run.opt.lr_scheduler.last_epoch == 0
    stage2_names = _trainable(model)
    assert any(".lora_" in n for n in stage2_names) == (stage2 == "lora_only")
    assert any(n.startswith("detr.transformer.") for n in stage2_names)
    _epoch(model, run, data, 1)
    checkpoint = _checkpoint(trial, model, run, data, 1)

    # the restarted worker: a fresh model in stage 1, then the checkpoint of epoch 1 (stage 2)
    fresh = _build(trial)
    resumed = worker.restore(trial, fresh, data, CPU, checkpoint)
    assert resumed.stage == 2 and resumed.start_epoch == 2 and stage_for(trial, 2) == resumed.stage
    assert _trainable(fresh) == stage2_names
    assert resumed.opt.lr_scheduler.last_epoch == run.opt.lr_scheduler.last_epoch == 1
    _epoch(model, run, data, 2)
    _epoch(fresh, resumed, data, 2)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name  # the same stage-2 step, from the same weights and optimizer state


def test_a_restart_after_the_last_stage_1_epoch_comes_back_in_stage_1_and_then_switches(tmp_path, no_ray_wrap):
    trial = two_stage_trial(tmp_path, {"regime": "partial"}, epochs=3)
    data = types.SimpleNamespace(train_loader=[_batch()], label_map=types.SimpleNamespace(as_dict=lambda: {}))
    model = _build(trial)
    run = worker.restore(trial, model, data, CPU, None)
    _epoch(model, run, data, 0)
    checkpoint = _checkpoint(trial, model, run, data, 0)
    fresh = _build(trial)
    resumed = worker.restore(trial, fresh, data, CPU, checkpoint)
    # its stage-1 optimizer state loads into a stage-1 optimizer; the epoch loop then switches at epoch 1
    assert resumed.stage == 1 and resumed.start_epoch == 1 and stage_for(trial, 1) == 2
    worker.switch_stage(trial, fresh, data, resumed, CPU, 1)
    assert resumed.stage == 2 and any(n.startswith("detr.backbone.0.body.layer4.") for n in _trainable(fresh))
