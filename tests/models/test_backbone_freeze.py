"""Which DETR backbone parameters train, per `weights` setting (bench/learn_probe.py measured the rule)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights

from detsweep.models import weights as weights_mod
from detsweep.models.backbone import BODY_PARTS, OFFICIAL_FROZEN_LAYERS, freeze_layers, frozen_layers_for
from detsweep.models.detr import build_detr
from detsweep.models.detr_detector import build_detr_detector
from detsweep.models.regimes import apply_regime
from tests.models.test_detr_weights import _hub_checkpoints, _plant_imagenet_resnet

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=32,
            num_queries=4, dropout=0.0)
# The stem's bn1 and every BatchNorm are FrozenBatchNorm2d: buffers, no parameters. So "conv1" is the stem.
OFFICIAL = {"conv1", "layer1"}


def _frozen_parts(detector) -> set[str]:
    body = detector.detr.backbone[0].body
    return {n.split(".")[0] for n, p in body.named_parameters() if not p.requires_grad}


def _checkpoint(tmp_path: Path, name: str) -> Path:
    torch.manual_seed(3)
    path = tmp_path / name
    torch.save({"model": build_detr(num_classes=3, aux_loss=True, **TINY).state_dict()}, path)
    return path


def _weights(kind: str, tmp_path: Path, monkeypatch) -> str:
    """The `weights` string for `kind`, with whatever it loads planted locally (nothing is downloaded)."""
    if kind == "imagenet":
        _plant_imagenet_resnet(tmp_path, monkeypatch, ResNet18_Weights.IMAGENET1K_V1,
                               torchvision.models.resnet18().state_dict())
    elif kind == "coco":
        staged = _checkpoint(tmp_path, "staged.pth")
        served = tmp_path / f"detr-tiny-{hashlib.sha256(staged.read_bytes()).hexdigest()[:8]}.pth"
        staged.rename(served)
        _hub_checkpoints(tmp_path, monkeypatch)
        monkeypatch.setattr(weights_mod, "DETR_R50_COCO_URL", served.as_uri())
    elif kind == "path":
        return str(_checkpoint(tmp_path, "base.pth"))
    return kind


@pytest.mark.parametrize(("kind", "frozen"), [
    ("none", set()),  # random init: nothing is frozen (bench/RESULTS.md, "Learning from scratch")
    ("imagenet", OFFICIAL),  # the official recipe for every pretrained start
    ("coco", OFFICIAL),
    ("path", OFFICIAL),  # e.g. a base detector pretrained on the synthetic source domain
])
def test_frozen_backbone_parts_per_weights(kind, frozen, tmp_path, monkeypatch):
    detector = build_detr_detector(num_classes=3, weights=_weights(kind, tmp_path, monkeypatch), **TINY)
    assert _frozen_parts(detector) == frozen
    trainable = {n for n, p in detector.named_parameters() if p.requires_grad}
    assert all(n in trainable for n, _ in detector.named_parameters() if not n.startswith("detr.backbone."))
    # `full` keeps what the builder froze; `partial` trains layer4 and the heads whatever the start.
    apply_regime(detector, "full")
    assert _frozen_parts(detector) == frozen
    apply_regime(detector, "partial")
    assert _frozen_parts(detector) == set(BODY_PARTS) - {"bn1", "layer4"}


def test_rule_table_and_official_default():
    assert OFFICIAL_FROZEN_LAYERS == ("conv1", "bn1", "layer1")
    assert frozen_layers_for("none") == ()
    assert all(frozen_layers_for(w) == OFFICIAL_FROZEN_LAYERS for w in ("imagenet", "coco", "/ckpt/base.pth"))
    # The bare builder (parity with the official code) keeps the official freezing, whatever the weights.
    torch.manual_seed(0)
    body = build_detr(num_classes=3, aux_loss=True, **TINY).backbone[0].body
    assert {n.split(".")[0] for n, p in body.named_parameters() if not p.requires_grad} == OFFICIAL


def test_freeze_layers_sets_both_ways_and_names_bad_parts():
    torch.manual_seed(0)
    backbone = build_detr(num_classes=3, aux_loss=True, **TINY).backbone[0]
    freeze_layers(backbone, ("layer3", "layer4"))
    assert {n.split(".")[0] for n, p in backbone.body.named_parameters() if not p.requires_grad} == {"layer3",
                                                                                                    "layer4"}
    freeze_layers(backbone, ())
    assert all(p.requires_grad for p in backbone.body.parameters())
    with pytest.raises(ValueError) as err:
        freeze_layers(backbone, ("stem",))
    assert str(err.value) == ("frozen backbone parts ['stem'] are not among "
                              "['conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4']")
