"""A trial's evaluations: the val pass of an evaluated epoch (on the EMA weights when the recipe keeps an
average; on merged weights for LoRA), its validation loss, and the best evaluation so far, whose model is
kept in the trial's `best/` folder and whose lack of progress stops the trial (`train.patience`).
Plain torch; the worker (worker.py) calls these steps and makes the Ray calls."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
from typing import Any

from detsweep.checkpoint import META, MODEL_STATE
from detsweep.storage import join, train_run_name, write_bytes_atomic
from detsweep.sweep.spec import TrialConfig

log = logging.getLogger("detsweep.worker")

BEST_DIR = "best"  # <storage>/<sweep>/train-<trial id>/best/: the best evaluation's model and metrics
# What results.parquet keeps of the best evaluation (as best_<name>), beside the final epoch's own.
BEST_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100", "ar_small",
             "ar_medium", "ar_large", "ece", "val_loss")


def evaluates(trial: TrialConfig, epoch: int) -> bool:
    """Whether `epoch` (0-based) is evaluated: every `eval.every` epochs, and always the last."""
    return (epoch + 1) % trial.eval.every == 0 or epoch == trial.train.epochs - 1


class Evaluator:
    """The val pass. LoRA trials evaluate a plain copy of the base architecture holding the merged weights,
    so adapters cost nothing at inference; the copy waits on the CPU while training runs, so its weights
    never count in the trial's training VRAM."""

    def __init__(self, trial: TrialConfig, model: Any, data: Any, device: Any, amp_dtype: Any) -> None:
        from detsweep.models import build_model

        self.trial, self.model, self.data, self.device, self.amp_dtype = trial, model, data, device, amp_dtype
        self.merged = trial.regime == "lora_only" and trial.eval.merge_lora
        self.module = model
        if self.merged:
            self.module = build_model(trial.model, dataclasses.replace(trial.detector, weights="none"),
                                      num_classes=data.label_map.num_classes)

    def run(self, epoch: int, ema: Any = None) -> tuple[dict[str, Any], dict[str, Any] | None, list]:
        """(eval phase stats, COCO quality + val losses on rank 0 else None, first val images drawn on the
        last epoch). With `ema`, the averaged weights are evaluated."""
        from detsweep import dist, engine
        from detsweep.metrics import evaluate_detections
        from detsweep.metrics.efficiency import PhaseMeter

        t, ev = self.trial, self.trial.eval
        with ema.applied(self.model) if ema is not None else contextlib.nullcontext():
            meter = PhaseMeter(self.device)
            meter.start()
            val_loss: dict[str, float] = {}
            dets = self._predict(meter, val_loss)
            stats = meter.stop()
            kept = self._drawn() if dist.is_main() and epoch == t.train.epochs - 1 and ev.visuals else []
        all_dets = engine.gather_detections(dets)  # on rank 0 only
        val_loss = dist.all_reduce_mean(val_loss, self.device)
        quality = None
        if dist.is_main():
            quality = evaluate_detections(str(self.data.val_ann), all_dets, match_iou=ev.calibration.match_iou,
                                          bins=ev.calibration.bins, error_score_threshold=ev.error_score_threshold,
                                          backend=ev.backend, score_threshold=ev.calibration.score_threshold)
            quality.update(val_loss)
            quality["_detections"] = all_dets
        return stats, quality, kept

    def _predict(self, meter: Any, val_loss: dict[str, float]) -> list[dict[str, Any]]:
        from detsweep import engine
        from detsweep.models.lora import merged_state_dict

        if self.merged:
            self.module.to(self.device)
            self.module.load_state_dict(merged_state_dict(self.model))
        try:
            dets, _ = engine.predict(self.module, self.data.val_loader, self.device, self.data.label_map.category_ids,
                                     amp_dtype=self.amp_dtype, meter=meter, val_loss=val_loss)
        finally:
            if self.merged:
                self.module.to("cpu")
        return dets

    def _drawn(self) -> list:
        """Predictions on the first val images themselves (the distributed sampler deals them out)."""
        from torch.utils.data import DataLoader, Subset

        from detsweep import engine
        from detsweep.data.coco import collate_fn

        first = DataLoader(Subset(self.data.val_ds, range(min(8, len(self.data.val_ds)))),
                           batch_size=self.trial.train.batch_size_per_worker, collate_fn=collate_fn)
        module = self.model if self.merged else self.module  # the merged copy is back on the CPU by now
        _, kept = engine.predict(module, first, self.device, self.data.label_map.category_ids,
                                 amp_dtype=self.amp_dtype, keep_images=8)
        return kept


@dataclasses.dataclass
class Best:
    """The best evaluation so far by `eval.best_metric` (val_loss: the lowest), and evaluations since."""

    epoch: int | None = None
    value: float | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    since: int = 0

    def offer(self, metric: str, epoch: int, metrics: dict[str, Any]) -> bool:
        """Take `metrics` of `epoch` if better; returns whether they were."""
        value = metrics.get(metric)
        lower = metric == "val_loss"
        better = value is not None and (self.value is None or (value < self.value if lower else value > self.value))
        if better:
            self.epoch, self.value, self.since = epoch, value, 0
            self.metrics = {k: metrics.get(k) for k in BEST_KEYS}
        else:
            self.since += 1
        return better

    def columns(self) -> dict[str, Any]:
        """`best_epoch` and `best_<metric>` for the results row."""
        return {"best_epoch": self.epoch, **{f"best_{k}": v for k, v in self.metrics.items()}}

    def stop_reason(self, trial: TrialConfig) -> str | None:
        """Why the trial stops early (`train.patience` evaluations without a better best metric), or None."""
        patience = trial.train.patience
        if patience is None or self.since < patience:
            return None
        return (f"patience: no better {trial.eval.best_metric} in {patience} evaluations (best "
                f"{self.value:.4f} at epoch {self.epoch})")


def save_best(trial: TrialConfig, model: Any, best: Best, label_map: Any) -> str:
    """Write the best evaluation's model (`engine.model_state`: CPU tensors; a LoRA trial its adapters and
    heads) and meta.json to `<trial's Train run>/best/`, each file atomically; returns the folder."""
    import torch

    from detsweep import engine

    folder = join(trial.storage, train_run_name(trial.trial_id), BEST_DIR)
    buf = io.BytesIO()
    torch.save(engine.model_state(model, trial.regime), buf)
    write_bytes_atomic(buf.getvalue(), join(folder, MODEL_STATE))
    meta = {"trial_id": trial.trial_id, "epoch": best.epoch, "regime": trial.regime, "model": trial.model,
            "label_map": label_map.as_dict(), "best_metric": trial.eval.best_metric, "value": best.value,
            "metrics": best.metrics}
    write_bytes_atomic(json.dumps(meta).encode(), join(folder, META))
    log.info("best %s %.4f at epoch %d: kept in %s", trial.eval.best_metric, best.value, best.epoch, folder)
    return folder


def track_best(trial: TrialConfig, run: Any, model: Any, epoch: int, metrics: dict[str, Any] | None,
               label_map: Any) -> None:
    """Rank 0: keep the best evaluation (its model in `best/`), add `best_*` and, when `train.patience`
    has run out, `stop_reason` to the report."""
    if metrics is None:
        return
    if run.best.offer(trial.eval.best_metric, epoch, metrics):
        with run.ema.applied(model) if run.ema is not None else contextlib.nullcontext():  # the weights evaluated
            save_best(trial, model, run.best, label_map)
    metrics.update(run.best.columns())
    reason = run.best.stop_reason(trial)
    if reason is not None and epoch < trial.train.epochs - 1:  # the last epoch ends the trial anyway
        metrics["stop_reason"] = reason
    run.history[-1].update({k: v for k, v in run.best.columns().items() if isinstance(v, (int, float))})
