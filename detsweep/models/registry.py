"""The names a sweep file may use for models, regimes, LoRA placements, backbones and weights: one
table each, torch-free, so that loading a sweep file never imports torch. The builders look their
names up here; the sweep loader refuses any other name before Ray starts."""
from __future__ import annotations

# model name (the sweep's `grid.model`) -> family (its section under `model:` in the sweep file)
MODELS: dict[str, str] = {"detr_r50": "detr", "fasterrcnn_r50_fpn": "faster_rcnn"}
FAMILIES: tuple[str, ...] = ("detr", "faster_rcnn")
REGIMES: tuple[str, ...] = ("full", "lora_only", "partial")
# Regimes each family can run (Faster R-CNN has no LoRA placement yet).
FAMILY_REGIMES: dict[str, tuple[str, ...]] = {"detr": REGIMES, "faster_rcnn": ("full", "partial")}
LORA_PLACEMENTS: tuple[str, ...] = ("attention_only", "attention_ffn", "decoder_only", "qv_only")
BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101")
# Named weights (anything else is a checkpoint file's path).
NAMED_WEIGHTS: tuple[str, ...] = ("none", "coco", "imagenet")


def family_of(model: str) -> str:
    """The family of `model`; a wrong name lists the known ones."""
    if model not in MODELS:
        raise ValueError(f"model {model!r} is not one of {sorted(MODELS)}")
    return MODELS[model]
