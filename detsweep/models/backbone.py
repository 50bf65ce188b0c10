"""DETR's image side: padding to a batch, ResNet body with FrozenBatchNorm2d, sine position encoding.

Faithful to facebookresearch/detr `models/backbone.py`, `models/position_encoding.py` and
`util/misc.py::nested_tensor_from_tensor_list` (commit 29901c5); state-dict keys are the official ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

# Output channels of layer4 per supported torchvision ResNet.
RESNET_CHANNELS: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def pad_images(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Batch images of different sizes the way the official `nested_tensor_from_tensor_list` does.

    images: list of [C, H_i, W_i]. Returns (batch [B, C, H, W], mask [B, H, W] bool) where H, W are the
    maxima, each image sits top-left, the rest is zero, and mask is True on padding.
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image, got an empty list")
    if any(img.dim() != 3 for img in images):
        raise ValueError(f"images must be [C,H,W] tensors, got shapes {[tuple(i.shape) for i in images]}")
    c = max(img.shape[0] for img in images)
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    first = images[0]
    batch = first.new_zeros((len(images), c, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=first.device)
    for img, padded, m in zip(images, batch, mask):
        padded[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return batch, mask


class FrozenBatchNorm2d(TorchvisionFrozenBatchNorm2d):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers, that keeps the input's dtype.

    Same keys as nn.BatchNorm2d minus `num_batches_tracked` (dropped on load), so official checkpoints load
    strictly. A subclass of torchvision's, so Faster R-CNN's builder and `isinstance` checks treat it as theirs.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W] in x's dtype."""
        # Official order of operations (eps inside the rsqrt, 1e-5 by default), so fp32 results match to the last bit.
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        # Folded in fp32, applied in x's dtype: fp32 buffers would promote bf16/fp16 activations to fp32 under
        # autocast and double the backbone's activation memory (issue 13). A no-op cast for fp32 inputs.
        return x * scale.to(x.dtype) + bias.to(x.dtype)


class ResNetBody(nn.Module):
    """A torchvision ResNet without avgpool/fc; returns the layer4 map [B, C, H/32, W/32].

    Attribute names equal torchvision's so keys read `body.conv1.weight`, `body.layer4.2.bn3.running_var`.
    """

    def __init__(self, resnet: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Backbone(nn.Module):
    """ResNet feature extractor plus mask downsampling (official `Backbone` + `BackboneBase`).

    Built random, with the stem and layer1 frozen (requires_grad False) as in the official code; layer2-4 train.
    `build_detr_detector` then applies `frozen_layers_for(weights)`, which trains all of it from random init.
    """

    def __init__(self, name: str, dilation: bool = False) -> None:
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(f"backbone {name!r} is not one of {sorted(RESNET_CHANNELS)}")
        if dilation and RESNET_CHANNELS[name] == 512:
            raise ValueError(f"dilation=True (DC5) needs a bottleneck ResNet, not {name!r}; "
                             "use one of ['resnet101', 'resnet50']")
        resnet = getattr(torchvision.models, name)(
            weights=None, norm_layer=FrozenBatchNorm2d, replace_stride_with_dilation=[False, False, dilation])
        self.body = ResNetBody(resnet)
        self.name = name
        self.num_channels = RESNET_CHANNELS[name]
        freeze_layers(self, OFFICIAL_FROZEN_LAYERS)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W], mask [B, H, W] (True = padding) -> (features [B, C, h, w], mask [B, h, w])."""
        features = self.body(images)
        # Nearest-neighbour resize of the padding mask, exactly as the official code does it.
        feature_mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, feature_mask


# ResNet parts as `ResNetBody` names them; conv1 + bn1 (+ relu, maxpool: no parameters) are the stem.
BODY_PARTS: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
# The official recipe (facebookresearch/detr models/backbone.py) trains layer2-4 of an ImageNet ResNet: its
# stem and layer1 are already generic edge and colour filters, and freezing them saves their backward.
OFFICIAL_FROZEN_LAYERS: tuple[str, ...] = ("conv1", "bn1", "layer1")


def frozen_layers_for(weights: str) -> tuple[str, ...]:
    """The ResNet parts (of BODY_PARTS) frozen at build for DETR `weights` ("none", "imagenet", "coco", a path).

    "none": nothing. bench/learn_probe.py measured no consistent gain or loss from freezing the random stem
    and layer1 (bench/RESULTS.md, "Learning from scratch"); what decides is what random init is for here:
    pretraining a base detector, whose stem must learn before fine-tuning freezes it as the official recipe
    freezes ImageNet's. torchvision also trains every layer from scratch (so does our Faster R-CNN).
    Any pretrained start (imagenet, coco, a checkpoint such as a base): OFFICIAL_FROZEN_LAYERS.
    """
    return () if weights == "none" else OFFICIAL_FROZEN_LAYERS


def freeze_layers(backbone: Backbone, frozen: tuple[str, ...]) -> None:
    """Set requires_grad on `backbone.body`'s parameters: False in the parts named in `frozen`, True elsewhere."""
    unknown = sorted(set(frozen) - set(BODY_PARTS))
    if unknown:
        raise ValueError(f"frozen backbone parts {unknown} are not among {list(BODY_PARTS)}")
    for name, param in backbone.body.named_parameters():
        param.requires_grad_(name.split(".", 1)[0] not in frozen)


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine 2-D position encoding over the unpadded region (official `PositionEmbeddingSine`)."""

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: Tensor) -> Tensor:
        """mask [B, h, w] (True = padding) -> pos [B, 2*num_pos_feats, h, w], channels (y..., x...)."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave sin (even channels) and cos (odd channels).
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class Joiner(nn.Sequential):
    """Backbone (index 0) + position encoding (index 1): the official `backbone.0.body.*` key prefix."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images [B, 3, H, W], mask [B, H, W] -> (features [B, C, h, w], mask [B, h, w], pos [B, D, h, w])."""
        features, feature_mask = self[0](images, mask)
        pos = self[1](feature_mask).to(features.dtype)
        return features, feature_mask, pos
