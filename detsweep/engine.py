"""One epoch of training and one pass of prediction: plain torch with explicit arguments, so the
same code runs under Ray, torchrun or a notebook. The model follows DESIGN.md's detector contract."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterable

import torch

from detsweep import dist
from detsweep.models.boxes import NonFiniteBoxesError



class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; the trial is recorded as failed with this message."""


def to_device(images: list[torch.Tensor], targets: list[dict[str, Any]] | None, device: torch.device):
    """Batches onto `device`; uint8 images (a GPU trial's loader) become float 0..1 there, not on the host."""
    images = [im.to(device, non_blocking=True) for im in images]
    images = [im.float().div_(255.0) if im.dtype == torch.uint8 else im for im in images]
    if targets is not None:
        targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
    return images, targets


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that `train.amp` (`auto | bf16 | fp16 | off`) gives on `device`; None = fp32.
    On the CPU only an explicit `bf16` autocasts (torch's CPU autocast; the tests' cheap net for dtype
    bugs): `auto` stays fp32 there, and fp16 needs a GPU's GradScaler."""
    if amp == "off":
        return None
    if device.type == "cpu":
        return torch.bfloat16 if amp == "bf16" else None
    if device.type != "cuda":
        return None
    # Without including_emulation=False, T4/V100 (sm75/sm70) count as bf16-capable and train in slow emulated bf16.
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported(including_emulation=False)):
        return torch.bfloat16
    return torch.float16


def amp_name(amp_dtype: torch.dtype | None) -> str:
    """The `amp_dtype` results column: the precision a trial really trained in."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[amp_dtype]


def lr_lambda(train: Any, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier on each param group's base lr per optimizer step (`LambdaLR`): linear warm-up over
    `train.warmup_steps`, then `train.lr_schedule` (`step`: x0.1 from `train.lr_drop_epoch`, default
    2/3 of the epochs as the official 200 of 300; `cosine`; `constant`)."""
    total = max(1, train.epochs * steps_per_epoch)
    drop_epoch = train.lr_drop_epoch or max(1, round(2 * train.epochs / 3))

    def f(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "step":
            return 0.1 if step >= drop_epoch * steps_per_epoch else 1.0
        if train.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        return 1.0

    return f


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epoch: int,
    grad_clip: float = 0.0,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    meter: Any = None,
    accumulate: int = 1,
    on_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train for one pass over `loader` ((images, targets) batches, see `collate_fn`).

    `accumulate`: one optimizer step per N batches (and one after the last): each batch's loss is
    divided by N, and a DDP model skips its gradient all-reduce (`no_sync`) on the batches between
    steps. `lr_scheduler` is stepped per optimizer step (warm-up + schedule in optimizer steps);
    `on_step()` runs after each (the EMA update, the profiler). `meter` is a
    `metrics.efficiency.PhaseMeter` (or None) told about every batch. Returns the mean over this
    rank's batches of each weighted loss and of their sum, `loss`.
    Raises `NonFiniteLossError` as soon as the summed loss is NaN/Inf.
    """
    model.train()
    # Running sums stay on the device (float64: thousands of steps), read back once at the end of the epoch.
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    for images, targets in loader:
        images, targets = to_device(images, targets, device)
        if batches % accumulate == 0:
            optimizer.zero_grad(set_to_none=True)
        stepping = (batches + 1) % accumulate == 0
        # Between optimizer steps a DDP model keeps its gradients local: one all-reduce per step, not per batch.
        sync = model.no_sync() if not stepping and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync:
            loss_dict, loss = _forward(model, images, targets, device, amp_dtype, f"epoch {epoch} step {batches}")
            (scaler.scale(loss / accumulate) if scaler is not None else loss / accumulate).backward()
        if stepping:
            _optimizer_step(optimizer, scaler, grad_clip, lr_scheduler, on_step)
        for k, v in (*loss_dict.items(), ("loss", loss)):
            v = v.detach().double().reshape(())
            sums[k] = v if k not in sums else sums[k] + v
        batches += 1
        if meter is not None:
            meter.step(len(images))
    if batches == 0:
        raise RuntimeError("the training loader produced no batch; is the dataset empty?")
    if batches % accumulate:  # the epoch's last, partial accumulation still makes its step
        _optimizer_step(optimizer, scaler, grad_clip, lr_scheduler, on_step)
    means = (torch.stack(list(sums.values())) / batches).tolist()  # note: one sync, at the end of the epoch
    return dict(zip(sums, means))


def _forward(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device,
             amp_dtype: torch.dtype | None, where: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The weighted losses and their sum, checked finite."""
    try:
        with autocast(device, amp_dtype):
            loss_dict = model(images, targets)
    except NonFiniteBoxesError as e:  # diverged: DETR's matcher meets the NaN boxes before the loss
        raise NonFiniteLossError(f"non-finite predicted boxes at {where}: training diverged ({str(e)[:120]})") from e
    loss = sum(loss_dict.values())
    # note: a CPU-GPU sync point, the step's only one here; once per step is the price of failing fast.
    if not torch.isfinite(loss).item():
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict.items())  # read back only on failure
        raise NonFiniteLossError(f"non-finite loss {loss.item()} at {where} ({parts})")
    return loss_dict, loss


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, grad_clip: float,
                    lr_scheduler: Any, on_step: Callable[[], None] | None) -> None:
    """Clip, step (through the GradScaler with fp16), advance the schedule."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    if on_step is not None:
        on_step()


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device,
    category_ids: list[int] | tuple[int, ...],
    *,
    amp_dtype: torch.dtype | None = None,
    meter: Any = None,
    keep_images: int = 0,
    val_loss: dict[str, float] | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[torch.Tensor, dict, dict]]]:
    """Run the detector over `loader` and return this rank's detections in COCO results format
    (`{"image_id", "category_id" (original id), "bbox": [x, y, w, h] absolute, "score"}`),
    with no score threshold. Also returns the first `keep_images` (image, target, prediction)
    triples on CPU, for drawing. Given a dict `val_loss`, fills it with this rank's mean weighted
    validation losses (`val_loss` and `val_<term>`): `_detect_with_loss` says how each model gets them."""
    model.eval()
    detections: list[dict[str, Any]] = []
    kept: list[tuple[torch.Tensor, dict, dict]] = []
    seen: set[int] = set()  # a loader that repeats an image (e.g. a ConcatDataset) scores it once
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    for images, targets in loader:
        with autocast(device, amp_dtype):
            if val_loss is None:
                images, _ = to_device(images, None, device)
                outputs = model(images)
            else:
                images, on_device = to_device(images, targets, device)
                outputs, losses = _detect_with_loss(model, images, on_device)
                for k, v in (*((f"val_{k}", v) for k, v in losses.items()), ("val_loss", sum(losses.values()))):
                    sums[k] = sums.get(k, 0) + v.detach().double()
                batches += 1
        fresh = 0
        for image, target, out in zip(images, targets, outputs):
            boxes_xyxy = out["boxes"].float().cpu()
            (h, w), (oh, ow) = image.shape[-2:], target.get("orig_size", image.shape[-2:])
            if (h, w) != (oh, ow):  # an eval transform resized the image: boxes back to the file's pixels
                boxes_xyxy = boxes_xyxy * torch.tensor([ow / w, oh / h, ow / w, oh / h])
            boxes_xywh = torch.cat([boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], dim=1)
            image_id = int(target["image_id"])
            if image_id in seen:
                continue
            seen.add(image_id)
            fresh += 1
            for box, score, label in zip(boxes_xywh.tolist(), out["scores"].float().cpu().tolist(),
                                         out["labels"].cpu().tolist()):
                detections.append({"image_id": image_id, "category_id": int(category_ids[label]),
                                   "bbox": [round(c, 3) for c in box], "score": float(score)})
            if len(kept) < keep_images:
                kept.append((image.cpu(), {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in target.items()},
                             {k: v.float().cpu() for k, v in out.items()}))
        if meter is not None:
            meter.step(fresh)  # a repeat is not another image evaluated
    if val_loss is not None and batches:
        val_loss.update(zip(sums, (torch.stack(list(sums.values())) / batches).tolist()))  # one read-back
    return detections, kept


def _detect_with_loss(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict[str, Any]]
                      ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Detections and weighted losses of one val batch. DETR gives both from one eval forward
    (`predict_with_loss`). torchvision's Faster R-CNN computes losses only in train mode, so it runs a second
    forward in train mode under no_grad (its FrozenBatchNorm has no running statistics to disturb; the RPN
    and RoI sampling are as in training)."""
    if hasattr(model, "predict_with_loss"):
        return model.predict_with_loss(images, targets)
    outputs = model(images)
    model.train()
    try:
        losses = model(images, targets)
    finally:
        model.eval()
    return outputs, losses


def gather_detections(detections: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """All ranks' detections on rank 0 (None on the other ranks), deduplicated by image id:
    `DistributedSampler` pads the last batch by repeating images, and a repeated image must be
    scored once (it is kept from the lowest rank that saw it)."""
    per_rank = dist.gather_to_main(detections)
    if per_rank is None:
        return None
    seen_by: dict[int, int] = {}
    merged: list[dict[str, Any]] = []
    for r, dets in enumerate(per_rank):
        for d in dets:
            owner = seen_by.setdefault(d["image_id"], r)
            if owner == r:
                merged.append(d)
    return merged


def to_cpu(obj: Any) -> Any:
    """`obj` (nested dicts/lists of tensors) with every tensor detached and copied to the CPU, so a
    checkpoint written on a GPU node loads on a CPU-only machine without `map_location`."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _adapters_only(module: torch.nn.Module, regime: str) -> bool:
    """Whether a checkpoint of `regime` keeps only the adapters and what trains: lora_only, and a two_stage
    trial into lora_only (it carries adapters from the start)."""
    from detsweep.models.lora import lora_parameters

    return regime == "lora_only" or (regime == "two_stage" and bool(lora_parameters(module)))


def model_state(module: torch.nn.Module, regime: str) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model, on the CPU: a LoRA trial only its adapters and heads
    (the base is rebuilt from its weights), other regimes the whole state dict."""
    if _adapters_only(module, regime):
        from detsweep.models.lora import lora_state_dict

        return to_cpu(lora_state_dict(module))
    return to_cpu(module.state_dict())


def load_model_state(module: torch.nn.Module, regime: str, state: dict[str, torch.Tensor]) -> None:
    """The inverse of `model_state`."""
    if _adapters_only(module, regime):
        from detsweep.models.lora import load_lora_state_dict

        load_lora_state_dict(module, state)
    else:
        module.load_state_dict(state)


@dataclasses.dataclass
class Optimization:
    """A trial's optimizer, per-step LR schedule and (fp16 only) GradScaler."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None

    def state_dict(self) -> dict[str, Any]:
        return to_cpu({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                       "scaler": self.scaler.state_dict() if self.scaler is not None else None})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def prepare_training(model: torch.nn.Module, train: Any, *, steps_per_epoch: int, to: torch.device | torch.dtype,
                     amp_dtype: torch.dtype | None, state: dict[str, Any] | None = None) -> Optimization:
    """Move `model` to `to` (its device), then build AdamW over its param groups (`model.param_groups`:
    heads at `train.lr`, backbone at `train.lr_backbone`), the LR schedule and the GradScaler, and load
    a checkpoint's `state` into them. The order matters: `Optimizer.load_state_dict` casts the saved
    moments to the device and dtype of the parameters it finds, so the model must already be where it
    trains; loaded before the move, AdamW's state stays on the CPU and the first CUDA step fails."""
    model.to(to)
    # fused: one kernel for all parameters instead of a loop of small ops (CPU and CUDA); for small models
    # the optimizer step was most of the step (bench/RESULTS.md, "Learning from scratch": 75 -> 13 ms).
    optimizer = torch.optim.AdamW(model.param_groups(train.lr, train.lr_backbone, train.weight_decay),
                                  lr=train.lr, weight_decay=train.weight_decay, fused=True)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    opt = Optimization(optimizer, lr_scheduler, scaler)
    if state is not None:
        opt.load_state_dict(state)
    return opt


class EMA:
    """An exponential moving average of a model's *trainable* parameters (a LoRA trial: its adapters and
    heads, never a second copy of the frozen backbone), kept by `torch.optim.swa_utils.AveragedModel` over
    them. After optimizer step t the average moves by `d_t = decay * (1 - exp(-t / warmup_steps))`
    (constant `decay` without warm-up), so early, random weights fade out fast. `applied(model)` swaps the
    average in for evaluation and swaps the live weights back after."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup_steps: int = 0) -> None:
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.decay, self.warmup_steps, self.steps = decay, warmup_steps, 0
        self.average = torch.optim.swa_utils.AveragedModel(
            torch.nn.ParameterList(self._params(model)), multi_avg_fn=self._average, use_buffers=False)

    def _params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        by_name = dict(model.named_parameters())
        return [by_name[n] for n in self.names]

    def decay_at(self, step: int) -> float:
        return self.decay * (1.0 - math.exp(-step / self.warmup_steps)) if self.warmup_steps else self.decay

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _n: Any) -> None:
        # One fused update of every tensor: avg += (1 - d) * (current - avg).
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay_at(self.steps))

    def update(self, model: torch.nn.Module) -> None:
        """After an optimizer step (`train_one_epoch(on_step=...)`)."""
        self.steps += 1
        self.average.update_parameters(torch.nn.ParameterList(self._params(model)))

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """`model` with the averaged weights in place of its trainable ones, for the block's duration."""
        live = [p.detach().clone() for p in self._params(model)]
        with torch.no_grad():
            for p, avg in zip(self._params(model), self.average.module.parameters()):
                p.copy_(avg)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, saved in zip(self._params(model), live):
                    p.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "average": to_cpu(self.average.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.average.load_state_dict(state["average"])
