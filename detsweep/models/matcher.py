"""Hungarian matching of DETR predictions to targets (facebookresearch/detr `models/matcher.py`, 29901c5)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detsweep.models.boxes import NonFiniteBoxesError, box_cxcywh_to_xyxy, check_boxes, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class*(-p[class]) + cost_bbox*L1 + cost_giou*(-GIoU).

    Defaults are the official recipe's (1, 5, 2). Predictions left unmatched are "no object".
    With `focal=True` the class cost is Deformable DETR's, matching its sigmoid focal loss: with p = sigmoid(logit)
    of the target class, alpha·(1-p)^gamma·(-log p) - (1-alpha)·p^gamma·(-log(1-p)).
    Outputs are {"pred_logits": [B, Q, K+1], "pred_boxes": [B, Q, 4] cxcywh norm}; targets
    [{"labels": [N_i] int64, "boxes": [N_i, 4] cxcywh norm}].
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, *,
                 focal: bool = False, focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.focal, self.focal_alpha, self.focal_gamma = focal, focal_alpha, focal_gamma
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher needs at least one non-zero cost, got cost_class=cost_bbox=cost_giou=0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def _costs(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
        """Cost of every prediction against every target of the batch: [B, Q, sum N_i], on the outputs' device.

        NaN where a target box is degenerate, so that it shows in the one finiteness check on the CPU.
        """
        bs, num_queries = outputs["pred_logits"].shape[:2]
        # Batched over all images at once (one big matrix, then split): cheaper than a loop over images.
        # float32 costs even under autocast: near-ties in bf16 would make the assignment arbitrary.
        logits = outputs["pred_logits"].flatten(0, 1).float()
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).float()
        tgt_xyxy = box_cxcywh_to_xyxy(tgt_bbox)
        if self.focal:
            cost_class = self._focal_class_cost(logits[:, tgt_ids])
        else:
            # -p[target class] approximates the NLL; the constant 1 of (1 - p) does not change the assignment.
            cost_class = -logits.softmax(-1)[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        # Unchecked: GIoU's own check would be a host-device sync per call; `match_layers` checks once on the CPU.
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), tgt_xyxy, check=False)
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        degenerate = (tgt_xyxy[:, 2:] < tgt_xyxy[:, :2]).any(dim=1)
        return cost.masked_fill(degenerate, float("nan")).view(bs, num_queries, len(tgt_ids))

    def _focal_class_cost(self, logits: Tensor) -> Tensor:
        """Deformable DETR's matcher class cost on the target classes' logits [Q', N] (1e-8 as there)."""
        prob = logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        return pos - neg

    def cost_matrices(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """Per-image cost matrices [Q, N_i] on the CPU (see the class docstring for the layout)."""
        cost = self._costs(outputs, targets).cpu()  # note: a host-device sync point
        sizes = [len(t["boxes"]) for t in targets]
        return [c[i] for i, c in enumerate(cost.split(sizes, -1))]

    @torch.no_grad()
    def match_layers(self, layers: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> list[Indices]:
        """Match the outputs of several decoder layers to the same targets: one Indices per layer.

        The costs of all layers cross to the CPU together and the indices come back together: one host-device
        sync per training step instead of one per layer, plus one asynchronous copy. Raises NonFiniteBoxesError
        when the predictions are NaN/inf and ValueError on a degenerate target box.
        """
        costs = torch.stack([self._costs(outputs, targets) for outputs in layers])
        costs = costs.cpu()  # note: a host-device sync point, the matcher's only one (scipy runs on the CPU)
        if not np.isfinite(costs.numpy()).all():  # on the CPU copy: no further sync
            _raise_for_non_finite(layers, targets)
        sizes = [len(t["boxes"]) for t in targets]
        assignments = [[linear_sum_assignment(c[i].numpy()) for i, c in enumerate(layer.split(sizes, -1))]
                       for layer in costs]
        return _indices_on(layers[0]["pred_logits"].device, assignments)

    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> Indices:
        """Match each image: returns [(pred_idx [n_i] int64, target_idx [n_i] int64)] with n_i = min(Q, N_i),
        on the outputs' device. pred_idx is sorted ascending (scipy's row order)."""
        return self.match_layers([outputs], targets)[0]


def _indices_on(device: torch.device, assignments: list[list[tuple[np.ndarray, np.ndarray]]]) -> list[Indices]:
    """scipy's (rows, cols) per layer and image -> int64 tensors on `device`, moved in one copy.

    Indexing device tensors with CPU indices would copy each index tensor in a blocking transfer (a sync each).
    """
    flat = [torch.as_tensor(x, dtype=torch.int64) for layer in assignments for pair in layer for x in pair]
    packed = torch.cat(flat) if flat else torch.empty(0, dtype=torch.int64)
    if device.type == "cuda":
        packed = packed.pin_memory()  # from pinned memory the copy is truly asynchronous
    parts = iter(packed.to(device, non_blocking=True).split([len(x) for x in flat]))
    return [[(next(parts), next(parts)) for _ in layer] for layer in assignments]


def _raise_for_non_finite(layers: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
    """Name what made a matching cost non-finite (runs only on failure, so its syncs do not matter)."""
    check_boxes("target boxes", box_cxcywh_to_xyxy(torch.cat([t["boxes"] for t in targets]).float()))
    for outputs in layers:
        for key in ("pred_boxes", "pred_logits"):
            values = outputs[key].detach().float()
            if not bool(torch.isfinite(values).all()):
                bad = values[~torch.isfinite(values)][:4].tolist()
                raise NonFiniteBoxesError(f"{key} hold non-finite values, e.g. {bad}")
    raise AssertionError("non-finite matching cost from finite predictions and valid targets")
