"""Mixed precision, proven under CPU bf16 autocast: boxes are decoded in fp32 (DETR's heads, Faster R-CNN's
regressions and anchors) and FrozenBatchNorm2d keeps bf16 activations in bf16 (issue 13, defects 3 and 5)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from detsweep.models.backbone import FrozenBatchNorm2d
from detsweep.models.detr import build_detr
from detsweep.models.faster_rcnn import build_faster_rcnn

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
MAX_PX = 1333  # the longest image side of the official recipes: box errors are measured in its pixels
DETR_TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=32,
                 num_queries=50, num_classes=3, dropout=0.0, aux_loss=True)
RCNN_TINY = {"backbone": "resnet18", "min_size": 64, "max_size": 96}


def _random_boxes_xyxy(n: int, size: float) -> torch.Tensor:
    xy = torch.rand(n, 2) * size * 0.7
    return torch.cat([xy, xy + 16 + torch.rand(n, 2) * size * 0.3], dim=1)


def test_detr_heads_give_fp32_boxes_under_bf16_autocast():
    torch.manual_seed(0)
    detr = build_detr(**DETR_TINY).eval()
    decoder_out = []
    detr.transformer.register_forward_hook(lambda module, args, out: decoder_out.append(out[0]))
    with torch.no_grad(), torch.autocast(**BF16):
        out = detr([torch.randn(3, 64, 96), torch.randn(3, 80, 64)])
    with torch.no_grad():  # the same heads in fp32, outside autocast, on the same decoder features
        hs = decoder_out[0].float()
        ref_logits, ref_boxes = detr.class_embed(hs)[-1], detr.bbox_embed(hs).sigmoid()[-1]
    assert out["pred_boxes"].dtype == out["pred_logits"].dtype == torch.float32
    assert all(a["pred_boxes"].dtype == torch.float32 for a in out["aux_outputs"])
    assert (out["pred_boxes"] - ref_boxes).abs().max().item() * MAX_PX <= 0.01
    assert (out["pred_logits"] - ref_logits).abs().max().item() <= 1e-5


def test_faster_rcnn_box_decoding_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    roi_heads = build_faster_rcnn(num_classes=3, backbone="resnet18").model.eval().roi_heads
    box_features = torch.randn(64, 1024).bfloat16()  # the box head's output under autocast
    proposals = [_random_boxes_xyxy(64, MAX_PX)]
    with torch.no_grad(), torch.autocast(**BF16):
        _, regression = roi_heads.box_predictor(box_features)
        boxes = roi_heads.box_coder.decode(regression, proposals)
    with torch.no_grad():
        _, ref_regression = roi_heads.box_predictor(box_features.float())
        ref_boxes = roi_heads.box_coder.decode(ref_regression, proposals)
    assert boxes.dtype == torch.float32
    assert (boxes - ref_boxes).abs().max().item() <= 0.01


def test_faster_rcnn_anchors_and_proposals_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    rpn = build_faster_rcnn(num_classes=3, backbone="resnet18").model.eval().rpn
    h, w = 256, MAX_PX  # a wide image: anchors reach x = 1333
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    # The FPN's five maps (strides 4..64) as autocast gives them; the RPN head's output layers see them directly.
    features = [torch.randn(1, 256, h // s, w // s).bfloat16() for s in (4, 8, 16, 32, 64)]

    def proposals(maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        anchors = rpn.anchor_generator(images, maps)
        objectness, deltas = concat_box_prediction_layers([rpn.head.cls_logits(m) for m in maps],
                                                          [rpn.head.bbox_pred(m) for m in maps])
        return anchors[0], rpn.box_coder.decode(deltas, anchors).view(-1, 4)

    with torch.no_grad(), torch.autocast(**BF16):
        anchors, boxes = proposals(features)
    with torch.no_grad():
        ref_anchors, ref_boxes = proposals([f.float() for f in features])
    assert anchors.dtype == boxes.dtype == torch.float32
    assert torch.equal(anchors, ref_anchors)
    assert (boxes - ref_boxes).abs().max().item() <= 0.01


def test_faster_rcnn_detections_and_losses_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    detector = build_faster_rcnn(num_classes=3, **RCNN_TINY)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([0])}]
    with torch.autocast(**BF16):
        losses = detector.train()(images, targets)
        with torch.no_grad():
            detections = detector.eval()(images)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert all(d["boxes"].dtype == d["scores"].dtype == torch.float32 for d in detections)


# --- FrozenBatchNorm2d -------------------------------------------------------------------------


def _random_frozen_bn(cls: type, channels: int = 8, eps: float = 1e-5) -> torch.nn.Module:
    bn = cls(channels)
    bn.eps = eps
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).normal_()
    bn.running_var.uniform_(0.5, 2.0)
    return bn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_batchnorm_keeps_the_input_dtype(dtype):
    torch.manual_seed(0)
    bn = _random_frozen_bn(FrozenBatchNorm2d)
    x = torch.randn(2, 8, 5, 5)
    assert bn(x.to(dtype)).dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bn(torch.nn.functional.conv2d(x, torch.randn(8, 8, 1, 1))).dtype == torch.bfloat16


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_frozen_batchnorm_in_fp32_equals_torchvision_bit_for_bit(eps):
    torch.manual_seed(0)
    ours = _random_frozen_bn(FrozenBatchNorm2d, eps=eps)
    theirs = torchvision.ops.misc.FrozenBatchNorm2d(8, eps=eps)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(ours(x), theirs(x))
    assert list(ours.state_dict()) == ["weight", "bias", "running_mean", "running_var"]


def _frozen_bn_output_dtypes(model: torch.nn.Module, run) -> set[torch.dtype]:
    dtypes = set()
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, torchvision.ops.misc.FrozenBatchNorm2d)):
            m.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    with torch.no_grad(), torch.autocast(**BF16):
        run()
    return dtypes


def test_detr_backbone_stays_bf16_under_bf16_autocast():
    detr = build_detr(**DETR_TINY).eval()
    assert _frozen_bn_output_dtypes(detr, lambda: detr([torch.randn(3, 64, 64)])) == {torch.bfloat16}


def test_pretrained_faster_rcnn_uses_dtype_preserving_frozen_batchnorm(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(build_faster_rcnn(num_classes=3, **RCNN_TINY).model.state_dict(), path)
    model = build_faster_rcnn(num_classes=3, weights=str(path), **RCNN_TINY).model.eval()
    frozen = [m for m in model.modules() if isinstance(m, torchvision.ops.misc.FrozenBatchNorm2d)]
    assert frozen and all(type(m) is FrozenBatchNorm2d and m.eps == 1e-5 for m in frozen)
    assert _frozen_bn_output_dtypes(model, lambda: model([torch.rand(3, 64, 64)])) == {torch.bfloat16}
