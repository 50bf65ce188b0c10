"""The pure-torch engine: a non-finite loss fails the trial with its reason, predictions come out
in COCO results format with original category ids and each image once, the LR schedule, the AMP
dtype, and a training step that reads the GPU back only where it must."""
from __future__ import annotations

import inspect
import math
import sys
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from detsweep import engine
from detsweep.data.coco import CocoDetection, LabelMap, build_datasets, collate_fn
from detsweep.engine import amp_dtype_for, lr_lambda
from detsweep.models.detr_detector import build_detr_detector

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
            num_queries=5, dropout=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train, val, label_map, val_ann = build_datasets(
        kind="synthetic", root=tmp_path_factory.mktemp("synth"), train_images=4, val_images=3, image_size=64,
        classes=None, seed=0, num_classes=3)
    return train, val, label_map


def test_non_finite_loss_raises_with_its_reason(data):
    train, _, label_map = data
    torch.manual_seed(0)
    model = build_detr_detector(num_classes=label_map.num_classes, **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e30)  # the first step ruins the weights
    loader = DataLoader(train, batch_size=2, collate_fn=collate_fn)
    # DETR's matcher meets the NaN boxes before the loss does: both paths name the epoch and step.
    with pytest.raises(engine.NonFiniteLossError, match=r"^non-finite (loss nan|predicted boxes) at epoch 3 step 1"):
        engine.train_one_epoch(model, loader, optimizer, torch.device("cpu"), epoch=3, grad_clip=0.1)


def test_train_one_epoch_returns_mean_losses_and_meters_images(data):
    train, _, label_map = data
    torch.manual_seed(0)
    model = build_detr_detector(num_classes=label_map.num_classes, **TINY)
    optimizer = torch.optim.AdamW(model.param_groups(1e-4, 1e-5, 1e-4))
    seen = []
    meter = SimpleNamespace(step=seen.append)
    out = engine.train_one_epoch(model, DataLoader(train, batch_size=2, collate_fn=collate_fn), optimizer,
                                 torch.device("cpu"), epoch=0, grad_clip=0.1, meter=meter)
    assert seen == [2, 2]
    assert set(out) >= {"loss", "loss_ce", "loss_bbox", "loss_giou"}
    parts = sum(v for k, v in out.items() if k != "loss")
    assert math.isclose(out["loss"], parts, rel_tol=1e-5)


def test_predict_gives_coco_results_with_original_ids_once_per_image(data):
    _, val, label_map = data
    model = build_detr_detector(num_classes=label_map.num_classes, **TINY)
    # The same images twice (a loader that repeats images): each is scored once.
    loader = DataLoader(torch.utils.data.ConcatDataset([val, val]), batch_size=2, collate_fn=collate_fn)
    seen = []
    dets, kept = engine.predict(model, loader, torch.device("cpu"), label_map.category_ids, keep_images=2,
                                meter=SimpleNamespace(step=seen.append))
    assert seen == [2, 1, 0]  # 3 images, then 3 repeats: repeats are not counted as evaluated
    assert len(dets) == len(val) * TINY["num_queries"]  # every query, no threshold, no repeats
    assert {d["image_id"] for d in dets} == set(val.image_ids)
    assert {d["category_id"] for d in dets} <= set(label_map.category_ids)
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] >= 0 and d["bbox"][3] >= 0 for d in dets)
    assert len(kept) == 2 and kept[0][2]["boxes"].shape == (TINY["num_queries"], 4)
    # Single process: gathering is the identity.
    assert engine.gather_detections(dets) == dets


def _gather_worker(rank: int, init_file: str, out_dir: str) -> None:
    import json
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # A padded DistributedSampler over 3 images: rank 0 sees 0, 2; rank 1 sees 1, 0 (a repeat).
    images = {0: [0, 2], 1: [1, 0]}[rank]
    dets = [{"image_id": i, "category_id": 3, "bbox": [0.0, 0.0, 1.0, 1.0], "score": rank + 0.5 + k / 10}
            for i in images for k in range(2)]
    merged = engine.gather_detections(dets)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(merged, f)
    tdist.destroy_process_group()


def test_gather_detections_across_two_gloo_ranks_dedups_on_rank_0(tmp_path):
    import json

    torch.multiprocessing.spawn(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    merged = json.loads((tmp_path / "rank0.json").read_text())
    assert json.loads((tmp_path / "rank1.json").read_text()) is None  # only rank 0 needs them
    # Image 0 is kept once, from rank 0 (the lowest rank that saw it); rank 1's repeat is dropped.
    assert [(d["image_id"], d["score"]) for d in merged] == [
        (0, 0.5), (0, 0.6), (2, 0.5), (2, 0.6), (1, 1.5), (1, 1.6)]


def test_lr_schedule_warmup_step_and_cosine():
    train = SimpleNamespace(epochs=3, warmup_steps=2, lr_schedule="step", lr_drop_epoch=2)
    f = lr_lambda(train, steps_per_epoch=4)
    assert [f(s) for s in range(12)] == [0.5, 1.0, 1, 1, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1]
    train = SimpleNamespace(epochs=2, warmup_steps=0, lr_schedule="cosine", lr_drop_epoch=None)
    g = lr_lambda(train, steps_per_epoch=5)
    assert g(0) == 1.0 and math.isclose(g(5), 0.5) and math.isclose(g(10), 0.0, abs_tol=1e-12)
    default_drop = lr_lambda(SimpleNamespace(epochs=300, warmup_steps=0, lr_schedule="step", lr_drop_epoch=None), 1)
    assert default_drop(199) == 1.0 and default_drop(200) == 0.1  # the official recipe: 200 of 300


def test_gradients_are_clipped_to_the_configured_norm(data):
    train, _, label_map = data
    torch.manual_seed(0)
    model = build_detr_detector(num_classes=label_map.num_classes, **TINY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves .grad as clipped
    loader = DataLoader(train, batch_size=2, collate_fn=collate_fn)
    norm = lambda: torch.linalg.vector_norm(  # noqa: E731
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()
    engine.train_one_epoch(model, loader, optimizer, torch.device("cpu"), epoch=0, grad_clip=0.0)
    assert norm() > 0.1  # unclipped, this tiny model's gradients are larger than the limit
    engine.train_one_epoch(model, loader, optimizer, torch.device("cpu"), epoch=0, grad_clip=0.1)
    assert norm() == pytest.approx(0.1, rel=1e-4)


@pytest.mark.parametrize("amp, device, expected", [
    ("off", "cuda", None), ("bf16", "cuda", torch.bfloat16), ("fp16", "cuda", torch.float16),
    # On the CPU only an explicit bf16 autocasts (the tests' dtype net); auto and fp16 train in fp32 there.
    ("bf16", "cpu", torch.bfloat16), ("auto", "cpu", None), ("fp16", "cpu", None), ("off", "cpu", None),
])
def test_amp_dtype_choice(amp, device, expected):

    assert amp_dtype_for(amp, torch.device(device)) == expected


@pytest.mark.parametrize("emulated", [True, False], ids=["T4_V100", "A10G_H100"])
def test_auto_amp_picks_bf16_only_where_the_gpu_has_it(emulated, monkeypatch):
    assert "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters
    # torch counts emulated bf16 (sm70/sm75) as supported unless asked not to; emulated bf16 is slow there.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or not emulated)
    assert amp_dtype_for("auto", torch.device("cuda")) == (torch.float16 if emulated else torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_step_with_grad_scaler_on_cuda(data):
    train, _, label_map = data
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_detr_detector(num_classes=label_map.num_classes, **TINY).to(device)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(model.param_groups(1e-4, 1e-5, 1e-4))
    scaler = torch.amp.GradScaler("cuda")
    loader = DataLoader(train, batch_size=2, collate_fn=collate_fn)
    for epoch in range(8):  # the scaler skips steps whose fp16 gradients overflow, then lowers its scale
        out = engine.train_one_epoch(model, loader, optimizer, device, epoch=epoch, grad_clip=0.1,
                                     amp_dtype=torch.float16, scaler=scaler)
        assert math.isfinite(out["loss"])
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        if any(not torch.equal(a, b) for a, b in zip(after, before)):
            break
    else:
        pytest.fail(f"no optimizer step was taken in 8 epochs (scale {scaler.get_scale()})")


# --- host-device syncs (issue 13, defect 7) -------------------------------------------------------

# The Tensor methods that, on a CUDA tensor, wait for the GPU to hand a value to Python.
READ_BACKS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")


def _count_read_backs(monkeypatch) -> Counter:
    """Counter of (method, "file:function" of its caller) for every READ_BACKS call from now on."""
    reads: Counter = Counter()
    for name in READ_BACKS:
        def counted(self, *args, _name=name, _original=getattr(torch.Tensor, name), **kwargs):
            caller = sys._getframe(1).f_code
            reads[(_name, f"{Path(caller.co_filename).name}:{caller.co_name}")] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_detr_training_steps_read_the_device_back_twice_each(data, monkeypatch):
    train, _, label_map = data
    torch.manual_seed(0)
    # Three decoder layers: matching the aux layers must not add read-backs of its own.
    model = build_detr_detector(num_classes=label_map.num_classes, **{**TINY, "dec_layers": 3})
    # SGD: AdamW reads its CPU step counters with .item(), which is no sync but would count here.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    batches = [collate_fn([train[0], train[1]]), collate_fn([train[2], train[3]])]  # loaded before counting
    reads = _count_read_backs(monkeypatch)
    out = engine.train_one_epoch(model, batches, optimizer, torch.device("cpu"), epoch=0, grad_clip=0.1)
    monkeypatch.undo()
    assert math.isfinite(out["loss"])
    # What remains, per step: the matcher's one copy of every layer's costs to the CPU (scipy's Hungarian
    # algorithm runs there) and the engine's finiteness check; per epoch: the engine's read of the means.
    assert reads == {("cpu", "matcher.py:match_layers"): 2, ("item", "engine.py:_forward"): 2,
                     ("tolist", "engine.py:train_one_epoch"): 1}


def test_labels_are_checked_by_the_dataset_once_not_by_the_model(data, monkeypatch):
    train, _, label_map = data
    # A label map bug (or a raw category id) would give a label outside 0..K-1: the dataset refuses it.
    monkeypatch.setattr(LabelMap, "to_label", lambda self, category_id: self.num_classes)
    k = label_map.num_classes
    with pytest.raises(ValueError, match=rf"labels must be contiguous in 0\.\.{k - 1}, got \[{k}\]"):
        CocoDetection(train.image_dir, train.ann_file, label_map=label_map)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_detr_training_steps_on_cuda_synchronize_twice_each(data):
    train, _, label_map = data
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_detr_detector(num_classes=label_map.num_classes, **{**TINY, "dec_layers": 3}).to(device)
    optimizer = torch.optim.AdamW(model.param_groups(1e-4, 1e-5, 1e-4))
    batch = collate_fn([train[0], train[1]])
    engine.train_one_epoch(model, [batch], optimizer, device, epoch=0)  # warm-up: lazy init, allocator
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.train_one_epoch(model, [batch, batch], optimizer, device, epoch=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    # Per step the matcher's cost copy and the finiteness check; per epoch the read of the means.
    assert len(syncs) <= 2 * 2 + 1, syncs


def test_uint8_images_are_scaled_on_the_device(data):
    """A GPU trial's loader sends uint8 pixels (a quarter of float32's bytes to copy); they reach the
    model as float 0..1, equal to the dataset's float images."""
    train, _, _ = data
    as_float = train[0][0]
    train.uint8 = True
    try:
        raw = train[0][0]
    finally:
        train.uint8 = False
    assert raw.dtype == torch.uint8
    (moved,), _ = engine.to_device([raw], None, torch.device("cpu"))
    assert moved.dtype == torch.float32 and torch.allclose(moved, as_float)
