"""Vision-transformer backbones for DETR: torchvision's ViT-B/16 and DINOv2 ViT-S/14, ViT-B/14 (timm's modules),
run on padded batches with padding masks, and a small neck that turns the last block's patch tokens into the
feature map DETR's `input_proj` expects (stride = the patch size, 16 or 14).

- Images are padded (bottom/right, zeros), never cropped, to a multiple of the patch size; a patch is padding
  when all its pixels are, and padded patches are masked out of every attention (keys), so an image's features
  do not depend on what it is batched with.
- The positional embedding is resized per image to its own patch grid, bicubic as DINOv2 does
  (facebookresearch/dinov2 `interpolate_pos_encoding`; we give the size, not its scale factor + 0.1 offset).
- State-dict keys are the library's under `body.` (`body.encoder.layers.encoder_layer_0...` for torchvision,
  `body.vit.blocks.0.attn.qkv...` for timm), so their checkpoints load strictly (`vit_weights.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

# name -> (library, constructor, patch size, embedding width)
VITS: dict[str, tuple[str, str, int, int]] = {
    "vit_b_16": ("torchvision", "vit_b_16", 16, 768),
    "dinov2_vits14": ("timm", "vit_small_patch14_dinov2", 14, 384),
    "dinov2_vitb14": ("timm", "vit_base_patch14_dinov2", 14, 768),
}


def pad_to_patches(images: Tensor, mask: Tensor, patch: int) -> tuple[Tensor, Tensor]:
    """images [B, 3, H, W], mask [B, H, W] (True = padding) -> both padded bottom/right to multiples of `patch`."""
    h, w = images.shape[-2:]
    ph, pw = -h % patch, -w % patch
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph))
        mask = F.pad(mask, (0, pw, 0, ph), value=True)
    return images, mask


def patch_mask(mask: Tensor, patch: int) -> Tensor:
    """Pixel mask [B, H, W] (H, W multiples of `patch`) -> patch mask [B, H/p, W/p]: True where every pixel
    is padding."""
    b, h, w = mask.shape
    return mask.view(b, h // patch, patch, w // patch, patch).all(dim=4).all(dim=2)


def resize_pos_grid(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """A positional-embedding grid [1, D, g, g] -> [1, D, h, w], bicubic (unchanged when the size is its own)."""
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    return F.interpolate(grid.float(), size=size, mode="bicubic", align_corners=False).to(grid.dtype)


def positions(grid: Tensor, pmask: Tensor) -> Tensor:
    """Per-image positional embeddings [B, h*w, D]: each image's grid resized to its own real extent (the
    unpadded patches, top-left), zeros on its padding. pmask: [B, h, w] (True = padding)."""
    b, h, w = pmask.shape
    out = grid.new_zeros((b, grid.shape[1], h, w))
    rows = (~pmask).any(dim=2).sum(dim=1).tolist()  # note: a host-device sync, once per forward
    cols = (~pmask).any(dim=1).sum(dim=1).tolist()
    for size in set(zip(rows, cols)):
        resized = resize_pos_grid(grid, size)
        for i, hw in enumerate(zip(rows, cols)):
            if hw == size:
                out[i, :, : size[0], : size[1]] = resized[0]
    return out.flatten(2).transpose(1, 2)


class _TorchvisionBody(nn.Module):
    """torchvision's VisionTransformer without its classifier (`heads`): `conv_proj`, `class_token`, `encoder`."""

    def __init__(self, arch: str, image_size: int | None) -> None:
        super().__init__()
        kw = {} if image_size is None else {"image_size": image_size}
        vit = getattr(torchvision.models, arch)(weights=None, **kw)
        self.conv_proj, self.class_token, self.encoder = vit.conv_proj, vit.class_token, vit.encoder
        self.patch_size, self.dim = vit.patch_size, vit.hidden_dim

    def embed(self, x: Tensor) -> Tensor:
        return self.conv_proj(x)

    def pos_parts(self) -> tuple[Tensor, Tensor]:
        pos = self.encoder.pos_embedding  # [1, 1 + g*g, D], the class token's first
        g = int((pos.shape[1] - 1) ** 0.5)
        return pos[:, :1], pos[:, 1:].transpose(1, 2).reshape(1, -1, g, g)

    def cls_token(self) -> Tensor:
        return self.class_token

    def blocks(self, x: Tensor, key_padding: Tensor) -> Tensor:
        """torchvision's Encoder.forward after its pos_embedding add, with a key padding mask [B, N]."""
        x = self.encoder.dropout(x)
        for block in self.encoder.layers:  # EncoderBlock.forward, plus the mask
            y = block.ln_1(x)
            y = block.self_attention(y, y, y, key_padding_mask=key_padding, need_weights=False)[0]
            x = x + block.dropout(y)
            x = x + block.mlp(block.ln_2(x))
        return self.encoder.ln(x)


class _TimmBody(nn.Module):
    """timm's VisionTransformer (DINOv2: LayerScale, 518-px grid) held whole as `vit`; its head is Identity."""

    def __init__(self, arch: str, image_size: int | None) -> None:
        super().__init__()
        import timm  # Apache-2.0; only DINOv2 backbones need it

        kw = {} if image_size is None else {"img_size": image_size}
        self.vit = timm.create_model(arch, pretrained=False, num_classes=0, **kw)
        self.patch_size, self.dim = self.vit.patch_embed.patch_size[0], self.vit.embed_dim

    def embed(self, x: Tensor) -> Tensor:
        return self.vit.patch_embed.proj(x)

    def pos_parts(self) -> tuple[Tensor, Tensor]:
        pos = self.vit.pos_embed  # [1, 1 + g*g, D]: DINOv2's class token has a position too
        g = int((pos.shape[1] - 1) ** 0.5)
        return pos[:, :1], pos[:, 1:].transpose(1, 2).reshape(1, -1, g, g)

    def cls_token(self) -> Tensor:
        return self.vit.cls_token

    def blocks(self, x: Tensor, key_padding: Tensor) -> Tensor:
        v = self.vit
        x = v.norm_pre(v.patch_drop(v.pos_drop(x)))
        # Boolean mask [B, 1, 1, N] for every head and query, SDPA's form (True = attend): a float one would have
        # to match the query's dtype under autocast.
        attend = ~key_padding[:, None, None, :]
        for block in v.blocks:
            x = block(x, attn_mask=attend)
        return v.norm(x)


class PatchNeck(nn.Module):
    """Patch tokens [B, h*w, D] -> feature map [B, D, h, w], through a LayerNorm: its identity init is a sensible
    fixed function, so the neck can stay frozen (lora_only, two_stage's first stage) and still feed input_proj
    features of unit scale. 2·D parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, d = tokens.shape
        return self.norm(tokens).transpose(1, 2).reshape(b, d, *hw)


class ViTBackbone(nn.Module):
    """A ViT body + PatchNeck with DETR's backbone interface (`Joiner`'s index 0, like `Backbone`).

    forward(images [B, 3, H, W], mask [B, H, W] True = padding) -> (features [B, D, ceil(H/p), ceil(W/p)],
    patch mask [B, ceil(H/p), ceil(W/p)]). `image_size` overrides the library's grid (tests: small models).
    """

    def __init__(self, name: str, image_size: int | None = None) -> None:
        super().__init__()
        if name not in VITS:
            raise ValueError(f"ViT backbone {name!r} is not one of {sorted(VITS)}")
        library, arch, _, _ = VITS[name]
        self.name, self.library, self.arch = name, library, arch
        self.body = (_TorchvisionBody if library == "torchvision" else _TimmBody)(arch, image_size)
        self.patch_size, self.num_channels = self.body.patch_size, self.body.dim
        self.neck = PatchNeck(self.num_channels)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        images, mask = pad_to_patches(images, mask, self.patch_size)
        pmask = patch_mask(mask, self.patch_size)
        x = self.body.embed(images)  # [B, D, h, w]
        hw = tuple(x.shape[-2:])
        cls_pos, grid = self.body.pos_parts()
        tokens = x.flatten(2).transpose(1, 2) + positions(grid, pmask).to(x.dtype)
        cls = (self.body.cls_token() + cls_pos).to(x.dtype).expand(len(x), -1, -1)
        key_padding = torch.cat([pmask.new_zeros((len(x), 1)), pmask.flatten(1)], dim=1)
        out = self.body.blocks(torch.cat([cls, tokens], dim=1), key_padding)
        return self.neck(out[:, 1:], hw), pmask


def vit_param_count(name: str, grid: int | None = None) -> int:
    """Closed form of a ViT body's parameters (no classifier head): patch embedding, class token, positions,
    12 blocks (2 LayerNorms, qkv, proj, 4x MLP; DINOv2 adds 2 LayerScales) and the final LayerNorm."""
    library, _, p, d = VITS[name]
    g = grid if grid is not None else (224 // p if library == "torchvision" else 518 // p)
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    block += 2 * d if library == "timm" else 0  # LayerScale gammas (init 1e-5)
    return (3 * p * p * d + d) + d + (1 + g * g) * d + 12 * block + 2 * d
