"""LoRA on any linear layer: module-name patterns, presets on both families (identity at init, merge equality,
only the adapters and the regime's heads move), closed-form counts and the errors that name modules."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from detsweep.models.detr import build_detr
from detsweep.models.faster_rcnn import build_faster_rcnn
from detsweep.models.lora import apply_lora, count_lora_params, lora_parameters, merge_lora
from detsweep.models.lora_targets import PRESETS, matched_names
from detsweep.models.regimes import apply_regime, trainable_parameters

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=2, dec_layers=2, dim_feedforward=48,
            num_queries=5, num_classes=3, dropout=0.0, aux_loss=True)
FC6_IN, REPR = 256 * 7 * 7, 1024  # torchvision's TwoMLPHead: RoIAlign 7x7 over 256 FPN channels -> 1024 -> 1024


def tiny_detr(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_detr(**TINY)


def tiny_frcnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_faster_rcnn(num_classes=3, backbone="resnet18", min_size=64, max_size=64,
                             box_batch_size_per_image=16, rpn_post_nms_top_n_test=100)


def images(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 80, generator=g), torch.rand(3, 48, 64, generator=g)]


def targets() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[10.0, 8.0, 30.0, 30.0], [2.0, 2.0, 20.0, 40.0]]), "labels": torch.tensor([0, 2])}]


def detr_outputs(model: nn.Module, imgs: list[torch.Tensor]) -> torch.Tensor:
    out = model(imgs)
    return torch.cat([t.flatten() for o in [out] + out["aux_outputs"] for t in (o["pred_logits"], o["pred_boxes"])])


def frcnn_outputs(model: nn.Module, imgs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.cat([d["boxes"].flatten(), d["scores"]]) for d in model.eval()(imgs)])


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ---- patterns --------------------------------------------------------------------------------------------------

def test_presets_are_the_registry_placements():
    from detsweep.models.registry import LORA_PLACEMENTS, PLACEMENT_NEEDS

    assert tuple(PRESETS) == LORA_PLACEMENTS == tuple(PLACEMENT_NEEDS)


@pytest.mark.parametrize("pattern,count,example", [
    (r"transformer\.encoder\.layers\.\d+\.self_attn", 2, "transformer.encoder.layers.1.self_attn"),
    (r"decoder\.layers\.1\.multihead_attn\.[qk]", 2, "transformer.decoder.layers.1.multihead_attn.k"),
    (r"linear1", 4, "transformer.decoder.layers.0.linear1"),  # suffix match at a module boundary
    (r"bbox_embed\.layers\.\d", 3, "bbox_embed.layers.2"),
])
def test_patterns_match_name_suffixes(pattern, count, example):
    names = matched_names(tiny_detr(), (pattern,), each_must_match=True)
    assert len(names) == count and example in names


def test_a_wrapper_matches_the_same_modules():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.detr = tiny_detr()

    plain = matched_names(tiny_detr(), PRESETS["attention_ffn"], each_must_match=False)
    wrapped = matched_names(Wrapper(), PRESETS["attention_ffn"], each_must_match=False)
    assert wrapped == [f"detr.{n}" for n in plain] and len(plain) == 3 * 2 + 2 * 2 * 2


def test_targets_that_match_nothing_or_a_non_linear_module_are_errors():
    with pytest.raises(ValueError) as err:
        apply_lora(tiny_detr(), rank=2, alpha=4, targets=[r"transformer\.encoder\.layers\.\d+\.self_atn"])
    msg = str(err.value)
    assert msg.startswith(r"lora target pattern 'transformer\.encoder\.layers\.\d+\.self_atn' matches no module "
                          "of DETR; adaptable modules are named like ['transformer.encoder.layers.")
    assert "self_attn" in msg
    with pytest.raises(ValueError) as err:
        apply_lora(tiny_detr(), rank=2, alpha=4, targets=[r"backbone\.0\.body\.layer4"])
    assert str(err.value) == (r"lora target pattern 'backbone\.0\.body\.layer4' matches 'backbone.0.body.layer4', "
                              "a Sequential: only nn.Linear and nn.MultiheadAttention (or its .q/.k/.v) take adapters")
    with pytest.raises(ValueError, match="is not a regular expression"):
        apply_lora(tiny_detr(), rank=2, alpha=4, targets=["linear(1"])
    with pytest.raises(ValueError, match=r"lora placement 'box_head' found no targets in DETR: its patterns"):
        apply_lora(tiny_detr(), rank=2, alpha=4, placement="box_head")


def test_overlapping_targets_adapt_each_weight_once():
    """An attention matched whole, by .q and through its out_proj is one in_proj site and one out_proj site."""
    model = tiny_detr()
    attn = r"transformer\.encoder\.layers\.0\.self_attn"
    apply_lora(model, rank=2, alpha=4, targets=[attn, attn + r"\.q", attn + r"\.out_proj"])
    d, r = TINY["hidden_dim"], 2
    assert count_lora_params(model) == 4 * (d + d) * r  # q, k, v, out blocks: r·(in + out) each
    deltas = model.transformer.encoder.layers[0].self_attn.parametrizations.in_proj_weight
    assert len(deltas) == 1 and list(deltas[0].blocks) == ["q", "k", "v"]


def test_targets_on_any_linear_layer_train_only_there():
    """lora.targets reaches layers no preset names (here the box MLP and the class head) and only they move."""
    model = apply_lora(tiny_detr(), rank=2, alpha=4, targets=[r"bbox_embed\.layers\.[01]", r"class_embed"])
    d, k = TINY["hidden_dim"], TINY["num_classes"] + 1
    assert count_lora_params(model) == 2 * (2 * (d + d)) + 2 * (d + k)
    apply_regime(model, "lora_only")
    _step_and_check_only_trainable_moved(model, lambda m: detr_outputs(m, images()).square().mean())


# ---- presets on both families: identity, merge, closed forms, only the adapters move ---------------------------

def _closed_form_detr(placement: str, r: int) -> int:
    d, f, enc, dec = TINY["hidden_dim"], TINY["dim_feedforward"], TINY["enc_layers"], TINY["dec_layers"]
    per_mha = {"attention_only": 4, "attention_ffn": 4, "decoder_only": 4, "qv_only": 2}[placement] * 2 * d * r
    n_mha = (enc if placement != "decoder_only" else 0) + 2 * dec
    ffn = (enc + dec) * 2 * (d + f) * r if placement == "attention_ffn" else 0
    return n_mha * per_mha + ffn


FAMILY_CASES = [("detr", p) for p in ("attention_only", "attention_ffn", "decoder_only", "qv_only")] + \
               [("faster_rcnn", "box_head")]


def _build(family: str, seed: int = 0) -> nn.Module:
    return tiny_detr(seed) if family == "detr" else tiny_frcnn(seed)


def _outputs(family: str, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return detr_outputs(model.eval(), images()) if family == "detr" else frcnn_outputs(model, images())


@pytest.mark.parametrize("family,placement", FAMILY_CASES)
def test_preset_identity_at_init_merge_and_counts(family, placement):
    model = _build(family)
    before = _outputs(family, model)
    apply_lora(model, rank=4, alpha=8, placement=placement)
    # B = 0: the same function, and the adapted weights equal W bit for bit. The outputs need not: the weights are
    # new tensors, and some CPUs' matrix kernels round differently at another address (5e-7 on an AMD EPYC, the
    # MHA fast path off or on). fp32 tolerances, far below what a real change of the function gives.
    torch.testing.assert_close(_outputs(family, model), before)
    expected = _closed_form_detr(placement, 4) if family == "detr" else 4 * ((FC6_IN + REPR) + (REPR + REPR))
    assert count_lora_params(model) == expected
    randomize_adapters(model)
    adapted = _outputs(family, model)
    assert not torch.equal(adapted, before)
    merged = merge_lora(copy.deepcopy(model))
    torch.testing.assert_close(_outputs(family, merged), adapted, rtol=0, atol=1e-5)
    assert set(merged.state_dict()) == set(_build(family).state_dict())  # the plain keys again


def _step_and_check_only_trainable_moved(model: nn.Module, loss_fn, dead: tuple[str, ...] = ()) -> None:
    """Two AdamW steps: nothing frozen moves, every adapter (outside `dead` prefixes) does."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3, weight_decay=0.0)
    for _ in range(2):  # two steps: a LoRA A only gets gradient once its B is non-zero
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved <= trainable, f"frozen parameters moved: {sorted(moved - trainable)[:5]}"
    lora = {n for n in trainable if ".lora_" in n and not n.startswith(dead)}
    assert lora and lora <= moved, f"adapters that did not move: {sorted(lora - moved)[:5]}"


def test_faster_rcnn_lora_only_trains_adapters_rpn_head_and_predictor_with_the_backbone_under_no_grad():
    model = apply_lora(tiny_frcnn(), rank=4, alpha=8, placement="box_head")
    counts = apply_regime(model, "lora_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith(("model.rpn.head.", "model.roi_heads.box_predictor."))
                             for n in trainable)
    heads = sum(p.numel() for n, p in model.named_parameters()
                if n.startswith(("model.rpn.head.", "model.roi_heads.box_predictor.")))
    assert counts["trainable_params"] == counts["lora_params"] + heads
    seen = []
    model.model.backbone.register_forward_hook(lambda m, i, out: seen.append(out))
    model.train()
    _step_and_check_only_trainable_moved(model, lambda m: sum(m(images(), targets()).values()))
    assert all(not f.requires_grad for f in seen[0].values())  # the frozen ResNet-FPN built no graph


def test_detr_lora_only_with_every_transformer_preset_moves_only_adapters_and_heads():
    for placement in ("attention_only", "qv_only"):
        model = apply_lora(tiny_detr(), rank=2, alpha=4, placement=placement)
        apply_regime(model, "lora_only")
        # DETR's decoder starts from tgt = 0: layer 0's self-attention sees all-equal values, so its adapters
        # get exactly-zero gradients (as in test_regimes.py)
        _step_and_check_only_trainable_moved(model, lambda m: detr_outputs(m.train(), images()).square().mean(),
                                             dead=("transformer.decoder.layers.0.self_attn.",))


def test_faster_rcnn_r50_box_head_closed_form():
    with torch.device("meta"):
        model = build_faster_rcnn(num_classes=5, backbone="resnet50")
    apply_lora(model, rank=8, alpha=16, placement="box_head")
    assert count_lora_params(model) == 8 * (FC6_IN + REPR + REPR + REPR) == 124_928
