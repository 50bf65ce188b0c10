"""DETR's set loss and post-processing (facebookresearch/detr `models/detr.py::SetCriterion/PostProcess`, 29901c5),
with Deformable DETR's sigmoid focal loss as the alternative class loss (fundamentalvision/Deformable-DETR
`models/deformable_detr.py::loss_labels`, `models/segmentation.py::sigmoid_focal_loss`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from detsweep.models.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from detsweep.models.matcher import HungarianMatcher, Indices

KNOWN_LOSSES = ("labels", "boxes", "cardinality")
CLASS_LOSSES = ("ce", "focal")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017) on independent sigmoids, summed and divided by `num_boxes`.

    logits, targets: [B, Q, K] (targets one-hot, 0 rows for unmatched queries). Each element contributes
    ``alpha_t · (1 - p_t)^gamma · BCE``; `alpha` < 0 turns the class balance off (Deformable DETR's convention).
    Deformable DETR's `sigmoid_focal_loss(...) * Q`: the mean over queries times Q is the plain sum.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


def _src_permutation_idx(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch_idx [M], pred_idx [M]) for indexing [B, Q, ...] outputs at the matched predictions."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


class SetCriterion(nn.Module):
    """Hungarian-matched losses: weighted CE over K+1 classes (or, with `class_loss="focal"`, a sigmoid focal loss
    over the K real classes), L1 and GIoU on matched boxes.

    Returns unweighted losses keyed like the official code: `loss_ce`, `class_error`, `loss_bbox`, `loss_giou`,
    `cardinality_error`, plus `<key>_<i>` for aux decoder layer i (no `class_error_<i>`). `weight_dict` is kept
    for the caller to weight them. Unlike the official code, nothing here waits for the GPU except the matcher's
    one copy of the costs to the CPU: `num_boxes` stays a device tensor and the indices come back on the device.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float], eos_coef: float,
                 losses: list[str], class_loss: str = "ce", focal_alpha: float = 0.25, focal_gamma: float = 2.0
                 ) -> None:
        super().__init__()
        unknown = [loss for loss in losses if loss not in KNOWN_LOSSES]
        if unknown:
            raise ValueError(f"unknown losses {unknown}; allowed: {list(KNOWN_LOSSES)}")
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"class_loss {class_loss!r} is not one of {list(CLASS_LOSSES)}")
        self.class_loss = class_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef  # down-weights the many "no object" predictions
        # Not persistent: derived from eos_coef, and keeps a detector's checkpoint to DETR's official keys.
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def loss_labels(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], indices: Indices,
                    num_boxes: Tensor, log: bool = True) -> dict[str, Tensor]:
        """Weighted cross-entropy over all queries (unmatched ones target "no object" = num_classes)."""
        src_logits = outputs["pred_logits"]
        idx = _src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o
        if self.class_loss == "focal":
            # One-hot over the K real classes; "no object" (the last logit, unused here) is an all-zero row.
            onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(src_logits.dtype)
            loss = sigmoid_focal_loss(src_logits[..., :-1], onehot, num_boxes, self.focal_alpha, self.focal_gamma)
            losses = {"loss_ce": loss}
        else:
            losses = {"loss_ce": F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            losses["class_error"] = 100 - _top1_accuracy(src_logits[idx].detach(), target_classes_o)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], indices: Indices,
                         num_boxes: Tensor) -> dict[str, Tensor]:
        """L1 error between the number of non-"no object" predictions and of targets (logging only, no grad)."""
        pred_logits = outputs["pred_logits"]
        # Filled on the device from Python ints: torch.as_tensor(list, device="cuda") is a blocking copy (a sync).
        tgt_lengths = torch.stack([torch.full((), float(len(t["labels"])), device=pred_logits.device)
                                   for t in targets])
        if self.class_loss == "focal":  # a query predicts an object when its best class sigmoid passes 0.5
            card_pred = (pred_logits[..., :-1].max(-1).values > 0).sum(1)
        else:
            card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths)}

    def loss_boxes(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], indices: Indices,
                   num_boxes: Tensor) -> dict[str, Tensor]:
        """L1 and 1-GIoU between matched pred and target boxes (cxcywh normalised), summed / num_boxes."""
        idx = _src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        # Unchecked: the matcher has already checked these boxes, on the CPU, without a sync here.
        loss_giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes),
                                                       box_cxcywh_to_xyxy(target_boxes), check=False))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def _get_loss(self, loss: str, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]],
                  indices: Indices, num_boxes: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        fn = {"labels": self.loss_labels, "cardinality": self.loss_cardinality, "boxes": self.loss_boxes}[loss]
        return fn(outputs, targets, indices, num_boxes, **kwargs)

    def num_boxes(self, targets: list[dict[str, Tensor]], device: torch.device) -> Tensor:
        """Targets per process, averaged over processes when torch.distributed is initialised; at least 1.

        A 0-dim float tensor on `device`: the official `.item()` here would be a host-device sync per step.
        """
        # torch.full launches a fill, where torch.as_tensor([n], device="cuda") would be a blocking copy.
        num = torch.full((1,), float(sum(len(t["labels"]) for t in targets)), device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            world_size = dist.get_world_size()
        return torch.clamp(num / world_size, min=1)[0]

    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """outputs: DETR's dict ([B,Q,K+1] logits, [B,Q,4] cxcywh-norm boxes, optional aux_outputs);
        targets: per image {"labels": [N_i] int64 in 0..K-1, "boxes": [N_i, 4] cxcywh normalised}.
        """
        main_outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        aux_outputs = outputs.get("aux_outputs", [])
        # Every decoder layer matched at once: one host-device sync per step rather than one per layer.
        indices, *aux_indices = self.matcher.match_layers([main_outputs, *aux_outputs], targets)
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses: dict[str, Tensor] = {}
        for loss in self.losses:
            losses.update(self._get_loss(loss, main_outputs, targets, indices, num_boxes))
        for i, (aux, aux_idx) in enumerate(zip(aux_outputs, aux_indices)):
            for loss in self.losses:
                # class_error is logged for the final layer only, as in the official code.
                kwargs = {"log": False} if loss == "labels" else {}
                l_dict = self._get_loss(loss, aux, targets, aux_idx, num_boxes, **kwargs)
                losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
        return losses


@torch.no_grad()
def _top1_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Percentage of rows whose argmax equals target: [M, C], [M] -> scalar; 0 when M == 0 (official)."""
    if target.numel() == 0:
        return torch.zeros([], device=logits.device)
    pred = logits.topk(1, dim=1, largest=True, sorted=True)[1][:, 0]
    return (pred == target).float().sum() * (100.0 / target.numel())


class PostProcess(nn.Module):
    """DETR outputs -> per-image {"scores": [Q], "labels": [Q] in 0..K-1, "boxes": [Q, 4] xyxy absolute}.

    Scores: the softmax over K+1 classes without "no object" (official), or with `sigmoid=True` (focal loss)
    the best of the K independent class sigmoids; the "no object" logit is not used then."""

    def __init__(self, sigmoid: bool = False) -> None:
        super().__init__()
        self.sigmoid = sigmoid

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """target_sizes: [B, 2] (h, w) of each image in the pixels the boxes should be expressed in."""
        out_logits, out_bbox = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.dim() != 2 or target_sizes.shape != (len(out_logits), 2):
            raise ValueError(f"target_sizes must be [{len(out_logits)}, 2] (h, w), got {tuple(target_sizes.shape)}")
        prob = out_logits[..., :-1].sigmoid() if self.sigmoid else F.softmax(out_logits, -1)[..., :-1]
        scores, labels = prob.max(-1)  # best real class; the "no object" column is dropped
        boxes = box_cxcywh_to_xyxy(out_bbox)
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        boxes = boxes * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
