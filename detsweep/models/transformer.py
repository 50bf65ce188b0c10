"""DETR's encoder-decoder transformer, faithful to facebookresearch/detr `models/transformer.py` (29901c5).

Sequences are [L, B, D] (sequence first), as nn.MultiheadAttention defaults to. Attribute names are the
official ones (`self_attn`, `multihead_attn`, `linear1`, `linear2`, `norm1..3`): LoRA and checkpoints rely on them.
Attention is called with need_weights=False: DETR never reads the weights, and returning them forces the explicit
softmax path; without them nn.MultiheadAttention calls scaled_dot_product_attention, whose fused CUDA kernels
(flash / memory-efficient) it can then take (issue 13).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN; the position encoding is added to queries and keys only, never to values."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, src: Tensor, src_key_padding_mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """src, pos: [HW, B, D]; src_key_padding_mask: [B, HW] True = padding -> [HW, B, D]."""
        if self.normalize_before:
            src2 = self.norm1(src)
            q = k = _with_pos(src2, pos)
            src2 = self.self_attn(q, k, value=src2, key_padding_mask=src_key_padding_mask, need_weights=False)[0]
            src = src + self.dropout1(src2)
            src2 = self.norm2(src)
            return src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(src2)))))
        q = k = _with_pos(src, pos)
        src2 = self.self_attn(q, k, value=src, key_padding_mask=src_key_padding_mask, need_weights=False)[0]
        src = src + self.dropout1(src2)
        src = self.norm1(src)
        src = src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(src)))))
        return self.norm2(src)


class TransformerDecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to the encoder memory, FFN.

    query_pos is added to q and k of self-attention and to q of cross-attention; pos to k of cross-attention.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None = None,
                pos: Tensor | None = None, query_pos: Tensor | None = None) -> Tensor:
        """tgt, query_pos: [Q, B, D]; memory, pos: [HW, B, D]; mask [B, HW] True = padding -> [Q, B, D]."""
        if self.normalize_before:
            tgt2 = self.norm1(tgt)
            q = k = _with_pos(tgt2, query_pos)
            tgt = tgt + self.dropout1(self.self_attn(q, k, value=tgt2, need_weights=False)[0])
            tgt2 = self.norm2(tgt)
            tgt2 = self.multihead_attn(query=_with_pos(tgt2, query_pos), key=_with_pos(memory, pos), value=memory,
                                       key_padding_mask=memory_key_padding_mask, need_weights=False)[0]
            tgt = tgt + self.dropout2(tgt2)
            tgt2 = self.norm3(tgt)
            return tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt2)))))
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt, need_weights=False)[0]))
        tgt2 = self.multihead_attn(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos), value=memory,
                                   key_padding_mask=memory_key_padding_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt = tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt)))))
        return self.norm3(tgt)


class TransformerEncoder(nn.Module):
    """A stack of encoder layers, with a final LayerNorm only in the pre-norm variant (official)."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, norm: nn.LayerNorm | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src: Tensor, src_key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        """[HW, B, D] -> memory [HW, B, D]."""
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """A stack of decoder layers; returns the shared final LayerNorm applied to every layer's output."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None,
                pos: Tensor | None, query_pos: Tensor | None) -> Tensor:
        """tgt [Q, B, D], memory [HW, B, D] -> hs [num_layers, Q, B, D] (normed, one per layer, for aux losses)."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    """DETR transformer (official `Transformer` with return_intermediate_dec=True, ReLU activation)."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 normalize_before: bool = False) -> None:
        super().__init__()
        enc_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder(enc_layer, num_encoder_layers,
                                          nn.LayerNorm(d_model) if normalize_before else None)
        dec_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.decoder = TransformerDecoder(dec_layer, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        self.nhead = nhead
        # Official init: Xavier-uniform on every matrix, PyTorch defaults for the rest.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor) -> tuple[Tensor, Tensor]:
        """src [B, D, h, w], mask [B, h, w] (True = padding), query_embed [Q, D], pos_embed [B, D, h, w].

        Returns (hs [num_dec_layers, B, Q, D], memory [B, D, h, w]).
        """
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)
        mask = mask.flatten(1)
        tgt = torch.zeros_like(query_embed)  # decoder input starts at zero; queries enter via query_pos
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)
