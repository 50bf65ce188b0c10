"""Augmentation recipes keep boxes on their objects (flipped, resized, cropped), drop what a crop leaves
degenerate, and a padded DETR batch sees each image as it sees it alone: the padding mask reaches the
transformer and the positional encoding."""
from __future__ import annotations

import pytest
import torch

from detsweep.data.transforms import RECIPES, apply, eval_transform, train_transform
from detsweep.models.detr_detector import build_detr_detector


def _scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 96x128 black image with two white rectangles, and their boxes."""
    image = torch.zeros(3, 96, 128)
    boxes = torch.tensor([[10.0, 12.0, 50.0, 40.0], [70.0, 50.0, 120.0, 90.0]])
    for x0, y0, x1, y1 in boxes.int().tolist():
        image[:, y0:y1, x0:x1] = 1.0
    return image, boxes, torch.tensor([0, 1])


def _covered(image: torch.Tensor, box: torch.Tensor) -> float:
    """The share of the box's pixels that are bright, and of the bright blob inside it the box covers."""
    x0, y0, x1, y1 = box.round().int().tolist()
    inside = image.mean(0)[y0:y1, x0:x1] > 0.5
    return float(inside.float().mean()) if inside.numel() else 0.0


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_keeps_every_box_on_its_shape(recipe):
    torch.manual_seed(0)
    transform = train_transform(recipe, scale=128 / 800)
    for _ in range(25):
        image, boxes, labels = _scene()
        out, out_boxes, out_labels = apply(transform, image, boxes, labels)
        assert out_boxes.shape[0] == out_labels.shape[0] >= 0
        h, w = out.shape[-2:]
        assert (out_boxes[:, 0::2] >= 0).all() and (out_boxes[:, 0::2] <= w).all() and (out_boxes[:, 1::2] <= h).all()
        for box in out_boxes:
            # Resizing blurs the edges by a pixel and colour jitter dims the white: most of the box stays on it.
            assert _covered(out, box) > (0.6 if recipe == "photometric" else 0.8), (recipe, box)


def test_flip_moves_the_box_with_the_pixels():
    image, boxes, labels = _scene()
    flip = train_transform("hflip", flip_p=1.0)
    out, out_boxes, _ = apply(flip, image, boxes, labels)
    assert torch.equal(out_boxes[0], torch.tensor([128 - 50.0, 12.0, 128 - 10.0, 40.0]))
    assert _covered(out, out_boxes[0]) == 1.0


def test_the_detr_recipe_resizes_in_the_official_scales_and_eval_resizes_once():
    torch.manual_seed(0)
    transform = train_transform("detr", scale=1.0)
    shorter = {min(apply(transform, torch.zeros(3, 480, 640), torch.zeros(0, 4), torch.zeros(0))[0].shape[-2:])
               for _ in range(40)}
    # One of 480, 512, ..., 800 (a pixel off where a crop's aspect ratio rounds the other side down).
    assert all(min(abs(v - s) for s in range(480, 801, 32)) <= 1 for v in shorter) and len(shorter) > 3
    resized = apply(eval_transform("detr"), torch.zeros(3, 480, 640), torch.zeros(0, 4), torch.zeros(0))[0]
    assert tuple(resized.shape[-2:]) == (800, 1066)  # 640 * 800 / 480, rounded down
    assert eval_transform("detr", resize=False) is None and eval_transform("hflip") is None  # Faster R-CNN: no


def test_a_crop_drops_boxes_it_leaves_degenerate():
    from detsweep.data.transforms import RandomSizeCrop
    from torchvision.transforms import v2

    torch.manual_seed(3)
    crop = v2.Compose([RandomSizeCrop(20, 20), v2.SanitizeBoundingBoxes(labels_getter=lambda x: x[1]["labels"])])
    kept = [apply(crop, *_scene())[1].shape[0] for _ in range(30)]
    assert min(kept) == 0 and max(kept) >= 1  # a 20x20 crop often misses both rectangles


def test_padding_mask_reaches_the_transformer_and_the_positional_encoding():
    torch.manual_seed(0)
    model = build_detr_detector(num_classes=2, backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1,
                                dec_layers=1, dim_feedforward=64, num_queries=5, dropout=0.0).eval()
    small, big = torch.rand(3, 64, 64), torch.rand(3, 64, 128)
    seen = []
    handle = model.detr.backbone.register_forward_hook(lambda m, args, out: seen.append((out[1], out[2])))
    with torch.no_grad():
        model([small])
        model([small, big])
    handle.remove()
    (mask_alone, pos_alone), (mask_batch, pos_batch) = seen
    w = mask_alone.shape[-1]  # 64 px at stride 32: 2 feature columns
    assert not mask_alone.any() and not mask_batch[0, :, :w].any() and mask_batch[0, :, w:].all()
    assert not mask_batch[1].any()
    # The sine encoding is normalised over the unpadded extent: the small image's positions are its own.
    assert torch.allclose(pos_batch[0, :, :, :w], pos_alone[0], atol=1e-6)
