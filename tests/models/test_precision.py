"""Mixed precision, proven under CPU bf16 autocast: FrozenBatchNorm2d keeps bf16 activations in bf16
(issue 13, defect 5)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from detsweep.models.backbone import FrozenBatchNorm2d
from detsweep.models.detr import build_detr
from detsweep.models.faster_rcnn import build_faster_rcnn

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
DETR_TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=32,
                 num_queries=50, num_classes=3, dropout=0.0, aux_loss=True)
RCNN_TINY = {"backbone": "resnet18", "min_size": 64, "max_size": 96}


# --- FrozenBatchNorm2d -------------------------------------------------------------------------


def _random_frozen_bn(cls: type, channels: int = 8, eps: float = 1e-5) -> torch.nn.Module:
    bn = cls(channels)
    bn.eps = eps
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).normal_()
    bn.running_var.uniform_(0.5, 2.0)
    return bn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_batchnorm_keeps_the_input_dtype(dtype):
    torch.manual_seed(0)
    bn = _random_frozen_bn(FrozenBatchNorm2d)
    x = torch.randn(2, 8, 5, 5)
    assert bn(x.to(dtype)).dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bn(torch.nn.functional.conv2d(x, torch.randn(8, 8, 1, 1))).dtype == torch.bfloat16


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_frozen_batchnorm_in_fp32_equals_torchvision_bit_for_bit(eps):
    torch.manual_seed(0)
    ours = _random_frozen_bn(FrozenBatchNorm2d, eps=eps)
    theirs = torchvision.ops.misc.FrozenBatchNorm2d(8, eps=eps)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(ours(x), theirs(x))
    assert list(ours.state_dict()) == ["weight", "bias", "running_mean", "running_var"]


def _frozen_bn_output_dtypes(model: torch.nn.Module, run) -> set[torch.dtype]:
    dtypes = set()
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, torchvision.ops.misc.FrozenBatchNorm2d)):
            m.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    with torch.no_grad(), torch.autocast(**BF16):
        run()
    return dtypes


def test_detr_backbone_stays_bf16_under_bf16_autocast():
    detr = build_detr(**DETR_TINY).eval()
    assert _frozen_bn_output_dtypes(detr, lambda: detr([torch.randn(3, 64, 64)])) == {torch.bfloat16}


def test_pretrained_faster_rcnn_uses_dtype_preserving_frozen_batchnorm(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(build_faster_rcnn(num_classes=3, **RCNN_TINY).model.state_dict(), path)
    model = build_faster_rcnn(num_classes=3, weights=str(path), **RCNN_TINY).model.eval()
    frozen = [m for m in model.modules() if isinstance(m, torchvision.ops.misc.FrozenBatchNorm2d)]
    assert frozen and all(type(m) is FrozenBatchNorm2d and m.eps == 1e-5 for m in frozen)
    assert _frozen_bn_output_dtypes(model, lambda: model([torch.rand(3, 64, 64)])) == {torch.bfloat16}
