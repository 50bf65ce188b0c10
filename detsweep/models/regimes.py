"""Fine-tuning regimes: which parameters of a DETR or Faster R-CNN train (full / lora_only / partial / heads;
`heads` is the first stage of the sweep's `two_stage` regime, whose second stage is one of the others).

A regime only sets ``requires_grad``; the optimizer then receives ``trainable_parameters(model)``. Frozen
parameters never require grad, so DDP needs no ``find_unused_parameters``.
"""
from __future__ import annotations

import logging
import re

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detsweep.models.lora import lora_parameters
from detsweep.models.registry import STAGE2_REGIMES

logger = logging.getLogger(__name__)

# The parameter sets apply_regime knows. A sweep's `two_stage` is a schedule of two of them: `heads`, then
# `two_stage.stage2.regime` (the worker switches at the epoch `two_stage.stage1.epochs`).
REGIMES: tuple[str, ...] = STAGE2_REGIMES + ("heads",)


# Parameters are matched by name *suffix*, so a raw model and a wrapper holding it (``.detr``, ``.model``)
# are the same to us. Each pattern must match at a module boundary.
_DETR_MARKERS = (r"transformer\.", r"query_embed\.")
_FRCNN_MARKERS = (r"rpn\.", r"roi_heads\.")
_DETR_HEADS = (r"class_embed\.", r"bbox_embed\.", r"query_embed\.")
# The last block of a ViT backbone (torchvision: encoder_layer_<last>, timm: vit.blocks.<last>) and its final norm
# play ResNet layer4's part in `partial`; `vit_last_block` names them (the block index depends on the depth).
_VIT_TAIL = (r"backbone\.0\.body\.(?:encoder\.ln|vit\.norm)\.", r"backbone\.0\.neck\.")
_TRAINABLE = {
    ("detr", "lora_only"): _DETR_HEADS,
    ("detr", "partial"): (r"backbone\.0\.body\.layer4\.",) + _VIT_TAIL + _DETR_HEADS,
    # Stage 1 of two_stage: a linear probe on the frozen decoder's outputs (the queries feed the frozen decoder,
    # so they would get no gradient: the whole body runs under no_grad).
    ("detr", "heads"): (r"class_embed\.", r"bbox_embed\."),
    # The adapters live in the box head (`box_head` placement); the RPN head and the box predictor train.
    ("faster_rcnn", "lora_only"): (r"rpn\.head\.", r"roi_heads\.box_predictor\."),
    ("faster_rcnn", "partial"): (r"backbone\.body\.layer4\.", r"backbone\.fpn\.", r"rpn\.", r"roi_heads\."),
}
# Names of the parameters frozen when apply_regime first saw the model (the build-time recipe: DETR's
# official backbone freezes conv1 and layer1, torchvision's trainable_backbone_layers likewise).
_BUILD_FROZEN_ATTR = "_detsweep_build_frozen"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?:^|\.){p}", name) for p in patterns)


def _canonical(name: str) -> str:
    """A parameter's name as if it carried no parametrization (LoRA renames W to ...original)."""
    return re.sub(r"parametrizations\.([^.]+)\.original$", r"\1", name)


def _model_kind(names: list[str], model: nn.Module) -> str:
    for kind, markers in (("detr", _DETR_MARKERS), ("faster_rcnn", _FRCNN_MARKERS)):
        if all(any(_matches(n, (m,)) for n in names) for m in markers):
            return kind
    raise ValueError(f"apply_regime supports DETR (with transformer and query_embed) and Faster R-CNN "
                     f"(with rpn and roi_heads) models, got {type(model).__name__}")


def _vit_last_block(named: list[tuple[str, nn.Parameter]]) -> tuple[str, ...]:
    """The pattern of a ViT backbone's last block, or () for a ResNet."""
    block = re.compile(r"(?:^|\.)backbone\.0\.body\.(encoder\.layers\.encoder_layer_|vit\.blocks\.)(\d+)\.")
    found = [(m.group(1), int(m.group(2))) for n, _ in named if (m := block.search(n))]
    if not found:
        return ()
    prefix, last = max(found, key=lambda f: f[1])
    return (rf"backbone\.0\.body\.{re.escape(prefix)}{last}\.",)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``: what the optimizer should hold."""
    return [p for p in model.parameters() if p.requires_grad]


def apply_regime(model: nn.Module, regime: str) -> dict:
    """Set ``requires_grad`` on every parameter of ``model`` for ``regime`` and return the counts.

    full: everything trains except what was frozen when the model was built (recorded on the first
        call; DETR: backbone stem and layer1, as in the official recipe). LoRA adapters, if any, train.
    lora_only: DETR: the LoRA adapters + class_embed, bbox_embed, query_embed; Faster R-CNN: the adapters + the
        RPN head + the box predictor. Needs apply_lora first.
    partial: DETR: backbone layer4 (a ViT: its last block, final norm and neck) + the same heads; Faster R-CNN:
        layer4 + FPN + RPN + ROI heads. LoRA adapters, if any, stay frozen.
    heads (DETR, two_stage's first stage): class_embed and bbox_embed only; adapters stay frozen.
    Idempotent: regimes can be switched on the same model. Returns
    ``{"total_params", "trainable_params", "trainable_frac", "lora_params"}`` (parameter elements;
    buffers such as FrozenBatchNorm statistics are not parameters).
    """
    if regime not in REGIMES:
        raise ValueError(f"regime {regime!r} is not one of {list(REGIMES)}")
    root = model.module if isinstance(model, DistributedDataParallel) else model
    named = list(root.named_parameters())
    kind = _model_kind([n for n, _ in named], root)
    lora_ids = {id(p) for p in lora_parameters(root)}
    if regime == "lora_only" and not lora_ids:
        raise ValueError(f"regime 'lora_only' needs LoRA adapters but this {kind} model has none; "
                         "call detsweep.models.lora.apply_lora first")
    if (kind, regime) not in _TRAINABLE and regime != "full":
        allowed = ["full"] + [r for k, r in _TRAINABLE if k == kind]
        raise ValueError(f"regime {regime!r} is not defined for {kind}; allowed: {allowed}")

    build_frozen = getattr(root, _BUILD_FROZEN_ATTR, None)
    if build_frozen is None:
        build_frozen = frozenset(_canonical(n) for n, p in named if not p.requires_grad and id(p) not in lora_ids)
        setattr(root, _BUILD_FROZEN_ATTR, build_frozen)

    tail = _TRAINABLE.get((kind, regime), ()) + (_vit_last_block(named) if regime == "partial" else ())
    for name, p in named:
        if regime == "full":
            train = _canonical(name) not in build_frozen
        elif id(p) in lora_ids:
            train = regime == "lora_only"
        else:
            train = _matches(name, tail) and _canonical(name) not in build_frozen
        p.requires_grad_(train)

    total = sum(p.numel() for _, p in named)
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    counts = {"total_params": total, "trainable_params": trainable,
              "trainable_frac": trainable / total if total else 0.0,
              "lora_params": sum(p.numel() for _, p in named if id(p) in lora_ids)}
    logger.info("regime %s on %s: %d / %d params trainable (%.2f%%), %d LoRA", regime, kind,
                trainable, total, 100 * counts["trainable_frac"], counts["lora_params"])
    return counts
