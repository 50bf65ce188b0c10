"""The Ray Train worker: `train_fn_per_worker` runs one trial on one DDP rank as a short sequence of
named steps (build data, build model, restore, then per epoch: train, evaluate, report with a
checkpoint). Every `ray.train` call of detsweep is visible in this file; the steps themselves are
plain torch (`detsweep.engine`, `detsweep.models`, `detsweep.metrics`).

Nothing heavy is imported at module level: the Tune trial actor and the Train controller unpickle
this function, and importing torch there costs ~258 MiB of private memory per process
(bench/overhead.py). Ray's own `TorchTrainer` still imports it there; this module adds nothing to that.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any

from detsweep.checkpoint import DETECTIONS, MODEL_STATE, TRAIN_STATE, write_meta
from detsweep.models.trial import build_trial_model
from detsweep.sweep.plan import loader_workers
from detsweep.sweep.spec import TrialConfig

log = logging.getLogger("detsweep.worker")

GPU_SHARE_MARGIN = 0.95  # of a fractional GPU's share, the part its caching allocator may hold


def train_fn_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    started_at = time.time()
    trial = TrialConfig.from_dict(config["trial"])
    ctx = ray.train.get_context()
    device = _setup(trial, ctx.get_world_rank())
    data = build_data(trial, ctx.get_world_size(), ctx.get_world_rank(), device)
    model, counts = build_trial_model(trial, data.label_map)
    checkpoint = ray.train.get_checkpoint()  # a restarted worker group, or a resumed sweep
    run = restore(trial, model, data, device, checkpoint)
    if run.finished is not None:
        # Finished before the driver died, but Tune had not yet recorded it: report the final
        # metrics again, so the trial ends as `ok` with its real numbers.
        ray.train.report(run.finished)
        return
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)  # already on `device`
    evaluator = Evaluator(trial, model, data, device)
    for epoch in range(run.start_epoch, trial.train.epochs):
        train_stats, losses = train_epoch(trial, ddp_model, data, run, device, epoch)
        eval_stats, quality, kept = evaluator.run(epoch)
        metrics = epoch_metrics(trial, run, epoch, losses, quality, train_stats, eval_stats, counts, started_at,
                                device, n_val=len(data.val_ds), skipped=data.skipped)
        ckpt_dir = save_checkpoint(trial, model, run, data, epoch, metrics, quality, kept)
        metrics = _broadcast(metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------
def _setup(trial: TrialConfig, rank: int) -> Any:
    """Rank-0 logging, seeds, threads; the device (Ray's CUDA device only when CUDA is really there:
    tests give CPU-only nodes logical GPUs)."""
    import ray.train.torch
    import torch

    from detsweep import dist

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {trial.trial_id} r{rank} %(name)s: %(message)s")
    dist.seed_everything(trial.train.seed)
    torch.set_num_threads(max(1, int(trial.resources.cpus_per_worker)))
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = ray.train.torch.get_device()
    share = trial.resources.gpus_per_worker
    if 0 < share < 1:
        # Ray's fractional GPUs are a scheduling promise, not isolation: cap this process's caching
        # allocator at its share (less a margin for the other process's CUDA context), so one trial's
        # growth raises OOM in that trial instead of in its neighbour.
        torch.cuda.set_per_process_memory_fraction(share * GPU_SHARE_MARGIN, device)
    return device


@dataclasses.dataclass
class TrialData:
    train_ds: Any
    val_ds: Any
    label_map: Any
    val_ann: Any
    train_loader: Any
    val_loader: Any
    skipped: dict = dataclasses.field(default_factory=dict)  # n_skipped_images, n_skipped_boxes (on_invalid: skip)


def build_data(trial: TrialConfig, world: int, rank: int, device: Any) -> TrialData:
    """The datasets, and loaders sharded over the ranks by our own samplers (Ray's would shuffle
    with seed 0 whatever `train.seed` says)."""
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    from detsweep.data.coco import build_dataset_splits, collate_fn

    d, t = trial.data, trial.train
    # coco: checked again here (annotations: seconds; image headers once per node, cached), so every
    # worker drops exactly what the driver's check reported under on_invalid: skip.
    splits = build_dataset_splits(
        kind=d.kind, root=d.root, train_images=d.train_images, val_images=d.val_images,
        image_size=d.image_size, classes=list(d.classes) if d.classes else None, seed=d.seed,
        num_classes=d.num_classes, format=d.format, train=d.train, val=d.val, on_invalid=d.on_invalid,
        image_check=d.image_check, domain=d.domain)
    train_ds, val_ds, label_map, val_ann = splits.train, splits.val, splits.label_map, splits.val_ann
    if world > 1:
        train_sampler = DistributedSampler(train_ds, world, rank, shuffle=True, seed=t.seed)
        val_sampler = DistributedSampler(val_ds, world, rank, shuffle=False)
    else:
        train_sampler, val_sampler = RandomSampler(train_ds, generator=torch.Generator().manual_seed(t.seed)), None
    on_cuda = device.type == "cuda"  # the engine moves CPU batches itself
    train_ds.uint8 = val_ds.uint8 = on_cuda  # a quarter of the bytes to copy; scaled to 0..1 on the device
    workers = loader_workers(trial)
    loader_kw = dict(batch_size=t.batch_size_per_worker, collate_fn=collate_fn, num_workers=workers,
                     pin_memory=on_cuda, **({"persistent_workers": True, "prefetch_factor": 4} if workers else {}))
    train_loader, val_loader = (
        ray.train.torch.prepare_data_loader(DataLoader(ds, sampler=sampler, **loader_kw), add_dist_sampler=False,
                                            move_to_device=on_cuda)
        for ds, sampler in ((train_ds, train_sampler), (val_ds, val_sampler)))
    return TrialData(train_ds, val_ds, label_map, val_ann, train_loader, val_loader, splits.skipped)


@dataclasses.dataclass
class TrialRun:
    """What carries from epoch to epoch, and across a restore."""

    opt: Any  # engine.Optimization
    amp_dtype: Any
    start_epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    totals: dict = dataclasses.field(default_factory=lambda: {"train_s": 0.0, "eval_s": 0.0})
    resumed_from: int | None = None
    finished: dict | None = None  # the final metrics, when the checkpoint is of the last epoch
    held_before: float = 0.0  # seconds earlier attempts' workers held their resources, to their last report


def restore(trial: TrialConfig, model: Any, data: TrialData, device: Any, checkpoint: Any) -> TrialRun:
    """Move the model to `device`, build its optimizer, and load the latest checkpoint if there is one."""
    import torch

    from detsweep import engine

    amp_dtype = engine.amp_dtype_for(trial.train.amp, device)
    steps = len(data.train_loader)
    if checkpoint is None:
        opt = engine.prepare_training(model, trial.train, steps_per_epoch=steps, to=device, amp_dtype=amp_dtype)
        return TrialRun(opt, amp_dtype)
    with checkpoint.as_directory() as ckpt_dir:
        engine.load_model_state(model, trial.regime, torch.load(os.path.join(ckpt_dir, MODEL_STATE),
                                                                 map_location="cpu", weights_only=True))
        state = torch.load(os.path.join(ckpt_dir, TRAIN_STATE), map_location="cpu", weights_only=False)
    opt = engine.prepare_training(model, trial.train, steps_per_epoch=steps, to=device, amp_dtype=amp_dtype,
                                  state=state)
    log.info("resumed from the checkpoint of epoch %d", state["epoch"])
    run = TrialRun(opt, amp_dtype, start_epoch=state["epoch"] + 1, history=state["history"],
                   totals=state["totals"], resumed_from=state["epoch"], held_before=state["totals"].get("worker_s", 0.0))
    if run.start_epoch >= trial.train.epochs:
        run.finished = state["metrics"]
    return run


def train_epoch(trial: TrialConfig, ddp_model: Any, data: TrialData, run: TrialRun, device: Any,
                epoch: int) -> tuple[dict[str, Any], dict[str, float]]:
    """One epoch on this rank; returns its phase stats and the losses averaged over the ranks."""
    from detsweep import dist, engine
    from detsweep.metrics.efficiency import PhaseMeter

    sampler = getattr(data.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    meter = PhaseMeter(device)
    meter.start()
    losses = engine.train_one_epoch(ddp_model, data.train_loader, run.opt.optimizer, device, epoch=epoch,
                                    grad_clip=trial.train.grad_clip, lr_scheduler=run.opt.lr_scheduler,
                                    amp_dtype=run.amp_dtype, scaler=run.opt.scaler, meter=meter)
    return meter.stop(), dist.all_reduce_mean(losses, device)


class Evaluator:
    """The val pass of every epoch. LoRA trials evaluate a plain copy of the base architecture holding
    the merged weights, so adapters cost nothing at inference; the copy waits on the CPU while
    training runs, so its weights never count in the trial's training VRAM."""

    def __init__(self, trial: TrialConfig, model: Any, data: TrialData, device: Any) -> None:
        from detsweep.models import build_model

        self.trial, self.model, self.data, self.device = trial, model, data, device
        self.merged = trial.regime == "lora_only" and trial.eval.merge_lora
        self.module = model
        if self.merged:
            self.module = build_model(trial.model, dataclasses.replace(trial.detector, weights="none"),
                                      num_classes=data.label_map.num_classes)

    def run(self, epoch: int) -> tuple[dict[str, Any], dict[str, Any] | None, list]:
        """(eval phase stats, COCO quality on rank 0 else None, first val images drawn on the last epoch)."""
        from detsweep import dist, engine
        from detsweep.metrics import evaluate_detections
        from detsweep.metrics.efficiency import PhaseMeter
        from detsweep.models.lora import merged_state_dict

        t, ev, ids = self.trial, self.trial.eval, self.data.label_map.category_ids
        if self.merged:
            self.module.to(self.device)
            self.module.load_state_dict(merged_state_dict(self.model))
        meter = PhaseMeter(self.device)
        meter.start()
        dets, _ = engine.predict(self.module, self.data.val_loader, self.device, ids,
                                 amp_dtype=engine.amp_dtype_for(t.train.amp, self.device), meter=meter)
        stats = meter.stop()
        kept = self._drawn() if dist.is_main() and epoch == t.train.epochs - 1 and ev.visuals else []
        if self.merged:
            self.module.to("cpu")
        all_dets = engine.gather_detections(dets)  # on rank 0 only
        quality = None
        if dist.is_main():
            quality = evaluate_detections(str(self.data.val_ann), all_dets, match_iou=ev.calibration.match_iou,
                                          bins=ev.calibration.bins, error_score_threshold=ev.error_score_threshold,
                                          backend=ev.backend)
            quality["_detections"] = all_dets
        return stats, quality, kept

    def _drawn(self) -> list:
        """Predictions on the first val images themselves (the distributed sampler deals them out)."""
        from torch.utils.data import DataLoader, Subset

        from detsweep import engine
        from detsweep.data.coco import collate_fn

        first = DataLoader(Subset(self.data.val_ds, range(min(8, len(self.data.val_ds)))),
                           batch_size=self.trial.train.batch_size_per_worker, collate_fn=collate_fn)
        _, kept = engine.predict(self.module, first, self.device, self.data.label_map.category_ids,
                                 amp_dtype=engine.amp_dtype_for(self.trial.train.amp, self.device), keep_images=8)
        return kept


def epoch_metrics(trial: TrialConfig, run: TrialRun, epoch: int, losses: dict[str, float],
                  quality: dict[str, Any] | None, train_stats: dict[str, Any], eval_stats: dict[str, Any],
                  counts: dict[str, int], started_at: float, device: Any, n_val: int,
                  skipped: dict[str, int] | None = None) -> dict[str, Any] | None:
    """The epoch's report on rank 0 (None elsewhere): losses, quality, cost. Gathers every rank's
    phase stats (all ranks must call it) and adds the epoch to `run.totals` and `run.history`."""
    from detsweep import dist, engine
    from detsweep.metrics.efficiency import device_info, peak_rss_mb, reduce_phase_stats

    phase = dist.gather_objects((train_stats, eval_stats, peak_rss_mb()))
    tr = reduce_phase_stats([p[0] for p in phase])  # images/s summed, seconds and VRAM maxed
    evs = reduce_phase_stats([p[1] for p in phase])
    totals = run.totals
    totals["worker_s"] = run.held_before + (time.time() - started_at)
    totals["train_s"] += tr["seconds"]
    totals["eval_s"] += evs["seconds"]
    # Peak VRAM of the whole trial: the largest of any epoch (each epoch resets per phase).
    for key, value in (("peak_vram_train_mb", tr["peak_vram_mb"]), ("peak_vram_eval_mb", evs["peak_vram_mb"]),
                       ("peak_vram_reserved_mb", max([v for v in (tr["peak_vram_reserved_mb"],
                                                                  evs["peak_vram_reserved_mb"]) if v is not None],
                                                     default=None))):
        if value is not None:
            totals[key] = max(value, totals.get(key) or 0.0)
    if not dist.is_main():
        return None
    metrics = {
        "epoch": epoch, "epochs_completed": epoch + 1, "lr": run.opt.optimizer.param_groups[0]["lr"],
        # Tune's TensorBoard logger takes its step from `timesteps_total` when present, else from
        # `training_iteration`, which restarts after a restore: curves stay on epochs.
        "timesteps_total": epoch + 1,
        **losses,  # loss (their sum) and each weighted component, mean over ranks
        **{k: v for k, v in quality.items() if not k.startswith("_") and k not in ("per_class_ap", "reliability")},
        "per_class_ap": json.dumps(quality.get("per_class_ap", {})),
        "reliability": json.dumps(quality.get("reliability", {})),
        **counts,
        **(skipped or {}),  # n_skipped_images, n_skipped_boxes: what data.on_invalid: skip dropped
        "peak_vram_train_mb": totals.get("peak_vram_train_mb"), "peak_vram_eval_mb": totals.get("peak_vram_eval_mb"),
        "peak_vram_reserved_mb": totals.get("peak_vram_reserved_mb"), "amp_dtype": engine.amp_name(run.amp_dtype),
        "peak_rss_mb": max(p[2] for p in phase),
        "train_images_per_s": tr["images_per_s"], "eval_images_per_s": evs["images_per_s"],
        "train_s": totals["train_s"], "eval_s": totals["eval_s"], "worker_s": totals["worker_s"],
        **device_info(device), "gpu_uuid": _gpu_uuid(device),
        # Rank 0's node (the driver and Tune's trial actor run elsewhere on a cluster). Not `hostname`:
        # Tune overwrites that key of every result with the trial actor's node.
        "rank0_hostname": socket.gethostname(),
        "worker_started_at": started_at,  # unix time: when this worker group began
    }
    if evs["images"] > n_val:  # the sampler padded the last round with images of other ranks
        metrics["eval_images_per_s"] *= n_val / evs["images"]
    if run.resumed_from is not None:
        metrics["resumed_from_epoch"] = run.resumed_from
    run.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "worker_started_at"})
    return metrics


def _gpu_uuid(device: Any) -> str | None:
    """The CUDA device's UUID: trials with the same one and overlapping run times shared that GPU."""
    import torch

    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None


def save_checkpoint(trial: TrialConfig, model: Any, run: TrialRun, data: TrialData, epoch: int,
                    metrics: dict[str, Any] | None, quality: dict[str, Any] | None, kept: list) -> str | None:
    """Rank 0 writes the epoch's checkpoint folder (CPU tensors, see checkpoint.py) and its artefacts
    into a local temporary folder for `ray.train.report` to upload; other ranks return None."""
    import torch

    from detsweep import engine

    if metrics is None:
        return None
    ckpt_dir = tempfile.mkdtemp(prefix=f"ckpt-{trial.trial_id}-")
    torch.save(engine.model_state(model, trial.regime), os.path.join(ckpt_dir, MODEL_STATE))
    torch.save({**run.opt.state_dict(), "epoch": epoch, "history": run.history, "totals": run.totals,
                "metrics": metrics}, os.path.join(ckpt_dir, TRAIN_STATE))
    write_meta(ckpt_dir, trial_id=trial.trial_id, epoch=epoch, regime=trial.regime, model=trial.model,
               label_map=data.label_map.as_dict())
    last = epoch == trial.train.epochs - 1
    _write_artefacts(ckpt_dir, quality["_detections"], run.history, kept, quality, data.label_map,
                     last and trial.eval.visuals)
    return ckpt_dir


def _broadcast(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0's metrics on every rank: each rank reports, and Ray keeps rank 0's."""
    from detsweep import dist

    return dist.broadcast_object(metrics)


def _write_artefacts(out_dir: str, detections: list, history: list, kept: list, quality: dict,
                     label_map: Any, visuals: bool) -> None:
    """Beside the checkpoint: the COCO results JSON (re-evaluate offline), and on the last epoch
    the loss curves, the reliability diagram and predictions drawn on the first val images."""
    from detsweep.metrics.coco import write_detections_json

    write_detections_json(detections, os.path.join(out_dir, DETECTIONS))
    if not visuals:
        return
    from detsweep.metrics.visuals import draw_predictions, plot_loss_curves, plot_reliability

    # The total and each weighted component; DETR's per-decoder-layer copies (`loss_ce_0`, ...)
    # would bury them.
    keys = [k for k in history[-1] if re.fullmatch(r"loss(_[a-z]+)*", k)]
    plot_loss_curves(history, os.path.join(out_dir, "loss_curves.png"), keys=keys)
    if quality.get("reliability"):
        plot_reliability(quality["reliability"], os.path.join(out_dir, "reliability.png"))
    if kept:
        images = [im for im, _, _ in kept]
        gts = [{"boxes_xyxy": tg["boxes"], "labels": tg["labels"]} for _, tg, _ in kept]
        preds = [{"boxes_xyxy": p["boxes"], "scores": p["scores"], "labels": p["labels"]} for _, _, p in kept]
        draw_predictions(images, preds, gts, list(label_map.names), os.path.join(out_dir, "predictions"))
