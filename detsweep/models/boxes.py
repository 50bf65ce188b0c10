"""Box format conversions and (generalized) IoU, as in facebookresearch/detr `util/box_ops.py`.

Formats: `xyxy` = (x0, y0, x1, y1); `cxcywh` = (center x, center y, width, height). Units follow the input.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes_cxcywh: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1), same units."""
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes_xyxy: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h), same units."""
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes_xyxy: Tensor) -> Tensor:
    """[N, 4] xyxy -> [N] areas."""
    return (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])


def box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union area: [N, 4], [M, 4] xyxy -> ([N, M] iou, [N, M] union)."""
    area1 = box_area(boxes1_xyxy)
    area2 = box_area(boxes2_xyxy)
    lt = torch.max(boxes1_xyxy[:, None, :2], boxes2_xyxy[:, :2])
    rb = torch.min(boxes1_xyxy[:, None, 2:], boxes2_xyxy[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


class NonFiniteBoxesError(ValueError):
    """Predicted boxes (or the logits matched with them) hold NaN/inf: the model has diverged (not a data problem)."""


def check_boxes(name: str, boxes_xyxy: Tensor) -> None:
    """Raise NonFiniteBoxesError on NaN/inf, ValueError on a box with x1 < x0 or y1 < y0 ([N, 4] xyxy).

    Note: a host-device sync on GPU; the matcher runs it only after its costs turned out non-finite.
    """
    valid = (boxes_xyxy[:, 2:] >= boxes_xyxy[:, :2]).all(dim=1)
    if not bool(valid.all()):
        if not bool(torch.isfinite(boxes_xyxy).all()):
            raise NonFiniteBoxesError(f"{name} holds non-finite values, e.g. {boxes_xyxy[~valid][:2].tolist()}")
        bad = boxes_xyxy[~valid][:5].tolist()
        raise ValueError(f"{name} has degenerate boxes (x1 < x0, y1 < y0 or nan), e.g. {bad}")


def generalized_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor, check: bool = True) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019): [N, 4], [M, 4] xyxy -> [N, M] in [-1, 1].

    With `check`, raises ValueError on a box with x1 < x0 or y1 < y0: such boxes give inf/nan silently
    (`check_boxes`, a host-device sync on GPU, as in the official code). The matcher and the criterion pass
    check=False: the matcher checks its costs once on the CPU instead, where it needs them anyway.
    """
    if check:
        check_boxes("boxes1_xyxy", boxes1_xyxy)
        check_boxes("boxes2_xyxy", boxes2_xyxy)
    iou, union = box_iou(boxes1_xyxy, boxes2_xyxy)
    lt = torch.min(boxes1_xyxy[:, None, :2], boxes2_xyxy[:, :2])
    rb = torch.max(boxes1_xyxy[:, None, 2:], boxes2_xyxy[:, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing
