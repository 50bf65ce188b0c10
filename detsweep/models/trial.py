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
    parameter counts."""
    from detsweep.metrics.efficiency import count_parameters
    from detsweep.models import build_model
    from detsweep.models.lora import apply_lora, count_lora_params
    from detsweep.models.regimes import apply_regime

    model = build_model(trial.model, _resolved(trial), num_classes=label_map.num_classes,
                        category_ids=list(label_map.category_ids), category_ids_are_coco=is_coco2017(trial.data))
    if trial.regime == "lora_only":
        lora = trial.lora
        apply_lora(model, rank=lora.rank, alpha=lora.alpha, placement=lora.placement, targets=lora.targets,
                   dropout=lora.dropout)
    apply_regime(model, trial.regime)
    counts = count_parameters(model)
    counts["lora_params"] = count_lora_params(model)
    return model, counts


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
