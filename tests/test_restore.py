"""Restoring a trial (a Train restart, spot preemption, --resume): the model is moved to where it trains
*before* its optimizer is built and loaded, so AdamW's moments land on the parameters' device and dtype;
and checkpoints hold CPU tensors, so they load on a machine without the GPU they were written on.

On CPU a move to float64 stands in for the move to CUDA: `Optimizer.load_state_dict` casts the saved
moments to whatever the parameters are when it runs, so the order shows the same way."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from detsweep import engine
from detsweep.data.coco import build_datasets, collate_fn
from detsweep.models.detr_detector import build_detr_detector

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
            num_queries=5, dropout=0.0)
TRAIN = SimpleNamespace(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, epochs=2, warmup_steps=0, lr_schedule="step",
                        lr_drop_epoch=None)


@pytest.fixture(scope="module")
def trained_state(tmp_path_factory):
    """A checkpoint's model and training state after one real epoch (2 steps) of a tiny DETR."""
    train, _, label_map, _ = build_datasets(kind="synthetic", root=tmp_path_factory.mktemp("synth"), train_images=4,
                                            val_images=2, image_size=64, classes=None, seed=0, num_classes=3)
    torch.manual_seed(0)
    model = build_detr_detector(num_classes=label_map.num_classes, **TINY)
    opt = engine.prepare_training(model, TRAIN, steps_per_epoch=2, to=torch.device("cpu"), amp_dtype=None)
    engine.train_one_epoch(model, DataLoader(train, batch_size=2, collate_fn=collate_fn), opt.optimizer,
                           torch.device("cpu"), epoch=0, lr_scheduler=opt.lr_scheduler)
    return label_map.num_classes, engine.model_state(model, "full"), opt.state_dict()


def _moments_match_params(optimizer: torch.optim.Optimizer) -> list[str]:
    """Each optimizer state tensor whose device or dtype differs from its parameter's (AdamW's `step` is a
    CPU scalar by design and is left out)."""
    wrong = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if name != "step" and torch.is_tensor(value) and (value.device, value.dtype) != (p.device, p.dtype):
                    wrong.append(f"{name}: {value.device}/{value.dtype} vs {p.device}/{p.dtype}")
    return wrong


def test_restored_optimizer_state_sits_on_its_parameters_device_and_dtype(trained_state):
    num_classes, model_state, train_state = trained_state
    model = build_detr_detector(num_classes=num_classes, **TINY)
    engine.load_model_state(model, "full", model_state)
    opt = engine.prepare_training(model, TRAIN, steps_per_epoch=2, to=torch.float64, amp_dtype=None,
                                  state=train_state)
    assert next(model.parameters()).dtype == torch.float64
    assert opt.optimizer.state, "the checkpoint's AdamW moments were loaded"
    assert _moments_match_params(opt.optimizer) == []
    assert opt.lr_scheduler.last_epoch == 2  # the schedule continues where it stopped


def test_the_old_order_leaves_the_moments_behind(trained_state):
    """The check above can fail: loading before the move (the order before the fix) leaves float32
    moments next to float64 parameters, as CPU moments next to CUDA parameters on a GPU node."""
    num_classes, model_state, train_state = trained_state
    model = build_detr_detector(num_classes=num_classes, **TINY)
    engine.load_model_state(model, "full", model_state)
    opt = engine.prepare_training(model, TRAIN, steps_per_epoch=2, to=torch.float32, amp_dtype=None,
                                  state=train_state)
    model.to(torch.float64)  # prepare_model's move, after the optimizer was loaded
    assert _moments_match_params(opt.optimizer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_restore_on_cuda_and_checkpoint_back_on_cpu(trained_state):
    num_classes, model_state, train_state = trained_state
    model = build_detr_detector(num_classes=num_classes, **TINY)
    engine.load_model_state(model, "full", model_state)
    opt = engine.prepare_training(model, TRAIN, steps_per_epoch=2, to=torch.device("cuda"), amp_dtype=None,
                                  state=train_state)
    assert _moments_match_params(opt.optimizer) == []
    images = [torch.rand(3, 64, 64, device="cuda")]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]], device="cuda"),
                "labels": torch.tensor([0], device="cuda")}]
    sum(model(images, targets).values()).backward()
    opt.optimizer.step()  # raised a device mismatch before the fix
    saved = engine.model_state(model, "full")
    state = opt.state_dict()
    assert all(v.device.type == "cpu" for v in saved.values())
    assert all(v.device.type == "cpu" for s in state["optimizer"]["state"].values() for v in s.values()
               if torch.is_tensor(v))
