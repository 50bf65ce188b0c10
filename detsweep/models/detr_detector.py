"""DETR on the torchvision detector contract: normalisation, target conversion, loss weighting, post-processing.

Train: `detector(images, targets) -> {loss name: weighted loss}`; eval: `detector(images) -> [{boxes, scores, labels}]`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detsweep.models.backbone import freeze_layers, frozen_layers_for
from detsweep.models.boxes import box_xyxy_to_cxcywh
from detsweep.models.criterion import PostProcess, SetCriterion
from detsweep.models.detr import DETR, build_detr
from detsweep.models.matcher import HungarianMatcher
from detsweep.models.vit import ViTBackbone
from detsweep.models.vit_weights import BACKBONE_PREFIX, load_vit_weights
from detsweep.models.weights import load_detr_weights


# torchvision's ImageNet statistics, as in the official DETR transforms.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_hw(h: int, w: int, min_size: int, max_size: int | None) -> tuple[int, int]:
    """Official `get_size_with_aspect_ratio`: shorter side -> min_size unless the longer would exceed max_size."""
    size = min_size
    if max_size is not None:
        short, long = float(min(h, w)), float(max(h, w))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


class DETRDetector(nn.Module):
    """Wraps `detr`, `criterion` and `postprocess` so the engine treats DETR like a torchvision detector.

    Attributes:
        category_ids: the original category id of each contiguous label (or None), for checkpoints.
        weights_summary: what `load_detr_weights` loaded, truncated or re-initialised.
    """

    def __init__(self, detr: DETR, criterion: SetCriterion, postprocess: PostProcess, *,
                 min_size: int | None = None, max_size: int | None = None,
                 category_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        if min_size is None and max_size is not None:
            raise ValueError(f"max_size={max_size} needs min_size as well (min_size=None means no resize)")
        for name, value in (("min_size", min_size), ("max_size", max_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of pixels or None, got {value}")
        self.detr = detr
        self.criterion = criterion
        self.postprocess = postprocess
        self.min_size = min_size
        self.max_size = max_size
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.num_classes = detr.num_classes
        self.weights_summary: dict[str, Any] = {"source": "none"}
        # Not persistent: constants, so checkpoints hold only DETR's own (official) keys under `detr.`.
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def _prepare(self, images: list[Tensor]) -> list[Tensor]:
        """Resize (if configured) and ImageNet-normalise each [3, H, W] image in 0..1."""
        out = []
        for img in images:
            if self.min_size is not None:
                h, w = resized_hw(img.shape[-2], img.shape[-1], self.min_size, self.max_size)
                if (h, w) != tuple(img.shape[-2:]):
                    img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False,
                                        antialias=True)[0]
            out.append((img - self.image_mean) / self.image_std)
        return out

    def _targets_to_official(self, targets: list[dict[str, Tensor]], sizes_hw: list[tuple[int, int]]
                             ) -> list[dict[str, Tensor]]:
        """xyxy absolute boxes -> cxcywh normalised by the image's own (unpadded, pre-resize) size."""
        if len(targets) != len(sizes_hw):
            raise ValueError(f"got {len(sizes_hw)} images but {len(targets)} targets")
        converted = []
        for i, (t, (h, w)) in enumerate(zip(targets, sizes_hw)):
            boxes_xyxy, labels = t["boxes"], t["labels"]
            if boxes_xyxy.dim() != 2 or boxes_xyxy.shape[-1] != 4 or len(labels) != len(boxes_xyxy):
                raise ValueError(f"target {i}: boxes must be [N, 4] with N labels, got boxes "
                                 f"{tuple(boxes_xyxy.shape)} and labels {tuple(labels.shape)}")
            # Labels are not range-checked here: on a GPU that is a host-device sync per image. The dataset
            # checks them once, on the CPU (`data.coco.CocoDetection`).
            # Same order as the official Normalize transform: convert, then divide by (w, h, w, h), here as
            # Python numbers: a [w, h, w, h] tensor made on the GPU would be a blocking copy per image.
            cx, cy, bw, bh = box_xyxy_to_cxcywh(boxes_xyxy.float()).unbind(-1)
            boxes_cxcywh_norm = torch.stack([cx / w, cy / h, bw / w, bh / h], dim=-1)
            converted.append({"boxes": boxes_cxcywh_norm, "labels": labels.to(torch.int64)})
        return converted

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """images: list of [3, H_i, W_i] float in 0..1.

        Train mode: targets (required) per image {"boxes": [N, 4] xyxy absolute pixels, "labels": [N] int64
        in 0..K-1}; returns the weighted losses (`loss_ce`, `loss_bbox`, `loss_giou` and `_<i>` aux copies).
        Eval mode: returns per image {"boxes": [Q, 4] xyxy in the input image's pixels, "scores": [Q],
        "labels": [Q] in 0..K-1}, all Q queries, no score threshold.
        """
        if not isinstance(images, (list, tuple)) or any(img.dim() != 3 or img.shape[0] != 3 for img in images):
            raise ValueError("images must be a list of [3, H, W] tensors, got "
                             f"{[tuple(i.shape) for i in images] if isinstance(images, (list, tuple)) else type(images)}")
        sizes_hw = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        if self.training and targets is None:
            raise ValueError("targets are required in train mode; call .eval() for predictions")
        outputs = self.detr(self._prepare(list(images)))
        if not self.training:
            target_sizes = torch.tensor(sizes_hw, dtype=torch.float32, device=outputs["pred_boxes"].device)
            return self.postprocess(outputs, target_sizes)
        losses = self.criterion(outputs, self._targets_to_official(targets, sizes_hw))
        # The official criterion also logs class_error and cardinality_error, which are not losses: left out, so
        # sum(loss_dict.values()) is exactly the official weighted total.
        weights = self.criterion.weight_dict
        return {k: v * weights[k] for k, v in losses.items() if k in weights}

    def predict_with_loss(self, images: list[Tensor], targets: list[dict[str, Tensor]]
                          ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Eval-mode detections (as `forward` in eval mode) and the weighted set-prediction losses of the
        very same forward: the validation loss the DETR fine-tuning literature reports, at no second pass."""
        sizes_hw = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        outputs = self.detr(self._prepare(list(images)))
        target_sizes = torch.tensor(sizes_hw, dtype=torch.float32, device=outputs["pred_boxes"].device)
        losses = self.criterion(outputs, self._targets_to_official(targets, sizes_hw))
        weights = self.criterion.weight_dict
        return self.postprocess(outputs, target_sizes), {k: v * weights[k] for k, v in losses.items() if k in weights}

    def param_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW param groups of the trainable parameters: backbone at lr_backbone, the rest at lr.

        Empty groups are left out (e.g. a frozen backbone). Call after the regime has set requires_grad.
        """
        for name, value in (("lr", lr), ("lr_backbone", lr_backbone), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        # The backbone's body (ResNet, ViT); a ViT's fresh neck trains at lr with input_proj.
        backbone_ids = {id(p) for p in self.detr.backbone[0].body.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"name": "transformer_and_heads", "params": [p for p in trainable if id(p) not in backbone_ids],
             "lr": lr, "weight_decay": weight_decay},
            {"name": "backbone", "params": [p for p in trainable if id(p) in backbone_ids],
             "lr": lr_backbone, "weight_decay": weight_decay},
        ]
        return [g for g in groups if g["params"]]


def detr_weight_dict(dec_layers: int, aux_loss: bool, ce: float = 1.0, bbox: float = 5.0,
                     giou: float = 2.0) -> dict[str, float]:
    """Official loss weights (ce 1, bbox 5, giou 2), copied for each aux decoder layer `_0.._{dec_layers-2}`."""
    weight_dict = {"loss_ce": ce, "loss_bbox": bbox, "loss_giou": giou}
    if aux_loss:
        base = dict(weight_dict)
        for i in range(dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    return weight_dict


_OFFICIAL_LOSS_WEIGHTS = {"ce": 1.0, "bbox": 5.0, "giou": 2.0}  # facebookresearch/detr main.py defaults
FOCAL_PRIOR_PROB = 0.01  # Lin et al. 2017 (RetinaNet) and Deformable DETR: every class starts at p = 0.01


def _loss_weights(given: Mapping[str, float] | None) -> dict[str, float]:
    unknown = sorted(set(given or {}) - set(_OFFICIAL_LOSS_WEIGHTS))
    if unknown:
        raise ValueError(f"loss_weights keys {unknown} are not among {list(_OFFICIAL_LOSS_WEIGHTS)}")
    return {**_OFFICIAL_LOSS_WEIGHTS, **{k: float(v) for k, v in (given or {}).items()}}


def _focal_prior(detr: DETR) -> None:
    """A fresh class head for the focal loss: bias log(p/(1-p)), so the loss does not start dominated by the
    many background queries (each class's sigmoid would otherwise start at 0.5)."""
    with torch.no_grad():
        detr.class_embed.bias.fill_(-math.log((1 - FOCAL_PRIOR_PROB) / FOCAL_PRIOR_PROB))


def build_detr_detector(*, num_classes: int, backbone: str = "resnet50", hidden_dim: int = 256, nheads: int = 8,
                        enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 2048,
                        num_queries: int = 100, dropout: float = 0.1, aux_loss: bool = True,
                        pre_norm: bool = False, min_size: int | None = None, max_size: int | None = None,
                        weights: str = "none", category_ids: Sequence[int] | None = None,
                        category_ids_are_coco: bool = False, class_loss: str = "ce", focal_alpha: float = 0.25,
                        focal_gamma: float = 2.0, loss_weights: Mapping[str, float] | None = None) -> DETRDetector:
    """DETR for `num_classes` contiguous labels with the official recipe: matcher costs 1/5/2, loss weights
    1/5/2 (+ aux copies), eos_coef 0.1. `loss_weights` ({ce, bbox, giou}, default the official 1/5/2) weight the
    losses and the matcher's costs alike, as the official defaults do. `class_loss="focal"`: Deformable DETR's
    sigmoid focal loss (`focal_alpha`, `focal_gamma`), its matcher class cost and sigmoid scores; a fresh class
    head then starts from its prior (bias -log((1-0.01)/0.01)), and the "no object" logit goes unused.
    `weights`: "none", "imagenet" (the backbone only, the official starting point; a ViT's: `vit_weights`),
    "lvd142m" (DINOv2), "backbone:PATH", "coco" or a DETR checkpoint path (see `load_detr_weights`); a ResNet's
    parts frozen follow from it (`backbone.frozen_layers_for`: the official stem + layer1 when pretrained, nothing
    from random init);
    `category_ids`: original category id of each label, sorted; with `category_ids_are_coco` (the dataset is
    COCO) they keep a COCO checkpoint's class rows, else a checkpoint of other classes gets a fresh class head.
    """
    if category_ids is not None and len(category_ids) != num_classes:
        raise ValueError(f"category_ids has {len(category_ids)} ids but num_classes is {num_classes}; "
                         "give one original category id per contiguous label")
    detr = build_detr(backbone=backbone, hidden_dim=hidden_dim, nheads=nheads, enc_layers=enc_layers,
                      dec_layers=dec_layers, dim_feedforward=dim_feedforward, num_queries=num_queries,
                      num_classes=num_classes, dropout=dropout, aux_loss=aux_loss, pre_norm=pre_norm)
    vit = isinstance(detr.backbone[0], ViTBackbone)
    if vit and (weights in ("imagenet", "lvd142m") or weights.startswith(BACKBONE_PREFIX)):
        summary = load_vit_weights(detr.backbone[0], weights)  # the backbone only, as `imagenet` for a ResNet
    else:
        summary = load_detr_weights(detr, weights, category_ids=None if category_ids is None else list(category_ids),
                                    category_ids_are_coco=category_ids_are_coco)
    if not vit:  # pretrained starts keep the official frozen stem + layer1; from random init everything trains
        freeze_layers(detr.backbone[0], frozen_layers_for(weights))
    w = _loss_weights(loss_weights)
    focal = class_loss == "focal"
    if focal and summary.get("class_embed", "reinitialised") == "reinitialised":
        _focal_prior(detr)
    matcher = HungarianMatcher(cost_class=w["ce"], cost_bbox=w["bbox"], cost_giou=w["giou"], focal=focal,
                               focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    criterion = SetCriterion(num_classes, matcher, detr_weight_dict(dec_layers, aux_loss, **w), eos_coef=0.1,
                             losses=["labels", "boxes", "cardinality"], class_loss=class_loss,
                             focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    detector = DETRDetector(detr, criterion, PostProcess(sigmoid=focal), min_size=min_size, max_size=max_size,
                            category_ids=category_ids)
    detector.weights_summary = summary
    return detector
