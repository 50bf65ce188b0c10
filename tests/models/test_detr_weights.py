"""DETR checkpoint loading: official layout, head/query/decoder adaptation, torch-hub 'coco' and 'imagenet' with
hash checks."""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights, ResNet101_Weights

from detsweep.models import weights as weights_mod
from detsweep.models.detr import build_detr
from detsweep.models.detr_detector import build_detr_detector
from detsweep.models.weights import IMAGENET_RESNETS, load_detr_weights
from tests.models.hostile import CODE_RAN, Payload

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dim_feedforward=32, dropout=0.0,
            aux_loss=True)
BIG = dict(num_classes=20, num_queries=10, dec_layers=3)  # the "pretrained" checkpoint's head sizes
COCO = dict(BIG, num_classes=91)  # the official COCO layout: 92 class rows, row c = COCO category id c
SMALL = dict(num_classes=3, num_queries=4, dec_layers=2)
TRUNCATION_LOGS = ["query_embed: kept the first 4 of the checkpoint's 10 queries",
                   "decoder: kept the first 2 of the checkpoint's 3 layers"]
WEIGHTS_LOGGER = "detsweep.models.weights"


def _detr(seed: int, **sizes):
    torch.manual_seed(seed)
    return build_detr(**TINY, **sizes)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _detr(0, **BIG).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "detr_big.pth"
    torch.save({"model": state}, path)  # the official layout
    return path, state


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _detr(0, **COCO).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "detr_coco.pth"
    torch.save({"model": state}, path)
    return path, state


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WEIGHTS_LOGGER]


def _assert_kept_parts_equal(small, state):
    """Everything except class_embed equals the checkpoint, truncated to the model's queries/decoder layers."""
    for key, value in small.state_dict().items():
        if key.startswith("class_embed."):
            continue
        expected = state[key][: value.shape[0]] if key == "query_embed.weight" else state[key]
        assert torch.equal(value, expected), key


def test_same_config_loads_strictly(big_checkpoint):
    path, state = big_checkpoint
    model = _detr(1, **BIG)
    summary = load_detr_weights(model, str(path))
    assert summary == {"source": str(path), "class_embed": "loaded", "num_queries": "loaded", "dec_layers": "loaded"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_coco_checkpoint_on_coco_data_keeps_class_rows_by_category_id(coco_checkpoint, caplog):
    """Only a COCO-layout checkpoint (92 rows) on a COCO dataset: then row c is COCO category id c."""
    path, state = coco_checkpoint
    model = _detr(1, **SMALL)
    with caplog.at_level(logging.INFO, logger=WEIGHTS_LOGGER):
        summary = load_detr_weights(model, str(path), category_ids=[2, 5, 17], category_ids_are_coco=True)
    assert summary["class_embed"] == "selected"
    assert summary["num_queries"] == "truncated 10->4" and summary["dec_layers"] == "truncated 3->2"
    rows = [2, 5, 17, 91]  # the three classes + the checkpoint's "no object" row
    assert torch.equal(model.class_embed.weight, state["class_embed.weight"][rows])
    assert torch.equal(model.class_embed.bias, state["class_embed.bias"][rows])
    _assert_kept_parts_equal(model, state)
    assert "transformer.decoder.norm.weight" in model.state_dict()
    messages = _messages(caplog)
    assert "class_embed: kept the COCO checkpoint's rows of category ids [2, 5, 17] (+ no-object row 91)" in messages
    assert all(line in messages for line in TRUNCATION_LOGS)


@pytest.mark.parametrize("checkpoint,category_ids,are_coco,reason", [
    ("coco_checkpoint", [3, 7, 12], False, "the dataset is not COCO, so its category ids are not COCO's"),
    ("coco_checkpoint", None, True, "no category ids were given"),
    ("coco_checkpoint", [0, 5, 95], True, "category ids [0, 95] are not COCO ids (1..90)"),
    ("big_checkpoint", [2, 5, 17], True, "the checkpoint has 21 class rows, not the COCO layout's 92"),
], ids=["synthetic_ids", "no_ids", "ids_outside_coco", "non_coco_checkpoint"])
def test_class_head_is_reinitialised_unless_coco_checkpoint_on_coco_data(checkpoint, category_ids, are_coco,
                                                                         reason, request, caplog):
    path, state = request.getfixturevalue(checkpoint)
    model = _detr(1, **SMALL)
    fresh = {k: v.clone() for k, v in model.class_embed.state_dict().items()}
    with caplog.at_level(logging.INFO, logger=WEIGHTS_LOGGER):
        summary = load_detr_weights(model, str(path), category_ids=category_ids, category_ids_are_coco=are_coco)
    assert summary["class_embed"] == "reinitialised"
    ckpt_classes = state["class_embed.weight"].shape[0] - 1
    messages = _messages(caplog)
    assert f"class_embed: re-initialised for the model's 3 classes (the checkpoint has {ckpt_classes}): {reason}" \
        in messages
    assert all(line in messages for line in TRUNCATION_LOGS)
    assert torch.equal(model.class_embed.weight, fresh["weight"]) and torch.equal(model.class_embed.bias, fresh["bias"])
    _assert_kept_parts_equal(model, state)


def test_bare_and_prefixed_state_dicts_load(big_checkpoint, tmp_path):
    _, state = big_checkpoint
    for name, saved in (("bare.pth", state), ("detector.pth", {f"detr.{k}": v for k, v in state.items()})):
        torch.save(saved, tmp_path / name)
        model = _detr(1, **BIG)
        load_detr_weights(model, str(tmp_path / name))
        assert torch.equal(model.query_embed.weight, state["query_embed.weight"]), name


def test_official_training_checkpoint_with_args_namespace_loads(big_checkpoint, tmp_path):
    """The official main.py saves model, optimizer, lr_scheduler, epoch and its argparse Namespace."""
    _, state = big_checkpoint
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299,
                "args": argparse.Namespace(lr=1e-4, backbone="resnet18")}, path)
    model = _detr(1, **BIG)
    load_detr_weights(model, str(path))
    assert torch.equal(model.class_embed.weight, state["class_embed.weight"])


def test_none_is_a_no_op():
    model = _detr(1, **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_detr_weights(model, "none") == {"source": "none"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_file_names_the_path_and_choices(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=rf"DETR weights file '{missing}' does not exist; weights must be "
                                                r"'none', 'imagenet', 'coco' or the path of a checkpoint file"):
        load_detr_weights(_detr(1, **SMALL), str(missing))


def test_mismatches_that_cannot_be_adapted_raise(big_checkpoint):
    path, _ = big_checkpoint
    with pytest.raises(ValueError, match=r"checkpoint backbone is resnet18 but the model's is resnet34"):
        load_detr_weights(build_detr(**{**TINY, "backbone": "resnet34"}, **BIG), str(path))
    with pytest.raises(ValueError, match=r"checkpoint has 10 queries but the model 12; use num_queries <= 10"):
        load_detr_weights(_detr(1, **{**BIG, "num_queries": 12}), str(path))
    with pytest.raises(ValueError, match=r"checkpoint has 3 decoder layers but the model 4; use dec_layers <= 3"):
        load_detr_weights(_detr(1, **{**BIG, "dec_layers": 4}), str(path))
    with pytest.raises(ValueError, match=r"checkpoint does not fit this DETR .*linear1.weight: checkpoint "
                                         r"\(32, 32\) vs model \(64, 32\)"):
        load_detr_weights(build_detr(**{**TINY, "dim_feedforward": 64}, **BIG), str(path))


def _faster_rcnn_state() -> dict[str, torch.Tensor]:
    from detsweep.models.faster_rcnn import build_faster_rcnn

    return build_faster_rcnn(num_classes=3, backbone="resnet18").model.state_dict()


@pytest.mark.parametrize("prefix", ["model.", ""], ids=["detsweep_model_pt", "torchvision_state_dict"])
def test_a_faster_rcnn_checkpoint_starts_only_detr_backbone(prefix, tmp_path, caplog):
    """The demo's DETR base starts from the Faster R-CNN base: its ResNet body (BatchNorm statistics
    included) lands in DETR's backbone, exactly; everything else keeps DETR's random init."""
    torch.manual_seed(3)
    state = _faster_rcnn_state()
    with torch.no_grad():  # trained statistics, so a load that skips them is caught
        state["backbone.body.bn1.running_mean"].uniform_(0.1, 0.9)
        state["backbone.body.layer4.1.bn2.running_var"].uniform_(2.0, 3.0)
    path = tmp_path / "model.pt"
    torch.save({f"{prefix}{k}": v for k, v in state.items()}, path)
    detr = _detr(1, **SMALL)
    before = {k: v.clone() for k, v in detr.state_dict().items()}
    with caplog.at_level(logging.INFO, logger=WEIGHTS_LOGGER):
        summary = load_detr_weights(detr, str(path))
    assert summary == {"source": str(path), "backbone": "faster_rcnn"}
    after = detr.state_dict()
    body = {k[len("backbone.body."):]: v for k, v in state.items()
            if k.startswith("backbone.body.") and not k.endswith("num_batches_tracked")}
    assert len(body) == len([k for k in after if k.startswith("backbone.0.body.")]) > 0
    for k, v in body.items():
        assert torch.equal(after[f"backbone.0.body.{k}"], v), k
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("backbone.0.body."))
    assert any("loaded the Faster R-CNN backbone of" in m for m in caplog.messages)


def test_a_faster_rcnn_checkpoint_of_another_backbone_is_one_clear_line(tmp_path):
    from detsweep.models.faster_rcnn import build_faster_rcnn

    path = tmp_path / "r34.pt"
    torch.save(build_faster_rcnn(num_classes=3, backbone="resnet34").model.state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_detr_weights(_detr(1, **SMALL), str(path))
    # resnet34 has 3/4/6/3 blocks where resnet18 has 2/2/2/2: 80 keys more, layer1.2 the first of them.
    assert str(info.value) == (f"{path}: its Faster R-CNN backbone does not fit DETR's resnet18 backbone (build "
                               "DETR with the Faster R-CNN's backbone): 0 missing keys [], 80 unexpected "
                               "['layer1.2.bn1.bias', 'layer1.2.bn1.running_mean'], shapes []")


def test_non_detr_checkpoint_is_a_clear_error(tmp_path):
    state = {k: v for k, v in _detr(0, **SMALL).state_dict().items() if k != "class_embed.weight"}
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_detr_weights(_detr(1, **SMALL), str(path))
    assert str(info.value) == (f"{path}: not a DETR state dict; expected keys like backbone.0.body.*, "
                               f"class_embed.weight, class_embed.bias, query_embed.weight; got keys like "
                               f"{sorted(state)[:3]}")


def test_checkpoint_with_a_pickled_object_is_refused_by_weights_only(big_checkpoint, tmp_path):
    _, state = big_checkpoint
    path = tmp_path / "hostile.pth"
    torch.save({"model": state, "extra": Payload()}, path)
    with pytest.raises(ValueError) as info:
        load_detr_weights(_detr(1, **BIG), str(path))
    assert str(info.value) == (f"could not load checkpoint file {str(path)!r}: it holds pickled objects other than "
                               f"tensors, which torch.load(weights_only=True) refuses (Unsupported global: GLOBAL "
                               f"tests.models.hostile.record_code_ran)")
    assert CODE_RAN == []


def _hub_checkpoints(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert torch.hub.get_dir() == str(tmp_path / "torch_home" / "hub")
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_coco_downloads_via_torch_hub_with_hash_check(coco_checkpoint, tmp_path, monkeypatch):
    """Happy path: a file:// URL whose name carries the file's real sha256 prefix, like the official URL."""
    path, state = coco_checkpoint
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    served = tmp_path / "served" / f"detr-tiny-{sha[:8]}.pth"
    served.parent.mkdir()
    served.write_bytes(path.read_bytes())
    checkpoints = _hub_checkpoints(tmp_path, monkeypatch)
    monkeypatch.setattr(weights_mod, "DETR_R50_COCO_URL", served.as_uri())

    model = _detr(1, **SMALL)
    summary = load_detr_weights(model, "coco", category_ids=[1, 2, 3], category_ids_are_coco=True)
    assert (summary["source"], summary["class_embed"]) == ("coco", "selected")
    assert (checkpoints / served.name).read_bytes() == path.read_bytes()  # cached by torch hub
    _assert_kept_parts_equal(model, state)
    assert torch.equal(model.class_embed.weight, state["class_embed.weight"][[1, 2, 3, 91]])

    served.unlink()  # the second load must come from the verified cache, not the URL
    again = _detr(2, **SMALL)
    load_detr_weights(again, "coco", category_ids=[1, 2, 3], category_ids_are_coco=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def test_coco_download_with_wrong_hash_raises(big_checkpoint, tmp_path, monkeypatch):
    path, _ = big_checkpoint
    served = tmp_path / "detr-tiny-00000000.pth"
    served.write_bytes(path.read_bytes())
    checkpoints = _hub_checkpoints(tmp_path, monkeypatch)
    monkeypatch.setattr(weights_mod, "DETR_R50_COCO_URL", served.as_uri())
    with pytest.raises(RuntimeError, match=r'invalid hash value \(expected "00000000"'):
        load_detr_weights(_detr(1, **SMALL), "coco")
    assert not (checkpoints / served.name).exists()  # torch hub keeps no bad download


def test_coco_cached_file_with_wrong_hash_raises(big_checkpoint, tmp_path, monkeypatch):
    """torch hub never re-checks a cached file; we do, so a foreign or truncated cache fails clearly."""
    path, _ = big_checkpoint
    checkpoints = _hub_checkpoints(tmp_path, monkeypatch)
    checkpoints.mkdir(parents=True)
    (checkpoints / "detr-r50-e632da11.pth").write_bytes(path.read_bytes())
    with pytest.raises(RuntimeError, match=r"detr-r50-e632da11.pth has sha256 [0-9a-f]{16}\.\.\., but its name says "
                                           r"it starts with 'e632da11': the file is corrupt or not the official one"):
        load_detr_weights(_detr(1, **SMALL), "coco")


# --- weights: imagenet (torchvision's ResNet into backbone.0.body, through torch hub's cache) --------------------

def _plant_imagenet_resnet(tmp_path: Path, monkeypatch, enum, state: dict[str, torch.Tensor]) -> Path:
    """Save `state` in torch hub's cache under a `<stem>-<sha256 prefix>.pth` name, as torchvision names its files,
    and point `enum`'s URL at it: nothing is downloaded, the hash is still checked."""
    staged = tmp_path / "staged.pth"
    torch.save(state, staged)
    prefix = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
    folder, name = enum.url.rsplit("/", 1)
    url = f"{folder}/{name.rsplit('-', 1)[0]}-{prefix}.pth"
    monkeypatch.setattr(enum.value, "url", url)  # torchvision's Weights dataclass holds the URL
    checkpoints = _hub_checkpoints(tmp_path, monkeypatch)
    checkpoints.mkdir(parents=True)
    return staged.rename(checkpoints / url.rsplit("/", 1)[1])


def test_imagenet_resnets_are_the_official_starting_weights():
    """The official DETR builds torchvision's resnet50(pretrained=True): IMAGENET1K_V1."""
    assert IMAGENET_RESNETS == {"resnet18": ResNet18_Weights.IMAGENET1K_V1, "resnet34": ResNet34_Weights.IMAGENET1K_V1,
                                "resnet50": ResNet50_Weights.IMAGENET1K_V1,
                                "resnet101": ResNet101_Weights.IMAGENET1K_V1}


def test_imagenet_loads_the_resnet_into_the_backbone_body_only(tmp_path, monkeypatch, caplog):
    torch.manual_seed(7)
    resnet = torchvision.models.resnet18().state_dict()  # with fc.* and num_batches_tracked, as torchvision's file
    _plant_imagenet_resnet(tmp_path, monkeypatch, ResNet18_Weights.IMAGENET1K_V1, resnet)
    model = _detr(1, **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger=WEIGHTS_LOGGER):
        summary = load_detr_weights(model, "imagenet")
    assert summary == {"source": "imagenet", "backbone": "ResNet18_Weights.IMAGENET1K_V1"}
    body = model.backbone[0].body.state_dict()
    assert set(body) == {k for k in resnet if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert all(torch.equal(v, resnet[k]) for k, v in body.items())
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.0.body.")}
    assert any(k.startswith("transformer.") for k in rest) and "input_proj.weight" in rest
    assert all(torch.equal(v, before[k]) for k, v in rest.items())  # transformer, input_proj, heads untouched
    assert _messages(caplog) == ["loaded ResNet18_Weights.IMAGENET1K_V1 into DETR's backbone.0.body; input_proj, "
                                 "transformer, queries and heads are freshly initialised"]


def test_imagenet_through_the_detector_builder_keeps_the_official_freezing(tmp_path, monkeypatch):
    torch.manual_seed(8)
    resnet = torchvision.models.resnet18().state_dict()
    _plant_imagenet_resnet(tmp_path, monkeypatch, ResNet18_Weights.IMAGENET1K_V1, resnet)
    detector = build_detr_detector(num_classes=3, weights="imagenet", num_queries=4, dec_layers=1,
                                   **TINY)
    assert detector.weights_summary["source"] == "imagenet"
    body = detector.detr.backbone[0].body
    assert torch.equal(body.conv1.weight, resnet["conv1.weight"])
    assert torch.equal(body.layer4[1].bn2.running_var, resnet["layer4.1.bn2.running_var"])
    frozen = {n.split(".")[0] for n, p in body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}  # FrozenBatchNorm2d holds buffers, no parameters


def test_imagenet_cached_file_with_wrong_hash_raises(tmp_path, monkeypatch):
    """The cache is hash-checked on every load, as for 'coco'."""
    torch.manual_seed(9)
    cached = _plant_imagenet_resnet(tmp_path, monkeypatch, ResNet18_Weights.IMAGENET1K_V1,
                                    torchvision.models.resnet18().state_dict())
    cached.write_bytes(cached.read_bytes()[:-1] + b"x")
    with pytest.raises(RuntimeError, match=rf"cached checkpoint {re.escape(str(cached))} has sha256 "
                                           r"[0-9a-f]{16}\.\.\., but its name says it starts with '[0-9a-f]{8}'"):
        load_detr_weights(_detr(1, **SMALL), "imagenet")


def test_imagenet_of_another_resnet_is_a_clear_error(tmp_path, monkeypatch):
    torch.manual_seed(10)
    _plant_imagenet_resnet(tmp_path, monkeypatch, ResNet18_Weights.IMAGENET1K_V1,
                           torchvision.models.resnet34().state_dict())
    with pytest.raises(ValueError, match=r"resnet18-[0-9a-f]{8}\.pth: does not fit DETR's resnet18 backbone: "
                                         r"Error\(s\) in loading state_dict for ResNetBody:"):
        load_detr_weights(_detr(1, **SMALL), "imagenet")
