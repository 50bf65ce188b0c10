"""Focal loss for DETR's classes (Deformable DETR's): the loss, the matcher's class cost and the sigmoid scores
against a case computed by hand, and configurable loss weights. The official `ce` default is unchanged (its
parity with facebookresearch/detr is test_detr_parity.py's)."""
from __future__ import annotations

import math

import pytest
import torch

from detsweep.models.criterion import PostProcess, SetCriterion, sigmoid_focal_loss
from detsweep.models.detr_detector import FOCAL_PRIOR_PROB, build_detr_detector, detr_weight_dict
from detsweep.models.matcher import HungarianMatcher

ALPHA, GAMMA = 0.25, 2.0
# One image, two queries, K = 2 classes (+ the unused "no object" logit), one target of class 0.
LOGITS = torch.tensor([[[2.0, -1.0, 0.5], [-0.5, 0.0, 3.0]]])
BOXES = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])  # equal: only the class cost decides
TARGETS = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.45, 0.5, 0.2, 0.3]])}]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def focal_term(logit: float, positive: bool) -> float:
    """One element of the sigmoid focal loss, written out from Lin et al. 2017."""
    p = sig(logit)
    if positive:
        return ALPHA * (1 - p) ** GAMMA * -math.log(p)
    return (1 - ALPHA) * p ** GAMMA * -math.log(1 - p)


def test_focal_loss_by_hand():
    # query 0 is matched to the class-0 target, query 1 is background; the "no object" logits are not used
    expected = (focal_term(2.0, True) + focal_term(-1.0, False) + focal_term(-0.5, False) + focal_term(0.0, False))
    onehot = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    got = sigmoid_focal_loss(LOGITS[..., :2], onehot, torch.tensor(1.0), ALPHA, GAMMA)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    criterion = SetCriterion(2, HungarianMatcher(focal=True), detr_weight_dict(1, False), eos_coef=0.1,
                             losses=["labels"], class_loss="focal")
    losses = criterion({"pred_logits": LOGITS, "pred_boxes": BOXES}, TARGETS)
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-6)
    assert losses["class_error"].item() == 0.0  # query 0's best class is 0


def test_focal_matcher_class_cost_by_hand():
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=0.0, cost_giou=0.0, focal=True)
    (cost,) = matcher.cost_matrices({"pred_logits": LOGITS, "pred_boxes": BOXES}, TARGETS)

    def class_cost(logit: float) -> float:  # Deformable DETR's: the positive minus the negative focal term
        p = sig(logit)
        return ALPHA * (1 - p) ** GAMMA * -math.log(p + 1e-8) - (1 - ALPHA) * p ** GAMMA * -math.log(1 - p + 1e-8)

    torch.testing.assert_close(cost, torch.tensor([[2 * class_cost(2.0)], [2 * class_cost(-0.5)]]),
                               rtol=1e-6, atol=1e-7)
    (rows, cols), = matcher({"pred_logits": LOGITS, "pred_boxes": BOXES}, TARGETS)
    assert rows.tolist() == [0] and cols.tolist() == [0]  # the confident query wins


def test_softmax_matcher_cost_is_unchanged_by_default():
    (cost,) = HungarianMatcher(1.0, 0.0, 0.0).cost_matrices({"pred_logits": LOGITS, "pred_boxes": BOXES}, TARGETS)
    torch.testing.assert_close(cost[:, 0], -LOGITS[0].softmax(-1)[:, 0])


def test_sigmoid_scores_in_post_processing():
    sizes = torch.tensor([[100.0, 200.0]])
    (out,) = PostProcess(sigmoid=True)({"pred_logits": LOGITS, "pred_boxes": BOXES}, sizes)
    assert out["labels"].tolist() == [0, 1]  # query 1's 3.0 "no object" logit plays no part
    torch.testing.assert_close(out["scores"], torch.tensor([sig(2.0), sig(0.0)]))
    (soft,) = PostProcess()({"pred_logits": LOGITS, "pred_boxes": BOXES}, sizes)
    torch.testing.assert_close(soft["scores"], LOGITS[0].softmax(-1)[:, :2].max(-1).values)


TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=32,
            num_queries=4, dropout=0.0)


def test_focal_detector_starts_from_the_prior_and_trains():
    torch.manual_seed(0)
    det = build_detr_detector(num_classes=3, class_loss="focal", loss_weights={"ce": 2.0}, **TINY)
    bias = det.detr.class_embed.bias.detach()
    torch.testing.assert_close(bias.sigmoid(), torch.full_like(bias, FOCAL_PRIOR_PROB))
    assert det.criterion.weight_dict["loss_ce"] == det.criterion.weight_dict["loss_ce_0"] == 2.0
    assert det.criterion.weight_dict["loss_bbox"] == 5.0 and det.criterion.matcher.cost_class == 2.0
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 56)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = det.train()(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total) and set(losses) >= {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"}
    total.backward()
    assert det.detr.class_embed.weight.grad[:3].abs().sum() > 0
    assert det.detr.class_embed.weight.grad[3].abs().sum() == 0  # the "no object" row is unused with focal
    scores = det.eval()(images)[0]["scores"]
    assert ((scores > 0) & (scores < 1)).all()


def test_ce_detector_keeps_the_official_recipe():
    det = build_detr_detector(num_classes=3, **TINY)
    assert det.criterion.class_loss == "ce" and not det.criterion.matcher.focal and not det.postprocess.sigmoid
    m = det.criterion.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (1.0, 5.0, 2.0)
    assert det.criterion.weight_dict == detr_weight_dict(2, True)
    with pytest.raises(ValueError, match=r"loss_weights keys \['cls'\] are not among \['ce', 'bbox', 'giou'\]"):
        build_detr_detector(num_classes=3, loss_weights={"cls": 1.0}, **TINY)
