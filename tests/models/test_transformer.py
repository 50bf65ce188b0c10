"""DETR's transformer asks nn.MultiheadAttention for no weights, so the fused SDPA kernels are reachable
(issue 13, defect 6); the parity tests (test_detr_parity.py) check that the numbers did not move."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detsweep.models.transformer import Transformer


@pytest.mark.parametrize("normalize_before", [False, True], ids=["post_norm", "pre_norm"])
def test_every_attention_call_skips_the_weights(normalize_before, monkeypatch):
    calls = []
    forward = nn.MultiheadAttention.forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append((kwargs.get("need_weights", True), out[1]))
        return out

    monkeypatch.setattr(nn.MultiheadAttention, "forward", spy)
    torch.manual_seed(0)
    transformer = Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32,
                              dropout=0.1, normalize_before=normalize_before).train()
    src, pos = torch.randn(2, 16, 3, 4), torch.randn(2, 16, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 3:] = True  # padding in the second image: the key_padding_mask path
    hs, _ = transformer(src, mask, torch.randn(5, 16), pos)
    assert hs.shape == (2, 2, 5, 16)
    assert len(calls) == 2 + 2 * 2  # encoder self-attn; decoder self- and cross-attn
    assert all(need_weights is False and weights is None for need_weights, weights in calls)
