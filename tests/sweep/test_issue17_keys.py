"""The sweep keys of issue 17 at load and expansion: lora.targets checked on each trial's real model (built on
the meta device, torch imported only then), placements pruned where they adapt nothing, backbones' own
weights, focal loss and loss weights, two_stage's keys and ids, and extra_trials beside the grid."""
from __future__ import annotations

import subprocess
import sys

import pytest

from detsweep.sweep import expand, parse_sweep
from detsweep.sweep.typed import SweepError

TINY = {"detr": {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1,
                 "dim_feedforward": 32, "num_queries": 4},
        "faster_rcnn": {"backbone": "resnet18", "regimes": ["full", "lora_only"]}}


def trials(**raw) -> list[str]:
    return [t.trial_id for t in expand(parse_sweep({"name": "x", "model": TINY, **raw}, "f.yaml"))]


def error(**raw) -> str:
    with pytest.raises(SweepError) as e:
        trials(**raw)
    return str(e.value)


def test_placements_are_pruned_where_they_adapt_nothing():
    grid = {"model": ["detr_r50", "fasterrcnn_r50_fpn"], "regime": ["lora_only"],
            "lora.placement": ["attention_only", "box_head", "backbone_attention"]}
    assert trials(grid=grid) == ["detr_r18-lora_only-r8-attention_only", "fasterrcnn_r18_fpn-lora_only-r8-box_head"]
    vit = {"detr": {**TINY["detr"], "backbone": "dinov2_vits14"}, "faster_rcnn": TINY["faster_rcnn"]}
    assert trials(model=vit, grid={"regime": ["lora_only"], "lora.placement": ["backbone_attention", "box_head"]}) \
        == ["detr_dinov2_vits14-lora_only-r8-backbone_attention"]


def test_lora_targets_are_checked_on_the_trials_model():
    ok = trials(lora={"targets": [r"roi_heads\.box_head\.fc7"]},
                grid={"model": ["fasterrcnn_r50_fpn"], "regime": ["lora_only"]})
    assert ok == ["fasterrcnn_r18_fpn-lora_only-r8-targets"]
    msg = error(lora={"targets": [r"transformer\.decoder\.layers\.\d+\.self_atn"]}, grid={"regime": ["lora_only"]})
    assert msg.startswith(r"f.yaml: lora.targets: lora target pattern 'transformer\.decoder\.layers\.\d+\.self_atn' "
                          "matches no module of DETRDetector; adaptable modules are named like ['detr.transformer.")
    assert msg.endswith("(trial detr_r18-lora_only-r8-targets)")
    msg = error(lora={"targets": [r"backbone\.0\.body\.layer4\.0\.conv1"]}, grid={"regime": ["lora_only"]})
    assert "matches 'detr.backbone.0.body.layer4.0.conv1', a Conv2d: only nn.Linear and nn.MultiheadAttention" in msg
    msg = error(grid={"regime": ["lora_only"], "lora.targets": [["class_embed"], ["nope"]]})
    assert msg.startswith("f.yaml: grid.lora.targets: lora target pattern 'nope' matches no module")


def test_the_sweep_package_imports_without_torch():
    code = ("import sys; import detsweep.sweep; from detsweep.sweep import rules; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("detr,message", [
    ({"backbone": "dinov2_vits14", "weights": "imagenet"},
     "f.yaml: model.detr.weights: 'imagenet' does not exist for backbone 'dinov2_vits14'; it has ['none', 'lvd142m']"),
    ({"backbone": "resnet50", "weights": "lvd142m"},
     "f.yaml: model.detr.weights: 'lvd142m' does not exist for backbone 'resnet50'; it has ['none', 'coco', "
     "'imagenet']"),
    ({"class_loss": "bce"}, "f.yaml: model.detr.class_loss: 'bce' is not one of ['ce', 'focal']"),
    ({"focal_alpha": 1.5}, "f.yaml: model.detr.focal_alpha: 1.5 must be in [0, 1]"),
    ({"loss_weights": {"bbox": -1}}, "f.yaml: model.detr.loss_weights.bbox: -1.0 must be >= 0"),
    ({"loss_weights": {"cls": 1}}, "f.yaml: model.detr.loss_weights.cls: unknown key; allowed keys are "
                                   "['ce', 'bbox', 'giou']"),
])
def test_detr_keys_fail_at_load(detr, message):
    with pytest.raises(SweepError) as e:
        parse_sweep({"name": "x", "model": {"detr": detr}}, "f.yaml", check_paths=False)
    assert str(e.value) == message


def test_backbone_path_weights_are_for_vits_and_must_exist(tmp_path):
    f = tmp_path / "dinov2.pth"
    f.write_bytes(b"x")
    ok = parse_sweep({"name": "x", "model": {"detr": {"backbone": "dinov2_vitb14", "weights": f"backbone:{f}"}}},
                     "f.yaml")
    assert ok.model.detr.weights == f"backbone:{f}"
    with pytest.raises(SweepError, match="is neither one of"):
        parse_sweep({"name": "x", "model": {"detr": {"backbone": "vit_b_16", "weights": "backbone:/nope.pth"}}},
                    "f.yaml")
    with pytest.raises(SweepError, match="backbone:PATH loads a ViT backbone's own file"):
        parse_sweep({"name": "x", "model": {"detr": {"weights": f"backbone:{f}"}}}, "f.yaml")


def test_two_stage_keys_apply_to_two_stage_trials_only():
    grid = {"regime": ["full", "two_stage"], "two_stage.stage2.regime": ["full", "lora_only"],
            "two_stage.stage1.epochs": [1]}
    ids = trials(train={"epochs": 2}, grid=grid)
    assert ids == ["detr_r18-full", "detr_r18-two_stage-regimefull",
                   "detr_r18-two_stage-r8-attention_only-regimelora_only"]
    by_id = {t.trial_id: t for t in expand(parse_sweep({"name": "x", "model": TINY, "train": {"epochs": 2},
                                                        "grid": grid}, "f.yaml"))}
    assert by_id["detr_r18-full"].two_stage is None and by_id["detr_r18-full"].axes == {}
    assert by_id["detr_r18-two_stage-regimefull"].lora is None
    assert by_id["detr_r18-two_stage-r8-attention_only-regimelora_only"].lora.rank == 8
    assert error(train={"epochs": 2}, two_stage={"stage1": {"epochs": 2}}, grid={"regime": ["two_stage"]}) == (
        "f.yaml: two_stage.stage1.epochs: 2 must be < train.epochs (2): the second stage needs an epoch "
        "(trial detr_r18-two_stage)")
    with pytest.raises(SweepError, match=r"two_stage.stage2.regime: 'two_stage' is not one of \['full', 'lora_only', "
                                         r"'partial'\]"):
        parse_sweep({"name": "x", "two_stage": {"stage2": {"regime": "two_stage"}}}, "f.yaml")
    with pytest.raises(SweepError, match=r"model.faster_rcnn.regimes\[0\]: 'two_stage' is not one of"):
        parse_sweep({"name": "x", "model": {"faster_rcnn": {"regimes": ["two_stage"]}}}, "f.yaml")


def test_extra_trials_beside_the_grid():
    extra = [{"model": "fasterrcnn_r50_fpn", "regime": "lora_only", "lora.placement": "box_head", "lora.rank": 4},
             {"regime": "two_stage"}]
    assert trials(train={"epochs": 2}, grid={"regime": ["full"]}, extra_trials=extra) == [
        "detr_r18-full", "fasterrcnn_r18_fpn-lora_only-r4-box_head", "detr_r18-two_stage"]
    assert error(extra_trials=[{"lora.rank": 0}]) == "f.yaml: extra_trials[0].lora.rank: 0 must be > 0"
    assert error(extra_trials=[{"regime": "lora_only", "lora.placement": "box_head"}]) == (
        "f.yaml: extra_trials[0]: this trial is pruned: its regime is not in model.<family>.regimes, or its "
        "lora.placement adapts nothing in its model")
    # an extra trial names the keys it sets: it never takes the id of a grid trial it differs from
    assert trials(grid={"regime": ["full"]}, extra_trials=[{"train.lr": 0.5}]) == ["detr_r18-full", "detr_r18-full-lr0.5"]
