"""Where LoRA adapters go: module-name patterns (regular expressions on ``named_modules()`` names) and the
named placements, each a preset of such patterns.

A pattern matches a module when it matches a dotted *suffix* of the module's name, from a module boundary to
the end (``re.search(rf"(?:^|\\.)(?:{pattern})$", name)``), so a raw DETR and a wrapper holding it
(``detr.transformer...``) are the same to it. What a match adapts:

- an ``nn.Linear``: its ``weight`` (adapter block ``w``; ``out`` for an attention's ``out_proj``);
- an ``nn.MultiheadAttention``: q, k, v (row blocks of its fused ``in_proj_weight`` [3E, E]) and ``out_proj``;
- ``<attention>.q`` / ``.k`` / ``.v``: one row block of that attention's ``in_proj_weight`` (these names
  are ours: an ``nn.MultiheadAttention`` has no submodule per projection).

Any other module matched is an error that names it, and so is a pattern that matches nothing (with a few real
names). The presets keep the placements' exact meaning and adapter counts from before patterns existed.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from detsweep.models.registry import LORA_PLACEMENTS

_DETR_ATTN = r"transformer\.(?:encoder|decoder)\.layers\.\d+\.(?:self_attn|multihead_attn)"
_VIT_ATTN = (
    # torchvision's VisionTransformer: one fused nn.MultiheadAttention per encoder block (qkv + out_proj)
    r"backbone\.0\.body\.encoder\.layers\.encoder_layer_\d+\.self_attention",
    # timm's VisionTransformer (DINOv2): Linear qkv [3E, E] and Linear proj per block
    r"backbone\.0\.body\.vit\.blocks\.\d+\.attn\.(?:qkv|proj)",
)
PRESETS: dict[str, tuple[str, ...]] = {
    # encoder self-attn, decoder self-attn and decoder cross-attn: q, k, v, out
    "attention_only": (_DETR_ATTN,),
    "attention_ffn": (_DETR_ATTN, r"transformer\.(?:encoder|decoder)\.layers\.\d+\.linear[12]"),
    # decoder self-attn and cross-attn only (q, k, v, out); no FFN, nothing in the encoder
    "decoder_only": (r"transformer\.decoder\.layers\.\d+\.(?:self_attn|multihead_attn)",),
    # the original LoRA paper's choice: W_q and W_v of every attention
    "qv_only": (_DETR_ATTN + r"\.[qv]",),
    # a ViT backbone's qkv and output projection in every block
    "backbone_attention": _VIT_ATTN,
    "backbone_attention+transformer": _VIT_ATTN + (_DETR_ATTN,),
    # Faster R-CNN's TwoMLPHead (fc6: 256·7·7 -> 1024, fc7: 1024 -> 1024)
    "box_head": (r"roi_heads\.box_head\.fc[67]",),
}
assert tuple(PRESETS) == LORA_PLACEMENTS, "registry.LORA_PLACEMENTS and the presets must list the same names"
_QKV = ("q", "k", "v")


@dataclass
class Site:
    """One weight to adapt: ``module.<tensor_name>`` and its row blocks, name -> (row_start, row_stop)."""

    module: nn.Module
    tensor_name: str
    blocks: dict[str, tuple[int, int]]


def preset_patterns(placement: str) -> tuple[str, ...]:
    """The patterns of a named placement; a wrong name lists the known ones."""
    if placement not in PRESETS:
        raise ValueError(f"lora placement {placement!r} is not one of {list(PRESETS)}")
    return PRESETS[placement]


def _candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str | None]]:
    """name -> (module, part): every named module (part None), plus ``<mha>.q|k|v`` for each
    nn.MultiheadAttention (that attention, part "q" | "k" | "v")."""
    out: dict[str, tuple[nn.Module, str | None]] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        out[name] = (module, None)
        if isinstance(module, nn.MultiheadAttention):
            out.update({f"{name}.{p}": (module, p) for p in _QKV})
    return out


def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(rf"(?:^|\.)(?:{pattern})$")
    except re.error as e:
        raise ValueError(f"lora target pattern '{pattern}' is not a regular expression: {e}") from None


def adaptable_names(model: nn.Module) -> list[str]:
    """Names a pattern can usefully match: every nn.Linear and nn.MultiheadAttention, and ``<mha>.q|k|v``."""
    return [n for n, (m, _) in _candidates(model).items() if isinstance(m, (nn.Linear, nn.MultiheadAttention))]


def _no_match_message(pattern: str, model: nn.Module) -> str:
    names = adaptable_names(model)
    close = difflib.get_close_matches(pattern, names, n=4, cutoff=0.0) if names else []
    return (f"lora target pattern '{pattern}' matches no module of {type(model).__name__}; "
            f"adaptable modules are named like {close or names[:4]} ({len(names)} in all)")


def matched_names(model: nn.Module, patterns: tuple[str, ...], *, each_must_match: bool) -> list[str]:
    """Candidate names (see the module docstring) matched by any of ``patterns``, in module order.

    Raises ValueError for a matched module that is neither nn.Linear nor nn.MultiheadAttention (naming it and
    its type), and, with ``each_must_match``, for a pattern that matches nothing (naming a few real modules).
    """
    candidates = _candidates(model)
    chosen: list[str] = []
    for pattern in patterns:
        rx = _compiled(pattern)
        hits = [n for n in candidates if rx.search(n)]
        if not hits and each_must_match:
            raise ValueError(_no_match_message(pattern, model))
        for name in hits:
            module = candidates[name][0]
            if not isinstance(module, (nn.Linear, nn.MultiheadAttention)):
                raise ValueError(f"lora target pattern '{pattern}' matches {name!r}, a {type(module).__name__}: "
                                 "only nn.Linear and nn.MultiheadAttention (or its .q/.k/.v) take adapters")
            if name not in chosen:
                chosen.append(name)
    order = {n: i for i, n in enumerate(candidates)}
    return sorted(chosen, key=order.__getitem__)


def resolve_sites(model: nn.Module, names: list[str]) -> list[Site]:
    """The weights to parametrize for the matched ``names``: blocks of one weight are merged, so an attention
    matched whole and by ``.q`` (or its ``out_proj`` matched too) is adapted once."""
    candidates = _candidates(model)
    out_projs = {id(m.out_proj) for m, _ in candidates.values() if isinstance(m, nn.MultiheadAttention)}
    sites: dict[tuple[int, str], Site] = {}

    def add(module: nn.Module, tensor_name: str, block: str, rows: tuple[int, int]) -> None:
        site = sites.setdefault((id(module), tensor_name), Site(module, tensor_name, {}))
        site.blocks[block] = rows

    for name in names:
        module, part = candidates[name]
        if isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim:
                raise ValueError(f"{name}: LoRA needs a fused in_proj_weight (kdim == vdim == embed_dim)")
            e = module.embed_dim
            rows = {p: (i * e, (i + 1) * e) for i, p in enumerate(_QKV)}
            for p in _QKV if part is None else (part,):
                add(module, "in_proj_weight", p, rows[p])
            if part is None:
                add(module.out_proj, "weight", "out", (0, e))
        else:
            add(module, "weight", "out" if id(module) in out_projs else "w", (0, module.out_features))
    for site in sites.values():  # LoRADelta needs its blocks in row order
        site.blocks = dict(sorted(site.blocks.items(), key=lambda kv: kv[1]))
    return list(sites.values())
