"""two_stage's model side: the `heads` regime (a linear probe: class and box heads only, the whole body under
no_grad), the stage schedule (stage_for, stage_train), each stage's counts, and the parameters that freeze and
unfreeze at the switch epoch; the worker's switch and a restart in stage 2 are tests/cluster/test_two_stage.py's."""
from __future__ import annotations

import types

import pytest
import torch

from detsweep.metrics.efficiency import count_parameters
from detsweep.models.detr import build_detr
from detsweep.models.regimes import apply_regime
from detsweep.models.trial import build_trial_model, enter_stage, prepare_stage, stage_for, stage_train
from detsweep.sweep import expand, parse_sweep

TINY_DETR = {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2,
             "dim_feedforward": 48, "num_queries": 4, "dropout": 0.0}
LABELS = types.SimpleNamespace(num_classes=3, category_ids=[1, 2, 3])


def two_stage_trial(tmp_path, stage2: dict | None = None, epochs: int = 3, **lora):
    sweep = parse_sweep({"name": "s", "storage": str(tmp_path), "model": {"detr": TINY_DETR},
                         "train": {"epochs": epochs, "lr": 1e-4, "lr_backbone": 1e-5},
                         "lora": {"rank": 2, "alpha": 4, **lora},
                         "two_stage": {"stage1": {"epochs": 1, "lr": 1e-3}, "stage2": stage2 or {}},
                         "grid": {"regime": ["two_stage"]}}, "f.yaml")
    (trial,) = expand(sweep)
    return trial


def test_heads_regime_is_a_linear_probe_under_no_grad():
    torch.manual_seed(0)
    detr = build_detr(**TINY_DETR, num_classes=3, aux_loss=True)
    counts = apply_regime(detr, "heads")
    trainable = {n for n, p in detr.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("class_embed.", "bbox_embed.")) for n in trainable)
    d, k = TINY_DETR["hidden_dim"], 3 + 1
    assert counts["trainable_params"] == (d * k + k) + 2 * (d * d + d) + (d * 4 + 4)
    seen = []
    detr.transformer.register_forward_hook(lambda m, i, out: seen.append(out[0]))
    out = detr([torch.rand(3, 40, 48)])
    assert not seen[0].requires_grad  # the decoder's output: no graph behind the heads
    assert out["pred_logits"].requires_grad


def test_stage_schedule_and_its_training_settings(tmp_path):
    trial = two_stage_trial(tmp_path, {"regime": "partial", "lr": 2e-5}, epochs=4)
    assert trial.trial_id == "detr_r18-two_stage" and trial.lora is None
    assert [stage_for(trial, e) for e in range(4)] == [1, 2, 2, 2]
    s1, s2 = stage_train(trial, 1), stage_train(trial, 2)
    assert (s1.epochs, s1.lr, s2.epochs, s2.lr) == (1, 1e-3, 3, 2e-5)
    assert s2.lr_backbone == pytest.approx(2e-6)  # train.lr_backbone / train.lr times stage 2's lr
    assert stage_train(trial, None) is trial.train
    full = two_stage_trial(tmp_path, {"lr_backbone": 0.0})
    assert stage_train(full, 2).lr_backbone == 0.0


@pytest.mark.parametrize("stage2", ["full", "partial", "lora_only"])
def test_each_stage_counts_and_what_freezes_and_unfreezes_at_the_switch(tmp_path, stage2):
    trial = two_stage_trial(tmp_path, {"regime": stage2})
    model, counts = build_trial_model(trial, LABELS)
    assert (trial.lora is not None) == (stage2 == "lora_only")
    stage1 = {n for n, p in model.named_parameters() if p.requires_grad}
    assert stage1 and all(n.startswith(("detr.class_embed.", "detr.bbox_embed.")) for n in stage1)
    assert counts["trainable_params_stage1"] == count_parameters(model)["trainable_params"]
    enter_stage(trial, model, 2)
    stage2_names = {n for n, p in model.named_parameters() if p.requires_grad}
    now = count_parameters(model)["trainable_params"]
    assert counts["trainable_params"] == counts["trainable_params_stage2"] == now
    assert stage1 < stage2_names  # the heads keep training; more unfreezes
    if stage2 == "lora_only":
        assert {n for n in stage2_names if ".lora_" in n} and counts["lora_params"] > 0
        assert not any(n.startswith("detr.backbone.") for n in stage2_names)
    if stage2 == "full":
        assert any(n.startswith("detr.backbone.0.body.layer1.") for n in stage2_names)  # weights none: all train


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 48, 64, generator=g), torch.rand(3, 40, 40, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[2.0, 2.0, 20.0, 30.0]]), "labels": torch.tensor([0])}]
    return images, targets


def _step(model, opt) -> None:
    images, targets = _batch()
    model.train()
    opt.optimizer.zero_grad()
    sum(model(images, targets).values()).backward()
    opt.optimizer.step()
    opt.lr_scheduler.step()


def test_only_the_stages_parameters_move_and_stage_2_gets_a_fresh_optimizer(tmp_path):
    trial = two_stage_trial(tmp_path, {"regime": "full", "lr": 1e-5})
    model, _ = build_trial_model(trial, LABELS)
    opt = prepare_stage(trial, model, 1, steps_per_epoch=1, to=torch.device("cpu"), amp_dtype=None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, opt)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith(("detr.class_embed.", "detr.bbox_embed.")) for n in moved)
    assert [g["initial_lr"] for g in opt.optimizer.param_groups] == [1e-3]  # the heads only: one group

    opt2 = prepare_stage(trial, model, 2, steps_per_epoch=1, to=torch.device("cpu"), amp_dtype=None)
    assert opt2.optimizer is not opt.optimizer and opt2.lr_scheduler.last_epoch == 0
    assert sorted(g["lr"] for g in opt2.optimizer.param_groups) == pytest.approx([1e-6, 1e-5])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, opt2)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("detr.backbone.") for n in moved) and any(n.startswith("detr.transformer.")
                                                                     for n in moved)
