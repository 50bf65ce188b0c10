"""The DETR model and its builders, faithful to facebookresearch/detr `models/detr.py` (commit 29901c5).

State-dict keys equal the official ones, so `detr-r50-e632da11.pth`'s `checkpoint["model"]` loads strictly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detsweep.models.backbone import RESNET_CHANNELS, Backbone, Joiner, PositionEmbeddingSine, pad_images
from detsweep.models.transformer import Transformer
from detsweep.models.vit import VITS, ViTBackbone


class MLP(nn.Module):
    """Feed-forward network: `num_layers` Linear layers with ReLU between them (official `MLP`)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """[..., input_dim] -> [..., output_dim]."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    """DEtection TRansformer: backbone -> input_proj -> transformer -> class/box heads.

    `num_classes` is the number of object classes K; `class_embed` has K+1 outputs, the last one "no object".
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool) -> None:
        super().__init__()
        hidden_dim = transformer.d_model
        # Registration order follows the official code, so state_dict() lists keys in the official order.
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, images: list[Tensor] | Tensor, mask: Tensor | None = None) -> dict[str, Any]:
        """Run DETR on ImageNet-normalised images.

        images: list of [3, H_i, W_i] (padded here like the official `nested_tensor_from_tensor_list`), or a
        batch [B, 3, H, W] with `mask` [B, H, W] (True = padding; None = no padding).
        Returns {"pred_logits": [B, Q, K+1], "pred_boxes": [B, Q, 4] cxcywh normalised to the unpadded image,
        "aux_outputs": list of the same two keys for each non-final decoder layer (only when aux_loss)}.
        """
        if isinstance(images, (list, tuple)):
            if mask is not None:
                raise ValueError("mask is only accepted with a padded batch tensor, not with a list of images")
            images, mask = pad_images(list(images))
        elif mask is None:
            mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=images.device)
        # A fully frozen backbone (lora_only regime) needs no autograd graph: saves its activations' memory. When
        # the transformer side is frozen too (two_stage's heads-only first stage), only the heads build one.
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        body_frozen = frozen and not any(p.requires_grad for m in (self.input_proj, self.transformer, self.query_embed)
                                         for p in m.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            features, feature_mask, pos = self.backbone(images, mask)
        with torch.no_grad() if body_frozen else contextlib.nullcontext():
            hs = self.transformer(self.input_proj(features), feature_mask, self.query_embed.weight, pos)[0]
        outputs_class, outputs_coord = self.heads(hs)
        out: dict[str, Any] = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                  for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out

    def heads(self, hs: Tensor) -> tuple[Tensor, Tensor]:
        """Class and box heads on the decoder outputs hs [L, B, Q, D] (one per decoder layer).

        Returns (logits [L, B, Q, K+1], boxes [L, B, Q, 4] cxcywh normalised), both float32 even under autocast:
        bf16's 8-bit mantissa would step the sigmoid boxes by ~2.6 px at 1333 px, and those boxes feed the
        matcher, the losses and evaluation (issue 13). Four small Linear layers on [L, B, Q, D]: fp32 costs little.
        """
        with torch.autocast(hs.device.type, enabled=False):
            hs = hs.float()
            return self.class_embed(hs), self.bbox_embed(hs).sigmoid()


def build_detr(*, backbone: str, hidden_dim: int, nheads: int, enc_layers: int, dec_layers: int,
               dim_feedforward: int, num_queries: int, num_classes: int, dropout: float, aux_loss: bool,
               pre_norm: bool = False, dilation: bool = False) -> DETR:
    """Build DETR with the official builder's argument names (backbone: resnet18/34/50/101 or a ViT of
    `vit.VITS`, weights random;
    `weights.load_detr_weights` loads pretrained ones). An official-style config dict, with its extra keys
    (`position_embedding`, loss weights, ...), goes through `build_detr_from_official_config` instead."""
    # A sweep's values were checked by its loader (sweep/rules.py), an official config's by
    # build_detr_from_official_config: internal asserts only.
    assert min(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, num_queries, num_classes) >= 1
    assert hidden_dim % nheads == 0 and hidden_dim % 2 == 0 and 0.0 <= dropout < 1.0, (hidden_dim, nheads, dropout)
    assert backbone in VITS or backbone in RESNET_CHANNELS, backbone
    assert not (dilation and backbone in VITS), "DC5 needs a bottleneck ResNet"
    body: nn.Module = ViTBackbone(backbone) if backbone in VITS else Backbone(backbone, dilation=dilation)
    joiner = Joiner(body, PositionEmbeddingSine(hidden_dim // 2, normalize=True))
    transformer = Transformer(d_model=hidden_dim, nhead=nheads, num_encoder_layers=enc_layers,
                              num_decoder_layers=dec_layers, dim_feedforward=dim_feedforward, dropout=dropout,
                              normalize_before=pre_norm)
    return DETR(joiner, transformer, num_classes=num_classes, num_queries=num_queries, aux_loss=aux_loss)


_MODEL_KEYS = ("backbone", "hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries",
               "num_classes", "dropout", "aux_loss", "pre_norm", "dilation")
# Official training arguments that do not shape the model (loss/matcher/optimiser/seed); accepted and ignored.
_IGNORED_KEYS = ("lr_backbone", "set_cost_class", "set_cost_bbox", "set_cost_giou", "bbox_loss_coef",
                 "giou_loss_coef", "eos_coef", "seed", "mask_loss_coef", "dice_loss_coef")
# Official options we only support at one value: {key: the supported value}.
_FIXED_KEYS = {"position_embedding": "sine", "masks": False}


def build_detr_from_official_config(cfg: Mapping[str, Any]) -> DETR:
    """Build DETR from an official-style argument dict (e.g. the parity fixture's `config`).

    Model keys go to `build_detr`; loss/optimiser keys are ignored; unknown keys and unsupported values raise.
    """
    unknown = sorted(set(cfg) - set(_MODEL_KEYS) - set(_IGNORED_KEYS) - set(_FIXED_KEYS))
    if unknown:
        raise ValueError(f"unknown DETR config keys {unknown}; known keys are "
                         f"{sorted(_MODEL_KEYS + _IGNORED_KEYS + tuple(_FIXED_KEYS))}")
    for key, supported in _FIXED_KEYS.items():
        if key in cfg and cfg[key] != supported:
            raise ValueError(f"DETR config {key}={cfg[key]!r} is not supported; only {supported!r} is")
    kw = {k: cfg[k] for k in _MODEL_KEYS if k in cfg}
    _check_official_values(kw)
    return build_detr(**kw)


def _check_official_values(kw: Mapping[str, Any]) -> None:
    """An official config comes from outside detsweep's sweep loader: its values are checked here, in its words."""
    for name in ("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "num_classes"):
        if name in kw and kw[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {kw[name]}")
    hidden, heads = kw.get("hidden_dim", 2), kw.get("nheads", 1)
    if hidden % heads != 0:
        raise ValueError(f"hidden_dim ({hidden}) must be divisible by nheads ({heads})")
    if hidden % 2 != 0:
        raise ValueError(f"hidden_dim must be even (half of it encodes y, half x), got {hidden}")
    if not 0.0 <= kw.get("dropout", 0.0) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {kw['dropout']}")
    backbone = kw.get("backbone", "resnet50")
    if backbone not in VITS and backbone not in RESNET_CHANNELS:
        raise ValueError(f"backbone {backbone!r} is not one of {sorted(RESNET_CHANNELS) + sorted(VITS)}")
    if kw.get("dilation") and backbone in VITS:
        raise ValueError(f"dilation=True (DC5) needs a bottleneck ResNet, not the ViT {backbone!r}")
