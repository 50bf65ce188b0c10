"""The names a sweep file may use for models, regimes, LoRA placements, backbones and weights: one
table each, torch-free, so that loading a sweep file never imports torch. The builders look their
names up here; the sweep loader refuses any other name before Ray starts."""
from __future__ import annotations

# model name (the sweep's `grid.model`) -> family (its section under `model:` in the sweep file)
MODELS: dict[str, str] = {"detr_r50": "detr", "fasterrcnn_r50_fpn": "faster_rcnn"}
FAMILIES: tuple[str, ...] = ("detr", "faster_rcnn")
# two_stage: heads first (backbone and transformer frozen), then `two_stage.stage2.regime` (DETR only).
REGIMES: tuple[str, ...] = ("full", "lora_only", "partial", "two_stage")
# What a `two_stage` trial may switch to after its heads-only first stage.
STAGE2_REGIMES: tuple[str, ...] = ("full", "lora_only", "partial")
# Regimes each family can run (Faster R-CNN's LoRA lives in its box head; its two-stage is not defined).
FAMILY_REGIMES: dict[str, tuple[str, ...]] = {"detr": REGIMES, "faster_rcnn": ("full", "lora_only", "partial")}
# Named LoRA placements, each a preset of module-name patterns (`models/lora_targets.py`).
LORA_PLACEMENTS: tuple[str, ...] = ("attention_only", "attention_ffn", "decoder_only", "qv_only",
                                    "backbone_attention", "backbone_attention+transformer", "box_head")
RESNET_BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101")
# Vision transformers (DETR only): torchvision's ViT-B/16, DINOv2 ViT-S/14 and ViT-B/14 (through timm).
VIT_BACKBONES: tuple[str, ...] = ("vit_b_16", "dinov2_vits14", "dinov2_vitb14")
BACKBONES: tuple[str, ...] = RESNET_BACKBONES + VIT_BACKBONES  # DETR's
FASTER_RCNN_BACKBONES: tuple[str, ...] = RESNET_BACKBONES  # torchvision's ResNet-FPN
# What each placement's patterns need in the model: DETR's transformer, a ViT backbone, Faster R-CNN's box
# head. A placement whose needs a trial's model lacks adapts nothing there; the grid drops that combination.
PLACEMENT_NEEDS: dict[str, frozenset[str]] = {
    "attention_only": frozenset({"detr_transformer"}), "attention_ffn": frozenset({"detr_transformer"}),
    "decoder_only": frozenset({"detr_transformer"}), "qv_only": frozenset({"detr_transformer"}),
    "backbone_attention": frozenset({"vit_backbone"}),
    "backbone_attention+transformer": frozenset({"vit_backbone", "detr_transformer"}),
    "box_head": frozenset({"box_head"}),
}
# Named weights (anything else is a checkpoint file's path; `backbone:PATH` a ViT backbone's own file).
NAMED_WEIGHTS: tuple[str, ...] = ("none", "coco", "imagenet", "lvd142m")
# The named weights each backbone has: coco is the official DETR-R50 / torchvision's Faster R-CNN R50, imagenet
# the ImageNet-1k classifier (ResNets, ViT-B/16), lvd142m DINOv2's own pretraining (through timm).
BACKBONE_WEIGHTS: dict[str, tuple[str, ...]] = {
    **{name: ("none", "imagenet") for name in ("resnet18", "resnet34", "resnet101", "vit_b_16")},
    "resnet50": ("none", "coco", "imagenet"),
    "dinov2_vits14": ("none", "lvd142m"), "dinov2_vitb14": ("none", "lvd142m"),
}


def family_of(model: str) -> str:
    """The family of `model`; a wrong name lists the known ones."""
    if model not in MODELS:
        raise ValueError(f"model {model!r} is not one of {sorted(MODELS)}")
    return MODELS[model]


def model_parts(family: str, backbone: str) -> frozenset[str]:
    """The parts of a model that LoRA placements look for (see PLACEMENT_NEEDS)."""
    if family == "faster_rcnn":
        return frozenset({"box_head"})
    return frozenset({"detr_transformer"} | ({"vit_backbone"} if backbone in VIT_BACKBONES else set()))


def placement_fits(placement: str, family: str, backbone: str) -> bool:
    """Whether `placement` finds its targets in a `family` model with `backbone`."""
    return PLACEMENT_NEEDS[placement] <= model_parts(family, backbone)
