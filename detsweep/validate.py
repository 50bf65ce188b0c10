"""Value rules of the sweep file that its types cannot express: ranges, combinations, files that
must exist, and the resources rule for fractional GPUs. Each violation is one line naming the
file, the dotted key (`grid.<key>` for a grid value), the value and what is allowed."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from detsweep.typed import SweepError

if TYPE_CHECKING:
    from detsweep.config import DetrConfig, ResourcesConfig, Sweep


# What a `data.kind: coco` root must hold (as `python -m detsweep.data coco2017` lays it out).
COCO_LAYOUT = ("images/train2017", "images/val2017", "annotations/instances_train2017.json",
               "annotations/instances_val2017.json")
# Metrics a scheduler may watch: what every epoch reports.
SCHEDULER_METRICS = ("ap", "ap50", "ap75", "ar100", "loss", "ece", "nll", "brier")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# `model.detr.weights: coco` is the official DETR-R50 (detr-r50-e632da11.pth, the official main.py
# defaults): these settings must equal its own, and its queries and decoder layers can only be cut.
DETR_COCO_ARCHITECTURE = {"backbone": "resnet50", "hidden_dim": 256, "nheads": 8, "enc_layers": 6,
                          "dim_feedforward": 2048}
DETR_COCO_AT_MOST = {"num_queries": 100, "dec_layers": 6}


def check_values(sweep: "Sweep", check_paths: bool = True, grid_key: str | None = None) -> None:
    """Value rules the types cannot express. `check_paths=False` skips data and checkpoint
    files (a --dry-run plans a cluster's sweep on a laptop that lacks them). When checking one
    grid value, `grid_key` is its dotted key and errors name it as `grid.<key>`."""
    src = sweep.source

    def fail(key: str, message: str) -> SweepError:
        return SweepError(f"{src}: {'grid.' + key if key == grid_key else key}: {message}")

    d, m, t, ft = sweep.data, sweep.model, sweep.train, sweep.fault_tolerance
    if not _NAME.match(sweep.name):
        raise fail("name", f"{sweep.name!r} must be letters, digits, '_', '-' or '.' (it names a folder)")
    rules = [  # (key, value, holds, what is allowed)
        ("data.train_images", d.train_images, d.train_images > 0 or d.kind == "coco" and d.train_images == 0, "> 0 (coco: 0 = all)"),
        ("data.val_images", d.val_images, d.val_images > 0 or d.kind == "coco" and d.val_images == 0, "> 0 (coco: 0 = all)"),
        ("data.image_size", d.image_size, d.image_size >= 32, ">= 32"),
        ("data.num_classes", d.num_classes, 1 <= d.num_classes <= 8, "in [1, 8]"),
        ("data.loader_workers", d.loader_workers, d.loader_workers >= 0, ">= 0"),
        ("train.epochs", t.epochs, t.epochs > 0, "> 0"),
        ("train.batch_size_per_worker", t.batch_size_per_worker, t.batch_size_per_worker > 0, "> 0"),
        ("train.lr", t.lr, t.lr > 0, "> 0"),
        ("train.lr_backbone", t.lr_backbone, t.lr_backbone >= 0, ">= 0"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("train.grad_clip", t.grad_clip, t.grad_clip >= 0, ">= 0 (0 = off)"),
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("train.lr_drop_epoch", t.lr_drop_epoch, t.lr_drop_epoch is None or t.lr_drop_epoch > 0, "> 0"),
        ("lora.rank", sweep.lora.rank, sweep.lora.rank > 0, "> 0"),
        ("lora.alpha", sweep.lora.alpha, sweep.lora.alpha > 0, "> 0"),
        ("lora.dropout", sweep.lora.dropout, 0.0 <= sweep.lora.dropout < 1.0, "in [0, 1)"),
        ("model.detr.num_queries", m.detr.num_queries, m.detr.num_queries > 0, "> 0"),
        ("model.detr.enc_layers", m.detr.enc_layers, m.detr.enc_layers > 0, "> 0"),
        ("model.detr.dec_layers", m.detr.dec_layers, m.detr.dec_layers > 0, "> 0"),
        ("model.detr.nheads", m.detr.nheads, m.detr.nheads > 0 and m.detr.hidden_dim % m.detr.nheads == 0,
         f"> 0 and a divisor of model.detr.hidden_dim ({m.detr.hidden_dim})"),
        ("model.detr.dropout", m.detr.dropout, 0.0 <= m.detr.dropout < 1.0, "in [0, 1)"),
        ("model.faster_rcnn.trainable_backbone_layers", m.faster_rcnn.trainable_backbone_layers,
         m.faster_rcnn.trainable_backbone_layers is None or 0 <= m.faster_rcnn.trainable_backbone_layers <= 5,
         "in [0, 5] or null"),
        ("model.faster_rcnn.box_batch_size_per_image", m.faster_rcnn.box_batch_size_per_image,
         m.faster_rcnn.box_batch_size_per_image > 0, "> 0"),
        ("model.faster_rcnn.rpn_post_nms_top_n_test", m.faster_rcnn.rpn_post_nms_top_n_test,
         m.faster_rcnn.rpn_post_nms_top_n_test >= 100, ">= 100 (100 detections per image are kept)"),
        ("eval.calibration.match_iou", sweep.eval.calibration.match_iou, 0.0 < sweep.eval.calibration.match_iou <= 1.0, "in (0, 1]"),
        ("eval.calibration.bins", sweep.eval.calibration.bins, sweep.eval.calibration.bins > 0, "> 0"),
        ("eval.error_score_threshold", sweep.eval.error_score_threshold, 0.0 <= sweep.eval.error_score_threshold <= 1.0, "in [0, 1]"),
        ("fault_tolerance.max_failures", ft.max_failures, ft.max_failures >= -1, ">= 0, or -1 for unlimited"),
        ("fault_tolerance.checkpoints_to_keep", ft.checkpoints_to_keep, ft.checkpoints_to_keep >= 1, ">= 1"),
        ("scheduler.metric", sweep.scheduler.metric, sweep.scheduler.metric in SCHEDULER_METRICS,
         f"one of {list(SCHEDULER_METRICS)}"),
        ("scheduler.grace_period", sweep.scheduler.grace_period, sweep.scheduler.grace_period >= 1, ">= 1"),
        ("scheduler.reduction_factor", sweep.scheduler.reduction_factor, sweep.scheduler.reduction_factor >= 2, ">= 2"),
        ("max_concurrent_trials", sweep.max_concurrent_trials,
         sweep.max_concurrent_trials is None or sweep.max_concurrent_trials >= 1, ">= 1"),
    ]
    for key, value, holds, allowed in rules:
        if not holds:
            raise fail(key, f"{value!r} must be {allowed}" if not allowed.startswith("one of")
                       else f"{value!r} is not {allowed}")
    for fam in ("detr", "faster_rcnn"):
        w = getattr(m, fam).weights
        named = ("none", "coco") + (("imagenet",) if fam == "faster_rcnn" else ())
        if w not in named and check_paths and not Path(w).expanduser().is_file():
            raise fail(f"model.{fam}.weights", f"{w!r} is neither one of {list(named)} nor an existing "
                       f"checkpoint file")
    if m.faster_rcnn.weights == "coco" and m.faster_rcnn.backbone != "resnet50":
        raise fail("model.faster_rcnn.weights", f"'coco' needs backbone 'resnet50', not {m.faster_rcnn.backbone!r}")
    violation = detr_coco_violation(m.detr)
    if violation is not None:
        raise fail(f"model.detr.{violation[0]}", violation[1])
    if check_paths and d.kind == "coco":
        root = Path(d.root).expanduser()
        if not root.is_dir():
            raise fail("data.root", f"{d.root!r} is not a directory (run `python -m detsweep.data coco2017 "
                       f"--root DIR` first)")
        for part in COCO_LAYOUT:
            if not (root / part).exists():
                raise fail("data.root", f"{d.root!r} has no {part} (a COCO root holds {list(COCO_LAYOUT)})")
    from detsweep.config import REGIMES, resources_for

    check_resources(sweep.resources, "resources", src)
    for regime in sweep.resources_by_regime:
        if regime not in REGIMES:
            raise SweepError(f"{src}: resources_by_regime.{regime}: unknown regime; allowed are {list(REGIMES)}")
        check_resources(resources_for(sweep, regime), f"resources_by_regime.{regime}", src)


def detr_coco_violation(detr: "DetrConfig") -> tuple[str, str] | None:
    """(field, message) of the first `model.detr` setting that the official COCO checkpoint cannot
    load into, or None (also when `weights` is not 'coco')."""
    if detr.weights != "coco":
        return None
    for name, official in DETR_COCO_ARCHITECTURE.items():
        value = getattr(detr, name)
        if value != official:
            return name, (f"{value!r} must be {official!r} with model.detr.weights 'coco' (the official "
                          f"DETR-R50's architecture)")
    for name, most in DETR_COCO_AT_MOST.items():
        value = getattr(detr, name)
        if value > most:
            return name, (f"{value!r} must be <= {most} with model.detr.weights 'coco' (the official DETR-R50 "
                          f"has {most}; a smaller model keeps the first ones)")
    return None


def check_resources(res: "ResourcesConfig", key: str, source: str) -> None:
    g = res.gpus_per_worker
    if g < 0:
        raise SweepError(f"{source}: {key}.gpus_per_worker: {g!r} must be >= 0")
    if res.cpus_per_worker <= 0:
        raise SweepError(f"{source}: {key}.cpus_per_worker: {res.cpus_per_worker!r} must be > 0")
    if res.ddp_workers < 1:
        raise SweepError(f"{source}: {key}.ddp_workers: {res.ddp_workers!r} must be >= 1")
    if g > 1 and g != int(g):
        raise SweepError(f"{source}: {key}.gpus_per_worker: {g!r} must be a whole number when above 1")
    if 0 < g < 1 and res.ddp_workers > 1:
        # Ray packs fractional bundles onto one GPU and NCCL refuses two ranks of one job on a
        # single device (ray-project/ray#48012).
        raise SweepError(f"{source}: {key}.gpus_per_worker: {g!r} is fractional, which needs "
                         f"ddp_workers: 1 (got {res.ddp_workers}); NCCL cannot run two ranks of one "
                         f"trial on one GPU")
    if res.backend == "nccl" and g == 0:
        raise SweepError(f"{source}: {key}.backend: 'nccl' needs gpus_per_worker > 0; use 'gloo' or 'auto'")
