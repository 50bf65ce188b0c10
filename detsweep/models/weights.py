"""Checkpoint files, always read with `weights_only=True`: torch-hub downloads (their sha256 prefix checked on
every load, not only while downloading) and local files. Loading DETR checkpoints (official COCO DETR-R50 or a
local file) into a possibly smaller DETR: adapts the class head, the number of queries and of decoder layers,
then loads strictly. Or only torchvision's ImageNet ResNet into DETR's backbone, as the official training starts.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights, ResNet101_Weights, WeightsEnum

from detsweep.models.detr import DETR

log = logging.getLogger(__name__)

# Official DETR-R50 trained on COCO 2017 (42.0 AP); torch hub names the cached file after the URL.
DETR_R50_COCO_URL = "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth"
# `weights: imagenet`: torchvision's ImageNet classification ResNet per backbone. The official DETR starts
# from torchvision's `resnet50(pretrained=True)`, which is IMAGENET1K_V1; the other depths take their V1 too.
IMAGENET_RESNETS: dict[str, WeightsEnum] = {
    "resnet18": ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": ResNet101_Weights.IMAGENET1K_V1,
}
# torch.hub's own rule (HASH_REGEX): the sha256 prefix is the first `-<hex>.` run of the file name.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
# Checkpoints written by the official main.py keep its argparse Namespace under "args"; allowing that one
# plain-data class keeps them loadable with weights_only=True (which runs no arbitrary code).
_OFFICIAL_SAFE_GLOBALS = [argparse.Namespace]
# The official DETR on COCO: num_classes=91 (COCO category ids run 1..90, with gaps) + the "no object" row,
# so row c is COCO category id c.
DETR_COCO_CLASS_ROWS = 92
COCO_MAX_CATEGORY_ID = 90
# A Faster R-CNN checkpoint's ResNet body: detsweep's wrapper saves torchvision's keys under `model.`.
_FASTER_RCNN_BODY = ("model.backbone.body.", "backbone.body.")
# Keys every DETR state dict has; a checkpoint of another detector lacks them.
_DETR_MARKERS = ("class_embed.weight", "class_embed.bias", "query_embed.weight")
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL \S+")
_DEC_LAYER_KEY = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.")
# (block type, blocks per layer1..4) -> torchvision ResNet name.
_RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
            ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101"}


def load_detr_weights(detr: DETR, weights: str, *, category_ids: list[int] | None = None,
                      category_ids_are_coco: bool = False) -> dict[str, Any]:
    """Load `weights` into `detr` in place and return a summary of what was adapted.

    weights: "none" (keep the random init), "imagenet" (torchvision's ImageNet ResNet into `backbone.0.body` only,
    the official starting point; see `load_imagenet_backbone`), "coco" (official DETR-R50 COCO checkpoint via torch
    hub, cached and sha256-checked), or a path to a checkpoint (`{"model": state_dict}` official layout or a bare
    state dict); a Faster R-CNN checkpoint's path loads only its ResNet body, into DETR's (`load_faster_rcnn_body`).
    category_ids: the dataset's original category ids, sorted, one per contiguous label.
    category_ids_are_coco: the dataset is COCO, so its category ids are COCO's.
    Class head: loaded as is when the checkpoint has the model's classes; else, when the checkpoint has the COCO
    layout (92 rows, row = COCO id) and the dataset is COCO, the rows of `category_ids` (+ "no object") are kept;
    otherwise it is re-initialised (logged).
    Queries and decoder layers beyond the model's are dropped (first ones kept); anything else that differs raises.
    """
    if weights == "none":  # the worker says once per trial what this means for the frozen stem
        return {"source": "none"}
    if weights == "imagenet":
        return load_imagenet_backbone(detr)
    if weights == "coco":
        state, source = _coco_state_dict(), "coco"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"DETR weights file {str(path)!r} does not exist; weights must be 'none', "
                                    "'imagenet', 'coco' or the path of a checkpoint file")
        checkpoint, source = load_checkpoint_file(path), str(path)
        body = faster_rcnn_body(checkpoint)
        if body is not None:
            return load_faster_rcnn_body(detr, body, source)
        state = _unwrap(checkpoint, source)
    _check_is_detr(state, source)
    own = detr.state_dict()
    summary: dict[str, Any] = {"source": source}
    _check_backbone(state, own)
    summary["class_embed"] = _adapt_class_embed(state, own, category_ids, category_ids_are_coco)
    summary["num_queries"] = _adapt_queries(state, own)
    summary["dec_layers"] = _adapt_decoder_layers(state, own)
    _check_layout(state, own)
    detr.load_state_dict(state, strict=True)
    log.info("loaded DETR weights from %s: %s", source, summary)
    return summary


def load_imagenet_backbone(detr: DETR) -> dict[str, Any]:
    """Load torchvision's ImageNet weights for `detr`'s ResNet (`IMAGENET_RESNETS`) into `backbone.0.body`,
    strictly, through the hash-checked torch hub cache. The classifier `fc.*` has no place in the body and
    FrozenBatchNorm2d drops BatchNorm's `num_batches_tracked`; input_proj, transformer, queries and heads keep
    their random init."""
    backbone = detr.backbone[0]
    enum = IMAGENET_RESNETS[backbone.name]
    load_imagenet_body(backbone.body, enum, f"DETR's {backbone.name} backbone")
    log.info("loaded %s into DETR's backbone.0.body; input_proj, transformer, queries and heads are freshly "
             "initialised", enum)
    return {"source": "imagenet", "backbone": str(enum)}


def load_imagenet_body(body: nn.Module, enum: WeightsEnum, what: str) -> None:
    """torchvision's ImageNet ResNet weights `enum` into a ResNet `body` (conv1, bn1, layer1..4) of a
    detector, `what`, strictly: the classifier `fc.*` has no place there. Hash-checked, weights_only."""
    state = load_hub_checkpoint(enum.url)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{enum.url}: expected a ResNet state dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        body.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{enum.url}: does not fit {what}: {err}") from err


def faster_rcnn_body(checkpoint: Any) -> dict[str, Tensor] | None:
    """The ResNet body (conv1, bn1, layer1..4) of a Faster R-CNN checkpoint: torchvision's keys
    `backbone.body.*`, or ours `model.backbone.body.*` (a detsweep trial's or base's model.pt); else None."""
    if not isinstance(checkpoint, dict):
        return None
    for prefix in _FASTER_RCNN_BODY:
        body = {k[len(prefix):]: v for k, v in checkpoint.items() if isinstance(k, str) and k.startswith(prefix)}
        if body:
            return body
    return None


def load_faster_rcnn_body(detr: DETR, body: dict[str, Tensor], source: str) -> dict[str, Any]:
    """A trained Faster R-CNN's ResNet body into DETR's `backbone.0.body`, strictly, BatchNorm statistics as
    frozen statistics (FrozenBatchNorm2d has no `num_batches_tracked`), as ImageNet weights are loaded:
    a detection-trained backbone for DETR (a Faster R-CNN base starts the DETR base of the demo).
    input_proj, transformer, queries and heads keep their random init."""
    backbone = detr.backbone[0]
    body = {k: v for k, v in body.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected, shapes = _layout_diff(body, backbone.body.state_dict())
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: its Faster R-CNN backbone does not fit DETR's {backbone.name} backbone "
                         f"(build DETR with the Faster R-CNN's backbone): {len(missing)} missing keys "
                         f"{sorted(missing)[:2]}, {len(unexpected)} unexpected {sorted(unexpected)[:2]}, "
                         f"shapes {shapes[:2]}")
    backbone.body.load_state_dict(body, strict=True)
    log.info("loaded the Faster R-CNN backbone of %s into DETR's backbone.0.body; input_proj, transformer, "
             "queries and heads are freshly initialised", source)
    return {"source": source, "backbone": "faster_rcnn"}


def _coco_state_dict() -> dict[str, Tensor]:
    url = DETR_R50_COCO_URL  # read at call time: tests point it at a local file:// checkpoint
    return _unwrap(load_hub_checkpoint(url), url)


def load_hub_checkpoint(url: str) -> Any:
    """The checkpoint at `url`, through torch hub's cache (`<hub dir>/checkpoints/<file name of url>`), loaded
    on CPU with weights_only=True. A `name-<hex>.ext` file name carries the sha256 prefix (torch hub's
    convention): it is checked while downloading and again whenever a cached file is loaded."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if cached.exists():
        # torch hub checks the hash only while downloading; a truncated or foreign cached file would otherwise
        # fail later with an unpickling error, or load silently.
        _verify_hash_prefix(cached)
    else:
        cached.parent.mkdir(parents=True, exist_ok=True)
        match = _HASH_IN_NAME.search(cached.name)
        log.info("downloading %s to %s", url, cached)
        # Writes to a temporary file and moves it into place only when the hash matches.
        torch.hub.download_url_to_file(url, str(cached), match.group(1) if match else None, progress=True)
    return load_checkpoint_file(cached)


def _verify_hash_prefix(path: Path) -> None:
    match = _HASH_IN_NAME.search(path.name)
    if match is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise RuntimeError(f"cached checkpoint {path} has sha256 {digest.hexdigest()[:16]}..., but its name says it "
                           f"starts with {match.group(1)!r}: the file is corrupt or not the official one; delete it "
                           "to download it again")


def _unwrap(checkpoint: Any, source: str) -> dict[str, Tensor]:
    """{"model": sd} (official) or a bare state dict -> state dict without `module.` / `detr.` prefixes."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source}: expected a DETR state dict or {{'model': state_dict}}, got "
                         f"{type(checkpoint).__name__} with keys {list(checkpoint)[:5] if isinstance(checkpoint, dict) else []}")
    # DDP-wrapped models and our DETRDetector save the same DETR keys under a prefix.
    for prefix in ("module.", "detr."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _check_is_detr(state: dict[str, Tensor], source: str) -> None:
    if not any(k.startswith("backbone.0.body.") for k in state) or any(k not in state for k in _DETR_MARKERS):
        raise ValueError(f"{source}: not a DETR state dict; expected keys like backbone.0.body.*, "
                         f"{', '.join(_DETR_MARKERS)}; got keys like {sorted(state)[:3]}")


def _resnet_name(state: dict[str, Tensor]) -> str:
    blocks = tuple(len({k.split(".")[4] for k in state if k.startswith(f"backbone.0.body.layer{i}.")})
                   for i in range(1, 5))
    kind = "bottleneck" if "backbone.0.body.layer1.0.conv3.weight" in state else "basic"
    return _RESNETS.get((kind, blocks), f"an unknown ResNet ({kind} blocks {blocks})")


def _check_backbone(state: dict[str, Tensor], own: dict[str, Tensor]) -> None:
    theirs, ours = _resnet_name(state), _resnet_name(own)
    if theirs != ours:
        raise ValueError(f"checkpoint backbone is {theirs} but the model's is {ours}; build the model with "
                         f"the checkpoint's backbone or use weights='none'")


def coco_rows_unusable(ckpt_rows: int, coco_rows: int, category_ids: list[int] | None,
                       category_ids_are_coco: bool) -> str | None:
    """Why a checkpoint's class rows cannot be picked by category id, or None when they can: the checkpoint
    must have the COCO layout (`coco_rows` rows, row c = COCO category id c) and the dataset must be COCO.
    Shared with Faster R-CNN (91 rows: background + ids 1..90)."""
    if ckpt_rows != coco_rows:
        return f"the checkpoint has {ckpt_rows} class rows, not the COCO layout's {coco_rows}"
    if category_ids is None:
        return "no category ids were given"
    if not category_ids_are_coco:
        return "the dataset is not COCO, so its category ids are not COCO's"
    outside = [c for c in category_ids if not 1 <= c <= COCO_MAX_CATEGORY_ID]
    if outside:
        return f"category ids {outside} are not COCO ids (1..{COCO_MAX_CATEGORY_ID})"
    return None


def _adapt_class_embed(state: dict[str, Tensor], own: dict[str, Tensor], category_ids: list[int] | None,
                       category_ids_are_coco: bool) -> str:
    ckpt_rows, our_rows = state["class_embed.weight"].shape[0], own["class_embed.weight"].shape[0]
    if ckpt_rows == our_rows:
        return "loaded"
    if category_ids is not None and len(category_ids) != our_rows - 1:
        raise ValueError(f"category_ids has {len(category_ids)} ids but the model has {our_rows - 1} classes")
    reason = coco_rows_unusable(ckpt_rows, DETR_COCO_CLASS_ROWS, category_ids, category_ids_are_coco)
    if reason is None:
        no_object = ckpt_rows - 1
        rows = torch.tensor([*category_ids, no_object])
        for key in ("class_embed.weight", "class_embed.bias"):
            state[key] = state[key][rows]
        log.info("class_embed: kept the COCO checkpoint's rows of category ids %s (+ no-object row %d)",
                 list(category_ids), no_object)
        return "selected"
    log.info("class_embed: re-initialised for the model's %d classes (the checkpoint has %d): %s",
             our_rows - 1, ckpt_rows - 1, reason)
    for key in ("class_embed.weight", "class_embed.bias"):
        state[key] = own[key]
    return "reinitialised"


def _adapt_queries(state: dict[str, Tensor], own: dict[str, Tensor]) -> str:
    ckpt_q, our_q = state["query_embed.weight"].shape[0], own["query_embed.weight"].shape[0]
    if ckpt_q < our_q:
        raise ValueError(f"checkpoint has {ckpt_q} queries but the model {our_q}; use num_queries <= {ckpt_q}")
    if ckpt_q == our_q:
        return "loaded"
    state["query_embed.weight"] = state["query_embed.weight"][:our_q]
    log.info("query_embed: kept the first %d of the checkpoint's %d queries", our_q, ckpt_q)
    return f"truncated {ckpt_q}->{our_q}"


def _num_dec_layers(state: dict[str, Tensor]) -> int:
    return len({m.group(1) for k in state if (m := _DEC_LAYER_KEY.match(k))})


def _adapt_decoder_layers(state: dict[str, Tensor], own: dict[str, Tensor]) -> str:
    ckpt_k, our_k = _num_dec_layers(state), _num_dec_layers(own)
    if ckpt_k < our_k:
        raise ValueError(f"checkpoint has {ckpt_k} decoder layers but the model {our_k}; use dec_layers <= {ckpt_k}")
    if ckpt_k == our_k:
        return "loaded"
    for key in list(state):
        m = _DEC_LAYER_KEY.match(key)
        if m and int(m.group(1)) >= our_k:
            del state[key]
    # The decoder's final `norm` is shared by all layers' outputs, so it is kept.
    log.info("decoder: kept the first %d of the checkpoint's %d layers", our_k, ckpt_k)
    return f"truncated {ckpt_k}->{our_k}"


def _layout_diff(state: dict[str, Tensor], own: dict[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """What keeps `state` from loading strictly into a module whose state is `own`: its missing and unexpected
    keys (in `own`'s and `state`'s order) and the keys whose shapes differ."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    return missing, unexpected, shapes


def _check_layout(state: dict[str, Tensor], own: dict[str, Tensor]) -> None:
    missing, unexpected, shapes = _layout_diff(state, own)
    if missing or unexpected or shapes:
        raise ValueError("checkpoint does not fit this DETR (different hidden_dim, enc_layers, dim_feedforward or "
                         f"pre_norm?): missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]}")


def load_checkpoint_file(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` on CPU, with a one-line error naming the file when it
    is not a readable torch checkpoint (truncated download, wrong file)."""
    try:
        with torch.serialization.safe_globals(_OFFICIAL_SAFE_GLOBALS):
            return torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many types for a corrupt file (pickle, zip, IndexError)
        # weights_only's refusal is many lines of advice; the refused global is what matters.
        refused = _REFUSED_GLOBAL.search(str(e)) if isinstance(e, pickle.UnpicklingError) else None
        why = (f"it holds pickled objects other than tensors, which torch.load(weights_only=True) refuses "
               f"({refused.group(0)})" if refused else f"{type(e).__name__}: {e}")
        raise ValueError(f"could not load checkpoint file {str(path)!r}: {why}") from e
