"""LoRA adapters for DETR's transformer, as torch parametrizations of the existing weights.

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
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

logger = logging.getLogger(__name__)

BASE_IDENTITY_KEY = "base_identity"


@dataclass(frozen=True)
class Placement:
    """Which weights of a DETR transformer get adapters.

    scopes: transformer stacks searched, from ("encoder", "decoder").
    attn_parts: projections adapted in every nn.MultiheadAttention of those stacks, from
        ("q", "k", "v", "out"); q, k, v are row blocks of the fused ``in_proj_weight`` [3E, E].
    ffn: also adapt ``linear1`` and ``linear2`` of every layer of those stacks.
    """

    scopes: tuple[str, ...]
    attn_parts: tuple[str, ...]
    ffn: bool


_QKVO = ("q", "k", "v", "out")
PLACEMENTS: dict[str, Placement] = {
    # encoder self-attn, decoder self-attn and decoder cross-attn: q, k, v, out
    "attention_only": Placement(("encoder", "decoder"), _QKVO, ffn=False),
    "attention_ffn": Placement(("encoder", "decoder"), _QKVO, ffn=True),
    # decoder self-attn and cross-attn only (q, k, v, out); no FFN, nothing in the encoder
    "decoder_only": Placement(("decoder",), _QKVO, ffn=False),
    # the original LoRA paper's choice: W_q and W_v of every attention
    "qv_only": Placement(("encoder", "decoder"), ("q", "v"), ffn=False),
}
PLACEMENT_NAMES: tuple[str, ...] = tuple(PLACEMENTS)


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


def _placement(name: str) -> Placement:
    if name not in PLACEMENTS:
        raise ValueError(f"lora placement {name!r} is not one of {list(PLACEMENT_NAMES)}")
    return PLACEMENTS[name]


def _find_targets(model: nn.Module, spec: Placement) -> list[tuple[str, nn.Module]]:
    """Modules to adapt, found by name so a raw DETR and a wrapper holding it both work."""
    scopes = "|".join(spec.scopes)
    in_layer = re.compile(rf"(?:^|\.)(?:{scopes})\.layers\.\d+\.")
    ffn_name = re.compile(rf"(?:^|\.)(?:{scopes})\.layers\.\d+\.linear[12]$")
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and in_layer.search(name):
            targets.append((name, module))
        elif spec.ffn and isinstance(module, nn.Linear) and ffn_name.search(name):
            targets.append((name, module))
    return targets


def _adapt(module: nn.Module, tensor_name: str, blocks: dict[str, tuple[int, int]], **lora_kw) -> None:
    weight = getattr(module, tensor_name)
    parametrize.register_parametrization(module, tensor_name, LoRADelta(weight, blocks, **lora_kw))


def apply_lora(model: nn.Module, *, rank: int, alpha: float, placement: str, dropout: float = 0.0) -> nn.Module:
    """Add LoRA adapters to the DETR transformer in ``model`` in place; freezes nothing (see regimes).

    rank: r >= 1. alpha: the scale numerator, > 0 (the delta is scaled by alpha / r).
    placement: one of PLACEMENT_NAMES. dropout: in [0, 1), see the module docstring.
    Returns ``model``.
    """
    spec = _placement(placement)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be an integer >= 1, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora alpha must be a finite number > 0, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
    root = _unwrap(model)
    if any(isinstance(m, LoRADelta) for m in root.modules()):
        raise ValueError("model already has LoRA adapters; call merge_lora(model) before adding new ones")
    targets = _find_targets(root, spec)
    if not targets:
        raise ValueError(f"lora placement {placement!r} found no targets in {type(root).__name__}: "
                         f"it adapts nn.MultiheadAttention / linear1 / linear2 under "
                         f"{'|'.join(spec.scopes)}.layers.<i> (a DETR transformer)")
    kw = {"rank": rank, "alpha": float(alpha), "dropout": float(dropout)}
    for name, module in targets:
        if isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim:
                raise ValueError(f"{name}: LoRA needs a fused in_proj_weight (kdim == vdim == embed_dim)")
            e = module.embed_dim
            rows = {"q": (0, e), "k": (e, 2 * e), "v": (2 * e, 3 * e)}
            qkv = {p: rows[p] for p in ("q", "k", "v") if p in spec.attn_parts}
            if qkv:
                _adapt(module, "in_proj_weight", qkv, **kw)
            if "out" in spec.attn_parts:
                _adapt(module.out_proj, "weight", {"out": (0, e)}, **kw)
        else:
            _adapt(module, "weight", {"w": (0, module.out_features)}, **kw)
    logger.info("LoRA %s r=%d alpha=%g: %d modules, %d adapter params",
                placement, rank, alpha, len(targets), count_lora_params(root))
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

