"""Parity of our DETR with the official facebookresearch/detr (29901c5) on the recorded tiny-model fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detsweep.models.backbone import pad_images
from detsweep.models.criterion import PostProcess, SetCriterion
from detsweep.models.detr import build_detr, build_detr_from_official_config
from detsweep.models.matcher import HungarianMatcher

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "detr"
TINY = FIXTURES / "detr_r18_tiny.pt"
R50_KEYS = FIXTURES / "detr_r50_keys.json"
ATOL = 1e-5

needs_tiny = pytest.mark.skipif(not TINY.exists(), reason=f"DETR parity fixture not found at {TINY}")


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(TINY, weights_only=True)


@pytest.fixture(scope="module")
def model(ref):
    m = build_detr_from_official_config(ref["config"])
    m.load_state_dict(ref["state_dict"], strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def outputs(model, ref) -> dict:
    with torch.no_grad():
        return model(list(ref["images"]))


@pytest.fixture(scope="module")
def matcher(ref) -> HungarianMatcher:
    cfg = ref["config"]
    return HungarianMatcher(cfg["set_cost_class"], cfg["set_cost_bbox"], cfg["set_cost_giou"])


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"


@needs_tiny
def test_state_dict_keys_and_order_equal_official(ref, model):
    assert list(model.state_dict()) == list(ref["state_dict"])
    assert all("num_batches_tracked" not in k for k in model.state_dict())


@needs_tiny
def test_intermediates_match(ref, model):
    """Stage by stage, so a regression points at the first stage that moved."""
    inter = ref["intermediates"]
    images, mask = pad_images(list(ref["images"]))
    _assert_close(images, inter["padded_images"], "padded images")
    assert torch.equal(mask, inter["padding_mask"])
    with torch.no_grad():
        features, feature_mask, pos = model.backbone(images, mask)
        proj = model.input_proj(features)
        hs, memory = model.transformer(proj, feature_mask, model.query_embed.weight, pos)
    _assert_close(features, inter["features"], "backbone features")
    assert torch.equal(feature_mask, inter["feature_mask"])
    _assert_close(pos, inter["pos"], "position encoding")
    _assert_close(proj, inter["proj"], "input_proj")
    _assert_close(memory, inter["memory"], "encoder memory")
    _assert_close(hs, inter["hs"], "decoder hs")


@needs_tiny
def test_forward_outputs_match(ref, outputs):
    _assert_close(outputs["pred_logits"], ref["pred_logits"], "pred_logits")
    _assert_close(outputs["pred_boxes"], ref["pred_boxes"], "pred_boxes")
    assert len(outputs["aux_outputs"]) == len(ref["aux_outputs"]) == ref["config"]["dec_layers"] - 1
    for i, (ours, theirs) in enumerate(zip(outputs["aux_outputs"], ref["aux_outputs"])):
        _assert_close(ours["pred_logits"], theirs["pred_logits"], f"aux {i} pred_logits")
        _assert_close(ours["pred_boxes"], theirs["pred_boxes"], f"aux {i} pred_boxes")


@needs_tiny
def test_padded_batch_with_mask_equals_list_input(ref, model, outputs):
    images, mask = pad_images(list(ref["images"]))
    with torch.no_grad():
        batched = model(images, mask)
    _assert_close(batched["pred_logits"], outputs["pred_logits"], "pred_logits")
    _assert_close(batched["pred_boxes"], outputs["pred_boxes"], "pred_boxes")


@needs_tiny
def test_frozen_backbone_runs_without_grad_and_gives_same_outputs(ref):
    model = build_detr_from_official_config(ref["config"])
    model.load_state_dict(ref["state_dict"], strict=True)
    grad_enabled_in_backbone = []
    model.backbone[0].body.register_forward_hook(lambda *_: grad_enabled_in_backbone.append(torch.is_grad_enabled()))
    trainable_out = model(list(ref["images"]))
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    frozen_out = model(list(ref["images"]))
    assert grad_enabled_in_backbone == [True, False]
    _assert_close(frozen_out["pred_logits"], trainable_out["pred_logits"].detach(), "pred_logits")
    assert frozen_out["pred_logits"].requires_grad  # the transformer and heads still train


@needs_tiny
def test_matcher_indices_match(ref, outputs, matcher):
    for ours, theirs in zip(matcher(outputs, ref["targets"]), ref["indices"]):
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    for layer, (aux, aux_ref) in enumerate(zip(outputs["aux_outputs"], ref["aux_indices"])):
        for ours, theirs in zip(matcher(aux, ref["targets"]), aux_ref):
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), f"aux layer {layer}"
    for ours, theirs in zip(matcher.cost_matrices(outputs, ref["targets"]), ref["intermediates"]["matcher_cost"]):
        _assert_close(ours, theirs, "matcher cost")


@needs_tiny
def test_losses_match(ref, outputs, matcher):
    cfg = ref["config"]
    criterion = SetCriterion(cfg["num_classes"], matcher, ref["weight_dict"], cfg["eos_coef"],
                             ["labels", "boxes", "cardinality"])
    losses = criterion(outputs, ref["targets"])
    assert sorted(losses) == sorted(ref["loss_dict"])
    for key, expected in ref["loss_dict"].items():
        _assert_close(losses[key], expected, key)
    total = sum(losses[k] * w for k, w in ref["weight_dict"].items())
    _assert_close(total, ref["loss_total"], "loss_total")


@needs_tiny
def test_postprocess_matches(ref, outputs):
    results = PostProcess()(outputs, ref["target_sizes"])
    for i, (ours, theirs) in enumerate(zip(results, ref["postprocess"])):
        h, w = ref["target_sizes"][i].tolist()
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        _assert_close(ours["scores"], theirs["scores"], "scores")
        assert torch.equal(ours["labels"], theirs["labels"])
        _assert_close(ours["boxes"] / scale, theirs["boxes"] / scale, "boxes / (w, h)")


@pytest.mark.skipif(not R50_KEYS.exists(), reason=f"DETR-R50 key list not found at {R50_KEYS}")
def test_r50_state_dict_equals_official_layout():
    expected = json.loads(R50_KEYS.read_text())
    model = build_detr(backbone="resnet50", hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6,
                       dim_feedforward=2048, num_queries=100, num_classes=91, dropout=0.1, aux_loss=True)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: shape for k, shape in expected["entries"]}
    assert sum(p.numel() for p in model.parameters()) == 41_524_768 == expected["num_parameters"]
    # Official freezing: stem and layer1 fixed, layer2-4 trained.
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    trained_layers = (".layer2.", ".layer3.", ".layer4.")
    assert frozen == {n for n, _ in model.backbone.named_parameters() if not any(s in n for s in trained_layers)}
    assert "0.body.conv1.weight" in frozen and "0.body.layer1.0.conv1.weight" in frozen


def test_batched_matching_equals_per_image_matching_with_empty_target():
    torch.manual_seed(0)
    num_queries, num_classes = 10, 5
    targets = []
    for n in (4, 0, 1, 10):
        boxes_cxcywh = torch.cat([torch.rand(n, 2) * 0.6 + 0.2, torch.rand(n, 2) * 0.3 + 0.05], dim=1)
        targets.append({"labels": torch.randint(0, num_classes, (n,)), "boxes": boxes_cxcywh})
    outputs = {"pred_logits": torch.randn(len(targets), num_queries, num_classes + 1),
               "pred_boxes": torch.rand(len(targets), num_queries, 4)}
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for i, target in enumerate(targets):
        single = matcher({k: v[i:i + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
        assert len(batched[i][0]) == min(num_queries, len(target["labels"]))
        assert batched[i][0].dtype == batched[i][1].dtype == torch.int64
    assert batched[1][0].numel() == 0


def test_official_config_rejects_unknown_keys_and_unsupported_values():
    cfg = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=32,
               num_queries=3, num_classes=2, dropout=0.0, aux_loss=False)
    with pytest.raises(ValueError, match=r"unknown DETR config keys \['hiden_dim'\]"):
        build_detr_from_official_config({**cfg, "hiden_dim": 8})
    with pytest.raises(ValueError, match=r"DETR config masks=True is not supported; only False is"):
        build_detr_from_official_config({**cfg, "masks": True})
    with pytest.raises(ValueError, match=r"backbone 'resnet51' is not one of \['resnet101', 'resnet18'"):
        build_detr_from_official_config({**cfg, "backbone": "resnet51"})
