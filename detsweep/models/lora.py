"""LoRA adapters on any nn.Linear / nn.MultiheadAttention of a detector, as torch parametrizations of the
existing weights (where they go: ``lora_targets``).

``W' = W + (alpha / r) · B · A`` (Hu et al. 2021); A is Kaiming-uniform (a=√5) and B is zero, as in PEFT,
so a fresh adapter changes nothing. Merging is ``remove_parametrizations(leave_parametrized=True)``.

Dropout: a parametrization changes a weight, not an activation, so PEFT's per-element dropout on the
adapter input cannot be expressed. We drop *input features* instead: in training, each forward samples one
mask ``m ~ Bernoulli(1 - p)`` over A's input columns and uses ``A · diag(m) / (1 - p)``. That is exactly
dropout on the adapter input with one mask shared by every token of the batch. Eval uses A unchanged.
"""
from __future__ import annotations

import hashlib
import logging
import math

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

from detsweep.models.lora_targets import PRESETS, adaptable_names, matched_names, preset_patterns, resolve_sites

logger = logging.getLogger(__name__)

BASE_IDENTITY_KEY = "base_identity"
PLACEMENT_NAMES: tuple[str, ...] = tuple(PRESETS)


class LoRADelta(nn.Module):
    """Parametrization ``W [out, in] -> W + (alpha / r) · B_b · A_b`` on row blocks b of W.

    blocks: name -> (row_start, row_stop) of W, in increasing order; rows outside every block pass through.
    Each block has ``lora_A[name]`` [r, in] and ``lora_B[name]`` [row_stop - row_start, r].
    """

    def __init__(self, weight: torch.Tensor, blocks: dict[str, tuple[int, int]], *, rank: int,
                 alpha: float, dropout: float) -> None:
        super().__init__()
        self.blocks = dict(blocks)
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = dropout
        kw = {"device": weight.device, "dtype": weight.dtype}
        in_features = weight.shape[1]
        self.lora_A = nn.ParameterDict(
            {b: nn.Parameter(torch.empty(rank, in_features, **kw)) for b in self.blocks})
        self.lora_B = nn.ParameterDict(
            {b: nn.Parameter(torch.zeros(stop - start, rank, **kw)) for b, (start, stop) in self.blocks.items()})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT / nn.Linear default init

    def _maybe_dropped(self, a: torch.Tensor, drop: bool) -> torch.Tensor:
        if not (drop and self.dropout > 0):
            return a
        # one mask over input features per forward == dropout on the input, shared by all tokens
        keep = torch.nn.functional.dropout(a.new_ones(a.shape[1]), self.dropout, training=True)
        return a * keep

    def adapted(self, weight: torch.Tensor, *, drop: bool) -> torch.Tensor:
        """W + scaling · B_b · A_b on every block, with the input-feature dropout of A when ``drop``."""
        pieces, row = [], 0
        for b, (start, stop) in self.blocks.items():
            if start > row:
                pieces.append(weight[row:start])
            # addmm: W_b + scaling · B_b @ A_b in one kernel
            pieces.append(torch.addmm(weight[start:stop], self.lora_B[b], self._maybe_dropped(self.lora_A[b], drop),
                                      alpha=self.scaling))
            row = stop
        if row < weight.shape[0]:
            pieces.append(weight[row:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.adapted(weight, drop=self.training)

    def extra_repr(self) -> str:
        return f"blocks={list(self.blocks)}, rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout}"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _adapt(module: nn.Module, tensor_name: str, blocks: dict[str, tuple[int, int]], **lora_kw) -> None:
    weight = getattr(module, tensor_name)
    parametrize.register_parametrization(module, tensor_name, LoRADelta(weight, blocks, **lora_kw))


def _check_lora_args(rank: int, alpha: float, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be an integer >= 1, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora alpha must be a finite number > 0, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")


def apply_lora(model: nn.Module, *, rank: int, alpha: float, placement: str = "attention_only",
               targets: tuple[str, ...] | list[str] | None = None, dropout: float = 0.0) -> nn.Module:
    """Add LoRA adapters to ``model`` in place; freezes nothing (see regimes).

    rank: r >= 1. alpha: the scale numerator, > 0 (the delta is scaled by alpha / r).
    placement: one of PLACEMENT_NAMES, a preset of module-name patterns (``lora_targets.PRESETS``); it must
        adapt something in ``model``. targets: module-name patterns instead of the placement (see
        ``lora_targets``); each must match at least one module. dropout: in [0, 1), see the module docstring.
    Returns ``model``.
    """
    patterns = preset_patterns(placement) if targets is None else tuple(targets)
    _check_lora_args(rank, alpha, dropout)
    if targets is not None and not patterns:
        raise ValueError("lora targets must be a non-empty list of module-name patterns, got []")
    root = _unwrap(model)
    if any(isinstance(m, LoRADelta) for m in root.modules()):
        raise ValueError("model already has LoRA adapters; call merge_lora(model) before adding new ones")
    names = matched_names(root, patterns, each_must_match=targets is not None)
    if not names:
        raise ValueError(f"lora placement {placement!r} found no targets in {type(root).__name__}: its "
                         f"patterns {list(patterns)} match none of its modules; adaptable ones are named like "
                         f"{adaptable_names(root)[:4]}")
    kw = {"rank": rank, "alpha": float(alpha), "dropout": float(dropout)}
    sites = resolve_sites(root, names)
    for site in sites:
        _adapt(site.module, site.tensor_name, site.blocks, **kw)
    logger.info("LoRA %s r=%d alpha=%g: %d weights, %d adapter params", placement if targets is None else
                list(patterns), rank, alpha, len(sites), count_lora_params(root))
    return model


def _lora_sites(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, tensor name) of every weight parametrized by a LoRADelta."""
    sites = []
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                if any(isinstance(p, LoRADelta) for p in plist):
                    sites.append((module, tensor_name))
    return sites


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight in place: ``W <- W + (alpha/r)·B·A`` as a plain Parameter.

    The merged Parameter is the same object as the base weight (optimizers holding it stay valid) and
    keeps its requires_grad flag. Returns ``model``.
    """
    for module, tensor_name in _lora_sites(_unwrap(model)):
        plist = module.parametrizations[tensor_name]
        if len(plist) != 1:
            raise ValueError(f"cannot merge {tensor_name!r}: it has {len(plist)} parametrizations, "
                             "LoRA must be the only one")
        plist[0].eval()  # no dropout in the merged weight
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``merge_lora(model)`` would produce, without changing ``model``: the plain keys
    (official DETR layout, e.g. ``...self_attn.in_proj_weight``) with every adapter folded in, no adapter keys.
    For loading into a plain copy of the architecture, e.g. for merged evaluation during LoRA training.
    """
    root = _unwrap(model)
    renamed: dict[int, tuple[str, torch.Tensor]] = {}  # id(base weight) -> (tensor name, merged weight)
    with torch.no_grad():
        for module, tensor_name in _lora_sites(root):
            plist = module.parametrizations[tensor_name]
            if len(plist) != 1:
                raise ValueError(f"cannot merge {tensor_name!r}: it has {len(plist)} parametrizations, "
                                 "LoRA must be the only one")
            renamed[id(plist.original)] = (tensor_name, plist[0].adapted(plist.original, drop=False))
    adapter_ids = {id(p) for p in lora_parameters(root)}
    out: dict[str, torch.Tensor] = {}
    for key, value in root.state_dict(keep_vars=True).items():
        if id(value) in renamed:  # the base weight: ".../parametrizations.W.original" -> ".../W"
            tensor_name, merged = renamed[id(value)]
            out[key.removesuffix(f"parametrizations.{tensor_name}.original") + tensor_name] = merged
        elif id(value) not in adapter_ids:  # adapter tensors (A, B) are dropped
            out[key] = value.detach()
    return out


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter (all A and B matrices) of ``model``."""
    return [p for m in _unwrap(model).modules() if isinstance(m, LoRADelta) for p in m.parameters()]


def count_lora_params(model: nn.Module) -> int:
    """Number of adapter elements: r · (in + out) per adapted weight block."""
    return sum(p.numel() for p in lora_parameters(model))


def _base_identity(model: nn.Module, exclude: set[str]) -> str:
    """sha256 (first 16 hex digits) over name, dtype, shape and bytes of every state-dict tensor not in
    ``exclude``: the frozen base weights and buffers an adapter checkpoint depends on (~0.1 s for R50)."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        if key in exclude:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def lora_state_dict(model: nn.Module) -> dict:
    """Adapter checkpoint: every LoRA tensor and every trainable non-LoRA parameter (e.g. the heads),
    on CPU under their state-dict keys, plus ``"base_identity"``: a hash of all other state-dict tensors
    (see ``_base_identity``), so the checkpoint only loads onto the exact base weights it was trained on.
    """
    root = _unwrap(model)
    lora_ids = {id(p) for p in lora_parameters(root)}
    if not lora_ids:
        raise ValueError("model has no LoRA adapters; call apply_lora(model, ...) first")
    sd: dict = {name: p.detach().cpu().clone() for name, p in root.named_parameters()
                if id(p) in lora_ids or p.requires_grad}
    sd[BASE_IDENTITY_KEY] = _base_identity(root, set(sd))
    return sd


def load_lora_state_dict(model: nn.Module, sd: dict) -> nn.Module:
    """Load a ``lora_state_dict`` checkpoint into ``model`` in place and return it.

    ``model`` must hold the same base weights and already carry adapters from ``apply_lora`` with the
    checkpoint's rank and placement; mismatches raise ValueError.
    """
    root = _unwrap(model)
    if BASE_IDENTITY_KEY not in sd:
        raise ValueError(f"not a LoRA state dict: it has no {BASE_IDENTITY_KEY!r} entry")
    tensors = {k: v for k, v in sd.items() if k != BASE_IDENTITY_KEY}
    own = root.state_dict()
    lora_ids = {id(p) for p in lora_parameters(root)}
    lora_names = {n for n, p in root.named_parameters() if id(p) in lora_ids}
    if not lora_names:
        raise ValueError("model has no LoRA adapters; call apply_lora with the checkpoint's rank and "
                         "placement before load_lora_state_dict")
    missing, unexpected = sorted(lora_names - tensors.keys()), sorted(tensors.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"LoRA state dict does not fit the model (different placement?): "
                         f"{len(missing)} adapter tensors missing from it, e.g. {missing[:3]}; "
                         f"{len(unexpected)} keys unknown to the model, e.g. {unexpected[:3]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"LoRA state dict does not fit the model (different rank?): {k} has shape "
                             f"{tuple(v.shape)} in the checkpoint but {tuple(own[k].shape)} in the model")
    identity = _base_identity(root, set(tensors))
    if identity != sd[BASE_IDENTITY_KEY]:
        raise ValueError(f"LoRA state dict was trained on base weights {sd[BASE_IDENTITY_KEY]!r} but this "
                         f"model's base weights are {identity!r}; load the same base weights first")
    root.load_state_dict(tensors, strict=False)
    return model

