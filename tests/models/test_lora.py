"""LoRA adapters: closed forms on single layers, placements on a tiny DETR, merge, adapter checkpoints."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from detsweep.models.detr import build_detr
from detsweep.models.lora import (PLACEMENT_NAMES, LoRADelta, apply_lora, count_lora_params, load_lora_state_dict,
                                  lora_parameters, lora_state_dict, merge_lora, merged_state_dict)
from detsweep.models.regimes import apply_regime, trainable_parameters

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=2, dec_layers=2, dim_feedforward=48,
            num_queries=5, num_classes=3, dropout=0.0, aux_loss=True)
R50 = dict(backbone="resnet50", hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048,
           num_queries=100, num_classes=91, dropout=0.1, aux_loss=True)


def tiny_detr(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_detr(**{**TINY, **overrides})


def images(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 80, generator=g), torch.rand(3, 48, 64, generator=g)]


def outputs(model: nn.Module, imgs: list[torch.Tensor]) -> torch.Tensor:
    """Every prediction of the model (final + aux layers) as one flat tensor."""
    out = model(imgs)
    layers = [out] + out.get("aux_outputs", [])
    return torch.cat([t.flatten() for o in layers for t in (o["pred_logits"], o["pred_boxes"])])


def surrogate_loss(model: nn.Module, imgs: list[torch.Tensor]) -> torch.Tensor:
    # Touches every output of every decoder layer; the detection criterion is tested elsewhere.
    out = model(imgs)
    return sum(o["pred_logits"].logsumexp(-1).mean() + o["pred_boxes"].square().mean()
               for o in [out] + out["aux_outputs"])


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    """Stand-in for training: non-zero B so the adapters actually change the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ---- single layers: the closed form W + (alpha/r)·B·A ---------------------------------------------------------

def _set_random_b(delta: LoRADelta) -> None:
    with torch.no_grad():
        for b in delta.lora_B.values():
            b.normal_()


def test_linear_delta_closed_form_and_init():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    w0 = lin.weight.detach().clone()
    parametrize.register_parametrization(lin, "weight", LoRADelta(lin.weight, {"w": (0, 5)}, rank=2, alpha=3.0,
                                                                  dropout=0.0))
    delta = lin.parametrizations.weight[0]
    assert torch.equal(lin.weight, w0)  # B = 0: a fresh adapter changes nothing, bitwise
    a = delta.lora_A["w"]
    bound = 1 / math.sqrt(6)  # kaiming_uniform(a=√5) on fan_in 6 == U(-1/√fan_in, 1/√fan_in)
    assert a.shape == (2, 6) and a.abs().max() <= bound and a.std() > bound / 4
    assert torch.equal(delta.lora_B["w"], torch.zeros(5, 2))
    _set_random_b(delta)
    expected = w0 + 1.5 * delta.lora_B["w"] @ a
    torch.testing.assert_close(lin.weight, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("parts", [("q", "k", "v"), ("q", "v")])
def test_mha_in_proj_blocks_closed_form(parts):
    torch.manual_seed(0)
    e = 8
    mha = nn.MultiheadAttention(e, 2)
    w0 = mha.in_proj_weight.detach().clone()
    rows = {"q": (0, e), "k": (e, 2 * e), "v": (2 * e, 3 * e)}
    parametrize.register_parametrization(
        mha, "in_proj_weight", LoRADelta(mha.in_proj_weight, {p: rows[p] for p in parts}, rank=3, alpha=6.0,
                                         dropout=0.0))
    delta = mha.parametrizations.in_proj_weight[0]
    _set_random_b(delta)
    expected = w0.clone()
    for p in parts:
        s, t = rows[p]
        expected[s:t] += 2.0 * delta.lora_B[p] @ delta.lora_A[p]
    torch.testing.assert_close(mha.in_proj_weight, expected, rtol=0, atol=1e-5)
    if "k" not in parts:
        assert torch.equal(mha.in_proj_weight[e:2 * e], w0[e:2 * e])


@pytest.mark.parametrize("mode", ["train", "eval", "eval_fast_path"])
def test_mha_forward_uses_parametrized_weights(mode):
    """The adapted MHA equals a plain MHA holding W + ΔW, in train, eval and the eval fast path."""
    torch.manual_seed(0)
    batch_first = mode == "eval_fast_path"  # the fast path needs batch_first and q is k is v
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.encoder = nn.Module()
    model.transformer.encoder.layers = nn.ModuleList([nn.Module()])
    model.transformer.encoder.layers[0].self_attn = mha
    apply_lora(model, rank=2, alpha=4, placement="attention_only")
    randomize_adapters(model)
    plain = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    with torch.no_grad():
        plain.in_proj_weight.copy_(mha.in_proj_weight)
        plain.in_proj_bias.copy_(mha.in_proj_bias)
        plain.out_proj.weight.copy_(mha.out_proj.weight)
        plain.out_proj.bias.copy_(mha.out_proj.bias)
    assert not torch.equal(plain.in_proj_weight, mha.parametrizations.in_proj_weight.original)
    x = torch.randn(3, 5, 8)
    if mode == "train":
        got, ref = mha(x, x + 1, x)[0], plain(x, x + 1, x)[0]
    else:
        mha.eval(), plain.eval()
        with torch.inference_mode():
            got, ref = mha(x, x, x, need_weights=False)[0], plain(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_dropout_drops_whole_input_features_in_train_only():
    torch.manual_seed(0)
    lin = nn.Linear(64, 4)
    parametrize.register_parametrization(lin, "weight", LoRADelta(lin.weight, {"w": (0, 4)}, rank=2, alpha=2.0,
                                                                  dropout=0.5))
    delta = lin.parametrizations.weight[0]
    _set_random_b(delta)
    base = lin.parametrizations.weight.original
    full_delta = (delta.lora_B["w"] @ delta.lora_A["w"]).detach()
    dropped = (lin.weight - base).detach()
    kept = (dropped.abs() > 0).all(0)
    # each input column is either dropped entirely or kept with the 1/(1-p) = 2 rescale
    torch.testing.assert_close(dropped[:, kept], 2 * full_delta[:, kept], rtol=1e-5, atol=1e-6)
    assert torch.equal(dropped[:, ~kept], torch.zeros_like(dropped[:, ~kept]))
    assert 0 < kept.sum() < 64
    lin.eval()
    torch.testing.assert_close(lin.weight - base, full_delta, rtol=1e-5, atol=1e-6)


# ---- placements on a tiny DETR ----------------------------------------------------------------------------------

# What each DETR-transformer placement means: (transformer stacks, attention projections, FFN too). The other
# presets (a ViT backbone's attention, Faster R-CNN's box head) are tested in test_lora_targets.py.
MEANING = {"attention_only": (("encoder", "decoder"), ("q", "k", "v", "out"), False),
           "attention_ffn": (("encoder", "decoder"), ("q", "k", "v", "out"), True),
           "decoder_only": (("decoder",), ("q", "k", "v", "out"), False),
           "qv_only": (("encoder", "decoder"), ("q", "v"), False)}
DETR_PLACEMENTS = tuple(MEANING)


def _closed_form(placement: str, d: int, f: int, enc: int, dec: int, r: int) -> int:
    scopes, attn_parts, ffn = MEANING[placement]
    n_mha = (enc if "encoder" in scopes else 0) + (2 * dec if "decoder" in scopes else 0)
    n_ffn = ((enc if "encoder" in scopes else 0) + (dec if "decoder" in scopes else 0)) * ffn
    return n_mha * len(attn_parts) * 2 * d * r + n_ffn * 2 * (d + f) * r


def test_placement_names():
    assert PLACEMENT_NAMES == ("attention_only", "attention_ffn", "decoder_only", "qv_only", "backbone_attention",
                               "backbone_attention+transformer", "box_head")


@pytest.mark.parametrize("placement", DETR_PLACEMENTS)
def test_fresh_adapter_changes_nothing_and_counts(placement):
    model = tiny_detr().eval()
    imgs = images()
    # With grad enabled on purpose: ATen's linear picks its kernel by whether the weight requires grad, so a
    # bitwise comparison needs the same requires_grad on both sides (here: True for W and for W + B·A).
    before = outputs(model, imgs)
    apply_lora(model, rank=4, alpha=8, placement=placement)
    assert torch.equal(outputs(model, imgs), before)
    assert count_lora_params(model) == _closed_form(placement, 32, 48, 2, 2, 4)
    adapted = {n.split(".parametrizations.")[0] + "." + n.split(".parametrizations.")[1].split(".")[0]
               for n, _ in model.named_parameters() if ".lora_A." in n}
    scopes, attn_parts, ffn = MEANING[placement]
    assert all(n.startswith(tuple(f"transformer.{s}." for s in scopes)) for n in adapted)
    assert any(n.endswith("linear1.weight") for n in adapted) == ffn
    assert any(n.endswith("out_proj.weight") for n in adapted) == ("out" in attn_parts)


@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("placement,per_rank", [("attention_only", 36_864), ("attention_ffn", 36_864 + 55_296),
                                                ("decoder_only", 24_576), ("qv_only", 18_432)])
def test_detr_r50_lora_param_closed_form(placement, per_rank, rank):
    with torch.device("meta"):  # only parameters are counted: no memory, no init time
        model = build_detr(**R50)
    apply_lora(model, rank=rank, alpha=16, placement=placement)
    assert count_lora_params(model) == per_rank * rank == _closed_form(placement, 256, 2048, 6, 6, rank)


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=4, alpha=8, placement="attn"),
     "lora placement 'attn' is not one of ['attention_only', 'attention_ffn', 'decoder_only', 'qv_only', "
     "'backbone_attention', 'backbone_attention+transformer', 'box_head']"),
    (dict(rank=0, alpha=8, placement="qv_only"), "lora rank must be an integer >= 1, got 0"),
    (dict(rank=4, alpha=0.0, placement="qv_only"), "lora alpha must be a finite number > 0, got 0.0"),
    (dict(rank=4, alpha=8, placement="qv_only", dropout=1.0), "lora dropout must be in [0, 1), got 1.0"),
])
def test_apply_lora_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        apply_lora(tiny_detr(), **kwargs)
    assert str(err.value) == message


def test_apply_lora_errors_without_targets_and_twice():
    with pytest.raises(ValueError, match="lora placement 'qv_only' found no targets in Sequential"):
        apply_lora(nn.Sequential(nn.Linear(2, 2)), rank=2, alpha=2, placement="qv_only")
    model = apply_lora(tiny_detr(), rank=2, alpha=2, placement="qv_only")
    with pytest.raises(ValueError, match=r"already has LoRA adapters; call merge_lora\(model\)"):
        apply_lora(model, rank=2, alpha=2, placement="qv_only")


# ---- merge -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", DETR_PLACEMENTS)
def test_merge_equals_unmerged_and_removes_adapters(placement):
    model = apply_lora(tiny_detr(), rank=4, alpha=8, placement=placement, dropout=0.1)
    randomize_adapters(model)
    imgs = images()
    model.eval()
    with torch.no_grad():
        unmerged = outputs(model, imgs)
    n_params = sum(p.numel() for p in model.parameters())
    merged = merge_lora(copy.deepcopy(model).train()).eval()  # in train mode: must not bake a dropout mask in
    with torch.no_grad():
        got = outputs(merged, imgs)
        assert not torch.equal(got, outputs(tiny_detr().eval(), imgs))  # the adapters did something
    torch.testing.assert_close(got, unmerged, rtol=0, atol=1e-5)
    assert not any(parametrize.is_parametrized(m) or isinstance(m, LoRADelta) for m in merged.modules())
    assert lora_parameters(merged) == [] and count_lora_params(merged) == 0
    assert sum(p.numel() for p in merged.parameters()) == n_params - count_lora_params(model)
    mha = merged.transformer.decoder.layers[1].multihead_attn
    assert type(mha) is nn.MultiheadAttention and type(mha.in_proj_weight) is nn.Parameter
    assert type(mha.out_proj.weight) is nn.Parameter
    assert set(merged.state_dict()) == set(tiny_detr().state_dict())  # official keys again


@pytest.mark.parametrize("placement", ["attention_ffn", "qv_only"])
def test_merged_state_dict_loads_into_a_plain_model_and_leaves_the_adapters(placement):
    model = apply_lora(tiny_detr(), rank=4, alpha=8, placement=placement, dropout=0.5)
    randomize_adapters(model)
    n_lora = count_lora_params(model)
    sd = merged_state_dict(model.train())  # train mode: the merged weights still carry no dropout mask
    assert count_lora_params(model) == n_lora and model.training  # model untouched
    plain = tiny_detr(seed=9).eval()
    plain.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(outputs(plain, images()), outputs(model.eval(), images()), rtol=0, atol=1e-5)
        merged_sd = merge_lora(model).state_dict()
    assert sd.keys() == merged_sd.keys() and all(torch.equal(sd[k], merged_sd[k]) for k in sd)


# ---- adapter checkpoints -----------------------------------------------------------------------------------------

def _trained_lora_detr(placement: str = "attention_ffn") -> nn.Module:
    model = apply_lora(tiny_detr(), rank=4, alpha=8, placement=placement)
    apply_regime(model, "lora_only")
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    for step in range(2):  # two steps: B moves on the first, A only once B != 0
        opt.zero_grad()
        surrogate_loss(model, images(step)).backward()
        opt.step()
    return model


def _roundtrip(sd: dict) -> tuple[dict, int]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    size = buf.tell()
    buf.seek(0)
    return torch.load(buf, weights_only=True), size


def test_adapter_checkpoint_round_trip_is_bitwise():
    trained = _trained_lora_detr().eval()
    sd, _ = _roundtrip(lora_state_dict(trained))
    heads = {n for n, _ in trained.named_parameters() if n.startswith(("class_embed.", "bbox_embed.", "query_embed."))}
    lora = {n for n, _ in trained.named_parameters() if ".lora_" in n}
    assert set(sd) == heads | lora | {"base_identity"}
    assert isinstance(sd["base_identity"], str) and len(sd["base_identity"]) == 16
    fresh = tiny_detr()
    torch.manual_seed(123)  # the fresh adapters start from different A's: loading must overwrite them
    apply_lora(fresh, rank=4, alpha=8, placement="attention_ffn").eval()
    apply_regime(fresh, "lora_only")  # same requires_grad as the trained model: same ATen kernels, bitwise
    imgs = images(7)
    with torch.no_grad():
        assert not torch.equal(outputs(fresh, imgs), outputs(trained, imgs))
        load_lora_state_dict(fresh, sd)
        assert torch.equal(outputs(fresh, imgs), outputs(trained, imgs))


def test_adapter_checkpoint_of_detr_r50_is_small():
    model = apply_lora(build_detr(**R50), rank=8, alpha=16, placement="attention_only")
    counts = apply_regime(model, "lora_only")
    _, size = _roundtrip(lora_state_dict(model))
    assert counts["trainable_params"] == 36_864 * 8 + 181_856
    assert size < 4 * counts["trainable_params"] + 200_000 < 2_200_000  # ~1.9 MB of float32 + key names


def test_load_lora_state_dict_errors():
    trained = _trained_lora_detr()
    sd = lora_state_dict(trained)
    other_rank = apply_lora(tiny_detr(), rank=2, alpha=8, placement="attention_ffn")
    with pytest.raises(ValueError, match=r"different rank\?\): transformer\..*lora_A\.\w+ has shape \(4, \d+\) "
                                         r"in the checkpoint but \(2, \d+\) in the model"):
        load_lora_state_dict(other_rank, sd)
    other_placement = apply_lora(tiny_detr(), rank=4, alpha=8, placement="qv_only")
    with pytest.raises(ValueError, match=r"different placement\?\): 0 adapter tensors missing from it, e.g. \[\]; "
                                         r"\d+ keys unknown to the model"):
        load_lora_state_dict(other_placement, sd)
    other_base = apply_lora(tiny_detr(seed=5), rank=4, alpha=8, placement="attention_ffn")
    with pytest.raises(ValueError, match=f"trained on base weights '{sd['base_identity']}' but this model's base "
                                         r"weights are '[0-9a-f]{16}'; load the same base weights first"):
        load_lora_state_dict(other_base, sd)
    with pytest.raises(ValueError, match="model has no LoRA adapters; call apply_lora with the checkpoint's rank"):
        load_lora_state_dict(tiny_detr(), sd)
    with pytest.raises(ValueError, match="not a LoRA state dict: it has no 'base_identity' entry"):
        load_lora_state_dict(other_base, {k: v for k, v in sd.items() if k != "base_identity"})
    with pytest.raises(ValueError, match=r"model has no LoRA adapters; call apply_lora\(model, ...\) first"):
        lora_state_dict(tiny_detr())
