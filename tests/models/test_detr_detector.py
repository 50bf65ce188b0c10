"""DETRDetector: the torchvision contract around DETR, checked against the official fixture numbers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detsweep.models.boxes import box_cxcywh_to_xyxy
from detsweep.models.detr_detector import IMAGENET_MEAN, IMAGENET_STD, build_detr_detector, detr_weight_dict, resized_hw

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "detr"
TINY = FIXTURES / "detr_r18_tiny.pt"
needs_tiny = pytest.mark.skipif(not TINY.exists(), reason=f"DETR parity fixture not found at {TINY}")
SMALL = dict(num_classes=3, backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2,
             dim_feedforward=32, num_queries=5, dropout=0.0)


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(TINY, weights_only=True)


@pytest.fixture(scope="module")
def fixture_detector(ref, tmp_path_factory):
    """The fixture's official model, built by our detector builder from a checkpoint file."""
    path = tmp_path_factory.mktemp("ckpt") / "detr_r18_tiny.pth"
    torch.save({"model": ref["state_dict"]}, path)
    cfg = ref["config"]
    return build_detr_detector(
        num_classes=cfg["num_classes"], backbone=cfg["backbone"], hidden_dim=cfg["hidden_dim"], nheads=cfg["nheads"],
        enc_layers=cfg["enc_layers"], dec_layers=cfg["dec_layers"], dim_feedforward=cfg["dim_feedforward"],
        num_queries=cfg["num_queries"], dropout=cfg["dropout"], aux_loss=cfg["aux_loss"], weights=str(path))


def _raw_images(ref) -> list[torch.Tensor]:
    """Undo the fixture's ImageNet normalisation: the detector takes 0..1 images."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return [img * std + mean for img in ref["images"]]


def _xyxy_abs_targets(ref) -> list[dict[str, torch.Tensor]]:
    out = []
    for img, t in zip(ref["images"], ref["targets"]):
        h, w = img.shape[-2:]
        out.append({"boxes": box_cxcywh_to_xyxy(t["boxes"]) * torch.tensor([w, h, w, h]), "labels": t["labels"]})
    return out


@needs_tiny
def test_train_mode_returns_weighted_official_losses(ref, fixture_detector):
    fixture_detector.train()
    losses = fixture_detector(_raw_images(ref), _xyxy_abs_targets(ref))
    assert set(losses) == set(ref["weight_dict"])
    for key, weight in ref["weight_dict"].items():
        assert abs(losses[key].item() - weight * ref["loss_dict"][key].item()) <= 1e-5, key
    assert abs(sum(losses.values()).item() - ref["loss_total"].item()) <= 1e-5
    # The official criterion's diagnostics, which the detector leaves out of its losses.
    images = _raw_images(ref)
    sizes = [tuple(img.shape[-2:]) for img in images]
    with torch.no_grad():
        raw = fixture_detector.criterion(fixture_detector.detr(fixture_detector._prepare(images)),
                                         fixture_detector._targets_to_official(_xyxy_abs_targets(ref), sizes))
    stats = {k: v for k, v in raw.items() if k not in ref["weight_dict"]}
    assert set(stats) == {"class_error", "cardinality_error", "cardinality_error_0"}
    assert stats["class_error"].item() == pytest.approx(75.0) and stats["cardinality_error"].item() == 10.0


@needs_tiny
def test_eval_mode_returns_postprocess_in_input_pixels(ref, fixture_detector):
    fixture_detector.eval()
    with torch.no_grad():
        results = fixture_detector(_raw_images(ref))
    for img, ours, theirs, size in zip(ref["images"], results, ref["postprocess"], ref["target_sizes"]):
        assert set(ours) == {"boxes", "scores", "labels"}
        assert ours["boxes"].shape == (ref["config"]["num_queries"], 4)  # every query, no score threshold
        h, w = img.shape[-2:]
        fixture_hw = size.tolist()
        expected_boxes = theirs["boxes"] / torch.tensor(fixture_hw[::-1] * 2) * torch.tensor([w, h, w, h])
        assert (ours["boxes"] - expected_boxes).abs().max().item() <= 1e-3  # pixels; 1e-5 in normalised units
        assert (ours["scores"] - theirs["scores"]).abs().max().item() <= 1e-5
        assert torch.equal(ours["labels"], theirs["labels"])


def test_resized_hw_follows_the_official_rule():
    assert resized_hw(480, 640, 800, 1333) == (800, 1066)
    assert resized_hw(100, 1000, 800, 1333) == (133, 1330)  # the long side caps the short one
    assert resized_hw(640, 480, 800, None) == (1066, 800)
    assert resized_hw(800, 900, 800, 1333) == (800, 900)  # already there: untouched


def test_resize_maps_predictions_back_to_input_pixels():
    torch.manual_seed(0)
    resizing = build_detr_detector(**SMALL, min_size=96, max_size=200).eval()
    plain = build_detr_detector(**SMALL).eval()
    plain.load_state_dict(resizing.state_dict())
    image = torch.rand(3, 48, 64)
    with torch.no_grad():
        ours = resizing([image])[0]
        resized = F.interpolate(image[None], size=(96, 128), mode="bilinear", align_corners=False, antialias=True)[0]
        reference = plain([resized])[0]
    torch.testing.assert_close(ours["scores"], reference["scores"])
    torch.testing.assert_close(ours["boxes"], reference["boxes"] / 2)  # 96x128 -> back to 48x64 pixels


def test_backward_reaches_trained_layers_only_and_param_groups_follow_requires_grad():
    torch.manual_seed(0)
    detector = build_detr_detector(**SMALL).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 8.0, 40.0, 60.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = detector(images, targets)
    assert set(losses) == set(detr_weight_dict(dec_layers=2, aux_loss=True))
    sum(losses.values()).backward()
    body = detector.detr.backbone[0].body
    # weights "none": the whole ResNet trains, stem and layer1 included (backbone.frozen_layers_for).
    assert body.layer4[0].conv1.weight.grad is not None and body.layer1[0].conv1.weight.grad is not None

    groups = detector.param_groups(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("transformer_and_heads", 1e-4, 1e-4), ("backbone", 1e-5, 1e-4)]
    trainable = [p for p in detector.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in body.parameters() if p.requires_grad}

    for p in detector.detr.backbone.parameters():
        p.requires_grad_(False)
    detector.detr.class_embed.weight.requires_grad_(False)
    groups = detector.param_groups(lr=1e-4, lr_backbone=1e-5, weight_decay=0.0)
    assert [g["name"] for g in groups] == ["transformer_and_heads"]
    expected = {id(p) for p in detector.parameters() if p.requires_grad}
    assert {id(p) for p in groups[0]["params"]} == expected and len(groups[0]["params"]) == len(expected)
    assert id(detector.detr.class_embed.weight) not in expected
    torch.optim.AdamW(groups, lr=1e-4)  # accepted as-is


def test_weight_dict_has_aux_copies_per_non_final_decoder_layer():
    weight_dict = detr_weight_dict(dec_layers=6, aux_loss=True)
    assert len(weight_dict) == 18 and weight_dict["loss_bbox_4"] == 5.0 and "loss_ce_5" not in weight_dict
    assert detr_weight_dict(dec_layers=6, aux_loss=False) == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def test_user_errors_name_the_bad_value():
    detector = build_detr_detector(**SMALL).train()
    image = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match=r"targets are required in train mode; call .eval\(\) for predictions"):
        detector([image])
    # Labels are range-checked by the dataset, not here (a host-device sync per image on a GPU).
    bad = [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([2])}]
    with pytest.raises(ValueError, match=r"images must be a list of \[3, H, W\] tensors, got \[\(1, 32, 32\)\]"):
        detector([torch.rand(1, 32, 32)], bad)
    with pytest.raises(ValueError, match=r"max_size=100 needs min_size as well"):
        build_detr_detector(**SMALL, max_size=100)
    with pytest.raises(ValueError, match=r"category_ids has 2 ids but num_classes is 3"):
        build_detr_detector(**SMALL, category_ids=[1, 2])


def test_train_step_under_bf16_autocast_gives_finite_losses():
    torch.manual_seed(0)
    detector = build_detr_detector(**SMALL).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 8.0, 40.0, 60.0], [30.0, 10.0, 70.0, 30.0]]),
                "labels": torch.tensor([2, 0])},
               {"boxes": torch.tensor([[0.0, 0.0, 64.0, 48.0]]), "labels": torch.tensor([1])}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = detector(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total) and total.dtype == torch.float32
    total.backward()
    assert torch.isfinite(detector.detr.class_embed.weight.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_tiny
def test_cuda_matches_cpu(ref, fixture_detector):
    images = _raw_images(ref)
    on_gpu = copy.deepcopy(fixture_detector).to("cuda").eval()
    with torch.no_grad():
        cpu = fixture_detector.eval()(images)
        gpu = on_gpu([img.cuda() for img in images])
    for c, g in zip(cpu, gpu):
        # cuDNN may use TF32 convolutions: looser than the CPU parity tolerance.
        torch.testing.assert_close(g["scores"].cpu(), c["scores"], atol=1e-3, rtol=0)
        torch.testing.assert_close(g["boxes"].cpu(), c["boxes"], atol=0.5, rtol=0)
