"""Value rules of the sweep file that its types cannot express: ranges, files that must exist, rules
between keys, and the resources rule for fractional GPUs. Each violation is one line naming the
file, the dotted key (`grid.<key>` for a grid value), the value and what is allowed."""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pyarrow as pa

from detsweep.data import sources
from detsweep.data.synthetic import domain_classes
from detsweep.models import registry
from detsweep.results import CONFIG_COLUMNS, DRIVER_COLUMNS, RESULTS_SCHEMA
from detsweep.sweep.bases import base_name
from detsweep.sweep.cost import pricing
from detsweep.sweep.spec import DataConfig, DetrConfig, ResourcesConfig, SearchConfig, Sweep, resources_for
from detsweep.sweep.typed import SweepError


# Loading a sweep checks of a `data.kind: coco` dataset only that its annotation files are there (its
# layout recognised by `detsweep.data.sources`, stdlib only): a cluster's head holds only these
# (cluster.yaml). Their content is checked by `detsweep.run` before Ray starts, the images where they are.
# Keys whose rules span other keys (see `combination_violation`): checked on every combination of their
# grid values, since each value alone says nothing about the trials it lands in.
COMBINATION_KEYS = ("train.epochs", "train.lr_drop_epoch", "data.kind", "data.num_classes", "data.classes",
                    "data.domain", "eval.every", "data.augment")
COMBINATION_PREFIXES = ("model.detr.",)
# Metrics a scheduler may watch: what every epoch reports.
SCHEDULER_METRICS = ("ap", "ap50", "ap75", "ar100", "loss", "ece", "nll", "brier")
# What a search may optimise: a number every epoch's report carries (the searcher sees the last one), or
# cost_usd, which the driver computes from the report's worker_s and the sweep's prices.
_NOT_REPORTED = ({c.name for c in CONFIG_COLUMNS} | DRIVER_COLUMNS
                 | {"epochs_completed", "n_skipped_images", "n_skipped_boxes"})
SEARCH_METRICS = tuple(f.name for f in RESULTS_SCHEMA if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
                       and f.name not in _NOT_REPORTED) + ("cost_usd",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
BACKBONE_PREFIX = "backbone:"  # as models/vit_weights.py (torch-free here)
# `model.detr.weights: coco` is the official DETR-R50 (detr-r50-e632da11.pth, the official main.py
# defaults): these settings must equal its own, and its queries and decoder layers can only be cut.
DETR_COCO_ARCHITECTURE = {"backbone": "resnet50", "hidden_dim": 256, "nheads": 8, "enc_layers": 6,
                          "dim_feedforward": 2048}
DETR_COCO_AT_MOST = {"num_queries": 100, "dec_layers": 6}


def _value_rules(sweep: Sweep) -> list[tuple[str, object, bool, str]]:
    """(dotted key, value, whether the rule holds, what is allowed) for every one-key value rule."""
    d, m, t, ft = sweep.data, sweep.model, sweep.train, sweep.fault_tolerance
    ts = sweep.two_stage
    return [
        ("data.train_images", d.train_images, d.train_images > 0 or d.kind == "coco" and d.train_images == 0, "> 0 (coco: 0 = all)"),
        ("data.val_images", d.val_images, d.val_images > 0 or d.kind == "coco" and d.val_images == 0, "> 0 (coco: 0 = all)"),
        ("data.image_size", d.image_size, d.image_size >= 32, ">= 32"),
        ("data.num_classes", d.num_classes, 1 <= d.num_classes <= len(domain_classes(d.domain)),
         f"in [1, {len(domain_classes(d.domain))}] (the {d.domain} domain's classes)"),
        ("data.loader_workers", d.loader_workers, d.loader_workers is None or d.loader_workers >= 0,
         ">= 0, or null (from the worker's CPUs)"),
        ("data.classes", d.classes, d.classes is None or 0 < len(d.classes) == len(set(d.classes)),
         "null or a non-empty list of distinct class names"),
        ("train.epochs", t.epochs, t.epochs > 0, "> 0"),
        ("train.batch_size_per_worker", t.batch_size_per_worker, t.batch_size_per_worker > 0, "> 0"),
        ("train.lr", t.lr, t.lr > 0, "> 0"),
        ("train.lr_backbone", t.lr_backbone, t.lr_backbone >= 0, ">= 0"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("train.grad_clip", t.grad_clip, t.grad_clip >= 0, ">= 0 (0 = off)"),
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("train.lr_drop_epoch", t.lr_drop_epoch, t.lr_drop_epoch is None or t.lr_drop_epoch > 0, "> 0"),
        ("lora.rank", sweep.lora.rank, sweep.lora.rank > 0, "> 0"),
        ("two_stage.stage1.epochs", ts.stage1.epochs, ts.stage1.epochs >= 1, ">= 1"),
        ("two_stage.stage1.lr", ts.stage1.lr, ts.stage1.lr > 0, "> 0"),
        ("two_stage.stage2.lr", ts.stage2.lr, ts.stage2.lr > 0, "> 0"),
        ("two_stage.stage2.lr_backbone", ts.stage2.lr_backbone, ts.stage2.lr_backbone is None
         or ts.stage2.lr_backbone >= 0, ">= 0, or null (train.lr_backbone / train.lr times two_stage.stage2.lr)"),
        ("lora.alpha", sweep.lora.alpha, sweep.lora.alpha > 0, "> 0"),
        ("lora.dropout", sweep.lora.dropout, 0.0 <= sweep.lora.dropout < 1.0, "in [0, 1)"),
        ("model.detr.num_queries", m.detr.num_queries, m.detr.num_queries > 0, "> 0"),
        ("model.detr.hidden_dim", m.detr.hidden_dim, m.detr.hidden_dim > 0 and m.detr.hidden_dim % 2 == 0,
         "> 0 and even (half of it encodes y, half x)"),
        ("model.detr.dim_feedforward", m.detr.dim_feedforward, m.detr.dim_feedforward > 0, "> 0"),
        ("model.detr.enc_layers", m.detr.enc_layers, m.detr.enc_layers > 0, "> 0"),
        ("model.detr.dec_layers", m.detr.dec_layers, m.detr.dec_layers > 0, "> 0"),
        ("model.detr.nheads", m.detr.nheads, m.detr.nheads > 0 and m.detr.hidden_dim % m.detr.nheads == 0,
         f"> 0 and a divisor of model.detr.hidden_dim ({m.detr.hidden_dim})"),
        ("model.detr.dropout", m.detr.dropout, 0.0 <= m.detr.dropout < 1.0, "in [0, 1)"),
        ("model.detr.focal_alpha", m.detr.focal_alpha, 0.0 <= m.detr.focal_alpha <= 1.0, "in [0, 1]"),
        ("model.detr.focal_gamma", m.detr.focal_gamma, m.detr.focal_gamma >= 0, ">= 0"),
        *((f"model.detr.loss_weights.{k}", v, v >= 0, ">= 0") for k, v in vars(m.detr.loss_weights).items()),
        ("model.detr.loss_weights", vars(m.detr.loss_weights), any(vars(m.detr.loss_weights).values()),
         "not all 0 (the matcher needs a cost)"),
        *((f"model.detr.{k}", getattr(m.detr, k), getattr(m.detr, k) is None or getattr(m.detr, k) > 0, "> 0 or null")
          for k in ("min_size", "max_size")),
        *((f"model.faster_rcnn.{k}", getattr(m.faster_rcnn, k), getattr(m.faster_rcnn, k) > 0, "> 0")
          for k in ("min_size", "max_size")),
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
        ("eval.calibration.score_threshold", sweep.eval.calibration.score_threshold,
         0.0 <= sweep.eval.calibration.score_threshold <= 1.0, "in [0, 1]"),
        ("fault_tolerance.max_failures", ft.max_failures, ft.max_failures >= -1, ">= 0, or -1 for unlimited"),
        ("fault_tolerance.keep", ft.keep, ft.keep >= 1, ">= 1"),
        ("train.accumulate", t.accumulate, t.accumulate >= 1, ">= 1"),
        ("train.patience", t.patience, t.patience is None or t.patience >= 1, ">= 1 evaluations, or null (off)"),
        ("train.ema.decay", t.ema and t.ema.decay, t.ema is None or 0.0 < t.ema.decay < 1.0, "in (0, 1)"),
        ("train.ema.warmup_steps", t.ema and t.ema.warmup_steps, t.ema is None or t.ema.warmup_steps >= 0, ">= 0"),
        ("train.profile.active", t.profile and t.profile.active, t.profile is None or t.profile.active >= 1, ">= 1"),
        ("train.profile.wait", t.profile and t.profile.wait, t.profile is None or min(t.profile.wait, t.profile.warmup) >= 0,
         ">= 0 (and warmup >= 0)"),
        ("eval.every", sweep.eval.every, sweep.eval.every >= 1, ">= 1 epochs"),
        ("scheduler.metric", sweep.scheduler.metric, sweep.scheduler.metric in SCHEDULER_METRICS,
         f"one of {list(SCHEDULER_METRICS)}"),
        ("scheduler.grace_period", sweep.scheduler.grace_period, sweep.scheduler.grace_period >= 1, ">= 1"),
        ("scheduler.reduction_factor", sweep.scheduler.reduction_factor, sweep.scheduler.reduction_factor >= 2, ">= 2"),
        ("max_concurrent_trials", sweep.max_concurrent_trials,
         sweep.max_concurrent_trials is None or sweep.max_concurrent_trials >= 1, ">= 1"),
    ]


def check_values(sweep: Sweep, check_paths: bool = True, grid_key: str | None = None) -> None:
    """Value rules the types cannot express, key by key (rules between keys: `combination_violation`).
    `check_paths=False` skips data and checkpoint files (a --dry-run plans a cluster's sweep on a
    laptop that lacks them). When checking one grid value, `grid_key` is its dotted key and errors
    name it as `grid.<key>`."""
    src = sweep.source

    def fail(key: str, message: str) -> SweepError:
        return SweepError(f"{src}: {'grid.' + key if key == grid_key else key}: {message}")

    if not _NAME.match(sweep.name):
        raise fail("name", f"{sweep.name!r} must be letters, digits, '_', '-' or '.' (it names a folder)")
    d, m = sweep.data, sweep.model
    for key, value, holds, allowed in _value_rules(sweep):
        if not holds:
            raise fail(key, f"{value!r} must be {allowed}" if not allowed.startswith("one of")
                       else f"{value!r} is not {allowed}")
    for fam in ("detr", "faster_rcnn"):
        w = getattr(m, fam).weights
        named = registry.NAMED_WEIGHTS
        file = w.removeprefix(BACKBONE_PREFIX)  # `backbone:PATH`: a ViT backbone's own checkpoint file
        if w not in named and base_name(w) is None and check_paths and not Path(file).expanduser().is_file():
            raise fail(f"model.{fam}.weights", f"{w!r} is neither one of {list(named)} nor an existing "
                       f"checkpoint file")
    if m.faster_rcnn.weights == "lvd142m" or m.faster_rcnn.weights.startswith(BACKBONE_PREFIX):
        raise fail("model.faster_rcnn.weights", f"{m.faster_rcnn.weights!r} is for DETR's ViT backbones; Faster "
                   f"R-CNN takes one of ['none', 'coco', 'imagenet'] or a checkpoint file")
    if m.faster_rcnn.weights == "coco" and m.faster_rcnn.backbone != "resnet50":
        raise fail("model.faster_rcnn.weights", f"'coco' needs backbone 'resnet50', not {m.faster_rcnn.backbone!r}")
    violation = data_violation(d, check_paths)
    if violation is not None:
        raise fail(*violation)
    check_resources(sweep.resources, "resources", src, grid_key)
    for regime in sweep.resources_by_regime:
        if regime not in registry.REGIMES:
            raise SweepError(f"{src}: resources_by_regime.{regime}: unknown regime; allowed are "
                             f"{list(registry.REGIMES)}")
        check_resources(resources_for(sweep, regime), f"resources_by_regime.{regime}", src)


def data_violation(d: DataConfig, check_paths: bool) -> tuple[str, str] | None:
    """(dotted key, message) of the first rule of the data section that `d` breaks, or None. With
    `check_paths`, a coco dataset's annotation files must be there (its layout recognised); its
    images are checked where they are, before Ray (`detsweep.run`) and by the workers."""
    explicit = [n for n in sources.SPLITS if getattr(d, n) is not None]
    if d.kind == "synthetic":
        if explicit:
            return f"data.{explicit[0]}", "needs data.kind 'coco' (the synthetic data makes its own splits)"
        return ("data.format", f"{d.format!r} needs data.kind 'coco'") if d.format != "auto" else None
    if explicit and (d.train is None or d.val is None):
        return (f"data.{'train' if d.train is None else 'val'}", "missing: data.train and data.val go together, "
                "each {annotations: FILE, images: DIR}")
    if not explicit and d.format == "coco":
        return "data.format", ("'coco' (plain COCO files) needs data.train and data.val; a data.root takes one "
                               f"of {[f for f in sources.FORMATS if f != 'coco']}")
    if not check_paths:
        return None
    for name in explicit:
        ann = getattr(d, name).annotations
        if not Path(ann).expanduser().is_file():
            return f"data.{name}.annotations", f"{ann!r} is not a file"
    if explicit:
        return None
    if not Path(d.root).expanduser().is_dir():
        return "data.root", (f"{d.root!r} is not a directory (run `python -m detsweep.data coco2017 --root DIR` "
                             f"first)")
    try:
        sources.root_layout(d.root, d.format)
    except sources.SourceError as e:
        return e.key, str(e)
    return None


def in_combination_rules(key: str) -> bool:
    """Whether the dotted grid `key` takes part in a rule between keys (`combination_violation`)."""
    return key in COMBINATION_KEYS or key.startswith(COMBINATION_PREFIXES)


def combination_violation(sweep: Sweep, grid_keys: Collection[str] = ()) -> tuple[str, str] | None:
    """(dotted key, message) of the first rule between keys that `sweep` (one trial's values) breaks,
    or None. Of a broken rule's keys the first is named, unless only a later one is in `grid_keys`:
    then that one is, so the error reads `grid.<key>` with the grid value that breaks it."""

    def named(*choices: tuple[str, str]) -> tuple[str, str]:
        return next((c for c in choices if c[0] in grid_keys), choices[0])

    t, d, sched = sweep.train, sweep.data, sweep.scheduler
    if t.lr_drop_epoch is not None and t.lr_drop_epoch > t.epochs:
        why = "(the step schedule lowers the rate at that epoch)"
        return named(("train.lr_drop_epoch", f"{t.lr_drop_epoch!r} must be <= train.epochs ({t.epochs}) {why}"),
                     ("train.epochs", f"{t.epochs!r} must be >= train.lr_drop_epoch ({t.lr_drop_epoch}) {why}"))
    if sched.kind == "asha" and sched.grace_period > t.epochs:
        why = "with scheduler asha (no trial is stopped before grace_period epochs)"
        return named(("scheduler.grace_period", f"{sched.grace_period!r} must be <= train.epochs ({t.epochs}) {why}"),
                     ("train.epochs", f"{t.epochs!r} must be >= scheduler.grace_period ({sched.grace_period}) {why}"))
    every = sweep.eval.every
    if sched.kind == "asha" and sched.grace_period % every and sched.grace_period < t.epochs:
        # A trial reports only on evaluated epochs: ASHA's first rung would see no result of its own epoch.
        why = (f"with scheduler asha and eval.every {every} (results come only at epochs {every}, {2 * every}, ... "
               f"and the last)")
        return named(("scheduler.grace_period", f"{sched.grace_period!r} must be a multiple of eval.every {why}"),
                     ("eval.every", f"{every!r} must divide scheduler.grace_period ({sched.grace_period}) {why}"))
    # The synthetic generator draws the first data.num_classes of its domain's classes (torch-free module).
    made = [c.name for c in domain_classes(d.domain, d.num_classes)]
    every = [c.name for c in domain_classes(d.domain)]
    if d.kind == "synthetic" and d.classes is not None and not set(d.classes) <= set(made):
        # Synthetic classes are chosen with data.num_classes; data.classes can only pick among those.
        classes = list(d.classes)
        return named(("data.classes", f"{classes!r} must be among the synthetic classes that data.num_classes "
                                      f"{d.num_classes} makes, {made} (a subset by other names needs data.kind "
                                      f"'coco')"),
                     ("data.num_classes", f"{d.num_classes!r} makes the synthetic classes {made}, which lack some "
                                          f"of data.classes {classes}; the order is {every}"),
                     ("data.kind", f"'synthetic' makes {made} (data.num_classes {d.num_classes}), which lack some "
                                   f"of data.classes {classes}"))
    if d.augment in ("detr", "photometric") and sweep.model.detr.min_size is not None:
        # The recipe resizes (multi-scale in training, 800 / 1333 in eval); a model resize on top would be a second.
        return named(("model.detr.min_size", f"{sweep.model.detr.min_size!r} must be null with data.augment "
                                             f"{d.augment!r}: the recipe resizes the images already"),
                     ("data.augment", f"{d.augment!r} resizes the images itself, so model.detr.min_size must be "
                                      f"null (it is {sweep.model.detr.min_size})"))
    violation = detr_coco_violation(sweep.model.detr) or detr_backbone_weights_violation(sweep.model.detr)
    if violation is not None:
        return f"model.detr.{violation[0]}", violation[1]
    return None


def detr_backbone_weights_violation(detr: DetrConfig) -> tuple[str, str] | None:
    """(field, message) when `model.detr.weights` names weights its backbone does not have, or None."""
    w, bb = detr.weights, detr.backbone
    if w.startswith(BACKBONE_PREFIX) and bb not in registry.VIT_BACKBONES:
        return "weights", (f"{w!r}: backbone:PATH loads a ViT backbone's own file; {bb!r} takes 'imagenet' or a "
                           f"DETR checkpoint")
    if w in registry.NAMED_WEIGHTS and w not in registry.BACKBONE_WEIGHTS[bb]:
        return "weights", f"{w!r} does not exist for backbone {bb!r}; it has {list(registry.BACKBONE_WEIGHTS[bb])}"
    return None


def detr_coco_violation(detr: DetrConfig) -> tuple[str, str] | None:
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


def check_resources(res: ResourcesConfig, key: str, source: str, grid_key: str | None = None) -> None:
    """The resources rules for `res`, found under `key` (`resources`, `resources_by_regime.<regime>`).
    When checking one grid value, `grid_key` is its dotted key: a rule it breaks names `grid.<key>`."""

    def fail(field: str, message: str) -> SweepError:
        name = f"{key}.{field}"
        return SweepError(f"{source}: {'grid.' + name if name == grid_key else name}: {message}")

    g = res.gpus_per_worker
    if g < 0:
        raise fail("gpus_per_worker", f"{g!r} must be >= 0")
    if res.cpus_per_worker <= 0:
        raise fail("cpus_per_worker", f"{res.cpus_per_worker!r} must be > 0")
    if res.ddp_workers < 1:
        raise fail("ddp_workers", f"{res.ddp_workers!r} must be >= 1")
    if g > 1 and g != int(g):
        raise fail("gpus_per_worker", f"{g!r} must be a whole number when above 1")
    if 0 < g < 1 and res.ddp_workers > 1:
        # Ray packs fractional bundles onto one GPU and NCCL refuses two ranks of one job on a
        # single device (ray-project/ray#48012).
        why = "NCCL cannot run two ranks of one trial on one GPU"
        if grid_key == f"{key}.ddp_workers":
            raise fail("ddp_workers", f"{res.ddp_workers!r} must be 1 with a fractional gpus_per_worker ({g}); {why}")
        raise fail("gpus_per_worker", f"{g!r} is fractional, which needs ddp_workers: 1 (got {res.ddp_workers}); {why}")
    if res.backend == "nccl" and g == 0:
        if grid_key == f"{key}.gpus_per_worker":
            raise fail("gpus_per_worker", f"{g!r} must be > 0 with backend 'nccl'; use backend 'gloo' or 'auto'")
        raise fail("backend", "'nccl' needs gpus_per_worker > 0; use 'gloo' or 'auto'")


@functools.lru_cache(maxsize=64)
def lora_targets_violation(model: str, detector: Any, targets: tuple[str, ...]) -> str | None:
    """Why `lora.targets` cannot adapt `model` built from its section `detector`, or None: a pattern that
    matches no module (the message lists a few real names) or one that matches a module other than an
    nn.Linear / nn.MultiheadAttention (named, with its type).

    The module names come from the real builder, run on torch's meta device (no memory, no weights, about a
    second): a hand-kept table of names would drift from the models. torch is imported here, lazily, and only
    for a sweep that sets `lora.targets`, so `detsweep.sweep` itself still imports without torch."""
    import torch

    from detsweep.models import build_model
    from detsweep.models.lora_targets import matched_names

    with torch.device("meta"):
        built = build_model(model, dataclasses.replace(detector, weights="none"), num_classes=2)
    try:
        matched_names(built, targets, each_must_match=True)
    except ValueError as e:
        return str(e)
    return None


def search_objectives(search: SearchConfig, source: str) -> list[tuple[str, str]]:
    """`search.objectives` as (metric, 'max' | 'min') pairs, in the syntax of `detsweep.frontier
    --objectives`; one SweepError line naming the bad entry."""
    if not search.objectives:
        raise SweepError(f"{source}: search.objectives: [] must name at least one objective, e.g. [ap:max]")
    out: list[tuple[str, str]] = []
    for i, text in enumerate(search.objectives):
        metric, _, mode = (s.strip() for s in text.partition(":"))
        if mode not in ("max", "min"):
            raise SweepError(f"{source}: search.objectives[{i}]: {text!r} is not METRIC:max or METRIC:min")
        if metric not in SEARCH_METRICS:
            raise SweepError(f"{source}: search.objectives[{i}]: {metric!r} is not a reported metric; use one of "
                             f"{list(SEARCH_METRICS)}")
        if metric in (m for m, _ in out):
            raise SweepError(f"{source}: search.objectives[{i}]: {metric!r} is given twice")
        out.append((metric, mode))
    return out


def check_search_and_cost(sweep: Sweep) -> None:
    """The `search:` section's own rules (its space is checked by sweep/search.py, which knows the grid)
    and the `cost:` section's prices (sweep/cost.py)."""
    src, search = sweep.source, sweep.search
    prices = pricing(sweep.cost, src)
    if search is None:
        return
    if search.num_samples < 1:
        raise SweepError(f"{src}: search.num_samples: {search.num_samples!r} must be >= 1")
    objectives = search_objectives(search, src)
    if prices is None and "cost_usd" in (m for m, _ in objectives):
        raise SweepError(f"{src}: search.objectives: cost_usd needs prices: cost.usd_per_gpu_hour and "
                         f"cost.usd_per_cpu_hour, or cost.node_types")
    if sweep.scheduler.kind == "asha" and len(objectives) > 1:
        raise SweepError(f"{src}: scheduler: 'asha' cannot stop trials of a multi-objective search "
                         f"({len(objectives)} objectives): Optuna cannot prune multi-objective studies, and ASHA "
                         f"would judge trials by scheduler.metric alone; use scheduler: none, or one objective")
