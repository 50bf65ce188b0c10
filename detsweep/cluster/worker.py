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
import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any

from detsweep.checkpoint import DETECTIONS, MODEL_STATE, TRAIN_STATE, write_meta
from detsweep.cluster.evaluation import Best, Evaluator, evaluates, track_best
from detsweep.models.trial import build_trial_model, prepare_stage, stage_for
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
    evaluator = Evaluator(trial, model, data, device, run.amp_dtype)
    for epoch in range(run.start_epoch, trial.train.epochs):
        if stage_for(trial, epoch) != run.stage:  # two_stage: the heads-only stage ends here
            ddp_model = switch_stage(trial, model, data, run, device, epoch)
        run.pending.append(train_epoch(trial, ddp_model, data, run, device, epoch))
        if not evaluates(trial, epoch):  # reports, checkpoints and the scheduler follow the evaluations
            continue
        eval_stats, quality, kept = evaluator.run(epoch, run.ema)
        metrics = epoch_metrics(trial, run, epoch, quality, eval_stats, counts, started_at, device,
                                n_val=len(data.val_ds), skipped=data.skipped)
        track_best(trial, run, model, epoch, metrics, data.label_map)
        ckpt_dir = save_checkpoint(trial, model, run, data, epoch, metrics, quality, kept)
        metrics = _broadcast(metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        if metrics.get("stop_reason"):  # train.patience: recorded as `stopped`, with the reason
            return


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
    from detsweep.data.transforms import EVAL_SIZE, eval_transform, train_transform

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
    # data.augment, in the official recipe's pixels scaled to synthetic images; Faster R-CNN resizes itself.
    scale, resize = (d.image_size / EVAL_SIZE if d.kind == "synthetic" else 1.0), trial.family == "detr"
    train_ds.transform = train_transform(d.augment, scale=scale, resize=resize)
    val_ds.transform = eval_transform(d.augment, scale=scale, resize=resize)
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
    ema: Any = None  # engine.EMA, with train.ema
    best: Best = dataclasses.field(default_factory=Best)
    pending: list = dataclasses.field(default_factory=list)  # (train stats, losses) of epochs not yet reported
    held_before: float = 0.0  # seconds earlier attempts' workers held their resources, to their last report
    stage: int | None = None  # two_stage: the stage the model and optimizer are in (checkpointed)


def restore(trial: TrialConfig, model: Any, data: TrialData, device: Any, checkpoint: Any) -> TrialRun:
    """Move the model to `device`, build its optimizer, and load the latest checkpoint if there is one."""
    import torch

    from detsweep import engine

    t = trial.train
    amp_dtype = engine.amp_dtype_for(t.amp, device)
    steps = math.ceil(len(data.train_loader) / t.accumulate)  # the schedule counts optimizer steps
    if checkpoint is None:
        opt = prepare_stage(trial, model, stage_for(trial, 0), steps_per_epoch=steps, to=device, amp_dtype=amp_dtype)
        ema = engine.EMA(model, t.ema.decay, t.ema.warmup_steps) if t.ema else None  # after the move
        return TrialRun(opt, amp_dtype, ema=ema, stage=stage_for(trial, 0))
    with checkpoint.as_directory() as ckpt_dir:
        engine.load_model_state(model, trial.regime, torch.load(os.path.join(ckpt_dir, MODEL_STATE),
                                                                 map_location="cpu", weights_only=True))
        state = torch.load(os.path.join(ckpt_dir, TRAIN_STATE), map_location="cpu", weights_only=False)
    # two_stage: back in the checkpoint's stage, with that stage's optimizer (the loop switches if it ended)
    opt = prepare_stage(trial, model, state.get("stage"), steps_per_epoch=steps, to=device, amp_dtype=amp_dtype,
                        state=state)
    log.info("resumed from the checkpoint of epoch %d", state["epoch"])
    run = TrialRun(opt, amp_dtype, start_epoch=state["epoch"] + 1, history=state["history"],
                   totals=state["totals"], resumed_from=state["epoch"], held_before=state["totals"].get("worker_s", 0.0),
                   best=Best(**state.get("best", {})), stage=state.get("stage"))
    if t.ema:
        run.ema = engine.EMA(model, t.ema.decay, t.ema.warmup_steps)
        run.ema.load_state_dict(state["ema"])
    if run.start_epoch >= trial.train.epochs:
        run.finished = state["metrics"]
    return run


def switch_stage(trial: TrialConfig, model: Any, data: TrialData, run: TrialRun, device: Any, epoch: int) -> Any:
    """two_stage at its switch epoch: stage 2's regime, a fresh optimizer, schedule and EMA, and a new DDP wrapper
    (DDP registers only what trains when it wraps; the old wrapper's hooks go quiet without its forward)."""
    import ray.train.torch

    from detsweep import engine

    run.stage, t = stage_for(trial, epoch), trial.train
    steps = math.ceil(len(data.train_loader) / t.accumulate)
    run.opt = prepare_stage(trial, model, run.stage, steps_per_epoch=steps, to=device, amp_dtype=run.amp_dtype)
    run.ema = engine.EMA(model, t.ema.decay, t.ema.warmup_steps) if t.ema else None
    log.info("two_stage: stage %d (%s) from epoch %d", run.stage, trial.two_stage.stage2.regime, epoch)
    return ray.train.torch.prepare_model(model, move_to_device=False)


def train_epoch(trial: TrialConfig, ddp_model: Any, data: TrialData, run: TrialRun, device: Any,
                epoch: int) -> tuple[dict[str, Any], dict[str, float]]:
    """One epoch on this rank; returns its phase stats and the losses averaged over the ranks."""
    from detsweep import dist, engine
    from detsweep.metrics.efficiency import PhaseMeter

    sampler = getattr(data.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    meter = PhaseMeter(device)
    profile = trial.train.profile if epoch == run.start_epoch and dist.is_main() else None
    with profiler(trial, profile) as prof_step:
        def on_step() -> None:
            if run.ema is not None:
                run.ema.update(getattr(ddp_model, "module", ddp_model))
            prof_step()

        meter.start()
        losses = engine.train_one_epoch(ddp_model, data.train_loader, run.opt.optimizer, device, epoch=epoch,
                                        grad_clip=trial.train.grad_clip, lr_scheduler=run.opt.lr_scheduler,
                                        amp_dtype=run.amp_dtype, scaler=run.opt.scaler, meter=meter,
                                        accumulate=trial.train.accumulate, on_step=on_step)
        stats = meter.stop()
    return stats, dist.all_reduce_mean(losses, device)


def epoch_metrics(trial: TrialConfig, run: TrialRun, epoch: int, quality: dict[str, Any] | None,
                  eval_stats: dict[str, Any], counts: dict[str, int], started_at: float, device: Any, n_val: int,
                  skipped: dict[str, int] | None = None) -> dict[str, Any] | None:
    """The evaluated epoch's report on rank 0 (None elsewhere): this epoch's losses and quality, cost
    over every epoch trained since the last report (`run.pending`). Gathers every rank's phase stats (all
    ranks must call it) and adds them to `run.totals` and the report to `run.history`."""
    from detsweep import dist, engine
    from detsweep.metrics.efficiency import device_info, peak_rss_mb, reduce_phase_stats

    pending, run.pending = run.pending, []
    phase = dist.gather_objects(([stats for stats, _ in pending], eval_stats, peak_rss_mb()))
    # Per epoch across ranks: images/s summed, seconds and VRAM maxed; the report's images/s is this epoch's.
    per_epoch = [reduce_phase_stats([p[0][i] for p in phase]) for i in range(len(pending))]
    tr, losses = per_epoch[-1], pending[-1][1]
    evs = reduce_phase_stats([p[1] for p in phase])
    totals = run.totals
    totals["worker_s"] = run.held_before + (time.time() - started_at)
    totals["train_s"] += sum(e["seconds"] for e in per_epoch)
    totals["eval_s"] += evs["seconds"]
    tr = {**tr, "peak_vram_mb": max([e["peak_vram_mb"] for e in per_epoch if e["peak_vram_mb"] is not None],
                                    default=None),
          "peak_vram_reserved_mb": max([e["peak_vram_reserved_mb"] for e in per_epoch
                                        if e["peak_vram_reserved_mb"] is not None], default=None)}
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
        # two_stage: the stage of this epoch and the epoch stage 2 starts at (history, TensorBoard, plot)
        **({"stage": run.stage, "stage_switch_epoch": trial.two_stage.stage1.epochs} if run.stage else {}),
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


@contextlib.contextmanager
def profiler(trial: TrialConfig, profile: Any):
    """Yields the function to call after each optimizer step. With `train.profile` (on the first epoch,
    rank 0), a `torch.profiler` trace of the steps its schedule picks, written beside the trial's
    TensorBoard events (`<root>/tune/<trial id>/profile/`), where TensorBoard's profiler tab and Perfetto
    open it."""
    if profile is None:
        yield lambda: None
        return
    import torch

    from detsweep.storage import TUNE_DIR, is_local, join

    target = join(trial.storage, TUNE_DIR, trial.trial_id, "profile")
    local = target if is_local(target) else tempfile.mkdtemp(prefix="profile-")
    schedule = torch.profiler.schedule(wait=profile.wait, warmup=profile.warmup, active=profile.active, repeat=1)
    with torch.profiler.profile(schedule=schedule, on_trace_ready=torch.profiler.tensorboard_trace_handler(local)) as p:
        yield p.step
    if local != target:
        _upload(local, target)
    log.info("profiler trace of %d steps in %s", profile.active, target)


def _upload(local: str, target: str) -> None:
    """Copy the files of a local folder to a URI folder."""
    from detsweep.storage import join, write_bytes_atomic

    for name in os.listdir(local):
        with open(os.path.join(local, name), "rb") as f:
            write_bytes_atomic(f.read(), join(target, name))


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
                "metrics": metrics, "best": dataclasses.asdict(run.best), "stage": run.stage,
                "ema": run.ema.state_dict() if run.ema is not None else None}, os.path.join(ckpt_dir, TRAIN_STATE))
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
    switch = history[-1].get("stage_switch_epoch")  # two_stage: where its second stage starts
    plot_loss_curves(history, os.path.join(out_dir, "loss_curves.png"), keys=keys, switch_epoch=switch)
    if quality.get("reliability"):
        plot_reliability(quality["reliability"], os.path.join(out_dir, "reliability.png"))
    if kept:
        images = [im for im, _, _ in kept]
        gts = [{"boxes_xyxy": tg["boxes"], "labels": tg["labels"]} for _, tg, _ in kept]
        preds = [{"boxes_xyxy": p["boxes"], "scores": p["scores"], "labels": p["labels"]} for _, _, p in kept]
        draw_predictions(images, preds, gts, list(label_map.names), os.path.join(out_dir, "predictions"))
