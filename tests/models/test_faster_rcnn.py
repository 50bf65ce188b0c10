"""Faster R-CNN baseline: detector contract, torchvision layout, weight loading and adaptation."""

import hashlib
import logging
import math
import os
import re
import subprocess
import sys
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights
from torchvision.ops.misc import FrozenBatchNorm2d

from detsweep.models.faster_rcnn import (
    build_faster_rcnn,
    load_detector_state_dict,
    weights_enum,
)
from tests.models.hostile import CODE_RAN, Payload

K = 3
TINY = {"backbone": "resnet18", "min_size": 64, "max_size": 96}
LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
PREDICTOR = (
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
)


def _batch():
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 78.0, 30.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def _save(tmp_path, state, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def _cached_hub_file(torch_home, url):
    """Where torch.hub looks for `url`'s weights under TORCH_HOME; a file there skips the download."""
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / os.path.basename(urlparse(url).path)


def _plant_hub_file(torch_home, monkeypatch, enum, obj):
    """Save `obj` in torch hub's cache as torchvision names its files (`<stem>-<sha256 prefix>.pth`) and
    point `enum`'s URL at that name: the download is skipped (none is possible here), the hash check is not."""
    staged = torch_home / "staged.pth"
    torch_home.mkdir(parents=True, exist_ok=True)
    torch.save(obj, staged)
    prefix = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
    folder, name = enum.url.rsplit("/", 1)
    url = f"{folder}/{name.rsplit('-', 1)[0]}-{prefix}.pth"
    monkeypatch.setattr(enum.value, "url", url)  # torchvision's Weights dataclass holds the URL
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return staged.rename(_cached_hub_file(torch_home, url))


# --- contract -----------------------------------------------------------------------------------


def test_train_returns_finite_torchvision_losses_and_backpropagates():
    torch.manual_seed(0)
    detector = build_faster_rcnn(num_classes=K, **TINY).train()
    images, targets = _batch()
    losses = detector(images, targets)
    assert set(losses) == LOSS_KEYS
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    predictor = detector.model.roi_heads.box_predictor
    assert predictor.cls_score.weight.grad.abs().sum() > 0
    assert detector.model.backbone.body.conv1.weight.grad is not None  # from scratch: all trainable


def test_target_labels_reach_torchvision_shifted_by_one():
    detector = build_faster_rcnn(num_classes=K, **TINY).train()
    seen = []
    # roi_heads(features, proposals, image_sizes, targets): the targets torchvision trains on.
    detector.model.roi_heads.register_forward_pre_hook(lambda m, args: seen.append([t["labels"] for t in args[3]]))
    images, targets = _batch()
    detector(images, targets)
    assert [t.tolist() for t in seen[0]] == [[1, 3], [2]]
    assert [t["labels"].tolist() for t in targets] == [[0, 2], [1]]  # caller's targets untouched


def test_target_labels_are_shifted_without_reading_them_back(monkeypatch):
    # Range-checking labels here would be a host-device sync per image on a GPU; the dataset checks them.
    detector = build_faster_rcnn(num_classes=K, **TINY).train()
    images, targets = _batch()
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__int__", "__bool__"):
            m.setattr(torch.Tensor, name, lambda *a, _name=name: pytest.fail(f"Tensor.{_name} read a value back"))
        converted = detector._to_torchvision(targets[0])
    assert converted["labels"].tolist() == [1, 3]
    with pytest.raises(ValueError, match="needs targets"):
        detector(images)


def test_eval_returns_contiguous_labels_inside_the_image_without_score_threshold():
    torch.manual_seed(0)
    detector = build_faster_rcnn(num_classes=K, **TINY).eval()
    assert detector.model.roi_heads.score_thresh == 0.0
    assert detector.model.roi_heads.detections_per_img == 100
    images, _ = _batch()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == len(images)
    for image, det in zip(images, detections):
        h, w = image.shape[1:]
        n = det["boxes"].shape[0]
        assert 0 < n <= 100
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert det["labels"].dtype == torch.int64
        assert det["labels"].min() >= 0 and det["labels"].max() <= K - 1  # never K, never -1
        boxes = det["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert ((det["scores"] >= 0) & (det["scores"] <= 1)).all()


# --- architecture -------------------------------------------------------------------------------


def test_resnet50_layout_equals_torchvision_fasterrcnn_resnet50_fpn():
    ours = build_faster_rcnn(num_classes=90, backbone="resnet50").model.state_dict()
    ref = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91
    ).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet101"])  # resnet50: layout test above
def test_backbones_build_with_k_plus_one_predictor_rows(backbone):
    predictor = build_faster_rcnn(num_classes=K, backbone=backbone).model.roi_heads.box_predictor
    assert predictor.cls_score.weight.shape == (K + 1, 1024)
    assert predictor.bbox_pred.weight.shape == (4 * (K + 1), 1024)


def test_from_scratch_uses_batchnorm_and_trains_every_layer():
    model = build_faster_rcnn(num_classes=K, **TINY).model
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_param_groups_split_backbone_body_from_the_rest():
    detector = build_faster_rcnn(num_classes=K, **TINY)
    heads, body = detector.param_groups(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    assert (heads["lr"], body["lr"], heads["weight_decay"]) == (1e-4, 1e-5, 1e-4)
    body_params = list(detector.model.backbone.body.parameters())
    assert {id(p) for p in body["params"]} == {id(p) for p in body_params}
    assert len(heads["params"]) + len(body["params"]) == len(list(detector.parameters()))

    for p in body_params:
        p.requires_grad_(False)
    detector.model.rpn.requires_grad_(False)
    (only,) = detector.param_groups(lr=1e-4, lr_backbone=1e-5, weight_decay=0.0)  # empty body group dropped
    assert only["lr"] == 1e-4
    assert {id(p) for p in only["params"]} == {id(p) for p in detector.parameters() if p.requires_grad}


# --- weights: local checkpoints ----------------------------------------------------------------


def test_coco_layout_checkpoint_keeps_the_rows_of_the_dataset_categories(tmp_path):
    torch.manual_seed(1)
    coco = build_faster_rcnn(num_classes=90, **TINY).model.state_dict()  # 91 rows, row = COCO id
    path = _save(tmp_path, coco)
    ids = [3, 17, 88]
    detector = build_faster_rcnn(num_classes=3, weights=path, category_ids=ids, category_ids_are_coco=True, **TINY)
    loaded = detector.model.state_dict()

    rows = [0, *ids]
    assert torch.equal(loaded[PREDICTOR[0]], coco[PREDICTOR[0]][rows])
    assert torch.equal(loaded[PREDICTOR[1]], coco[PREDICTOR[1]][rows])
    box_rows = [4 * r + j for r in rows for j in range(4)]
    assert torch.equal(loaded[PREDICTOR[2]], coco[PREDICTOR[2]][box_rows])
    assert torch.equal(loaded[PREDICTOR[3]], coco[PREDICTOR[3]][box_rows])
    assert all(torch.equal(v, coco[k]) for k, v in loaded.items() if k not in PREDICTOR)


def test_pretrained_checkpoint_freezes_batchnorm_and_the_first_layers(tmp_path):
    path = _save(tmp_path, build_faster_rcnn(num_classes=K, **TINY).model.state_dict())
    body = build_faster_rcnn(num_classes=K, weights=path, **TINY).model.backbone.body
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}  # torchvision's default of 3
    body0 = build_faster_rcnn(num_classes=K, weights=path, trainable_backbone_layers=0, **TINY).model.backbone.body
    assert not any(p.requires_grad for p in body0.parameters())


def test_checkpoint_without_category_ids_gets_a_fresh_predictor(tmp_path):
    torch.manual_seed(2)
    source = build_faster_rcnn(num_classes=90, **TINY).model.state_dict()
    path = _save(tmp_path, {"model": source})  # the {"model": sd} layout
    loaded = build_faster_rcnn(num_classes=K, weights=path, **TINY).model.state_dict()
    assert loaded[PREDICTOR[0]].shape == (K + 1, 1024) and loaded[PREDICTOR[2]].shape == (4 * (K + 1), 1024)
    assert all(torch.equal(v, source[k]) for k, v in loaded.items() if k not in PREDICTOR)


@pytest.mark.parametrize("ckpt_classes,category_ids,are_coco,reason", [
    (90, [3, 7, 12], False, "the dataset is not COCO, so its category ids are not COCO's"),
    (90, [5, 95, 200], True, "category ids [95, 200] are not COCO ids (1..90)"),
    (90, None, True, "no category ids were given"),
    (20, [3, 7, 12], True, "the checkpoint has 21 class rows, not the COCO layout's 91"),
], ids=["synthetic_ids", "ids_outside_coco", "no_ids", "non_coco_checkpoint"])
def test_predictor_is_fresh_unless_coco_checkpoint_on_coco_data(ckpt_classes, category_ids, are_coco, reason,
                                                                 caplog):
    torch.manual_seed(6)
    source = build_faster_rcnn(num_classes=ckpt_classes, **TINY).model.state_dict()
    target = build_faster_rcnn(num_classes=K, **TINY).model
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k in PREDICTOR}
    with caplog.at_level(logging.INFO, logger="detsweep.models.faster_rcnn"):
        how = load_detector_state_dict(target, source, category_ids=category_ids, category_ids_are_coco=are_coco)
    assert how == "fresh"
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], fresh[k]) for k in PREDICTOR)
    assert all(torch.equal(v, source[k]) for k, v in loaded.items() if k not in PREDICTOR)
    ids = "" if category_ids is None else f", category_ids={category_ids}"
    assert caplog.messages == [f"checkpoint: loaded; box predictor freshly initialised (checkpoint "
                               f"{ckpt_classes + 1} class rows, model {K + 1}){ids}: {reason}"]


def test_same_classes_load_strictly_from_a_detector_state_dict(tmp_path):
    torch.manual_seed(3)
    source = build_faster_rcnn(num_classes=K, **TINY)
    path = _save(tmp_path, source.state_dict())  # FasterRCNNDetector's own "model."-prefixed keys
    loaded = build_faster_rcnn(num_classes=K, weights=path, category_ids=[10, 20, 95], **TINY).model.state_dict()
    expected = source.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.items())


def test_checkpoint_of_another_backbone_is_a_clear_error(tmp_path):
    path = _save(tmp_path, build_faster_rcnn(num_classes=K, **TINY).model.state_dict())
    with pytest.raises(ValueError, match=r"ckpt\.pth: does not fit this Faster R-CNN"):
        build_faster_rcnn(num_classes=K, backbone="resnet34", weights=path)
    bad = _save(tmp_path, {"backbone.body.conv1.weight": torch.zeros(1)}, "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision Faster R-CNN state dict, missing"):
        build_faster_rcnn(num_classes=K, weights=bad, **TINY)


# --- weights: torchvision enums (offline, through torch.hub's cache) ---------------------------


def test_weights_enum_selection():
    assert weights_enum("resnet50", "coco") is FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    assert weights_enum("resnet18", "imagenet") is ResNet18_Weights.IMAGENET1K_V1
    assert weights_enum("resnet50", "imagenet") is ResNet50_Weights.IMAGENET1K_V1
    assert weights_enum("resnet101", "none") is None


def test_coco_weights_load_through_torch_hub_and_adapt_rows(tmp_path, monkeypatch):
    torch.manual_seed(4)
    coco = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91
    ).state_dict()
    _plant_hub_file(tmp_path, monkeypatch, FasterRCNN_ResNet50_FPN_Weights.COCO_V1, coco)
    model = build_faster_rcnn(num_classes=2, weights="coco", category_ids=[1, 62], category_ids_are_coco=True,
                              min_size=64, max_size=64).model
    loaded = model.state_dict()
    assert torch.equal(loaded[PREDICTOR[0]], coco[PREDICTOR[0]][[0, 1, 62]])
    assert torch.equal(loaded["backbone.body.layer3.0.conv1.weight"], coco["backbone.body.layer3.0.conv1.weight"])
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and all(m.eps == 0.0 for m in frozen)  # COCO_V1 was trained with eps 0


def test_imagenet_weights_load_the_backbone_only(tmp_path, monkeypatch):
    torch.manual_seed(5)
    resnet = torchvision.models.resnet18().state_dict()  # with the classifier fc.*, as torchvision's file
    _plant_hub_file(tmp_path, monkeypatch, ResNet18_Weights.IMAGENET1K_V1, resnet)
    torch.manual_seed(5)
    scratch = build_faster_rcnn(num_classes=K, weights="none", **TINY).model.state_dict()
    torch.manual_seed(5)
    model = build_faster_rcnn(num_classes=K, weights="imagenet", **TINY).model
    body = model.backbone.body.state_dict()
    assert set(body) == {k for k in resnet if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert all(torch.equal(v, resnet[k]) for k, v in body.items())
    assert torch.equal(model.rpn.head.conv[0][0].weight, scratch["rpn.head.conv.0.0.weight"])  # same fresh init
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, FrozenBatchNorm2d))


HUB_WEIGHTS = [
    ("resnet50", "coco", FasterRCNN_ResNet50_FPN_Weights.COCO_V1),
    ("resnet50", "imagenet", ResNet50_Weights.IMAGENET1K_V1),
]


@pytest.mark.parametrize("backbone,weights,enum", HUB_WEIGHTS, ids=["coco", "imagenet"])
def test_cached_hub_file_with_wrong_hash_names_file_and_expected_prefix(backbone, weights, enum, tmp_path,
                                                                        monkeypatch):
    """torch hub checks the hash only while downloading; a foreign file already in its cache must fail."""
    cached = _cached_hub_file(tmp_path, enum.url)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = re.search(r"-([0-9a-f]+)\.pth$", enum.url).group(1)
    with pytest.raises(RuntimeError) as info:
        build_faster_rcnn(num_classes=K, backbone=backbone, weights=weights)
    assert re.fullmatch(
        rf"cached checkpoint {re.escape(str(cached))} has sha256 [0-9a-f]{{16}}\.\.\., but its name says it starts "
        rf"with '{expected}': the file is corrupt or not the official one; delete it to download it again",
        str(info.value),
    )


@pytest.mark.parametrize("backbone,weights,enum", HUB_WEIGHTS, ids=["coco", "imagenet"])
def test_hub_file_with_a_pickled_object_is_refused_by_weights_only(backbone, weights, enum, tmp_path, monkeypatch):
    state = {"conv1.weight": torch.zeros(1), "extra": Payload()}
    cached = _plant_hub_file(tmp_path, monkeypatch, enum, state)  # right hash: only weights_only can stop it
    with pytest.raises(ValueError) as info:
        build_faster_rcnn(num_classes=K, backbone=backbone, weights=weights)
    assert str(info.value) == (
        f"could not load checkpoint file {str(cached)!r}: it holds pickled objects other than tensors, which "
        f"torch.load(weights_only=True) refuses (Unsupported global: GLOBAL tests.models.hostile.record_code_ran)"
    )
    assert CODE_RAN == []


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"weights": "/nonexistent/frcnn.pth"},
            FileNotFoundError,
            "weights='/nonexistent/frcnn.pth' is neither one of ['none', 'coco', 'imagenet'] "
            "nor an existing checkpoint file",
        ),
        ({"category_ids": [1, 2]}, ValueError, "category_ids has 2 entries but num_classes=3: one id per class"),
        ({"category_ids": [3, 2, 1]}, ValueError, "category_ids must be distinct ints in ascending order, got [3, 2, 1]"),
    ],
)
def test_bad_arguments_name_the_value_and_the_choices(kwargs, error, message):
    with pytest.raises(error) as info:
        build_faster_rcnn(**{"num_classes": K, **kwargs})
    assert str(info.value) == message


@pytest.mark.parametrize("kwargs, key", [
    ({"backbone": "resnet18", "weights": "coco"}, "model.faster_rcnn.weights"),
    ({"backbone": "resnet152"}, "model.faster_rcnn.backbone"),
    ({"trainable_backbone_layers": 6}, "model.faster_rcnn.trainable_backbone_layers"),
    ({"min_size": 0}, "model.faster_rcnn.min_size"),
])
def test_the_loader_refuses_what_the_builder_only_asserts(kwargs, key):
    """User errors are raised once, by the sweep loader, with the key; the builder trusts a loaded config."""
    from detsweep.sweep import parse_sweep
    from detsweep.sweep.typed import SweepError

    with pytest.raises(SweepError) as info:
        parse_sweep({"name": "x", "model": {"faster_rcnn": kwargs}}, check_paths=False)
    assert str(info.value).startswith(f"<memory>: {key}: "), str(info.value)
    with pytest.raises(AssertionError):
        build_faster_rcnn(**{"num_classes": K, **kwargs})


def test_module_does_not_import_ray():
    code = "import sys, detsweep.models.faster_rcnn; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_loading_with_category_ids_of_another_length_is_a_clear_error():
    model = build_faster_rcnn(num_classes=K, **TINY).model
    with pytest.raises(ValueError, match=r"^2 category_ids for a model with 3 classes: one id per class$"):
        load_detector_state_dict(model, model.state_dict(), category_ids=[1, 2])


def test_roi_sampling_and_eval_proposals_reach_torchvision():
    from detsweep.models.faster_rcnn import build_faster_rcnn

    det = build_faster_rcnn(num_classes=3, backbone="resnet18", min_size=64, max_size=64,
                            box_batch_size_per_image=64, rpn_post_nms_top_n_test=300)
    assert det.model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert det.model.rpn._post_nms_top_n["testing"] == 300
    default = build_faster_rcnn(num_classes=3, backbone="resnet18", min_size=64, max_size=64)
    assert default.model.roi_heads.fg_bg_sampler.batch_size_per_image == 512  # torchvision's own defaults
    assert default.model.rpn._post_nms_top_n["testing"] == 1000
