"""A trial's detector from its `TrialConfig`: built, its weights resolved (`base:NAME` → the base's
latest checkpoint), its regime applied. Ray-free, so `detsweep.predict` rebuilds a trial exactly as its
Train worker did."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from typing import Any

from detsweep.checkpoint import MODEL_STATE
from detsweep.sweep.spec import TrialConfig

log = logging.getLogger(__name__)


def build_trial_model(trial: TrialConfig, label_map: Any) -> tuple[Any, dict[str, int]]:
    """The trial's detector with its regime applied (LoRA adapters, frozen parts), on the CPU, and its
    parameter counts. A two_stage trial is left in its first stage; its counts are the second stage's (the
    trial's trainable params, as the frontier reads them), with `trainable_params_stage1` and `_stage2` beside."""
    from detsweep.metrics.efficiency import count_parameters
    from detsweep.models import build_model
    from detsweep.models.lora import apply_lora, count_lora_params
    from detsweep.models.regimes import apply_regime

    model = build_model(trial.model, _resolved(trial), num_classes=label_map.num_classes,
                        category_ids=list(label_map.category_ids), category_ids_are_coco=is_coco2017(trial.data))
    if trial.lora is not None:  # lora_only, or a two_stage into lora_only (the adapters wait frozen in stage 1)
        lora = trial.lora
        apply_lora(model, rank=lora.rank, alpha=lora.alpha, placement=lora.placement, targets=lora.targets,
                   dropout=lora.dropout)
    if trial.regime != "two_stage":
        apply_regime(model, trial.regime)
        counts = count_parameters(model)
    else:
        apply_regime(model, "full")  # records the build-time frozen parts before any stage freezes more
        counts = {**count_parameters(enter_stage(trial, model, 2)),
                  "trainable_params_stage1": count_parameters(enter_stage(trial, model, 1))["trainable_params"]}
        counts["trainable_params_stage2"] = counts["trainable_params"]
    counts["lora_params"] = count_lora_params(model)
    return model, counts


def stage_for(trial: TrialConfig, epoch: int) -> int | None:
    """The stage (1 or 2) a two_stage trial trains `epoch` in (0-based), None for other regimes: stage 1 for the
    first `two_stage.stage1.epochs` epochs, stage 2 for the rest of `train.epochs`."""
    if trial.two_stage is None:
        return None
    return 1 if epoch < trial.two_stage.stage1.epochs else 2


def enter_stage(trial: TrialConfig, model: Any, stage: int) -> Any:
    """Apply stage `stage`'s regime to a two_stage trial's `model` (1: `heads`, 2: `two_stage.stage2.regime`);
    returns the model."""
    from detsweep.models.regimes import apply_regime

    apply_regime(model, "heads" if stage == 1 else trial.two_stage.stage2.regime)
    return model


def stage_train(trial: TrialConfig, stage: int | None) -> Any:
    """The `train` settings a stage's optimizer and schedule are built from: its learning rates, and its own
    epochs for the schedule (the step schedule's drop at 2/3 of them). `trial.train` for other regimes."""
    t = trial.train
    if stage is None:
        return t
    s1, s2 = trial.two_stage.stage1, trial.two_stage.stage2
    if stage == 1:
        return dataclasses.replace(t, epochs=s1.epochs, lr=s1.lr, lr_backbone=s1.lr * t.lr_backbone / t.lr,
                                   lr_drop_epoch=None)
    lr_backbone = s2.lr * t.lr_backbone / t.lr if s2.lr_backbone is None else s2.lr_backbone
    return dataclasses.replace(t, epochs=t.epochs - s1.epochs, lr=s2.lr, lr_backbone=lr_backbone, lr_drop_epoch=None)


def prepare_stage(trial: TrialConfig, model: Any, stage: int | None, *, steps_per_epoch: int, to: Any,
                  amp_dtype: Any, state: dict[str, Any] | None = None) -> Any:
    """`engine.prepare_training` for a stage: a two_stage trial's `model` enters `stage` first (its regime), and
    the stage gets its own AdamW and schedule (`stage_train`); other trials (stage None) get `trial.train`'s."""
    from detsweep import engine

    if stage is not None:
        enter_stage(trial, model, stage)
    return engine.prepare_training(model, stage_train(trial, stage), steps_per_epoch=steps_per_epoch, to=to,
                                   amp_dtype=amp_dtype, state=state)


def _resolved(trial: TrialConfig) -> Any:
    """The trial's model settings with `weights: base:NAME` replaced by the base's weights file: the
    model state of its pretraining's latest checkpoint (copied here first when it lives at a URI). The
    base was trained on other classes, so the builder gives the trial a fresh class head."""
    if trial.base_run is None:
        return trial.detector
    from detsweep.checkpoint import latest_checkpoint
    from detsweep.storage import filesystem, is_local, join

    folder = latest_checkpoint(trial.base_run)
    if folder is None:
        raise FileNotFoundError(f"{trial.detector.weights}: no finished pretraining in {trial.base_run}")
    path = join(folder, MODEL_STATE)
    if not is_local(path):
        fs, remote = filesystem(path)
        local = os.path.join(tempfile.mkdtemp(prefix="base-"), MODEL_STATE)
        with fs.open_input_stream(remote) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst)
        path = local
    log.info("%s: the base's weights from %s", trial.detector.weights, folder)
    return dataclasses.replace(trial.detector, weights=path)


def is_coco2017(data: Any) -> bool:
    """Whether the trial's category ids are COCO's own (a COCO 2017 layout), so a COCO checkpoint's class
    rows may be kept by id; a Roboflow, CVAT or Label Studio export numbers its classes its own way."""
    if data.kind != "coco":
        return False
    from detsweep.data.sources import resolve

    return resolve(data.root, data.format, data.train, data.val).format == "coco2017"
