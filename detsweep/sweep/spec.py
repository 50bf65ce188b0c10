"""The sweep file's sections and one trial's config: typed, frozen dataclasses. The field types are the
schema (`typed.py`): Literal = enum, `X | None` = optional, tuple = list. Name tables come from
`detsweep.models.registry`, the one place they are kept."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from detsweep.data import sources
from detsweep.models import registry
from detsweep.sweep.typed import build

Backbone = Literal[registry.BACKBONES]  # Literal[("a", "b")] is Literal["a", "b"]
Regime = Literal[registry.REGIMES]
Placement = Literal[registry.LORA_PLACEMENTS]


# --------------------------------------------------------------------------------------------
# Sections. Field types drive validation: Literal = enum, `X | None` = optional, tuple = list.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitConfig:
    """One explicit split: a COCO-format annotation file and the folder its file_names are relative to."""

    annotations: str
    images: str | None = None  # None: beside the file (Roboflow), or images/<subset> next to annotations/


@dataclass(frozen=True)
class DataConfig:
    kind: Literal["synthetic", "coco"] = "synthetic"
    root: str = "~/.cache/detsweep/synthetic"
    # coco: the layout of `root` (auto: recognised from the folder), or the quirks of explicit splits.
    format: Literal[sources.FORMATS] = "auto"
    train: SplitConfig | None = None  # coco: explicit splits instead of `root`
    val: SplitConfig | None = None
    test: SplitConfig | None = None  # checked, not trained or evaluated on
    on_invalid: Literal["error", "skip"] = "error"  # a bad box / image / id: refuse the run, or drop it
    image_check: Literal["header", "none"] = "header"  # a run's image check (--skip-image-check: none)
    train_images: int | None = None  # synthetic: images to generate (64); coco: first N (None/0 = all)
    val_images: int | None = None  # synthetic: 16; coco: first N (None/0 = all)
    image_size: int = 128  # synthetic only
    num_classes: int = 5  # synthetic only
    classes: tuple[str, ...] | None = None  # a class subset by name (synthetic: among num_classes')
    seed: int = 0  # synthetic generation seed
    domain: Literal["source", "target"] = "source"  # synthetic only: the transfer task's two domains
    augment: Literal["none", "hflip", "detr", "photometric"] = "hflip"  # training augmentation (data/transforms.py)
    loader_workers: int | None = None  # DataLoader processes per DDP worker; null: min(8, cpus_per_worker - 1) with a GPU, else 0


@dataclass(frozen=True)
class LossWeights:
    """DETR's loss weights, also its matcher's costs (the official defaults are 1/5/2 for both)."""

    ce: float = 1.0  # the class loss (cross-entropy, or focal with class_loss: focal)
    bbox: float = 5.0  # L1 on cxcywh-normalised boxes
    giou: float = 2.0  # 1 - GIoU


@dataclass(frozen=True)
class DetrConfig:
    backbone: Backbone = "resnet50"
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
    regimes: tuple[Regime, ...] = registry.FAMILY_REGIMES["detr"]
    # ce: the official softmax cross-entropy over K+1; focal: Deformable DETR's sigmoid focal loss (and its
    # matcher cost, sigmoid scores)
    class_loss: Literal["ce", "focal"] = "ce"
    focal_alpha: float = 0.25  # Deformable DETR's defaults
    focal_gamma: float = 2.0
    loss_weights: LossWeights = field(default_factory=LossWeights)


@dataclass(frozen=True)
class FasterRCNNConfig:
    backbone: Literal[registry.FASTER_RCNN_BACKBONES] = "resnet50"
    weights: str = "none"  # none | coco | imagenet | /path/to/state_dict.pth
    min_size: int = 800
    max_size: int = 1333
    trainable_backbone_layers: int | None = None  # None: 3 when pretrained, all 5 from scratch
    box_batch_size_per_image: int = 512  # RoIs sampled per image in training (torchvision's default)
    rpn_post_nms_top_n_test: int = 1000  # proposals kept per image in eval (torchvision's default)
    # Faster R-CNN is the baseline: by default only fully fine-tuned (seed 000's matrix).
    regimes: tuple[Literal[registry.FAMILY_REGIMES["faster_rcnn"]], ...] = ("full",)


@dataclass(frozen=True)
class ModelConfig:
    detr: DetrConfig = field(default_factory=DetrConfig)
    faster_rcnn: FasterRCNNConfig = field(default_factory=FasterRCNNConfig)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    placement: Placement = "attention_only"  # a preset of module-name patterns (models/lora_targets.py)
    # Module-name patterns (regular expressions on named_modules() names) instead of the placement: each
    # must match an nn.Linear / nn.MultiheadAttention (or its .q/.k/.v) of the trial's model.
    targets: tuple[str, ...] | None = None


@dataclass(frozen=True)
class EmaConfig:
    """An exponential moving average of the trainable weights, used for evaluation and the best checkpoint."""

    decay: float = 0.9998
    warmup_steps: int = 2000  # the decay ramps up as decay * (1 - exp(-step / warmup_steps)); 0: constant


@dataclass(frozen=True)
class ProfileConfig:
    """A torch.profiler trace of a few optimizer steps of the first epoch (torch.profiler.schedule)."""

    wait: int = 1
    warmup: int = 1
    active: int = 3


@dataclass(frozen=True)
class Stage1Config:
    """two_stage's first stage: the heads only (class and box heads; backbone, transformer and queries frozen and
    run under no_grad), for `epochs` of `train.epochs`, at `lr`."""

    epochs: int = 1
    lr: float = 1.0e-3


@dataclass(frozen=True)
class Stage2Config:
    """two_stage's second stage: `regime` for the remaining epochs, with a fresh optimizer and schedule at `lr`
    (`lr_backbone` null: `train.lr_backbone / train.lr` times `lr`, the official 1:10)."""

    regime: Literal[registry.STAGE2_REGIMES] = "full"
    lr: float = 1.0e-5
    lr_backbone: float | None = None


@dataclass(frozen=True)
class TwoStageConfig:
    """`two_stage:` of a `regime: two_stage` trial (linear probe, then fine-tune; seed 003's recipe)."""

    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)


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
    accumulate: int = 1  # optimizer steps every N batches: an effective batch of N x batch x ddp_workers
    ema: EmaConfig | None = None  # off unless given
    patience: int | None = None  # stop after N evaluations without a better eval.best_metric
    profile: ProfileConfig | None = None  # off unless given


@dataclass(frozen=True)
class CalibrationConfig:
    match_iou: float = 0.5
    bins: int = 10
    # D-ECE (Küppers et al. 2020): only detections scoring at least this count; IoU 0.5 and 10 bins are fixed.
    score_threshold: float = 0.3


@dataclass(frozen=True)
class EvalConfig:
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    error_score_threshold: float = 0.3
    backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"
    merge_lora: bool = True  # evaluate LoRA trials on merged weights: no adapter cost at inference
    visuals: bool = True  # loss curves + predictions on the first 8 val images (rank 0)
    every: int = 1  # evaluate every N epochs, and always after the last
    best_metric: Literal["ap", "ap50", "ap75", "ar100", "val_loss"] = "ap"  # the best checkpoint's (val_loss: lowest)


@dataclass(frozen=True)
class ResourcesConfig:
    ddp_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, gloo without


@dataclass(frozen=True)
class FaultToleranceConfig:
    max_failures: int = 0  # Train restarts of a trial's worker group, each from its last checkpoint
    keep: int = 2  # the last K checkpoints (the best one is kept besides, in best/)
    on_resume_errored: Literal["resume", "restart", "skip"] = "resume"


@dataclass(frozen=True)
class SchedulerConfig:
    kind: Literal["none", "asha"] = "none"
    metric: str = "ap"  # any reported number: ap, ap50, loss, ece, ...
    mode: Literal["max", "min"] = "max"
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class SearchConfig:
    """`search:`: trials sampled from a space by Optuna (Ray Tune's OptunaSearch) instead of the grid's
    product; the grid may fix keys (one value each). The space's entries are parsed by sweep/search.py."""

    kind: Literal["optuna"] = "optuna"
    num_samples: int = 16
    objectives: tuple[str, ...] = ("ap:max",)  # COLUMN:DIRECTION, as `detsweep.frontier --objectives`
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"  # TPE and NSGA-II both take several objectives
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)  # dotted key -> {choice: [...]} | {loguniform: [lo, hi]} ...


@dataclass(frozen=True)
class CostConfig:
    """`cost:`: the user's prices (the cloud's on-demand or spot price), flat or per node type of
    cluster.yaml, and an optional time estimate for `--dry-run`. See sweep/cost.py."""

    usd_per_gpu_hour: float | None = None
    usd_per_cpu_hour: float | None = None
    node_types: dict[str, float] = field(default_factory=dict)  # cluster.yaml node type name -> USD per node-hour
    cluster: str = "cluster.yaml"  # the file whose available_node_types node_types names
    expected_minutes: float | None = None  # one trial's worker time, for --dry-run's cost estimate


@dataclass(frozen=True)
class BaseConfig:
    """A base to fine-tune from (`model.<family>.weights: base:NAME`): pretrained once by detsweep on
    `data` with `train`, starting from `weights`, in the architecture of the trial that uses it (of the sweep's
    `model.<family>` for `model` when it is another model's base's `weights: base:NAME`)."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=lambda: ResourcesConfig(ddp_workers=1))
    # none | imagenet | coco | a checkpoint path | base:OTHER (another base, built first): what it starts from
    weights: str = "none"
    # The model this base is, when another model's base starts from it (`weights: base:NAME` there); None:
    # the model of whatever uses it.
    model: str | None = None


@dataclass(frozen=True)
class Sweep:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    two_stage: TwoStageConfig = field(default_factory=TwoStageConfig)  # used by `regime: two_stage` only
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    resources_by_regime: dict[str, dict[str, Any]] = field(default_factory=dict)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # Single trials beside the grid's product: each a mapping of `model`, `regime` and dotted keys to one value
    # (the sweep's sections give the rest, not the grid), pruned and named like grid trials.
    extra_trials: tuple[dict[str, Any], ...] = ()
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    bases: dict[str, BaseConfig] = field(default_factory=dict)  # base:NAME weights, see sweep/bases.py
    search: SearchConfig | None = None  # None: the grid's trials; else sampled (sweep/search.py)
    cost: CostConfig = field(default_factory=CostConfig)
    storage: str = "~/detsweep_results"
    # None: computed from the cluster's resources when the sweep starts. Set it on an autoscaling
    # cluster that starts with no GPU nodes, where the resources present are not the ones to come.
    max_concurrent_trials: int | None = None
    source: str = "<memory>"  # the file it came from, for error messages


@dataclass(frozen=True)
class TrialConfig:
    """One complete trial: what a Train worker needs, and nothing from the grid machinery. It holds
    only its own model family's settings (`detector`), so a key of the other family never makes two
    trials differ (`--resume`)."""

    sweep: str
    trial_id: str
    model: str  # a key of registry.MODELS
    family: str  # registry.MODELS[model]: "detr" | "faster_rcnn"
    regime: str
    data: DataConfig
    detector: DetrConfig | FasterRCNNConfig  # model.<family>
    lora: LoraConfig | None  # None unless the trial has adapters (lora_only, or two_stage into lora_only)
    train: TrainConfig
    eval: EvalConfig
    resources: ResourcesConfig
    fault_tolerance: FaultToleranceConfig
    storage: str  # <storage>/<sweep name>, expanded
    axes: dict[str, Any]  # the grid values of this trial, by dotted key
    base_run: str | None = None  # weights `base:NAME`: the base's Ray Train run, whose latest checkpoint it loads
    two_stage: TwoStageConfig | None = None  # None unless regime == "two_stage"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialConfig":
        kwargs = dict(d)
        for name, typ in (("data", DataConfig), ("train", TrainConfig), ("eval", EvalConfig),
                          ("resources", ResourcesConfig), ("fault_tolerance", FaultToleranceConfig)):
            kwargs[name] = build(typ, d[name], name, "<trial>")
        kwargs["detector"] = build(FAMILY_SECTIONS[d["family"]], d["detector"], "detector", "<trial>")
        kwargs["lora"] = None if d["lora"] is None else build(LoraConfig, d["lora"], "lora", "<trial>")
        if d.get("two_stage") is not None:
            kwargs["two_stage"] = build(TwoStageConfig, d["two_stage"], "two_stage", "<trial>")
        return cls(**kwargs)


FAMILY_SECTIONS: dict[str, type] = {"detr": DetrConfig, "faster_rcnn": FasterRCNNConfig}
assert set(FAMILY_SECTIONS) == set(registry.FAMILIES)


def data_defaults(d: DataConfig) -> DataConfig:
    """Image counts left out mean: synthetic 64 train / 16 val; COCO all of them (0)."""
    fallback = (64, 16) if d.kind == "synthetic" else (0, 0)
    return dataclasses.replace(d, train_images=fallback[0] if d.train_images is None else d.train_images,
                               val_images=fallback[1] if d.val_images is None else d.val_images)


def has_adapters(regime: str, two_stage: TwoStageConfig) -> bool:
    """Whether a trial of `regime` carries LoRA adapters: lora_only, or a two_stage whose second stage is."""
    return regime == "lora_only" or (regime == "two_stage" and two_stage.stage2.regime == "lora_only")


def resources_for(sweep: Sweep, regime: str) -> ResourcesConfig:
    """`resources` with `resources_by_regime.<regime>`'s overrides."""
    override = sweep.resources_by_regime.get(regime, {})
    return build(ResourcesConfig, {**dataclasses.asdict(sweep.resources), **override},
                 f"resources_by_regime.{regime}", sweep.source)
