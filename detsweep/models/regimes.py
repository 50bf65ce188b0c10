"""Fine-tuning regimes: which parameters of a DETR or Faster R-CNN train (full / lora_only / partial).

A regime only sets ``requires_grad``; the optimizer then receives ``trainable_parameters(model)``. Frozen
parameters never require grad, so DDP needs no ``find_unused_parameters``.
"""
from __future__ import annotations

import logging
import re

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detsweep.models.lora import lora_parameters
from detsweep.models.registry import REGIMES

logger = logging.getLogger(__name__)


# Parameters are matched by name *suffix*, so a raw model and a wrapper holding it (``.detr``, ``.model``)
# are the same to us. Each pattern must match at a module boundary.
_DETR_MARKERS = (r"transformer\.", r"query_embed\.")
_FRCNN_MARKERS = (r"rpn\.", r"roi_heads\.")
_DETR_HEADS = (r"class_embed\.", r"bbox_embed\.", r"query_embed\.")
_TRAINABLE = {
    ("detr", "lora_only"): _DETR_HEADS,
    ("detr", "partial"): (r"backbone\.0\.body\.layer4\.",) + _DETR_HEADS,
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


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``: what the optimizer should hold."""
    return [p for p in model.parameters() if p.requires_grad]


def apply_regime(model: nn.Module, regime: str) -> dict:
    """Set ``requires_grad`` on every parameter of ``model`` for ``regime`` and return the counts.

    full: everything trains except what was frozen when the model was built (recorded on the first
        call; DETR: backbone stem and layer1, as in the official recipe). LoRA adapters, if any, train.
    lora_only (DETR): the LoRA adapters + class_embed, bbox_embed, query_embed. Needs apply_lora first.
    partial: DETR: backbone layer4 + the same heads; Faster R-CNN: layer4 + FPN + RPN + ROI heads.
        LoRA adapters, if any, stay frozen.
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
                         "call detsweep.models.lora.apply_lora first (LoRA is defined for DETR only)")
    if (kind, regime) not in _TRAINABLE and regime != "full":
        raise ValueError(f"regime {regime!r} is not defined for {kind}; allowed: ['full', 'partial']")

    build_frozen = getattr(root, _BUILD_FROZEN_ATTR, None)
    if build_frozen is None:
        build_frozen = frozenset(_canonical(n) for n, p in named if not p.requires_grad and id(p) not in lora_ids)
        setattr(root, _BUILD_FROZEN_ATTR, build_frozen)

    for name, p in named:
        if regime == "full":
            train = _canonical(name) not in build_frozen
        elif id(p) in lora_ids:
            train = regime == "lora_only"
        else:
            train = _matches(name, _TRAINABLE[kind, regime]) and _canonical(name) not in build_frozen
        p.requires_grad_(train)

    total = sum(p.numel() for _, p in named)
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    counts = {"total_params": total, "trainable_params": trainable,
              "trainable_frac": trainable / total if total else 0.0,
              "lora_params": sum(p.numel() for _, p in named if id(p) in lora_ids)}
    logger.info("regime %s on %s: %d / %d params trainable (%.2f%%), %d LoRA", regime, kind,
                trainable, total, 100 * counts["trainable_frac"], counts["lora_params"])
    return counts
