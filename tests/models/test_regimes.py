"""Fine-tuning regimes: which parameters train, closed-form counts, no backbone graph, 2-process DDP."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from detsweep.models.detr import build_detr
from detsweep.models.lora import apply_lora, count_lora_params
from detsweep.models.regimes import REGIMES, apply_regime, trainable_parameters

PLACEMENT_NAMES = ("attention_only", "attention_ffn", "decoder_only", "qv_only")  # DETR's transformer ones
# `heads` (two_stage's first stage) has its own tests in test_two_stage.py.
USER_REGIMES = ("full", "lora_only", "partial")

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=2, dec_layers=2, dim_feedforward=48,
            num_queries=5, num_classes=3, dropout=0.0, aux_loss=True)
R50 = dict(backbone="resnet50", hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048,
           num_queries=100, num_classes=91, dropout=0.1, aux_loss=True)
HEADS = ("class_embed.", "bbox_embed.", "query_embed.")
BUILD_FROZEN = ("backbone.0.body.conv1.", "backbone.0.body.layer1.")  # the official DETR recipe (bn1 has no params)


def tiny_detr(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_detr(**TINY)


def images(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 80, generator=g), torch.rand(3, 48, 64, generator=g)]


def surrogate_loss(model: nn.Module, imgs: list[torch.Tensor]) -> torch.Tensor:
    # Touches every output of every decoder layer; the detection criterion is tested elsewhere.
    out = model(imgs)
    return sum(o["pred_logits"].logsumexp(-1).mean() + o["pred_boxes"].square().mean()
               for o in [out] + out["aux_outputs"])


def expected_trainable(name: str, regime: str) -> bool:
    if regime == "full":
        return not name.startswith(BUILD_FROZEN)
    if regime == "lora_only":
        return ".lora_" in name or name.startswith(HEADS)
    return name.startswith(("backbone.0.body.layer4.",) + HEADS)


class Wrapper(nn.Module):
    """A detector wrapper holding the network as an attribute, like DETRDetector.detr."""

    def __init__(self, detr: nn.Module) -> None:
        super().__init__()
        self.detr = detr


# ---- argument errors ---------------------------------------------------------------------------------------------

def test_regime_names_and_errors():
    assert REGIMES == ("full", "lora_only", "partial", "heads")
    with pytest.raises(ValueError) as err:
        apply_regime(tiny_detr(), "frozen")
    assert str(err.value) == "regime 'frozen' is not one of ['full', 'lora_only', 'partial', 'heads']"
    with pytest.raises(ValueError) as err:
        apply_regime(tiny_detr(), "lora_only")
    assert str(err.value) == ("regime 'lora_only' needs LoRA adapters but this detr model has none; call "
                              "detsweep.models.lora.apply_lora first")
    with pytest.raises(ValueError) as err:
        apply_regime(nn.Linear(2, 2), "full")
    assert str(err.value) == ("apply_regime supports DETR (with transformer and query_embed) and Faster R-CNN "
                              "(with rpn and roi_heads) models, got Linear")


# ---- which parameters train: regime × placement on a tiny DETR ---------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENT_NAMES)
@pytest.mark.parametrize("regime", USER_REGIMES)
def test_only_intended_parameters_change(regime, placement):
    model = apply_lora(tiny_detr(), rank=2, alpha=4, placement=placement)
    counts = apply_regime(model, regime)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        assert p.requires_grad == expected_trainable(n, regime), n
    assert counts["trainable_params"] == sum(p.numel() for p in trainable_parameters(model))
    assert counts["lora_params"] == count_lora_params(model) > 0
    assert counts["total_params"] == sum(p.numel() for p in model.parameters())
    assert counts["trainable_frac"] == counts["trainable_params"] / counts["total_params"]

    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-4, weight_decay=0.0)  # no decay: moved == had grad
    for step in range(2):  # two steps: a LoRA A only gets gradient once its B is non-zero
        opt.zero_grad()
        surrogate_loss(model, images(step)).backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        # DETR's decoder starts from tgt = 0, so layer 0's self-attention averages all-equal values (its v bias):
        # its q, k, v weights get exactly-zero gradients, so moving is not required there, only allowed.
        dead = n.startswith("transformer.decoder.layers.0.self_attn.")
        assert changed <= expected_trainable(n, regime), f"frozen parameter moved: {n}"
        assert changed or dead or not expected_trainable(n, regime), f"trainable parameter did not move: {n}"


@pytest.mark.parametrize("regime,graph", [("lora_only", False), ("partial", True), ("full", True)])
def test_backbone_builds_autograd_graph_only_when_it_trains(regime, graph):
    model = apply_lora(tiny_detr(), rank=2, alpha=4, placement="attention_only")
    apply_regime(model, regime)
    seen = []
    model.backbone[0].body.register_forward_hook(lambda m, i, out: seen.append(out))
    loss = surrogate_loss(model, images(0))
    assert loss.requires_grad
    assert seen[0].requires_grad is graph and (seen[0].grad_fn is not None) is graph


def test_regimes_switch_idempotently_and_see_through_wrappers():
    model = apply_lora(tiny_detr(), rank=2, alpha=4, placement="qv_only")
    first = apply_regime(model, "full")
    apply_regime(model, "lora_only")
    apply_regime(model, "partial")
    assert apply_regime(model, "full") == first  # stem and layer1 stay frozen: recorded at the first call
    wrapped = Wrapper(apply_lora(tiny_detr(), rank=2, alpha=4, placement="qv_only"))
    for regime in REGIMES:
        assert apply_regime(wrapped, regime) == apply_regime(model, regime)
        names = {n.removeprefix("detr.") for n, p in wrapped.named_parameters() if p.requires_grad}
        assert names == {n for n, p in model.named_parameters() if p.requires_grad}


# ---- closed forms on DETR-R50 ------------------------------------------------------------------------------------

D, NQ, K = 256, 100, 91
HEAD_PARAMS = (D * (K + 1) + (K + 1)) + (2 * (D * D + D) + (D * 4 + 4)) + NQ * D  # class, bbox MLP, queries
LAYER4_PARAMS = (1024 * 512 + 9 * 512 * 512 + 512 * 2048 + 1024 * 2048) + 2 * (2048 * 512 + 9 * 512 * 512 + 512 * 2048)


@pytest.mark.parametrize("placement,lora_per_rank", [("attention_only", 36_864), ("attention_ffn", 36_864 + 55_296)])
def test_detr_r50_closed_form_counts(placement, lora_per_rank):
    with torch.device("meta"):  # only parameters are counted: no memory, no init time
        model = build_detr(**R50)
    assert apply_regime(model, "full") == {"total_params": 41_524_768, "trainable_params": 41_302_368,
                                           "trainable_frac": 41_302_368 / 41_524_768, "lora_params": 0}
    assert apply_regime(model, "partial")["trainable_params"] == LAYER4_PARAMS + HEAD_PARAMS == 15_124_064
    r = 8
    apply_lora(model, rank=r, alpha=16, placement=placement)
    counts = apply_regime(model, "lora_only")
    assert HEAD_PARAMS == 181_856
    assert counts == {"total_params": 41_524_768 + lora_per_rank * r,
                      "trainable_params": lora_per_rank * r + HEAD_PARAMS,
                      "trainable_frac": (lora_per_rank * r + HEAD_PARAMS) / (41_524_768 + lora_per_rank * r),
                      "lora_params": lora_per_rank * r}


# ---- Faster R-CNN -----------------------------------------------------------------------------------------------

def tiny_faster_rcnn() -> nn.Module:
    torch.manual_seed(0)
    # trainable_layers=3: torchvision freezes conv1 and layer1 at build, as for a pretrained backbone
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    return FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64)


def test_faster_rcnn_regimes():
    model = tiny_faster_rcnn()
    build_frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert build_frozen and all(n.startswith(("backbone.body.conv1.", "backbone.body.layer1.",
                                              "backbone.body.bn1.")) for n in build_frozen)
    full = apply_regime(model, "full")
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == build_frozen
    assert full["lora_params"] == 0 and full["trainable_params"] < full["total_params"]

    partial = apply_regime(Wrapper(model), "partial")  # via a wrapper: names are matched by suffix
    want = ("backbone.body.layer4.", "backbone.fpn.", "rpn.", "roi_heads.")
    for n, p in model.named_parameters():
        assert p.requires_grad == n.startswith(want), n
    assert partial["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith(want))
    with pytest.raises(ValueError, match="regime 'lora_only' needs LoRA adapters but this faster_rcnn model has none"):
        apply_regime(model, "lora_only")


# ---- DDP: a real 2-process gloo step per regime, no find_unused_parameters ---------------------------------------

def _ddp_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for regime in USER_REGIMES:
            model = apply_lora(tiny_detr(), rank=2, alpha=4, placement="attention_ffn")
            apply_regime(model, regime)
            init = [p.detach().clone() for p in model.parameters()]
            ddp = DistributedDataParallel(model)  # find_unused_parameters=False: frozen params must not matter
            opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-4, weight_decay=0.0)
            for step in range(2):  # DDP reports unused parameters at the *next* forward, so take two steps
                opt.zero_grad()
                surrogate_loss(ddp, images(10 * rank + step)).backward()  # different data per rank
                opt.step()
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            assert torch.equal(gathered[0], gathered[1]), f"{regime}: ranks diverged after the step"
            moved = [not torch.equal(p, p0) for p, p0 in zip(model.parameters(), init)]
            assert moved == [p.requires_grad and m for p, m in zip(model.parameters(), moved)], regime
            assert sum(moved) > 0, regime
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_ddp_two_process_step_for_every_regime():
    # fork, like DataLoader workers (single-threaded children): spawn would re-import torch, ~10 s per rank
    mp.start_processes(_ddp_worker, args=(2, _free_port()), nprocs=2, join=True,  # raises if a rank fails
                       start_method="fork")
