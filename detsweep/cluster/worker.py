"""The Ray Train worker: `train_fn_per_worker` builds one trial's model and data, trains and
evaluates every epoch, and reports. The only `ray.train` calls of detsweep live here.

Nothing heavy is imported at module level: the Tune trial actor and the Train controller
unpickle this function, and importing torch there costs ~258 MiB of private memory per process
(bench/overhead.py). Ray's own `TorchTrainer` still imports it there; this module adds nothing to that.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any

log = logging.getLogger("detsweep.worker")

TRAIN_STATE = "train_state.pt"
MODEL_STATE = "model.pt"
META = "meta.json"


def _model_state(module: Any, regime: str) -> dict:
    """A LoRA trial keeps only its adapters and heads; other regimes keep the whole model."""
    if regime == "lora_only":
        from detsweep.models.lora import lora_state_dict

        return lora_state_dict(module)
    return module.state_dict()


def _load_model_state(module: Any, regime: str, state: dict) -> None:
    if regime == "lora_only":
        from detsweep.models.lora import load_lora_state_dict

        load_lora_state_dict(module, state)
    else:
        module.load_state_dict(state)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    import dataclasses

    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

    from detsweep import dist, engine
    from detsweep.config import TrialConfig
    from detsweep.data.coco import build_datasets, collate_fn
    from detsweep.metrics import evaluate_detections
    from detsweep.metrics.efficiency import PhaseMeter, count_parameters, device_info, peak_rss_mb, reduce_phase_stats
    from detsweep.models import build_model
    from detsweep.models.lora import apply_lora, count_lora_params, merged_state_dict
    from detsweep.models.regimes import apply_regime

    worker_started_at = time.time()
    trial = TrialConfig.from_dict(config["trial"])
    ctx = ray.train.get_context()
    logging.basicConfig(level=logging.INFO if ctx.get_world_rank() == 0 else logging.WARNING,
                        format=f"%(asctime)s {trial.trial_id} r{ctx.get_world_rank()} %(name)s: %(message)s")
    dist.seed_everything(trial.train.seed)
    torch.set_num_threads(max(1, int(trial.resources.cpus_per_worker)))
    # Ray assigns a CUDA device whenever the trial holds GPUs, even logical ones on a CPU-only
    # node (tests do this); only trust it when CUDA is really there.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")

    d = trial.data
    train_ds, val_ds, label_map, val_ann = build_datasets(
        kind=d.kind, root=d.root, train_images=d.train_images, val_images=d.val_images,
        image_size=d.image_size, classes=list(d.classes) if d.classes else None, seed=d.seed,
        num_classes=d.num_classes)
    family_cfg = trial.detr if trial.family == "detr" else trial.faster_rcnn
    if trial.family == "detr" and family_cfg.weights == "none":
        log.info("DETR weights 'none': the backbone's stem and layer1, frozen as in the official code, stay at "
                 "their random init; weights 'imagenet' starts from torchvision's ImageNet ResNet, as the official "
                 "DETR does")
    model = build_model(trial.model, family_cfg, num_classes=label_map.num_classes,
                        category_ids=list(label_map.category_ids), category_ids_are_coco=d.kind == "coco")
    if trial.regime == "lora_only":
        apply_lora(model, rank=trial.lora.rank, alpha=trial.lora.alpha, placement=trial.lora.placement,
                   dropout=trial.lora.dropout)
    apply_regime(model, trial.regime)
    counts = count_parameters(model)
    counts["lora_params"] = count_lora_params(model)

    t = trial.train
    optimizer = torch.optim.AdamW(model.param_groups(t.lr, t.lr_backbone, t.weight_decay),
                                  lr=t.lr, weight_decay=t.weight_decay)
    on_cuda = device.type == "cuda"  # the engine moves CPU batches itself
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    # Our own samplers: Ray's would shuffle with seed 0 whatever `train.seed` says.
    if world > 1:
        train_sampler = DistributedSampler(train_ds, world, rank, shuffle=True, seed=t.seed)
        val_sampler = DistributedSampler(val_ds, world, rank, shuffle=False)
    else:
        train_sampler = RandomSampler(train_ds, generator=torch.Generator().manual_seed(t.seed))
        val_sampler = None
    loader_kw = dict(batch_size=t.batch_size_per_worker, collate_fn=collate_fn, num_workers=d.loader_workers,
                     pin_memory=on_cuda)
    train_loader = ray.train.torch.prepare_data_loader(
        DataLoader(train_ds, sampler=train_sampler, **loader_kw), add_dist_sampler=False, move_to_device=on_cuda)
    val_loader = ray.train.torch.prepare_data_loader(
        DataLoader(val_ds, sampler=val_sampler, **loader_kw), add_dist_sampler=False, move_to_device=on_cuda)
    steps_per_epoch = len(train_loader)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, engine.lr_lambda(t, steps_per_epoch))
    amp_dtype = engine.amp_dtype_for(t.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start_epoch, history, totals = 0, [], {"train_s": 0.0, "eval_s": 0.0}
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a resumed sweep
        with checkpoint.as_directory() as ckpt_dir:
            _load_model_state(model, trial.regime, torch.load(os.path.join(ckpt_dir, MODEL_STATE),
                                                               map_location="cpu", weights_only=True))
            state = torch.load(os.path.join(ckpt_dir, TRAIN_STATE), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history, totals = state["epoch"] + 1, state["history"], state["totals"]
        resumed_from = state["epoch"]
        log.info("resumed from the checkpoint of epoch %d", state["epoch"])
        if start_epoch >= t.epochs:
            # Finished before the driver died, but Tune had not yet recorded it: report the final
            # metrics again, so the trial ends as `ok` with its real numbers.
            ray.train.report(state["metrics"])
            return

    ddp_model = ray.train.torch.prepare_model(model, move_to_device=device)
    module = getattr(ddp_model, "module", ddp_model)
    # LoRA trials evaluate a plain copy of the base architecture holding the merged weights, so
    # adapters cost nothing at inference. The copy waits on the CPU while training runs: its
    # weights must not count in the trial's training VRAM.
    merged_eval = trial.regime == "lora_only" and trial.eval.merge_lora
    eval_module = build_model(trial.model, dataclasses.replace(family_cfg, weights="none"),
                              num_classes=label_map.num_classes) if merged_eval else module
    info = device_info(device)

    for epoch in range(start_epoch, t.epochs):
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        train_meter = PhaseMeter(device)
        train_meter.start()
        losses = engine.train_one_epoch(ddp_model, train_loader, optimizer, device, epoch=epoch,
                                        grad_clip=t.grad_clip, lr_scheduler=lr_scheduler,
                                        amp_dtype=amp_dtype, scaler=scaler, meter=train_meter)
        train_stats = train_meter.stop()
        losses = dist.all_reduce_mean(losses, device)

        if merged_eval:
            eval_module.to(device)
            eval_module.load_state_dict(merged_state_dict(module))
        eval_meter = PhaseMeter(device)
        eval_meter.start()
        last = epoch == t.epochs - 1
        dets, _ = engine.predict(eval_module, val_loader, device, label_map.category_ids,
                                 amp_dtype=amp_dtype, meter=eval_meter)
        eval_stats = eval_meter.stop()
        kept = []
        if dist.is_main() and last and trial.eval.visuals:
            # The first val images themselves: the distributed sampler deals them out across ranks.
            first = DataLoader(Subset(val_ds, range(min(8, len(val_ds)))), batch_size=t.batch_size_per_worker,
                               collate_fn=collate_fn)
            _, kept = engine.predict(eval_module, first, device, label_map.category_ids, amp_dtype=amp_dtype,
                                     keep_images=8)
        if merged_eval:
            eval_module.to("cpu")
        all_dets = engine.gather_detections(dets)  # on rank 0 only
        phase = dist.gather_objects((train_stats, eval_stats, peak_rss_mb()))
        tr = reduce_phase_stats([p[0] for p in phase])  # images/s summed, seconds and VRAM maxed
        evs = reduce_phase_stats([p[1] for p in phase])
        if evs["images"] > len(val_ds):  # the sampler padded the last round with images of other ranks
            evs["images_per_s"] *= len(val_ds) / evs["images"]
        totals["train_s"] += tr["seconds"]
        totals["eval_s"] += evs["seconds"]
        # Peak VRAM of the whole trial: the largest of any epoch (each epoch resets per phase).
        for key, value in (("peak_vram_train_mb", tr["peak_vram_mb"]), ("peak_vram_eval_mb", evs["peak_vram_mb"])):
            if value is not None:
                totals[key] = max(value, totals.get(key) or 0.0)

        metrics: dict[str, Any] | None = None
        ckpt_dir = None
        if dist.is_main():
            ev = trial.eval
            quality = evaluate_detections(str(val_ann), all_dets, match_iou=ev.calibration.match_iou,
                                          bins=ev.calibration.bins,
                                          error_score_threshold=ev.error_score_threshold, backend=ev.backend)
            metrics = {
                "epoch": epoch, "epochs_completed": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                # Tune's TensorBoard logger takes its step from `timesteps_total` when present, else
                # from `training_iteration`, which restarts after a restore: curves stay on epochs.
                "timesteps_total": epoch + 1,
                **losses,  # loss (their sum) and each weighted component, mean over ranks
                **{k: v for k, v in quality.items() if k not in ("per_class_ap", "reliability")},
                "per_class_ap": json.dumps(quality.get("per_class_ap", {})),
                "reliability": json.dumps(quality.get("reliability", {})),
                **counts,
                "peak_vram_train_mb": totals.get("peak_vram_train_mb"),
                "peak_vram_eval_mb": totals.get("peak_vram_eval_mb"),
                "peak_rss_mb": max(p[2] for p in phase),
                "train_images_per_s": tr["images_per_s"], "eval_images_per_s": evs["images_per_s"],
                "train_s": totals["train_s"], "eval_s": totals["eval_s"], **info,
                # Rank 0's node (the driver and Tune's trial actor run elsewhere on a cluster). Not
                # `hostname`: Tune overwrites that key of every result with the trial actor's node.
                "rank0_hostname": socket.gethostname(),
                "worker_started_at": worker_started_at,  # unix time: when this worker group began
            }
            if resumed_from is not None:
                metrics["resumed_from_epoch"] = resumed_from
            history.append({k: v for k, v in metrics.items()
                            if isinstance(v, (int, float)) and k != "worker_started_at"})
            ckpt_dir = tempfile.mkdtemp(prefix=f"ckpt-{trial.trial_id}-")
            torch.save(_model_state(module, trial.regime), os.path.join(ckpt_dir, MODEL_STATE))
            torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "epoch": epoch, "history": history, "totals": totals, "metrics": metrics},
                       os.path.join(ckpt_dir, TRAIN_STATE))
            with open(os.path.join(ckpt_dir, META), "w") as f:
                json.dump({"trial_id": trial.trial_id, "epoch": epoch, "regime": trial.regime,
                           "model": trial.model, "label_map": label_map.as_dict(),
                           "saved_at": time.time()}, f)
            _write_artefacts(ckpt_dir, all_dets, history, kept, quality, label_map, last and trial.eval.visuals)
        metrics = dist.broadcast_object(metrics)
        ray.train.report(metrics, checkpoint=(ray.train.Checkpoint.from_directory(ckpt_dir)
                                              if ckpt_dir is not None else None))
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


def _write_artefacts(out_dir: str, detections: list, history: list, kept: list, quality: dict,
                     label_map: Any, visuals: bool) -> None:
    """Beside the checkpoint: the COCO results JSON (re-evaluate offline), and on the last epoch
    the loss curves, the reliability diagram and predictions drawn on the first val images."""
    from detsweep.metrics.coco import write_detections_json

    write_detections_json(detections, os.path.join(out_dir, "detections.json"))
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
