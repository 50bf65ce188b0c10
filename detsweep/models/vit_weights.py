"""Pretrained weights for DETR's ViT backbones (`model.detr.weights` with a ViT `backbone`), every file checked
against a hash and read without running pickled code:

- `imagenet` (vit_b_16): torchvision's `ViT_B_16_Weights.IMAGENET1K_V1`, through torch hub's cache; the sha256
  prefix in its file name is checked on every load, and it loads with `weights_only=True` (`weights.py`).
- `lvd142m` (dinov2_*): DINOv2's LVD-142M pretraining as timm publishes it (`timm/vit_*_patch14_dinov2.lvd142m`
  on the Hugging Face hub), read from the hub's local cache only; nothing downloads. The cache stores a file
  under its own sha256 (`blobs/<sha256>`), so the file is hashed and compared with that name on every load; it is
  a safetensors file (tensors only, no pickle).
- `backbone:PATH`: a backbone-only checkpoint file, in the library's layout (torchvision's ViT, timm's, or the
  official DINOv2 `dinov2_vits14_pretrain.pth` layout, converted by timm), `.safetensors` or a torch file read
  with `weights_only=True`; a torch-hub style `name-<sha256 prefix>.pth` is hash-checked.

The body loads strictly (the classifier `heads.*` and DINOv2's `mask_token` have no place in it); the neck,
input_proj, transformer and heads keep their fresh init.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

from torch import Tensor
from torchvision.models import ViT_B_16_Weights

from detsweep.models.vit import ViTBackbone
from detsweep.models.weights import _verify_hash_prefix, load_checkpoint_file, load_hub_checkpoint

log = logging.getLogger(__name__)

# `imagenet` per torchvision ViT; the URL is read at call time (tests point it at a local file:// checkpoint).
VIT_IMAGENET: dict[str, Any] = {"vit_b_16": ViT_B_16_Weights.IMAGENET1K_V1}
VIT_IMAGENET_URLS: dict[str, str] = {name: enum.url for name, enum in VIT_IMAGENET.items()}
# `lvd142m` per DINOv2 backbone: (Hugging Face repo, file), timm's published conversion of the official weights.
DINOV2_HUB: dict[str, tuple[str, str]] = {
    "dinov2_vits14": ("timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors"),
    "dinov2_vitb14": ("timm/vit_base_patch14_dinov2.lvd142m", "model.safetensors"),
}
BACKBONE_PREFIX = "backbone:"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def load_vit_weights(backbone: ViTBackbone, weights: str) -> dict[str, Any]:
    """Load `weights` ("imagenet", "lvd142m" or "backbone:PATH") into `backbone.body` and return a summary."""
    name = backbone.name
    if weights == "imagenet":
        if name not in VIT_IMAGENET_URLS:
            raise ValueError(f"weights 'imagenet' exist for {sorted(VIT_IMAGENET_URLS)}, not {name!r}; "
                             f"a DINOv2 backbone takes weights 'lvd142m'")
        url = VIT_IMAGENET_URLS[name]
        load_vit_body(backbone, load_hub_checkpoint(url), url)
        return {"source": "imagenet", "backbone": str(VIT_IMAGENET[name])}
    if weights == "lvd142m":
        if name not in DINOV2_HUB:
            raise ValueError(f"weights 'lvd142m' (DINOv2) exist for {sorted(DINOV2_HUB)}, not {name!r}")
        path = dinov2_cached_file(name)
        load_vit_body(backbone, read_tensors(path), str(path))
        return {"source": "lvd142m", "backbone": str(path)}
    if weights.startswith(BACKBONE_PREFIX):
        path = Path(weights[len(BACKBONE_PREFIX):]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights file {str(path)!r} does not exist")
        _verify_hash_prefix(path)
        load_vit_body(backbone, read_tensors(path), str(path))
        return {"source": str(path)}
    raise ValueError(f"weights {weights!r} for the ViT {name!r}: use 'none', 'imagenet' (vit_b_16), 'lvd142m' "
                     f"(DINOv2), 'backbone:PATH' or a DETR checkpoint path")


def dinov2_cached_file(name: str) -> Path:
    """The cached DINOv2 safetensors file of backbone `name`, its sha256 checked against the cache's blob name.
    Raises FileNotFoundError saying how to fetch it when it is not cached (nothing is downloaded here)."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo, filename = DINOV2_HUB[name]
    found = try_to_load_from_cache(repo, filename)
    if not isinstance(found, str):
        raise FileNotFoundError(f"DINOv2 weights for {name} are not in the Hugging Face cache "
                                f"({constants.HF_HUB_CACHE}); fetch them once with "
                                f"`hf download {repo} {filename}`, or give weights 'backbone:PATH'")
    path = Path(found)
    blob = path.resolve().name  # snapshots/<rev>/model.safetensors -> ../../blobs/<sha256>
    if _SHA256.match(blob):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != blob:
            raise RuntimeError(f"cached DINOv2 weights {path} have sha256 {digest.hexdigest()[:16]}..., not the "
                               f"{blob[:16]}... the cache names them by: the file is corrupt; delete it to fetch it "
                               "again")
    else:
        log.warning("%s: not a content-addressed cache blob, its hash is not checked", path)
    return path


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A state dict from a `.safetensors` file (tensors only) or a torch file (`weights_only=True`)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_checkpoint_file(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def load_vit_body(backbone: ViTBackbone, state: dict[str, Tensor], source: str) -> None:
    """A library-layout ViT state dict into `backbone.body`, strictly: torchvision's without its `heads.*`
    classifier; timm's (or the official DINOv2 layout) through timm's own converter, which also drops
    `mask_token` and resizes the positions to the body's grid."""
    if backbone.library == "torchvision":
        target = backbone.body
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn

        target = backbone.body.vit
        state = checkpoint_filter_fn(dict(state), target)
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{source}: does not fit the {backbone.name} backbone: {err}") from err
    log.info("loaded %s into DETR's %s backbone; neck, input_proj, transformer, queries and heads are freshly "
             "initialised", source, backbone.name)
