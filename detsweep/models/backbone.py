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


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers.

    Same keys as nn.BatchNorm2d minus `num_batches_tracked`, so official checkpoints load strictly.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # noqa: ANN001 (torch's signature)
        # torchvision ImageNet checkpoints carry BatchNorm's counter; it means nothing when frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        # Official order of operations (eps 1e-5 inside the rsqrt), so results match to the last bit.
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias


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

    The stem and layer1 are frozen (requires_grad False) as in the official code; layer2-4 train. The ResNet is
    built random: without pretrained weights (`weights.load_detr_weights`) the frozen part stays random.
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
        for param_name, param in self.body.named_parameters():
            if not param_name.startswith(("layer2", "layer3", "layer4")):
                param.requires_grad_(False)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W], mask [B, H, W] (True = padding) -> (features [B, C, h, w], mask [B, h, w])."""
        features = self.body(images)
        # Nearest-neighbour resize of the padding mask, exactly as the official code does it.
        feature_mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, feature_mask


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
