"""`build_model`: one function from a trial's model settings to a detector on the torchvision
contract (train: `model(images, targets) -> weighted loss dict`; eval: `model(images) -> list of
{boxes (xyxy, absolute), scores, labels}`). Names that are wrong list the known ones."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from detsweep.models.registry import family_of

if TYPE_CHECKING:  # the package imports no torch itself: `detsweep.models.registry` stays torch-free
    import torch


def _build_detr(cfg: Any, num_classes: int, category_ids: list[int] | None,
                category_ids_are_coco: bool) -> torch.nn.Module:
    from detsweep.models.detr_detector import build_detr_detector

    return build_detr_detector(
        num_classes=num_classes, backbone=cfg.backbone, hidden_dim=cfg.hidden_dim, nheads=cfg.nheads,
        enc_layers=cfg.enc_layers, dec_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward,
        num_queries=cfg.num_queries, dropout=cfg.dropout, aux_loss=cfg.aux_loss,
        min_size=cfg.min_size, max_size=cfg.max_size, weights=cfg.weights, category_ids=category_ids,
        category_ids_are_coco=category_ids_are_coco, class_loss=cfg.class_loss, focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma, loss_weights=vars(cfg.loss_weights))


def _build_faster_rcnn(cfg: Any, num_classes: int, category_ids: list[int] | None,
                       category_ids_are_coco: bool) -> torch.nn.Module:
    from detsweep.models.faster_rcnn import build_faster_rcnn

    return build_faster_rcnn(
        num_classes=num_classes, backbone=cfg.backbone, weights=cfg.weights, min_size=cfg.min_size,
        max_size=cfg.max_size, trainable_backbone_layers=cfg.trainable_backbone_layers,
        category_ids=category_ids, category_ids_are_coco=category_ids_are_coco,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test)


_BUILDERS = {"detr": _build_detr, "faster_rcnn": _build_faster_rcnn}


def build_model(model: str, cfg: Any, *, num_classes: int, category_ids: list[int] | None = None,
                category_ids_are_coco: bool = False) -> torch.nn.Module:
    """Build detector `model` (a key of `registry.MODELS`) from its family's config section
    (`DetrConfig` / `FasterRCNNConfig`), for `num_classes` contiguous labels whose original
    category ids are `category_ids`. Only when `category_ids_are_coco` (the sweep's `data.kind`
    is `coco`) do those ids pick a COCO checkpoint's class rows; otherwise a pretrained class
    head of another size is re-initialised."""
    return _BUILDERS[family_of(model)](cfg, num_classes, category_ids, category_ids_are_coco)
