"""Benchmark: does a small DETR learn from scratch, and what should `weights: none` freeze?

Run: .venv/bin/python bench/learn_probe.py [--train-images 128] [--epochs 12] [--variants frozen_stem,train_all]
     [--seeds 0] [--no-write]
     .venv/bin/python bench/learn_probe.py --fixed-batch 8 [--steps 300] ...
     .venv/bin/python bench/learn_probe.py --demo-size [--budget-s 400] [--variants ...]
     .venv/bin/python bench/learn_probe.py --demo-size --train-images 1024 --val-images 64 --budget-s 2400 \
         --transplant <storage>/_bases/demo_frcnn-*/train-base-*/best/model.pt --variants demo_transplant,...
A small DETR (resnet18, hidden 128, 2+2 layers, 20 queries) trains from random init on synthetic shapes
(`--train-images` train images at 128 px, 32 val) through the project's own engine; each variant x seed in a
fresh process, one torch thread, the same data, schedule and seed. Reports the train loss of the first and last
epoch (and its parts), AP / AP50 on the val images and AP50 on up to 32 training images (fit vs generalisation).
With --fixed-batch N instead: the overfit test's tiny DETR (tests/models/test_overfit.py) on N fixed images at
96 px, no flip, constant lr, until AP50 >= 0.9 on them or --steps: can the variant fit at all, and is it stable.
With --demo-size instead: the demo base's DETR (the overfit test's size, 10 queries) on the demo base's data (128
source-domain images at 64 px), lr 1e-3, for --budget-s of training each, val AP every 2 epochs: does anything
leave DETR's plateau within the minutes a laptop demo can spend? `--transplant` (the `demo_transplant*` variants)
starts DETR's ResNet from a trained Faster R-CNN's (e.g. the demo's cached base): is a pretrained backbone the gap?
Writes the section "## Learning from scratch, ... (bench/learn_probe.py)" of bench/RESULTS.md ("## Learning from a
transplanted backbone, ..." with --transplant).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

DATA = dict(val_images=32, image_size=128, num_classes=5)
MODEL = dict(backbone="resnet18", hidden_dim=128, nheads=8, enc_layers=2, dec_layers=2, dim_feedforward=512,
             dropout=0.1)
# --fixed-batch: the overfit test's tiny DETR and image size.
TINY_MODEL = dict(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=128,
                  dropout=0.0)
FIXED_IMAGE_SIZE, FIXED_QUERIES, FIT_AP50, EVAL_EVERY = 96, 10, 0.9, 25
STEM_AND_LAYER1 = ("conv1", "bn1", "layer1")
# variant -> what differs from the default (stem + layer1 frozen, 20 queries, lr 2e-4 everywhere).
# `batchnorm` (bench-only): the backbone's FrozenBatchNorm2d (an identity at random init) swapped for
# trainable nn.BatchNorm2d, as torchvision's Faster R-CNN does from scratch.
VARIANTS: dict[str, dict] = {
    "frozen_stem": dict(frozen=STEM_AND_LAYER1),
    "train_all": dict(frozen=()),
    "train_all_bn": dict(frozen=(), batchnorm=True),
    "train_all_lr1e-3": dict(frozen=(), lr=1e-3),
    "frozen_stem_lr1e-3": dict(frozen=STEM_AND_LAYER1, lr=1e-3),
    "train_all_bn_lr1e-3": dict(frozen=(), batchnorm=True, lr=1e-3),
    "train_all_q10": dict(frozen=(), num_queries=10),
    # --demo-size: the demo's lr, and what else might speed the start: focal loss (Deformable DETR's class loss and
    # weights) and a 3x larger input (6x6 instead of 2x2 feature cells at stride 32).
    "demo_train_all": dict(frozen=(), lr=1e-3),
    "demo_train_all_bn": dict(frozen=(), batchnorm=True, lr=1e-3),
    "demo_train_all_bn_focal": dict(frozen=(), batchnorm=True, lr=1e-3,
                                    model=dict(class_loss="focal", loss_weights={"ce": 2, "bbox": 5, "giou": 2})),
    "demo_train_all_bn_up192": dict(frozen=(), batchnorm=True, lr=1e-3, model=dict(min_size=192, max_size=192)),
    # --transplant: the ResNet body (and its BatchNorm statistics, frozen) of a trained Faster R-CNN, the official
    # recipe for a pretrained backbone (stem + layer1 frozen, a 10x lower backbone lr).
    "demo_transplant": dict(frozen=STEM_AND_LAYER1, transplant=True, lr=5e-4, lr_backbone=5e-5),
    "demo_transplant_up128": dict(frozen=STEM_AND_LAYER1, transplant=True, lr=5e-4, lr_backbone=5e-5,
                                  model=dict(min_size=128, max_size=128)),
}
DEMO_VARIANTS = "demo_train_all,demo_train_all_bn,demo_train_all_bn_focal,demo_train_all_bn_up192"
DEMO_IMAGE_SIZE = 64
DEFAULT_VARIANTS = "frozen_stem,train_all,train_all_bn,frozen_stem_lr1e-3,train_all_lr1e-3"
BATCH, LR, WARMUP_STEPS, GRAD_CLIP = 4, 2e-4, 20, 0.1  # grad clip 0.1: the official recipe


def _swap_batchnorm(module) -> None:
    """Replace every FrozenBatchNorm2d under `module` by a trainable nn.BatchNorm2d of the same width."""
    from torch import nn

    from detsweep.models.backbone import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, FrozenBatchNorm2d):
            setattr(module, name, nn.BatchNorm2d(child.weight.shape[0]))
        else:
            _swap_batchnorm(child)


def _build(variant: dict, num_classes: int, model_kw: dict = MODEL, queries: int = 20, transplant: str | None = None):
    from detsweep.models.backbone import freeze_layers
    from detsweep.models.detr_detector import build_detr_detector

    model = build_detr_detector(num_classes=num_classes, weights="none",
                                num_queries=variant.get("num_queries", queries), **{**model_kw, **variant.get("model", {})})
    backbone = model.detr.backbone[0]
    if variant.get("batchnorm"):
        _swap_batchnorm(backbone.body)
    if variant.get("transplant"):  # what a DETR base with `weights: base:<a Faster R-CNN base>` loads
        from detsweep.models.weights import load_detr_weights

        load_detr_weights(model.detr, transplant)
    freeze_layers(backbone, variant["frozen"])
    return model


def _ap(model, dataset, gt: dict, category_ids: list[int]) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from detsweep import engine
    from detsweep.data.coco import collate_fn
    from detsweep.metrics import coco_eval

    loader = DataLoader(dataset, batch_size=8, collate_fn=collate_fn)
    dets, _ = engine.predict(model, loader, torch.device("cpu"), category_ids)
    return coco_eval(gt, dets, img_ids=dataset.image_ids)


def _title(args) -> str:
    if args.demo_size:
        data = "" if args.train_images == 128 else f", {args.train_images} images"
        start = "a transplanted backbone" if args.transplant else "scratch"
        return f"Learning from {start} at the demo base's size{data}, {args.budget_s:.0f} s each (bench/learn_probe.py)"
    if args.fixed_batch:
        return f"Learning from scratch, a fixed batch of {args.fixed_batch} images (bench/learn_probe.py)"
    return f"Learning from scratch, {args.train_images} images x {args.epochs} epochs (bench/learn_probe.py)"


def run_variant(name: str, seed: int, epochs: int, train_images: int, data_root: str) -> dict:
    """Train variant `name` for `epochs` and return its losses, APs and timings."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from detsweep import dist, engine
    from detsweep.data.coco import CocoDetection, build_datasets, collate_fn, load_coco_json

    torch.set_num_threads(1)
    dist.seed_everything(seed)
    variant = VARIANTS[name]
    train_set, val_set, label_map, val_ann = build_datasets(kind="synthetic", root=data_root, classes=None, seed=0,
                                                            train_images=train_images, **DATA)
    model = _build(variant, label_map.num_classes)
    lr = variant.get("lr", LR)
    # From scratch the backbone gets the transformer's lr: the official 1e-5 is for ImageNet weights.
    optimizer = torch.optim.AdamW(model.param_groups(lr, lr, 1e-4), lr=lr, weight_decay=1e-4, fused=True)
    loader = DataLoader(train_set, batch_size=BATCH, collate_fn=collate_fn,
                        sampler=RandomSampler(train_set, generator=torch.Generator().manual_seed(seed)))
    schedule = SimpleNamespace(epochs=epochs, warmup_steps=WARMUP_STEPS, lr_schedule="cosine", lr_drop_epoch=None)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, engine.lr_lambda(schedule, len(loader)))

    losses, wall0, cpu0 = [], time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        out = engine.train_one_epoch(model, loader, optimizer, torch.device("cpu"), epoch=epoch,
                                     grad_clip=GRAD_CLIP, lr_scheduler=lr_scheduler)
        losses.append(out["loss"])
        parts = {k: out[k] for k in ("loss_ce", "loss_bbox", "loss_giou")}  # last decoder layer, weighted
        print(f"{name} seed {seed} epoch {epoch}: loss {out['loss']:.3f}", file=sys.stderr, flush=True)
    train_wall, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0

    val = _ap(model, val_set, load_coco_json(val_ann), list(label_map.category_ids))
    # Up to 32 training images without flips: how well the model fits what it saw.
    fit_set = CocoDetection(train_set.image_dir, train_set.ann_file, label_map=label_map, train=False,
                            image_ids=train_set.image_ids[:32])
    fit = _ap(model, fit_set, load_coco_json(train_set.ann_file), list(label_map.category_ids))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"variant": name, "seed": seed, "epochs": epochs, "losses": losses, "last_parts": parts, "ap": val["ap"],
            "ap50": val["ap50"], "train_ap50": fit["ap50"], "trainable_params": trainable,
            "train_wall_s": train_wall, "train_cpu_s": train_cpu}


def _eval_every(train_images: int) -> int:
    """--demo-size evaluates every this many epochs: about every 256 images seen (every 2 for 128 images)."""
    return max(1, 256 // train_images)


def run_demo_size(name: str, seed: int, args) -> dict:
    """Train variant `name` at the demo base's size for `args.budget_s` seconds of training; val AP every
    `_eval_every(args.train_images)` epochs."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from detsweep import dist, engine
    from detsweep.data.coco import build_datasets, collate_fn, load_coco_json

    torch.set_num_threads(1)
    dist.seed_everything(seed)
    variant = VARIANTS[name]
    train_set, val_set, label_map, val_ann = build_datasets(
        kind="synthetic", root=args.data_root, classes=None, seed=0, train_images=args.train_images,
        **{**DATA, "image_size": DEMO_IMAGE_SIZE, "val_images": args.val_images})
    model = _build(variant, label_map.num_classes, TINY_MODEL, FIXED_QUERIES, transplant=args.transplant)
    lr = variant.get("lr", LR)
    optimizer = torch.optim.AdamW(model.param_groups(lr, variant.get("lr_backbone", lr), 1e-4), lr=lr,
                                  weight_decay=1e-4, fused=True)
    loader = DataLoader(train_set, batch_size=BATCH, collate_fn=collate_fn,
                        sampler=RandomSampler(train_set, generator=torch.Generator().manual_seed(seed)))
    gt, ids = load_coco_json(val_ann), list(label_map.category_ids)
    curve, trained, epoch = [], 0.0, 0
    every, budget_s = _eval_every(args.train_images), args.budget_s
    while trained < budget_s:
        t0 = time.perf_counter()
        out = engine.train_one_epoch(model, loader, optimizer, torch.device("cpu"), epoch=epoch, grad_clip=GRAD_CLIP)
        trained, epoch = trained + time.perf_counter() - t0, epoch + 1
        if epoch % every == 0 or trained >= budget_s:
            val = _ap(model, val_set, gt, ids)
            curve.append({"epoch": epoch, "train_s": round(trained), "loss": out["loss"], "ap": val["ap"],
                          "ap50": val["ap50"]})
            print(f"{name} seed {seed} epoch {epoch}: loss {out['loss']:.3f} AP50 {val['ap50']:.3f}", file=sys.stderr,
                  flush=True)
    return {"variant": name, "seed": seed, "train_images": args.train_images, "curve": curve, "epochs": epoch,
            "train_s": trained}


def _marks(budget_s: float) -> list[float]:
    """Training-time marks for the "best val AP50 by" column: 10, 20, 40, 80 ... min below the budget, then it."""
    marks, m = [], 600.0
    while m < budget_s - 60:
        marks.append(m)
        m *= 2
    return marks + [budget_s]


def _demo_table(rows: list[dict], budget_s: float) -> str:
    marks = _marks(budget_s)
    by = " / ".join(f"{m / 60:.0f}" for m in marks)
    lines = ["| variant | seed | train images | epochs in budget | loss, first eval | loss, last | "
             f"best val AP50 by {by} min of training | best val AP50 (epoch) | last val AP | s / epoch |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        c = r["curve"]
        best = max(c, key=lambda p: p["ap50"])
        upto = " / ".join(f"{max((p['ap50'] for p in c if p['train_s'] <= m or m == marks[-1]), default=0.0):.3f}"
                        for m in marks)
        lines.append(f"| {r['variant']} | {r['seed']} | {r['train_images']} | {r['epochs']} | "
                     f"{c[0]['loss']:.2f} | {c[-1]['loss']:.2f} | {upto} | {best['ap50']:.3f} ({best['epoch']}) | "
                     f"{c[-1]['ap']:.3f} | {r['train_s'] / r['epochs']:.1f} |")
    return "\n".join(lines)


def run_fixed_batch(name: str, seed: int, steps: int, images: int, data_root: str) -> dict:
    """Train variant `name` on `images` fixed images until AP50 >= FIT_AP50 on them or `steps`."""
    import torch

    from detsweep import dist, engine
    from detsweep.data.coco import build_datasets, collate_fn, load_coco_json
    from detsweep.metrics import coco_eval

    torch.set_num_threads(1)
    dist.seed_everything(seed)
    variant = VARIANTS[name]
    # The val split loads without flips; its images are the batch and its ground truth scores it.
    _, val_set, label_map, val_ann = build_datasets(kind="synthetic", root=data_root, classes=None, seed=0,
                                                    train_images=1, val_images=images, image_size=FIXED_IMAGE_SIZE,
                                                    num_classes=DATA["num_classes"])
    batch = collate_fn([val_set[i] for i in range(len(val_set))])
    model = _build(variant, label_map.num_classes, TINY_MODEL, FIXED_QUERIES)
    lr = variant.get("lr", LR)
    optimizer = torch.optim.AdamW(model.param_groups(lr, lr, 1e-4), lr=lr, weight_decay=1e-4, fused=True)
    losses, ap50s, cpu0, done = [], [], time.process_time(), 0
    while done < steps and (not ap50s or ap50s[-1] < FIT_AP50):
        out = engine.train_one_epoch(model, [batch] * EVAL_EVERY, optimizer, torch.device("cpu"), epoch=0,
                                     grad_clip=GRAD_CLIP)
        done += EVAL_EVERY
        dets, _ = engine.predict(model, [batch], torch.device("cpu"), list(label_map.category_ids))
        losses.append(out["loss"])
        ap50s.append(coco_eval(load_coco_json(val_ann), dets)["ap50"])
        print(f"{name} seed {seed} step {done}: loss {out['loss']:.3f} AP50 {ap50s[-1]:.3f}", file=sys.stderr,
              flush=True)
    return {"variant": name, "seed": seed, "steps": done, "losses": losses, "ap50": ap50s[-1],
            "fit_steps": done if ap50s[-1] >= FIT_AP50 else None, "cpu_s": time.process_time() - cpu0}


def _fixed_table(rows: list[dict]) -> str:
    lines = [f"| variant | seed | loss, first {EVAL_EVERY} steps | loss, last {EVAL_EVERY} steps | AP50 on the batch | "
             f"steps to AP50 >= {FIT_AP50} | CPU s / {EVAL_EVERY} steps |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fit = str(r["fit_steps"]) if r["fit_steps"] else f"not in {r['steps']}"
        lines.append(f"| {r['variant']} | {r['seed']} | {r['losses'][0]:.2f} | {r['losses'][-1]:.2f} | "
                     f"{r['ap50']:.3f} | {fit} | {r['cpu_s'] / len(r['losses']):.1f} |")
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    lines = ["| variant | seeds | trainable params | loss, epoch 1 | loss, last epoch | vs frozen_stem | "
             "last: ce / L1 / GIoU | val AP | val AP50 | train AP50 | CPU s / epoch |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    base = [r["losses"][-1] for r in rows if r["variant"] == "frozen_stem"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]

        def cell(key: str, fmt: str = ".3f") -> str:
            vals = [r[key] for r in rs]
            return " / ".join(format(v, fmt) for v in vals) if len(vals) > 1 else format(vals[0], fmt)

        for r in rs:
            r["loss_first"], r["loss_last"] = r["losses"][0], r["losses"][-1]
            r["cpu_per_epoch"] = r["train_cpu_s"] / r["epochs"]
        last = statistics.mean(r["loss_last"] for r in rs)
        ratio = f"{last / statistics.mean(base):.2f}x" if base else "–"
        parts = " / ".join(f"{statistics.mean(r['last_parts'][k] for r in rs):.2f}"
                           for k in ("loss_ce", "loss_bbox", "loss_giou"))
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in rs)} | {rs[0]['trainable_params']:,} | "
                     f"{cell('loss_first', '.2f')} | {cell('loss_last', '.2f')} | {ratio} | {parts} | {cell('ap')} | "
                     f"{cell('ap50')} | {cell('train_ap50')} | {statistics.mean(r['cpu_per_epoch'] for r in rs):.1f} |")
    return "\n".join(lines)


_LEGEND = ("`frozen_stem`: the official recipe, conv1 + layer1 frozen (at their random init here). `train_all`: "
           "nothing frozen. `_bn` (bench-only): the backbone's FrozenBatchNorm2d, an identity at random init, replaced "
           "by trainable BatchNorm2d. `_lr1e-3`: lr 1e-3 everywhere. `_q10`: 10 queries.")


def _setting(args) -> str:
    if args.demo_size:
        m = TINY_MODEL
        return (f"The demo base's DETR ({m['backbone']}, hidden {m['hidden_dim']}, {m['enc_layers']}+"
                f"{m['dec_layers']} layers, FFN {m['dim_feedforward']}, dropout {m['dropout']}, {FIXED_QUERIES} "
                "queries) from random init unless named, `weights: none`, nothing frozen unless named, on the demo "
                f"base's data ({args.train_images} source-domain images at {DEMO_IMAGE_SIZE} px, "
                f"{DATA['num_classes']} classes, h-flip 0.5; {args.val_images} val), batch {BATCH}, AdamW (fused) "
                f"lr 1e-3 everywhere unless named, constant, weight decay 1e-4, grad clip {GRAD_CLIP}; "
                f"{args.budget_s:.0f} s of training each (evaluation not counted), val AP every "
                f"{_eval_every(args.train_images)} epochs. `_focal`: Deformable DETR's sigmoid focal loss "
                "with its weights 2/5/2. `_up192`, `_up128`: DETR's own resize to 192 / 128 px (6x6 / 4x4 feature "
                "cells at stride 32 instead of 2x2). `demo_transplant`: the ResNet-18 body and BatchNorm statistics of the "
                "demo's trained Faster R-CNN base (`--transplant`), as frozen statistics, with the official pretrained "
                "recipe: stem + layer1 frozen, lr 5e-4, backbone 5e-5.")
    if args.fixed_batch:
        m = TINY_MODEL
        return (f"The overfit test's tiny DETR ({m['backbone']}, hidden {m['hidden_dim']}, {m['enc_layers']}+"
                f"{m['dec_layers']} layers, FFN {m['dim_feedforward']}, dropout {m['dropout']}, {FIXED_QUERIES} "
                f"queries) from random init, `weights: none`, trained on one fixed batch of {args.fixed_batch} "
                f"synthetic images at {FIXED_IMAGE_SIZE} px (no flip) until AP50 >= {FIT_AP50} on that batch, checked "
                f"every {EVAL_EVERY} steps, or {args.steps} steps. AdamW (fused) lr {LR:g} everywhere unless named, "
                f"constant, weight decay 1e-4, grad clip {GRAD_CLIP}.")
    m = MODEL
    return (f"Small DETR ({m['backbone']}, hidden {m['hidden_dim']}, {m['enc_layers']}+{m['dec_layers']} layers, FFN "
            f"{m['dim_feedforward']}, dropout {m['dropout']}, 20 queries unless named) from random init, "
            f"`weights: none`, on synthetic shapes ({args.train_images} train / {DATA['val_images']} val images at "
            f"{DATA['image_size']} px, {DATA['num_classes']} classes, h-flip 0.5). {args.epochs} epochs of batch "
            f"{BATCH}, AdamW (fused) lr {LR:g} for backbone and the rest unless named, weight decay 1e-4, "
            f"{WARMUP_STEPS} warm-up steps then cosine, grad clip {GRAD_CLIP}. Train AP50: the first (up to) 32 "
            "training images without flip. Loss = the weighted sum over both decoder layers (aux loss), mean over "
            "the epoch; its parts are the last layer's. vs frozen_stem: mean last-epoch loss over that of frozen_stem.")


def _report(rows: list[dict], args, load_before: float, elapsed: float) -> str:
    import torch

    return "\n".join([
        f"## {_title(args)}", "",
        _setting(args) + " The project's `engine.train_one_epoch` / `engine.predict` / `coco_eval`; each variant x "
        "seed in a fresh process, one torch thread.",
        f"Machine: 2-core {platform.machine()} CPU shared with other jobs (1-min load average {load_before:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after), torch {torch.__version__}, no GPU; "
        f"whole run {elapsed / 60:.0f} min.",
        _LEGEND, "",
        _demo_table(rows, args.budget_s) if args.demo_size
        else _fixed_table(rows) if args.fixed_batch else _table(rows), "",
    ])


def _summary(r: dict) -> str:
    if "curve" in r:
        return (f"{r['epochs']} epochs, loss {r['curve'][-1]['loss']:.2f}, best val AP50 "
                f"{max(p['ap50'] for p in r['curve']):.3f}")
    if "fit_steps" in r:
        return f"loss {r['losses'][0]:.2f} -> {r['losses'][-1]:.2f}, AP50 {r['ap50']:.3f} after {r['steps']} steps"
    return (f"loss {r['losses'][0]:.2f} -> {r['losses'][-1]:.2f}, val AP {r['ap']:.3f} AP50 {r['ap50']:.3f}, "
            f"train AP50 {r['train_ap50']:.3f}, {r['train_wall_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--fixed-batch", type=int, default=0, help="train on this many fixed images instead")
    parser.add_argument("--steps", type=int, default=300, help="with --fixed-batch: the most optimizer steps")
    parser.add_argument("--demo-size", action="store_true", help="the demo base's DETR and data, time-boxed")
    parser.add_argument("--budget-s", type=float, default=400, help="with --demo-size: training seconds per run")
    parser.add_argument("--val-images", type=int, default=32, help="with --demo-size: val images")
    parser.add_argument("--transplant", help="with the demo_transplant variants: a Faster R-CNN trial's model.pt")
    parser.add_argument("--variants", help=f"comma-separated, of {sorted(VARIANTS)} (default: the mode's set)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--data-root", default=str(Path("~/.cache/detsweep/synthetic").expanduser()))
    parser.add_argument("--json", help="also write every run's result, per-epoch losses included, to this file")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, seed = args.worker.rsplit(":", 1)
        result = (run_demo_size(name, int(seed), args) if args.demo_size
                  else run_fixed_batch(name, int(seed), args.steps, args.fixed_batch, args.data_root) if args.fixed_batch
                  else run_variant(name, int(seed), args.epochs, args.train_images, args.data_root))
        print(json.dumps(result))
        return

    names = (args.variants or (DEMO_VARIANTS if args.demo_size else DEFAULT_VARIANTS)).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    if not args.transplant and any(VARIANTS[n].get("transplant") for n in names):
        sys.exit("the demo_transplant variants need --transplant CHECKPOINT (a Faster R-CNN trial's model.pt)")
    sys.path.insert(0, str(Path(__file__).parent))
    from results_md import child_json

    rows, load_before, t0 = [], os.getloadavg()[0], time.perf_counter()
    for seed in args.seeds.split(","):
        for name in names:  # interleaved by seed, so drifting load hits every variant alike
            cmd = [sys.executable, str(Path(__file__)), "--worker", f"{name}:{seed}", "--epochs", str(args.epochs),
                   "--train-images", str(args.train_images), "--fixed-batch", str(args.fixed_batch),
                   "--steps", str(args.steps), "--data-root", args.data_root, "--budget-s", str(args.budget_s)]
            if args.demo_size:
                cmd += ["--demo-size", "--val-images", str(args.val_images)]
            if args.transplant:
                cmd += ["--transplant", args.transplant]
            rows.append(child_json(cmd, f"{name} seed {seed}"))
            print(f"{name} seed {seed}: {_summary(rows[-1])}", flush=True)
    rows.sort(key=lambda r: names.index(r["variant"]))
    text = _report(rows, args, load_before, time.perf_counter() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))  # per-epoch losses included
    if args.no_write:
        print(text)
    else:
        from results_md import write_section

        write_section(_title(args), text)
        print(text)


if __name__ == "__main__":
    main()
