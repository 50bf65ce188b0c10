"""ViT backbones for DETR: shapes and padding masks on odd sizes, batch invariance, parity with the library's own
forward, resized positions, closed-form counts, LoRA presets in the backbone, and the weights loaders on files
the tests write (no download)."""
from __future__ import annotations

import copy
import functools
import hashlib
import os

import pytest
import torch
import torchvision
from torch import nn

from detsweep.models import vit_weights
from detsweep.models.detr import build_detr
from detsweep.models.detr_detector import build_detr_detector
from detsweep.models.lora import apply_lora, count_lora_params, lora_parameters, merge_lora
from detsweep.models.regimes import apply_regime, trainable_parameters
from detsweep.models.vit import VITS, ViTBackbone, patch_mask, resize_pos_grid, vit_param_count


@pytest.fixture
def tiny_torchvision_vit(monkeypatch):
    """torchvision.models.vit_b_16 -> a 2-block, 32-wide ViT/16 on a 4x4 grid (the real one is 86M parameters)."""
    def make(weights=None, image_size=64):
        assert weights is None
        return torchvision.models.VisionTransformer(image_size=image_size, patch_size=16, num_layers=2, num_heads=2,
                                                    hidden_dim=32, mlp_dim=64)
    monkeypatch.setattr(torchvision.models, "vit_b_16", make)


@pytest.fixture
def tiny_dinov2(monkeypatch):
    """timm's DINOv2 ViT-S/14 with 2 blocks on a 5x5 grid (70 px) instead of 12 blocks on 37x37."""
    import timm

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda arch, **kw: real(arch, **{"img_size": 70, **kw, "depth": 2}))


def _randomize_layer_scale(module: nn.Module) -> None:
    """DINOv2's LayerScale starts at 1e-5: blocks would barely matter, so give them weight for the tests."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(0.5)


def _backbone(name: str) -> ViTBackbone:
    torch.manual_seed(0)
    b = ViTBackbone(name).eval()
    _randomize_layer_scale(b)
    return b


# ---- shapes, masks, batch invariance ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit_b_16", "dinov2_vits14"])
def test_odd_sizes_are_padded_not_cropped_and_masked_per_patch(name, tiny_torchvision_vit, tiny_dinov2):
    backbone = _backbone(name)
    p = backbone.patch_size
    sizes = [(2 * p + 3, 3 * p + 1), (p - 5, 2 * p)]  # neither a multiple of the patch size
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images, mask = torch.zeros(2, 3, h, w), torch.ones(2, h, w, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for i, (hi, wi) in enumerate(sizes):
        images[i, :, :hi, :wi] = torch.rand(3, hi, wi, generator=g)
        mask[i, :hi, :wi] = False
    with torch.no_grad():
        features, pmask = backbone(images, mask)
    grid = (-(-h // p), -(-w // p))  # ceil: the last partial patch is kept
    assert features.shape == (2, backbone.num_channels, *grid) and pmask.shape == (2, *grid)
    for i, (hi, wi) in enumerate(sizes):
        real = torch.zeros(grid, dtype=torch.bool)
        real[: -(-hi // p), : -(-wi // p)] = True  # a patch with any real pixel is real
        assert torch.equal(~pmask[i], real)
        # each image alone (its own, smaller padding) gives the same features on its real patches
        with torch.no_grad():
            alone, _ = backbone(images[i:i + 1, :, :hi, :wi], mask[i:i + 1, :hi, :wi])
        rh, rw = alone.shape[-2:]
        torch.testing.assert_close(features[i, :, :rh, :rw], alone[0], rtol=1e-4, atol=1e-4)


def test_patch_mask_needs_every_pixel_padded():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :, 3] = True  # one padded column: the right patches still hold real pixels
    assert not patch_mask(mask, 2).any()
    mask[0, :, 2:] = True
    assert patch_mask(mask, 2).tolist() == [[[False, True], [False, True]]]


def test_torchvision_forward_parity_at_the_native_size(tiny_torchvision_vit):
    backbone = _backbone("vit_b_16")
    reference = torchvision.models.vit_b_16(image_size=64).eval()
    missing, unexpected = reference.load_state_dict(backbone.body.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("heads.") for k in missing)  # the same keys but the classifier
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tokens = reference.encoder(_tv_tokens(reference, x))
        ours, _ = backbone(x, torch.zeros(2, 64, 64, dtype=torch.bool))
    expected = backbone.neck(tokens[:, 1:], (4, 4))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def _tv_tokens(vit: torchvision.models.VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """torchvision's own VisionTransformer.forward up to the encoder input (class token prepended)."""
    tokens = vit._process_input(x)
    return torch.cat([vit.class_token.expand(len(x), -1, -1), tokens], dim=1)


def test_timm_forward_parity_at_the_native_size(tiny_dinov2):
    backbone = _backbone("dinov2_vits14")
    x = torch.rand(2, 3, 70, 70)
    with torch.no_grad():
        expected = backbone.neck(backbone.body.vit.forward_features(x)[:, 1:], (5, 5))
        ours, _ = backbone(x, torch.zeros(2, 70, 70, dtype=torch.bool))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_positions_are_resized_bicubic_and_kept_at_their_own_size():
    grid = torch.randn(1, 8, 5, 5)
    assert resize_pos_grid(grid, (5, 5)) is grid
    resized = resize_pos_grid(grid, (3, 7))
    torch.testing.assert_close(resized, torch.nn.functional.interpolate(grid, size=(3, 7), mode="bicubic",
                                                                        align_corners=False))


# ---- parameter counts -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,library_count", [("vit_b_16", 86_567_656 - (768 * 1000 + 1000)),  # minus the heads
                                                ("dinov2_vits14", 22_056_192), ("dinov2_vitb14", 86_579_712)])
def test_closed_form_counts(name, library_count):
    with torch.device("meta"):
        backbone = ViTBackbone(name)
        if VITS[name][0] == "torchvision":
            library = sum(p.numel() for n, p in torchvision.models.vit_b_16().named_parameters()
                          if not n.startswith("heads."))
        else:
            import timm

            library = sum(p.numel() for p in timm.create_model(VITS[name][1], num_classes=0).parameters())
    body = sum(p.numel() for p in backbone.body.parameters())
    assert body == vit_param_count(name) == library == library_count
    assert sum(p.numel() for p in backbone.neck.parameters()) == 2 * backbone.num_channels


# ---- DETR with a ViT: LoRA presets in the backbone, regimes ---------------------------------------------------------

TINY = dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=48, num_queries=4, num_classes=3,
            dropout=0.0, aux_loss=True)


def _vit_detr(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    detr = build_detr(backbone=name, **TINY)
    _randomize_layer_scale(detr)
    return detr


def _outputs(model: nn.Module, imgs: list[torch.Tensor]) -> torch.Tensor:
    out = model(imgs)
    return torch.cat([t.flatten() for o in [out] + out["aux_outputs"] for t in (o["pred_logits"], o["pred_boxes"])])


def _images(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 45, 61, generator=g), torch.rand(3, 33, 50, generator=g)]


def _lora_closed_form(name: str, placement: str, r: int) -> int:
    d_vit = 32 if name == "vit_b_16" else 384  # the tiny test ViTs: 2 blocks
    # per block: qkv (3·d rows over d inputs, adapted as 3 blocks of d when fused in an MHA; 1 block of 3d in
    # timm's Linear) and the output projection
    qkv = 3 * (d_vit + d_vit) * r if name == "vit_b_16" else (d_vit + 3 * d_vit) * r
    backbone = 2 * (qkv + (d_vit + d_vit) * r)
    d = TINY["hidden_dim"]
    transformer = (TINY["enc_layers"] + 2 * TINY["dec_layers"]) * 4 * 2 * d * r
    return backbone + (transformer if placement.endswith("+transformer") else 0)


@pytest.mark.parametrize("name", ["vit_b_16", "dinov2_vits14"])
@pytest.mark.parametrize("placement", ["backbone_attention", "backbone_attention+transformer"])
def test_backbone_lora_identity_merge_counts_and_only_adapters_move(name, placement, tiny_torchvision_vit,
                                                                    tiny_dinov2):
    model = _vit_detr(name).eval()
    imgs = _images()
    with torch.no_grad():
        before = _outputs(model, imgs)
    apply_lora(model, rank=2, alpha=4, placement=placement)
    with torch.no_grad():
        torch.testing.assert_close(_outputs(model, imgs), before)  # fp32 tolerances: see test_lora_targets
    assert count_lora_params(model) == _lora_closed_form(name, placement, 2)
    adapted = {n.split(".parametrizations.")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert any(n.startswith("backbone.0.body.") for n in adapted)
    assert any(n.startswith("transformer.") for n in adapted) == placement.endswith("+transformer")

    apply_regime(model, "lora_only")
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3, weight_decay=0.0)
    model.train()
    for step in range(2):
        opt.zero_grad()
        _outputs(model, _images(step)).square().mean().backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, frozen_before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved <= trainable and {n for n in trainable if ".lora_" in n and ".body." in n} <= moved

    model.eval()
    with torch.no_grad():
        adapted_out = _outputs(model, imgs)
        merged = merge_lora(copy.deepcopy(model))
        torch.testing.assert_close(_outputs(merged, imgs), adapted_out, rtol=0, atol=1e-5)
    assert lora_parameters(merged) == []


@pytest.mark.parametrize("name", ["vit_b_16", "dinov2_vits14"])
def test_partial_trains_the_last_block_final_norm_neck_and_heads(name, tiny_torchvision_vit, tiny_dinov2):
    model = _vit_detr(name)
    apply_regime(model, "partial")
    last = "encoder.layers.encoder_layer_1." if name == "vit_b_16" else "vit.blocks.1."
    final = "encoder.ln." if name == "vit_b_16" else "vit.norm."
    for n, p in model.named_parameters():
        want = n.startswith(("class_embed.", "bbox_embed.", "query_embed.", "backbone.0.neck.",
                             f"backbone.0.body.{last}", f"backbone.0.body.{final}"))
        assert p.requires_grad == want, n


def test_detector_param_groups_put_the_fresh_neck_at_lr(tiny_dinov2):
    det = build_detr_detector(backbone="dinov2_vits14", **{k: v for k, v in TINY.items() if k != "num_classes"},
                              num_classes=3)
    groups = {g["name"]: g for g in det.param_groups(1e-4, 1e-5, 1e-4)}
    neck = {id(p) for p in det.detr.backbone[0].neck.parameters()}
    assert neck <= {id(p) for p in groups["transformer_and_heads"]["params"]}
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in det.detr.backbone[0].body.parameters()}


# ---- weights: torch hub (imagenet), the Hugging Face cache (lvd142m), backbone:PATH ----------------------------------

def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _named_by_hash(path, stem: str):
    target = path.with_name(f"{stem}-{_sha256(path)[:8]}.pth")
    path.rename(target)
    return target


def test_vit_b_16_imagenet_through_torch_hub_hash_checked(tiny_torchvision_vit, tmp_path, monkeypatch):
    source = torchvision.models.vit_b_16()  # the tiny stand-in, with its ImageNet-style classifier
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    served = _named_by_hash(tmp_path / "vit.pth", "vit_b_16")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setitem(vit_weights.VIT_IMAGENET_URLS, "vit_b_16", served.as_uri())
    det = build_detr_detector(backbone="vit_b_16", weights="imagenet", **{k: v for k, v in TINY.items()})
    body = det.detr.backbone[0].body
    assert torch.equal(body.encoder.pos_embedding, source.encoder.pos_embedding)
    assert det.weights_summary["source"] == "imagenet"
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / served.name
    cached.write_bytes(cached.read_bytes()[:-10])  # a truncated cache entry is refused by its name's hash
    with pytest.raises(RuntimeError, match="the file is corrupt or not the official one"):
        build_detr_detector(backbone="vit_b_16", weights="imagenet", **TINY)


def _hf_cache(tmp_path, state: dict, repo: str) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "hf" / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    save_file(state, str(tmp_path / "model.safetensors"))
    digest = _sha256(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").rename(folder / "blobs" / digest)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    os.symlink(folder / "blobs" / digest, folder / "snapshots" / "abc123" / "model.safetensors")


def test_dinov2_lvd142m_from_the_hugging_face_cache_only(tiny_dinov2, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match=r"not in the Hugging Face cache .*hf download "
                                                r"timm/vit_small_patch14_dinov2.lvd142m model.safetensors"):
        build_detr_detector(backbone="dinov2_vits14", weights="lvd142m", **TINY)
    torch.manual_seed(5)
    source = ViTBackbone("dinov2_vits14").body.vit
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    _hf_cache(tmp_path, state, "timm/vit_small_patch14_dinov2.lvd142m")
    det = build_detr_detector(backbone="dinov2_vits14", weights="lvd142m", **TINY)
    assert torch.equal(det.detr.backbone[0].body.vit.pos_embed, source.pos_embed)
    blob = next((tmp_path / "hf").rglob("blobs/*"))
    blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\0")  # same length, other content
    with pytest.raises(RuntimeError, match="not the .* the cache names them by: the file is corrupt"):
        build_detr_detector(backbone="dinov2_vits14", weights="lvd142m", **TINY)


def test_official_dinov2_layout_from_a_local_file_weights_only(tiny_dinov2, tmp_path):
    torch.manual_seed(6)
    source = ViTBackbone("dinov2_vits14").body.vit
    official = {**source.state_dict(), "mask_token": torch.zeros(1, 384)}  # facebookresearch/dinov2's layout
    torch.save(official, tmp_path / "dinov2.pth")
    path = _named_by_hash(tmp_path / "dinov2.pth", "dinov2_vits14_pretrain")
    det = build_detr_detector(backbone="dinov2_vits14", weights=f"backbone:{path}", **TINY)
    assert torch.equal(det.detr.backbone[0].body.vit.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    torch.save({"x": functools.partial(print)}, path)  # pickled code: refused, whatever the name says
    with pytest.raises(RuntimeError, match="corrupt or not the official one"):
        build_detr_detector(backbone="dinov2_vits14", weights=f"backbone:{path}", **TINY)
    other = tmp_path / "other.pth"
    torch.save({"x": functools.partial(print)}, other)
    with pytest.raises(ValueError, match=r"weights_only=True\) refuses"):
        build_detr_detector(backbone="dinov2_vits14", weights=f"backbone:{other}", **TINY)
