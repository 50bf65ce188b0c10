"""Hungarian matching of DETR predictions to targets (facebookresearch/detr `models/matcher.py`, 29901c5)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detsweep.models.boxes import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class*(-p[class]) + cost_bbox*L1 + cost_giou*(-GIoU).

    Defaults are the official recipe's (1, 5, 2). Predictions left unmatched are "no object".
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher needs at least one non-zero cost, got cost_class=cost_bbox=cost_giou=0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def cost_matrices(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """Per-image cost matrices [Q, N_i] (on CPU) for outputs {"pred_logits": [B,Q,K+1],
        "pred_boxes": [B,Q,4] cxcywh norm} and targets [{"labels": [N_i] int64, "boxes": [N_i,4] cxcywh norm}].
        """
        bs, num_queries = outputs["pred_logits"].shape[:2]
        # Batched over all images at once (one big matrix, then split): cheaper than a loop over images.
        # float32 costs even under autocast: near-ties in bf16 would make the assignment arbitrary.
        out_prob = outputs["pred_logits"].flatten(0, 1).float().softmax(-1)
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).float()
        # -p[target class] approximates the NLL; the constant 1 of (1 - p) does not change the assignment.
        cost_class = -out_prob[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(bs, num_queries, -1).cpu()  # note: a host-device sync point
        sizes = [len(t["boxes"]) for t in targets]
        return [c[i] for i, c in enumerate(cost.split(sizes, -1))]

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match each image: returns [(pred_idx [n_i] int64, target_idx [n_i] int64)] with n_i = min(Q, N_i).

        pred_idx is sorted ascending (scipy's row order). See `cost_matrices` for the input layout.
        """
        indices = []
        for c in self.cost_matrices(outputs, targets):
            rows, cols = linear_sum_assignment(c.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
