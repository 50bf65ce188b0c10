"""The sweep file: typed, frozen dataclasses, loaded once with `yaml.safe_load` and validated
completely before Ray starts. `load_sweep(path)` reads it; `expand(sweep)` gives the trials."""
from __future__ import annotations

import dataclasses
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from detsweep.typed import SweepError, _build, _coerce
from detsweep.validate import check_resources, check_values, combination_violation, in_combination_rules

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
    classes: tuple[str, ...] | None = None  # a class subset by name (synthetic: among num_classes')
    seed: int = 0  # synthetic generation seed
    loader_workers: int = 0


@dataclass(frozen=True)
class DetrConfig:
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    weights: str = "none"  # none | imagenet | coco | /path/to/checkpoint.pth
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
    check_values(sweep, check_paths)
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
                check_values(_apply_axis(sweep, key, v, where=f"grid.{key}"), check_paths, grid_key=key)
        if len(set(map(repr, values))) != len(values):
            raise SweepError(f"{sweep.source}: grid.{key}: {values!r} has repeated values")
        out[key] = tuple(values)
    _check_combinations(sweep, out)
    return out


def _check_combinations(sweep: Sweep, grid: dict[str, tuple[Any, ...]]) -> None:
    """Each grid value above was checked alone; rules between keys (`train.lr_drop_epoch` <=
    `train.epochs`, the official checkpoint's DETR shape, ...) must hold for every trial, so check
    every combination of the grid values of their keys (the sweep's own values without such axes)."""
    keys = [k for k in grid if in_combination_rules(k)]
    for values in itertools.product(*(grid[k] for k in keys)):
        combined = sweep
        for key, value in zip(keys, values):
            combined = _apply_axis(combined, key, value, where=f"grid.{key}")
        violation = combination_violation(combined, keys)
        if violation is not None:
            key, message = violation
            raise SweepError(f"{sweep.source}: {'grid.' + key if key in keys else key}: {message}")


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
           "resources_for", "check_resources", "MODELS", "REGIMES", "LORA_PLACEMENTS"]
