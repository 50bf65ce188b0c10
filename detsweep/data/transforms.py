"""Augmentation recipes (`data.augment`) on `torchvision.transforms.v2`: boxes are `tv_tensors.BoundingBoxes`,
so every geometric transform moves them with the pixels, and `SanitizeBoundingBoxes` drops the boxes a crop
leaves degenerate (with their labels).

- `none`: nothing; `hflip`: a random horizontal flip (p 0.5);
- `detr`: the official DETR recipe (facebookresearch/detr `datasets/coco.py`): flip, then either a resize
  of the shorter side to one of 480, 512, ..., 800 (longer side at most 1333), or a resize to 400/500/600,
  a random crop of 384..600 px and the same multi-scale resize; eval resizes to 800 / at most 1333;
- `photometric`: `detr` plus colour jitter (brightness, contrast, saturation, hue), a light Gaussian blur
  and Gaussian noise (seed HW2's set).

Sizes are the official recipe's pixels, times `scale` (`data.image_size / 800` for synthetic data, so a
128 px smoke sweep gets 77..128 px scales; 1 for real data). DETR feeds its images as they come
(`model.detr.min_size` null), so the recipe's resize is the only one; Faster R-CNN resizes inside
torchvision's transform anyway, so for it the recipes flip, crop and colour but never resize.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

RECIPES = ("none", "hflip", "detr", "photometric")
# The official recipe's pixels.
SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
MAX_SIZE = 1333
CROP_RESIZE = (400, 500, 600)
CROP = (384, 600)
EVAL_SIZE = 800


class RandomSizeCrop(v2.Transform):
    """A random crop whose height and width are drawn from [min_size, max_size], clipped to the image
    (the official DETR's `RandomSizeCrop`), on v2's geometry so boxes follow."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch = int(torch.randint(min(self.min_size, h), min(h, self.max_size) + 1, ()))
        cw = int(torch.randint(min(self.min_size, w), min(w, self.max_size) + 1, ()))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.crop, inpt, **params)


def _px(sizes: Sequence[int], scale: float) -> list[int]:
    return [max(8, round(s * scale)) for s in sizes]


def _geometric(scale: float, resize: bool) -> list[v2.Transform]:
    flip = [v2.RandomHorizontalFlip(p=0.5)]
    if not resize:  # Faster R-CNN: its own transform resizes; keep the crop
        return flip + [v2.RandomApply([RandomSizeCrop(*_px(CROP, scale))], p=0.5)]
    multi = v2.RandomShortestSize(_px(SCALES, scale), max_size=_px([MAX_SIZE], scale)[0])
    cropped = v2.Compose([v2.RandomShortestSize(_px(CROP_RESIZE, scale)), RandomSizeCrop(*_px(CROP, scale)),
                          v2.RandomShortestSize(_px(SCALES, scale), max_size=_px([MAX_SIZE], scale)[0])])
    return flip + [v2.RandomChoice([multi, cropped])]


def _photometric() -> list[v2.Transform]:
    return [v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
            v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=(0.1, 1.0))], p=0.3),
            v2.RandomApply([v2.GaussianNoise(sigma=0.03)], p=0.3)]


def train_transform(recipe: str, *, scale: float = 1.0, resize: bool = True, flip_p: float = 0.5
                    ) -> v2.Transform | None:
    """The training transform of `recipe` on (float image 0..1, {"boxes": BoundingBoxes, "labels"}), None
    for `none`. `resize=False` leaves the resize to the model (Faster R-CNN); `flip_p`: `hflip`'s chance."""
    if recipe not in RECIPES:
        raise ValueError(f"augment recipe {recipe!r} is not one of {list(RECIPES)}")
    if recipe == "none":
        return None
    if recipe == "hflip":
        steps: list[v2.Transform] = [v2.RandomHorizontalFlip(p=flip_p)]
    else:
        steps = _geometric(scale, resize) + (_photometric() if recipe == "photometric" else [])
    return v2.Compose(steps + [v2.SanitizeBoundingBoxes(labels_getter=lambda inputs: inputs[1]["labels"])])


def eval_transform(recipe: str, *, scale: float = 1.0, resize: bool = True) -> v2.Transform | None:
    """The eval transform: the official 800 / at most 1333 resize for `detr` and `photometric` (DETR),
    else none."""
    if recipe in ("detr", "photometric") and resize:
        return v2.Resize(_px([EVAL_SIZE], scale)[0], max_size=_px([MAX_SIZE], scale)[0])
    return None


def apply(transform: v2.Transform | None, image: torch.Tensor, boxes_xyxy: torch.Tensor,
          labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `transform` on one image ([3, H, W]) and its boxes (xyxy absolute) and labels."""
    if transform is None:
        return image, boxes_xyxy, labels
    boxes = tv_tensors.BoundingBoxes(boxes_xyxy, format="XYXY", canvas_size=tuple(image.shape[-2:]))
    out_image, target = transform(tv_tensors.Image(image), {"boxes": boxes, "labels": labels})
    return out_image.as_subclass(torch.Tensor), target["boxes"].as_subclass(torch.Tensor), target["labels"]
