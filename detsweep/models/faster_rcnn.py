"""Torchvision's Faster R-CNN (ResNet-FPN) behind detsweep's detector contract.

Labels are contiguous 0..K-1 outside and torchvision's 1..K inside (0 is its background).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum
from torchvision.models.detection import FasterRCNN, FasterRCNN_ResNet50_FPN_Weights
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone

# torchvision's FrozenBatchNorm2d, but it keeps bf16/fp16 activations in their dtype (issue 13).
from detsweep.models.backbone import FrozenBatchNorm2d
from detsweep.models.registry import FASTER_RCNN_BACKBONES as BACKBONES
from detsweep.models.registry import BACKBONE_WEIGHTS
from detsweep.models.weights import (IMAGENET_RESNETS, coco_rows_unusable, load_checkpoint_file, load_hub_checkpoint,
                                     load_imagenet_body)

logger = logging.getLogger(__name__)

# Named weights of a ResNet-FPN (anything else is a state dict's path); DINOv2's `lvd142m` is DETR's only.
WEIGHTS: tuple[str, ...] = BACKBONE_WEIGHTS["resnet50"]

# torchvision's COCO layout: 91 rows, row 0 background, row c = COCO category id c (ids 1..90).
_COCO_ROWS = len(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
_CLS_W = "roi_heads.box_predictor.cls_score.weight"
_CLS_B = "roi_heads.box_predictor.cls_score.bias"
_BOX_W = "roi_heads.box_predictor.bbox_pred.weight"
_BOX_B = "roi_heads.box_predictor.bbox_pred.bias"
_ADAPTATIONS = {
    "selected": "rows of the COCO category ids kept",
    "kept": "kept as is",
    "fresh": "freshly initialised",
}

# Evaluation sees every detection (DESIGN "Metric definitions": AP with no score threshold);
# torchvision's default 0.05 threshold truncates the precision/recall curve and lowers AP.
_BOX_SCORE_THRESH = 0.0
_BOX_DETECTIONS_PER_IMG = 100  # COCO's maxDets


class FasterRCNNDetector(nn.Module):
    """torchvision FasterRCNN (`.model`) with contiguous labels 0..K-1 on both sides.

    Train: `forward(images, targets)` with images `list[Tensor[3,H,W]]` in 0..1 and targets
    `list[{"boxes": Tensor[N,4] xyxy absolute pixels, "labels": Tensor[N] int64 in 0..K-1}]`
    returns torchvision's loss dict: loss_classifier, loss_box_reg, loss_objectness,
    loss_rpn_box_reg (scalars).
    Eval: `forward(images)` returns per image `{"boxes": Tensor[D,4] xyxy absolute pixels of the
    input image, "scores": Tensor[D], "labels": Tensor[D] int64 in 0..K-1}`, D <= 100,
    with no score threshold.
    """

    def __init__(self, model: FasterRCNN, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("FasterRCNNDetector in train mode needs targets (got None)")
            return self.model(images, [self._to_torchvision(t) for t in targets])
        detections = self.model(images)
        return [{**d, "labels": d["labels"] - 1} for d in detections]

    def _to_torchvision(self, target: dict[str, Tensor]) -> dict[str, Tensor]:
        # Labels are not range-checked here: on a GPU that is a host-device sync per image. The
        # dataset checks them once, on the CPU (`data.coco.CocoDetection`).
        return {**target, "labels": target["labels"] + 1}

    def param_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer param groups of trainable params only: FPN/RPN/heads at `lr`, then the
        ResNet body (`model.backbone.body`) at `lr_backbone`; empty groups are left out."""
        body_ids = {id(p) for p in self.model.backbone.body.parameters()}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        rest = [p for p in trainable if id(p) not in body_ids]
        body = [p for p in trainable if id(p) in body_ids]
        groups = [
            {"params": rest, "lr": lr, "weight_decay": weight_decay},
            {"params": body, "lr": lr_backbone, "weight_decay": weight_decay},
        ]
        return [g for g in groups if g["params"]]


def weights_enum(backbone: str, weights: str) -> WeightsEnum | None:
    """The torchvision weights enum that `weights` names for `backbone` (None for "none").

    "coco" -> FasterRCNN_ResNet50_FPN_Weights.COCO_V1 (whole detector, resnet50 only);
    "imagenet" -> the backbone's IMAGENET1K_V1 classification weights.
    """
    # The sweep loader (sweep/rules.py) refuses these with the key, the value and the choices.
    assert backbone in BACKBONES and weights in WEIGHTS, (backbone, weights)
    if weights == "coco":
        assert backbone == "resnet50", f"COCO_V1 is a resnet50 detector, not {backbone!r}"
        return FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    if weights == "imagenet":
        return IMAGENET_RESNETS[backbone]  # also torchvision's detection recipe (`pretrained_backbone`)
    return None


def build_faster_rcnn(
    *,
    num_classes: int,
    backbone: str = "resnet50",
    weights: str = "none",
    min_size: int = 800,
    max_size: int = 1333,
    trainable_backbone_layers: int | None = None,
    category_ids: Sequence[int] | None = None,
    category_ids_are_coco: bool = False,
    box_batch_size_per_image: int = 512,
    rpn_post_nms_top_n_test: int = 1000,
) -> FasterRCNNDetector:
    """Build torchvision's Faster R-CNN ResNet-FPN for `num_classes` foreground classes.

    With backbone="resnet50" the module tree is exactly `fasterrcnn_resnet50_fpn`'s.
    weights: "none" (random init, BatchNorm2d, every layer trainable, as torchvision does from
    scratch); "coco" (COCO_V1 detector, resnet50 only); "imagenet" (ImageNet ResNet loaded into
    the backbone body, fresh FPN/RPN/heads); or a path to a torchvision-layout state dict (bare,
    `{"model": sd}`, or a FasterRCNNDetector's own `model.`-prefixed one). Pretrained weights use
    FrozenBatchNorm2d. "coco" and "imagenet" come from the torchvision enum's URL through torch
    hub's cache, sha256-checked on every load; every file loads with weights_only=True.
    trainable_backbone_layers: 0..5 counted from layer4; None -> 3 when pretrained, 5 from scratch.
    category_ids: the dataset's original category ids, sorted, one per contiguous label.
    category_ids_are_coco: only for COCO data, with a COCO-layout checkpoint, are class rows kept by id.
    box_batch_size_per_image, rpn_post_nms_top_n_test: torchvision's RoIs sampled in training and
    proposals kept in eval (its defaults); small images with few objects need far fewer.
    """
    # The sweep loader refuses a bad backbone, size or layer count with the key and the choices; the data
    # layer gives num_classes >= 1. Internal asserts only.
    assert backbone in BACKBONES, backbone
    assert num_classes >= 1 and min_size >= 1 and max_size >= 1, (num_classes, min_size, max_size)
    if category_ids is not None:
        category_ids = _check_category_ids(category_ids, num_classes)

    is_path = weights not in WEIGHTS
    if is_path and not Path(weights).expanduser().is_file():
        raise FileNotFoundError(
            f"weights={weights!r} is neither one of {list(WEIGHTS)} nor an existing checkpoint file"
        )
    enum = None if is_path else weights_enum(backbone, weights)
    pretrained = weights != "none"
    layers = _trainable_layers(trainable_backbone_layers, pretrained)

    body = resnet_fpn_backbone(
        backbone_name=backbone,
        weights=None,  # ImageNet weights are loaded below, through our hash-checked, weights_only path
        # Pretrained statistics stay fixed: detection batches are too small for BatchNorm.
        norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d,
        trainable_layers=layers,
    )
    model = FasterRCNN(
        body,
        num_classes=num_classes + 1,  # + torchvision's background class 0
        min_size=min_size,
        max_size=max_size,
        box_score_thresh=_BOX_SCORE_THRESH,
        box_detections_per_img=_BOX_DETECTIONS_PER_IMG,
        box_batch_size_per_image=box_batch_size_per_image,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
    )
    _decode_boxes_in_fp32(model)
    assert type(model.backbone) is BackboneWithFPN, type(model.backbone)
    model.backbone.__class__ = _NoGradWhenFrozen  # as parametrize does: same parameters and state-dict keys

    if weights == "coco":
        load_detector_state_dict(model, load_hub_checkpoint(enum.url), category_ids=category_ids,
                                 category_ids_are_coco=category_ids_are_coco, source="COCO_V1")
        # COCO_V1 was trained before torchvision fixed FrozenBatchNorm2d's eps (pytorch/vision#2933);
        # torchvision's own builder resets it to 0 for exactly these weights.
        _set_frozen_bn_eps(model, 0.0)
    elif weights == "imagenet":
        load_imagenet_body(model.backbone.body, enum, "the FPN backbone's ResNet body")
        logger.info("%s: loaded into the backbone body; FPN, RPN and heads freshly initialised", enum)
    elif is_path:
        load_detector_state_dict(model, load_checkpoint_file(weights), category_ids=category_ids,
                                 category_ids_are_coco=category_ids_are_coco, source=str(weights))
    return FasterRCNNDetector(model, num_classes)


def load_detector_state_dict(
    model: FasterRCNN,
    checkpoint: Mapping[str, Any],
    *,
    category_ids: Sequence[int] | None = None,
    category_ids_are_coco: bool = False,
    source: str = "checkpoint",
) -> str:
    """Load a torchvision-layout Faster R-CNN state dict into `model`, adapting the box predictor.

    Predictor rows, in order of preference:
    - "selected": a COCO-layout checkpoint (91 rows), a COCO dataset (`category_ids_are_coco`)
      and `category_ids` all in 1..90 -> rows [0] + category_ids of cls_score, and rows
      4*id..4*id+3 of bbox_pred;
    - "kept": the checkpoint has as many classes as `model` -> loaded as they are;
    - "fresh": otherwise `model`'s freshly initialised predictor stays.
    Everything else loads with strict=True. Returns which of the three happened.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{source}: expected a state dict, got {type(checkpoint).__name__}")
    if isinstance(checkpoint.get("model"), Mapping):  # {"model": sd}, as DETR's checkpoints
        checkpoint = checkpoint["model"]
    state = dict(checkpoint)
    if state and all(k.startswith("model.") for k in state):  # a FasterRCNNDetector's state_dict
        state = {k[len("model."):]: v for k, v in state.items()}
    missing = [k for k in (_CLS_W, _CLS_B, _BOX_W, _BOX_B) if k not in state]
    if missing:
        raise ValueError(f"{source}: not a torchvision Faster R-CNN state dict, missing {missing}")

    ckpt_rows = state[_CLS_W].shape[0]
    ours = model.roi_heads.box_predictor
    our_rows = ours.cls_score.out_features
    if category_ids is not None and len(category_ids) + 1 != our_rows:
        raise ValueError(
            f"{len(category_ids)} category_ids for a model with {our_rows - 1} classes: one id per class"
        )
    ids = None if category_ids is None else list(category_ids)
    not_coco = coco_rows_unusable(ckpt_rows, _COCO_ROWS, ids, category_ids_are_coco)
    if not_coco is None:
        rows = torch.tensor([0, *category_ids])
        box_rows = (rows[:, None] * 4 + torch.arange(4)).flatten()
        state[_CLS_W], state[_CLS_B] = state[_CLS_W][rows], state[_CLS_B][rows]
        state[_BOX_W], state[_BOX_B] = state[_BOX_W][box_rows], state[_BOX_B][box_rows]
        how = "selected"
    elif ckpt_rows == our_rows:
        how = "kept"
    else:
        state[_CLS_W], state[_CLS_B] = ours.cls_score.weight.detach(), ours.cls_score.bias.detach()
        state[_BOX_W], state[_BOX_B] = ours.bbox_pred.weight.detach(), ours.bbox_pred.bias.detach()
        how = "fresh"
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{source}: does not fit this Faster R-CNN (backbone or layout differs): {err}"
        ) from err
    logger.info(
        "%s: loaded; box predictor %s (checkpoint %d class rows, model %d)%s%s",
        source,
        _ADAPTATIONS[how],
        ckpt_rows,
        our_rows,
        "" if category_ids is None else f", category_ids={list(category_ids)}",
        f": {not_coco}" if how == "fresh" else "",
    )
    return how


def _trainable_layers(requested: int | None, pretrained: bool) -> int:
    assert requested is None or 0 <= requested <= 5, requested  # the loader's rule
    if not pretrained:
        # Freezing random weights makes no sense; torchvision's builder forces 5 here too.
        if requested not in (None, 5):
            logger.warning("weights='none': trainable_backbone_layers=%d ignored, training all 5", requested)
        return 5
    return 3 if requested is None else requested


def _check_category_ids(category_ids: Sequence[int], num_classes: int) -> list[int]:
    ids = list(category_ids)
    if len(ids) != num_classes:
        raise ValueError(
            f"category_ids has {len(ids)} entries but num_classes={num_classes}: one id per class"
        )
    if any(not isinstance(c, int) or isinstance(c, bool) for c in ids) or ids != sorted(set(ids)):
        raise ValueError(f"category_ids must be distinct ints in ascending order, got {ids}")
    return ids


class _NoGradWhenFrozen(BackboneWithFPN):
    """torchvision's ResNet-FPN backbone that builds no autograd graph when none of its parameters trains
    (`lora_only`: the adapters sit in the box head), so its activations are not kept for a backward."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if any(p.requires_grad for p in self.parameters()):
            return super().forward(x)
        with torch.no_grad():
            return super().forward(x)


class _Fp32Forward:
    """Mixin for a layer whose output is decoded into boxes: it runs with autocast off on an fp32 copy of its
    input, so its output is fp32 whatever the autocast dtype."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class _Fp32Linear(_Fp32Forward, nn.Linear):
    pass


class _Fp32Conv2d(_Fp32Forward, nn.Conv2d):
    pass


def _decode_boxes_in_fp32(model: FasterRCNN) -> None:
    """Make the RPN's and the box head's regressions, and so torchvision's box decoding, fp32 under autocast.

    torchvision decodes boxes in the dtype of the regression output (`BoxCoder.decode_single` casts the reference
    boxes to it), and builds anchors in the feature maps' dtype: in bf16, decoding alone added 1.45 px of error
    on average and up to 15 px in issue 13's CPU check. The four output layers (the RPN head's 1x1 convs, the box
    predictor's Linear layers) are tiny, so they run in fp32: only their class changes, as
    `torch.nn.utils.parametrize` does, so parameters and state-dict keys stay torchvision's. The anchor generator
    gets fp32 stand-ins of the feature maps: it reads only their shape, dtype and device.
    """
    head, predictor = model.rpn.head, model.roi_heads.box_predictor
    for layer in (head.cls_logits, head.bbox_pred, predictor.cls_score, predictor.bbox_pred):
        layer.__class__ = {nn.Conv2d: _Fp32Conv2d, nn.Linear: _Fp32Linear}[type(layer)]
    model.rpn.anchor_generator.register_forward_pre_hook(_fp32_feature_maps)


def _fp32_feature_maps(module: nn.Module, args: tuple[Any, list[Tensor]]) -> tuple[Any, list[Tensor]]:
    """(image_list, feature maps) -> the same with each map an fp32 view of one element (no memory, no copy)."""
    image_list, feature_maps = args
    return image_list, [torch.empty((), dtype=torch.float32, device=f.device).expand(f.shape)
                         for f in feature_maps]


def _set_frozen_bn_eps(model: nn.Module, eps: float) -> None:
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = eps
