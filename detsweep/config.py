"""The sweep file: typed, frozen dataclasses, loaded once with `yaml.safe_load` and validated
completely before Ray starts. `load_sweep(path)` reads it; `expand(sweep)` gives the trials."""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from detsweep.typed import SweepError, _build, _coerce

# Names the validator accepts. Kept here (not imported from models/) so loading a sweep file
# never imports torch; tests check these equal the models' own registries.
MODELS = {"detr_r50": "detr", "fasterrcnn_r50_fpn": "faster_rcnn"}
REGIMES = ("full", "lora_only", "partial")
LORA_PLACEMENTS = ("attention_only", "attention_ffn", "decoder_only", "qv_only")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


# --------------------------------------------------------------------------------------------
# Sections. Field types drive validation: Literal = enum, `X | None` = optional, tuple = list.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    kind: Literal["synthetic", "coco"] = "synthetic"
    root: str = "~/.cache/detsweep/synthetic"
    train_images: int | None = None  # synthetic: images to generate (64); coco: first N (None/0 = all)
    val_images: int | None = None  # synthetic: 16; coco: first N (None/0 = all)
    image_size: int = 128  # synthetic only
    num_classes: int = 5  # synthetic only
    classes: tuple[str, ...] | None = None  # coco: a class subset by name
    seed: int = 0  # synthetic generation seed
    loader_workers: int = 0


@dataclass(frozen=True)
class DetrConfig:
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    weights: str = "none"  # none | coco | /path/to/checkpoint.pth
    num_queries: int = 100
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    aux_loss: bool = True
    min_size: int | None = None  # resize inside the model; None = feed images as they are
    max_size: int | None = None
    regimes: tuple[Literal["full", "lora_only", "partial"], ...] = REGIMES


@dataclass(frozen=True)
class FasterRCNNConfig:
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    weights: str = "none"  # none | coco | imagenet | /path/to/state_dict.pth
    min_size: int = 800
    max_size: int = 1333
    trainable_backbone_layers: int | None = None  # None: 3 when pretrained, all 5 from scratch
    box_batch_size_per_image: int = 512  # RoIs sampled per image in training (torchvision's default)
    rpn_post_nms_top_n_test: int = 1000  # proposals kept per image in eval (torchvision's default)
    # Faster R-CNN is the baseline: by default only fully fine-tuned (seed 000's matrix).
    regimes: tuple[Literal["full", "partial"], ...] = ("full",)


@dataclass(frozen=True)
class ModelConfig:
    detr: DetrConfig = field(default_factory=DetrConfig)
    faster_rcnn: FasterRCNNConfig = field(default_factory=FasterRCNNConfig)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    placement: Literal["attention_only", "attention_ffn", "decoder_only", "qv_only"] = "attention_only"


@dataclass(frozen=True)
class TrainConfig:
    # The official DETR recipe: AdamW, lr 1e-4 / backbone 1e-5, wd 1e-4, clip 0.1.
    epochs: int = 2
    batch_size_per_worker: int = 2
    lr: float = 1.0e-4
    lr_backbone: float = 1.0e-5
    weight_decay: float = 1.0e-4
    grad_clip: float = 0.1
    lr_schedule: Literal["step", "cosine", "constant"] = "step"
    lr_drop_epoch: int | None = None  # step schedule: x0.1 at this epoch (default 2/3 of epochs)
    warmup_steps: int = 0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    seed: int = 0


@dataclass(frozen=True)
class CalibrationConfig:
    match_iou: float = 0.5
    bins: int = 10


@dataclass(frozen=True)
class EvalConfig:
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    error_score_threshold: float = 0.3
    backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"
    merge_lora: bool = True  # evaluate LoRA trials on merged weights: no adapter cost at inference
    visuals: bool = True  # loss curves + predictions on the first 8 val images (rank 0)


@dataclass(frozen=True)
class ResourcesConfig:
    ddp_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, gloo without


@dataclass(frozen=True)
class FaultToleranceConfig:
    max_failures: int = 0  # Train restarts of a trial's worker group, each from its last checkpoint
    checkpoints_to_keep: int = 2
    on_resume_errored: Literal["resume", "restart", "skip"] = "resume"


@dataclass(frozen=True)
class SchedulerConfig:
    kind: Literal["none", "asha"] = "none"
    metric: str = "ap"  # any reported number: ap, ap50, loss, ece, ...
    mode: Literal["max", "min"] = "max"
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class Sweep:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    resources_by_regime: dict[str, dict[str, Any]] = field(default_factory=dict)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    storage: str = "~/detsweep_results"
    # None: computed from the cluster's resources when the sweep starts. Set it on an autoscaling
    # cluster that starts with no GPU nodes, where the resources present are not the ones to come.
    max_concurrent_trials: int | None = None
    source: str = "<memory>"  # the file it came from, for error messages


@dataclass(frozen=True)
class TrialConfig:
    """One complete trial: what a Train worker needs, and nothing from the grid machinery."""

    sweep: str
    trial_id: str
    model: str  # a key of MODELS
    family: str  # "detr" | "faster_rcnn"
    regime: str
    data: DataConfig
    detr: DetrConfig
    faster_rcnn: FasterRCNNConfig
    lora: LoraConfig | None  # None unless regime == "lora_only"
    train: TrainConfig
    eval: EvalConfig
    resources: ResourcesConfig
    fault_tolerance: FaultToleranceConfig
    storage: str  # <storage>/<sweep name>, expanded
    axes: dict[str, Any]  # the grid values of this trial, by dotted key

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = dict(d)
        for name, typ in (("data", DataConfig), ("detr", DetrConfig), ("faster_rcnn", FasterRCNNConfig),
                          ("train", TrainConfig), ("eval", EvalConfig), ("resources", ResourcesConfig),
                          ("fault_tolerance", FaultToleranceConfig)):
            kwargs[name] = _build(typ, d[name], name, "<trial>")
        kwargs["lora"] = None if d["lora"] is None else _build(LoraConfig, d["lora"], "lora", "<trial>")
        assert set(kwargs) == set(sections), set(kwargs) ^ set(sections)
        return cls(**kwargs)


# What a `data.kind: coco` root must hold (as `python -m detsweep.data coco2017` lays it out).
COCO_LAYOUT = ("images/train2017", "images/val2017", "annotations/instances_train2017.json",
               "annotations/instances_val2017.json")
# Metrics a scheduler may watch: what every epoch reports.
SCHEDULER_METRICS = ("ap", "ap50", "ap75", "ar100", "loss", "ece", "nll", "brier")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_values(sweep: Sweep, check_paths: bool = True, grid_key: str | None = None) -> None:
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
    if m.detr.weights == "coco" and m.detr.backbone != "resnet50":
        raise fail("model.detr.weights", f"'coco' (the official DETR-R50) needs backbone 'resnet50', "
                   f"not {m.detr.backbone!r}")
    if check_paths and d.kind == "coco":
        root = Path(d.root).expanduser()
        if not root.is_dir():
            raise fail("data.root", f"{d.root!r} is not a directory (run `python -m detsweep.data coco2017 "
                       f"--root DIR` first)")
        for part in COCO_LAYOUT:
            if not (root / part).exists():
                raise fail("data.root", f"{d.root!r} has no {part} (a COCO root holds {list(COCO_LAYOUT)})")
    check_resources(sweep.resources, "resources", src)
    for regime in sweep.resources_by_regime:
        if regime not in REGIMES:
            raise SweepError(f"{src}: resources_by_regime.{regime}: unknown regime; allowed are {list(REGIMES)}")
        check_resources(resources_for(sweep, regime), f"resources_by_regime.{regime}", src)


def check_resources(res: ResourcesConfig, key: str, source: str) -> None:
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


def _data_defaults(d: DataConfig) -> DataConfig:
    """Image counts left out mean: synthetic 64 train / 16 val; COCO all of them (0)."""
    fallback = (64, 16) if d.kind == "synthetic" else (0, 0)
    return dataclasses.replace(d, train_images=fallback[0] if d.train_images is None else d.train_images,
                               val_images=fallback[1] if d.val_images is None else d.val_images)


def resources_for(sweep: Sweep, regime: str) -> ResourcesConfig:
    override = sweep.resources_by_regime.get(regime, {})
    return _build(ResourcesConfig, {**dataclasses.asdict(sweep.resources), **override},
                  f"resources_by_regime.{regime}", sweep.source)


def parse_sweep(raw: Any, source: str = "<memory>", *, check_paths: bool = True) -> Sweep:
    """Validate a parsed YAML document into a `Sweep`. Raises `SweepError`."""
    if not isinstance(raw, dict):
        raise SweepError(f"{source}: the sweep file must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    sched = raw.get("scheduler")
    if isinstance(sched, str) or sched is None:
        raw["scheduler"] = {"kind": sched or "none"}
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{source}: grid: {grid!r} must be a mapping of dotted keys to lists")
    raw["grid"] = {}
    sweep = dataclasses.replace(_build(Sweep, raw, "", source), source=source)
    sweep = dataclasses.replace(sweep, data=_data_defaults(sweep.data))
    _check_values(sweep, check_paths)
    sweep = dataclasses.replace(sweep, grid=_check_grid(grid, sweep, check_paths))
    return sweep


def _check_grid(grid: dict[str, Any], sweep: Sweep, check_paths: bool) -> dict[str, tuple[Any, ...]]:
    out = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{sweep.source}: grid.{key}: {values!r} must be a non-empty list")
        if key == "model":
            for v in values:
                if v not in MODELS:
                    raise SweepError(f"{sweep.source}: grid.model: {v!r} is not one of {list(MODELS)}")
        elif key == "regime":
            for v in values:
                if v not in REGIMES:
                    raise SweepError(f"{sweep.source}: grid.regime: {v!r} is not one of {list(REGIMES)}")
        else:
            for v in values:  # each value must be valid where it lands, by type and by value
                _check_values(_apply_axis(sweep, key, v, where=f"grid.{key}"), check_paths, grid_key=key)
        if len(set(map(repr, values))) != len(values):
            raise SweepError(f"{sweep.source}: grid.{key}: {values!r} has repeated values")
        out[key] = tuple(values)
    return out


def _apply_axis(sweep: Sweep, key: str, value: Any, *, where: str) -> Sweep:
    """Return `sweep` with the dotted `key` set to `value`, type-checked."""
    parts = key.split(".")
    settable = ("data", "model", "lora", "train", "eval", "resources", "fault_tolerance")
    if parts[0] not in settable or len(parts) < 2:
        raise SweepError(f"{sweep.source}: {where}: unknown grid key; use 'model', 'regime' or a "
                         f"dotted key under one of {list(settable)}")

    def set_in(obj: Any, path: list[str], prefix: str) -> Any:
        names = [f.name for f in dataclasses.fields(obj)]
        if path[0] not in names:
            raise SweepError(f"{sweep.source}: {where}: unknown key '{prefix}{path[0]}'; allowed keys are {names}")
        cur = getattr(obj, path[0])
        if len(path) == 1:
            new = _coerce(value, typing.get_type_hints(type(obj))[path[0]], where, sweep.source)
        elif dataclasses.is_dataclass(cur):
            new = set_in(cur, path[1:], f"{prefix}{path[0]}.")
        else:
            raise SweepError(f"{sweep.source}: {where}: {prefix}{path[0]} has no sub-keys")
        return dataclasses.replace(obj, **{path[0]: new})

    return set_in(sweep, parts, "")


def load_sweep(path: str | Path, *, check_paths: bool = True) -> Sweep:
    """Read and validate a sweep file. Raises `SweepError` with a one-line message."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise SweepError(f"{path}: not valid YAML{line}: {getattr(e, 'problem', e)}") from None
    return parse_sweep(raw, str(path), check_paths=check_paths)


from detsweep.grid import expand, trial_table  # noqa: E402  (re-exported: config.expand)

__all__ = ["Sweep", "TrialConfig", "SweepError", "load_sweep", "parse_sweep", "expand", "trial_table",
           "resources_for", "MODELS", "REGIMES", "LORA_PLACEMENTS"]
