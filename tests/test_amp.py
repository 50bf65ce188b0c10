"""`train.amp: bf16` on the CPU: torch's CPU autocast runs the same autocast paths a GPU's bf16 does, so
every regime of both models trains a few steps under it in CI, a cheap net for dtype bugs (a head left in
bf16, a promotion to fp32 that doubles memory, a loss that goes non-finite)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from detsweep import engine
from detsweep.data.coco import build_datasets, collate_fn
from detsweep.models import build_model
from detsweep.models.lora import apply_lora
from detsweep.models.regimes import apply_regime
from detsweep.sweep.spec import DetrConfig, FasterRCNNConfig

DETR = DetrConfig(backbone="resnet18", num_queries=5, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1,
                  dim_feedforward=64, dropout=0.0)
FRCNN = FasterRCNNConfig(backbone="resnet18", min_size=64, max_size=64, box_batch_size_per_image=32,
                         rpn_post_nms_top_n_test=100)
TRAIN = SimpleNamespace(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, epochs=1, warmup_steps=0, lr_schedule="constant",
                        lr_drop_epoch=None)
CASES = [("detr_r50", DETR, "full"), ("detr_r50", DETR, "lora_only"), ("detr_r50", DETR, "partial"),
         ("fasterrcnn_r50_fpn", FRCNN, "full"), ("fasterrcnn_r50_fpn", FRCNN, "partial")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train, val, label_map, _ = build_datasets(kind="synthetic", root=tmp_path_factory.mktemp("synth"), train_images=4,
                                              val_images=2, image_size=64, classes=None, seed=0, num_classes=3)
    return train, val, label_map


@pytest.mark.parametrize("model_name,cfg,regime", CASES, ids=[f"{m}-{r}" for m, _, r in CASES])
def test_every_regime_trains_under_cpu_bf16_autocast(data, model_name, cfg, regime):
    train, val, label_map = data
    cpu = torch.device("cpu")
    amp = engine.amp_dtype_for("bf16", cpu)
    assert amp is torch.bfloat16 and engine.amp_name(amp) == "bf16"
    torch.manual_seed(0)
    model = build_model(model_name, cfg, num_classes=label_map.num_classes)
    if regime == "lora_only":
        apply_lora(model, rank=2, alpha=4, placement="attention_only")
    apply_regime(model, regime)
    opt = engine.prepare_training(model, TRAIN, steps_per_epoch=2, to=cpu, amp_dtype=amp)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = engine.train_one_epoch(model, DataLoader(train, batch_size=2, collate_fn=collate_fn), opt.optimizer,
                                    cpu, epoch=0, grad_clip=0.1, lr_scheduler=opt.lr_scheduler, amp_dtype=amp)
    assert torch.isfinite(torch.tensor(losses["loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never changes the weights
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "no trainable parameter moved"
    model.eval()
    with torch.no_grad(), engine.autocast(cpu, amp):
        (out, _) = model([val[0][0], val[1][0]])
    assert out["boxes"].dtype == torch.float32 and out["scores"].dtype == torch.float32  # fp32 heads
