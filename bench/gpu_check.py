#!/usr/bin/env python3
"""The GPU readiness check (issue 13): one GPU, synthetic data, no network, no Ray, under 8 minutes on one
H200. It drives detsweep's own engine and models the way a Ray Train worker does, prints one PASS / FAIL /
SKIP line per check, and rewrites <out>/gpu_check.json after every section, so a run cut short still
leaves what it measured. Exit status 1 when any check fails.

    PYTHONUNBUFFERED=1 python bench/gpu_check.py --out /tmp/gc      # on a GPU node, from the repository root
    python bench/gpu_check.py --smoke --out /tmp/gc                  # every section on CPU, tiny models
    python bench/gpu_check.py --only resume,ddp --out /tmp/gc

Sections (the optional ones are skipped once --budget-s is spent; seed000 sizes its steps to what is left):
  env       torch, CUDA, driver; what `train.amp: auto` picks (native bf16, else fp16); sm75+ / driver 580+
  resume    defect 1: after engine.prepare_training with a checkpoint's state, every optimizer state tensor
            is on its parameter's device and dtype and a step runs; the old order (load, then move) as control
  amp       DETR-R50 and Faster R-CNN R50-FPN steps at 800x1333, batch 4, in bf16, fp16 + GradScaler and
            fp32: finite losses, parameters updated, boxes fp32 in training and in eval
  regimes   per regime: train and eval images/s, peak allocated / reserved VRAM, syncs per step, A10G fit
  loader    synthetic JPEGs through data.coco.CocoDetection and a DataLoader: loader_workers 0 vs 8
  fraction  two LoRA trial processes on one GPU under set_per_process_memory_fraction vs one alone
  ddp       a world-1 NCCL DDP step per regime, DDP built as ray.train.torch.prepare_model builds it
            (an unused parameter would raise; a control proves it does), NCCL object collectives
  nccl      on a multi-GPU node: a 2-GPU all_reduce with NCCL_P2P_DISABLE=1 (cluster.yaml's g5 setting)
            and with P2P on; SKIP on one GPU
  knobs     (optional) channels_last, cudnn.benchmark and TF32 A/B
  seed000   (optional) seed 000's table: trainable params, peak VRAM, time for 500 steps of Faster R-CNN,
            DETR full and DETR LoRA r4, in the time left (fewer steps when the budget demands; the JSON says
            so). For all 500 steps of each: --only env,seed000
--smoke forces the CPU, tiny models (resnet18, 64x96 images, 1-2 steps); CUDA-only parts report SKIP and
performance expectations are not judged. Imports only torch, torchvision, numpy, PIL, detsweep's engine,
models and data, and the config sections of detsweep.sweep.spec (pyyaml, pyarrow): the lent GPU machine has
no Ray, no pycocotools, and nothing can be installed there (tests/bench/test_gpu_check.py blocks them).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from types import SimpleNamespace
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the GPU machine runs the checkout as it is: detsweep is not installed there

import torch  # noqa: E402

from detsweep import engine  # noqa: E402
from detsweep.models import build_model  # noqa: E402
from detsweep.models.lora import apply_lora  # noqa: E402
from detsweep.models.regimes import apply_regime  # noqa: E402
# The sweep file's own sections, so the builders get every field they read (a stand-in broke as soon as
# DetrConfig grew one). detsweep.sweep is torch- and Ray-free (tests/test_architecture.py); it needs pyyaml
# and pyarrow, which the lent GPU machine's image has.
from detsweep.sweep.spec import DetrConfig, FasterRCNNConfig, TrainConfig  # noqa: E402

T0 = time.time()
RESULT_TAG = "GC_RESULT "  # a child's answer on stdout, apart from anything else it prints
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
A10G_MIB = 23028  # what nvidia-smi reports for an A10G (g5): the node full.yaml plans for
FRACTION = 0.45  # two 0.5-GPU trials, each capped below its share: the CUDA context is outside the allocator

# Sizes. REAL is sweeps/full.yaml's trial (COCO-sized originals that the models resize to 800x1333).
REAL = SimpleNamespace(
    num_classes=80, batch=4, boxes=7,
    shapes=[(480, 640), (427, 640), (640, 480), (480, 640), (425, 640), (512, 640)],
    detr=dict(backbone="resnet50", hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048,
              num_queries=100, min_size=800, max_size=1333),
    frcnn=dict(backbone="resnet50", min_size=800, max_size=1333, box_batch_size_per_image=512,
               rpn_post_nms_top_n_test=1000, trainable_backbone_layers=None),
    warm=3, steps=10, max_update_steps=8, jpegs=120, loader_workers=8, loader_steps=20, trial_steps=30,
    seed000_steps=500)
TINY = SimpleNamespace(
    num_classes=5, batch=2, boxes=3, shapes=[(48, 64), (64, 48)],
    detr=dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64,
              num_queries=10, min_size=64, max_size=96),
    frcnn=dict(backbone="resnet18", min_size=64, max_size=96, box_batch_size_per_image=32,
               rpn_post_nms_top_n_test=100, trainable_backbone_layers=None),
    warm=0, steps=1, max_update_steps=1, jpegs=8, loader_workers=2, loader_steps=1, trial_steps=1,
    seed000_steps=1)
# sweeps/full.yaml's train section (its x0.1 drop at epoch 8 of 12 is never reached in these few steps).
TRAIN = TrainConfig(epochs=12, batch_size_per_worker=4, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, grad_clip=0.1,
                    lr_schedule="step", lr_drop_epoch=8, amp="auto", seed=0)


class Ctx:
    """What every section gets: sizes, device, a temporary folder, the time budget and the report."""

    def __init__(self, out: str, smoke: bool, budget_s: float) -> None:
        self.smoke, self.sizes = smoke, (TINY if smoke else REAL)
        self.dev = torch.device("cuda", 0) if not smoke and torch.cuda.is_available() else torch.device("cpu")
        self.cuda = self.dev.type == "cuda"
        self.tmp = tempfile.mkdtemp(prefix="gpu_check_")
        atexit.register(shutil.rmtree, self.tmp, True)
        self.path = os.path.join(out, "gpu_check.json")
        self.deadline = T0 + budget_s
        self.weights: dict[str, str] = {}  # kind -> a random checkpoint file (weights_file)
        self.context_mb: float | None = None
        self.section = ""
        self.report: dict[str, Any] = {"sections": {}, "checks": []}

    def left(self) -> float:
        return self.deadline - time.time()

    def figures(self) -> dict[str, Any]:
        return self.report["sections"][self.section]["figures"]

    def check(self, name: str, ok: bool | None, detail: str) -> None:
        """Record one check: ok True = PASS, False = FAIL, None = SKIP (cannot be judged here)."""
        status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.report["checks"].append({"section": self.section, "check": name, "status": status, "detail": detail})
        print(f"[{status}] {self.section}: {name}: {detail}", flush=True)

    def gate(self, ok: bool) -> bool:
        """A performance expectation: judged on a GPU only (--smoke measures on a shared CPU)."""
        return True if self.smoke else bool(ok)

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.report, f, indent=1, default=str)
        os.replace(tmp, self.path)  # a run killed mid-write leaves the previous complete file


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def mib(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()  # note: kernels run asynchronously; a clock read needs this first


def free(ctx: Ctx) -> None:
    """Drop the previous model's memory, so each measurement's peaks are its own."""
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peaks(ctx: Ctx) -> dict[str, float | None]:
    if not ctx.cuda:
        return {"peak_alloc_mb": None, "peak_reserved_mb": None}
    return {"peak_alloc_mb": mib(torch.cuda.max_memory_allocated()),
            "peak_reserved_mb": mib(torch.cuda.max_memory_reserved())}


def weights_file(ctx: Ctx, kind: str) -> str:
    """A random detector saved as a checkpoint file, made once per process tree. Built from a path, a model
    has `weights: coco`'s layout without a download, as sweeps/full.yaml's trials do: Faster R-CNN with
    FrozenBatchNorm2d and 3 trainable backbone layers, DETR with its stem and layer1 frozen (`weights:
    none` trains all of the ResNet)."""
    if kind not in ctx.weights:
        torch.manual_seed(0)
        s = ctx.sizes
        if kind == "detr":
            model = build_model("detr_r50", DetrConfig(**s.detr), num_classes=s.num_classes)
        else:
            cfg = FasterRCNNConfig(**{**s.frcnn, "weights": "none", "trainable_backbone_layers": None})
            model = build_model("fasterrcnn_r50_fpn", cfg, num_classes=s.num_classes)
        ctx.weights[kind] = os.path.join(ctx.tmp, f"{kind}_random.pth")
        torch.save(model.state_dict(), ctx.weights[kind])
    return ctx.weights[kind]


def build(ctx: Ctx, kind: str, regime: str = "full", placement: str = "attention_only",
          rank: int = 8) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A detector on the CPU as the worker builds it (build_model, LoRA, regime) and its parameter counts."""
    torch.manual_seed(0)
    s = ctx.sizes
    if kind == "detr":
        cfg = DetrConfig(**{**s.detr, "weights": weights_file(ctx, kind)})
        model = build_model("detr_r50", cfg, num_classes=s.num_classes)
    else:
        cfg = FasterRCNNConfig(**{**s.frcnn, "weights": weights_file(ctx, kind)})
        model = build_model("fasterrcnn_r50_fpn", cfg, num_classes=s.num_classes)
    if regime == "lora_only":
        apply_lora(model, rank=rank, alpha=16.0, placement=placement)
    return model, apply_regime(model, regime)


def make_batches(ctx: Ctx, n: int, seed: int = 0) -> list[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
    """n (images, targets) batches on the device: images [3, H, W] in 0..1 at COCO-like original sizes,
    targets {boxes (xyxy, absolute), labels 0..K-1, image_id, orig_size}."""
    s, g = ctx.sizes, torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        images, targets = [], []
        for i in range(s.batch):
            h, w = s.shapes[(b * s.batch + i) % len(s.shapes)]
            wh = torch.tensor([w, h, w, h], dtype=torch.float32)
            xy0 = torch.rand(s.boxes, 2, generator=g) * torch.tensor([w, h]) * 0.6
            size = (0.1 + 0.3 * torch.rand(s.boxes, 2, generator=g)) * torch.tensor([w, h])
            boxes_xyxy = torch.minimum(torch.cat([xy0, xy0 + size], 1), wh)
            images.append(torch.rand(3, h, w, generator=g).to(ctx.dev))
            targets.append({"boxes": boxes_xyxy.to(ctx.dev),
                            "labels": torch.randint(0, s.num_classes, (s.boxes,), generator=g).to(ctx.dev),
                            "image_id": b * s.batch + i + 1, "orig_size": (h, w)})
        out.append((images, targets))
    return out


def cycled(batches: list, n: int) -> list:
    return [batches[i % len(batches)] for i in range(n)]


def prepare(ctx: Ctx, model: torch.nn.Module, amp_dtype: torch.dtype | None,
            state: dict[str, Any] | None = None) -> engine.Optimization:
    return engine.prepare_training(model, TRAIN, steps_per_epoch=1000, to=ctx.dev, amp_dtype=amp_dtype, state=state)


def train(ctx: Ctx, model: torch.nn.Module, opt: engine.Optimization, batches: Any,
          amp_dtype: torch.dtype | None) -> dict[str, float]:
    """engine.train_one_epoch as the worker calls it."""
    return engine.train_one_epoch(model, batches, opt.optimizer, ctx.dev, epoch=0, grad_clip=TRAIN.grad_clip,
                                  lr_scheduler=opt.lr_scheduler, amp_dtype=amp_dtype, scaler=opt.scaler)


def timed(ctx: Ctx, model: torch.nn.Module, opt: engine.Optimization, batches: list, amp_dtype: torch.dtype | None,
          warm: int) -> tuple[dict[str, float], float, float]:
    """(losses, images/s, seconds) over batches[warm:]; the first `warm` (cuDNN autotuning, allocator growth)
    are left out, as PhaseMeter does."""
    if warm:
        train(ctx, model, opt, batches[:warm], amp_dtype)
    sync(ctx)
    t = time.perf_counter()
    losses = train(ctx, model, opt, batches[warm:], amp_dtype)
    sync(ctx)
    seconds = time.perf_counter() - t
    return losses, sum(len(b[0]) for b in batches[warm:]) / seconds, seconds


def count_syncs(fn: Callable[[], Any]) -> int:
    """Host-device synchronisations that fn makes (CUDA's sync debug mode warns at each one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


class GpuUtil:
    """GPU utilisation sampled every 50 ms in a thread (NVML); mean None without pynvml or CUDA."""

    def __init__(self, ctx: Ctx) -> None:
        self.samples: list[int] = []
        self._stop, self._nvml = threading.Event(), None
        if ctx.cuda:
            with contextlib.suppress(Exception):
                import pynvml

                pynvml.nvmlInit()
                self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

    def __enter__(self) -> GpuUtil:
        if self._nvml:
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def run_child(ctx: Ctx, name: str, args: dict[str, Any], timeout: float,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run CHILDREN[name](args) in a fresh process of this file; its JSON answer, or {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--child-args", json.dumps(args),
           "--out", ctx.tmp] + (["--smoke"] if ctx.smoke else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    answers = [line[len(RESULT_TAG):] for line in p.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if p.returncode or not answers:
        return {"error": f"exit status {p.returncode}: {p.stderr.strip()[-1500:]}"}
    return json.loads(answers[-1])


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------
def sec_env(ctx: Ctx) -> None:
    import torchvision

    f = ctx.figures()
    f.update(torch=torch.__version__, torchvision=torchvision.__version__, python=sys.version.split()[0],
             cpus=os.cpu_count(), cuda_available=torch.cuda.is_available(), device=str(ctx.dev),
             torch_cuda=torch.version.cuda)
    f["amp"] = {a: str(engine.amp_dtype_for(a, ctx.dev)) for a in ("auto", "bf16", "fp16", "off")}
    if not ctx.cuda:
        ctx.check("amp auto picks native bf16, else fp16", None, f"no CUDA device ({ctx.dev}); amp {f['amp']}")
        ctx.check("CUDA 13 wheels: sm75+ and driver >= 580", None, "no CUDA device")
        return
    p = torch.cuda.get_device_properties(ctx.dev)
    torch.zeros(1, device=ctx.dev)  # the context now exists: what the device uses beyond the allocator
    free_b, total_b = torch.cuda.mem_get_info()
    ctx.context_mb = mib(total_b - free_b - torch.cuda.memory_reserved())
    driver = None
    with contextlib.suppress(Exception):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.split()[0]
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    f.update(gpu=p.name, capability=f"{p.major}.{p.minor}", total_mib=mib(p.total_memory), driver=driver,
             cudnn=torch.backends.cudnn.version(), nccl=str(torch.cuda.nccl.version()),
             bf16_native=native, bf16_with_emulation=torch.cuda.is_bf16_supported(), context_mb=ctx.context_mb,
             matmul_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_tf32=torch.backends.cudnn.allow_tf32)
    want = str(torch.bfloat16 if native else torch.float16)
    ctx.check("amp auto picks native bf16, else fp16", f["amp"]["auto"] == want,
              f"auto -> {f['amp']['auto']} on {p.name} (sm{p.major}{p.minor}); native bf16: {native}, "
              f"is_bf16_supported(): {f['bf16_with_emulation']}")
    major = int(driver.split(".")[0]) if driver else None
    if not (torch.version.cuda or "").startswith("13"):
        ctx.check("CUDA 13 wheels: sm75+ and driver >= 580", None, f"torch is built for CUDA {torch.version.cuda}")
    else:
        ctx.check("CUDA 13 wheels: sm75+ and driver >= 580", (p.major, p.minor) >= (7, 5) and (major or 0) >= 580,
                  f"sm{p.major}{p.minor}, driver {driver}, torch CUDA {torch.version.cuda}")


def misplaced_state(optimizer: torch.optim.Optimizer) -> tuple[int, list[str]]:
    """(optimizer state tensors looked at, those not on their parameter's device and dtype). AdamW's `step`
    counts are left out: torch keeps them CPU scalars on purpose (neither capturable nor fused)."""
    n, bad = 0, []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key == "step" or not torch.is_tensor(value):
                    continue
                n += 1
                if value.device != p.device or value.dtype != p.dtype:
                    bad.append(f"{key} {value.device}/{value.dtype} vs param {p.device}/{p.dtype}")
    return n, bad


def sec_resume(ctx: Ctx) -> None:
    """Defect 1. On CPU a dtype change (float64) stands in for the device change: Optimizer.load_state_dict
    casts saved moments to the dtype and the device of the parameters it finds, in the same call."""
    f = ctx.figures()
    target = ctx.dev if ctx.cuda else torch.float64
    batch = make_batches(ctx, 1)
    for kind, regime, amp in (("detr", "full", "bf16"), ("detr", "lora_only", "fp16")):
        key, dt = f"{kind}/{regime}", (DTYPES[amp] if ctx.cuda else None)
        try:
            m, _ = build(ctx, kind, regime)
            opt = prepare(ctx, m, dt)
            for _ in range(ctx.sizes.max_update_steps):  # fp16: GradScaler skips the steps whose grads overflow,
                train(ctx, m, opt, batch, dt)            # and AdamW has no state before its first real step
                if opt.optimizer.state:
                    break
            state, weights = opt.state_dict(), engine.model_state(m, regime)  # CPU copies, as a checkpoint holds
            scale = opt.scaler.get_scale() if opt.scaler is not None else None
            del m, opt
            free(ctx)
            # The fixed order: a fresh CPU model gets the weights, prepare_training moves it, then loads the state.
            m, _ = build(ctx, kind, regime)
            engine.load_model_state(m, regime, weights)
            opt = engine.prepare_training(m, TRAIN, steps_per_epoch=1000, to=target, amp_dtype=dt, state=state)
            n, bad = misplaced_state(opt.optimizer)
            scale_ok = scale is None or opt.scaler.get_scale() == scale
            step = "not run: float64 stands in for the device on CPU"
            if ctx.cuda:
                train(ctx, m, opt, batch, dt)
                step = "ok"
            # The old order (defect 1): the state loaded into the CPU model's optimizer, then the model moved, as
            # ray.train.torch.prepare_model did after the restore.
            c, _ = build(ctx, kind, regime)
            engine.load_model_state(c, regime, weights)
            copt = engine.prepare_training(c, TRAIN, steps_per_epoch=1000, to=torch.device("cpu"), amp_dtype=dt,
                                           state=state)
            c.to(target)
            _, cbad = misplaced_state(copt.optimizer)
            control = f"{len(cbad)} misplaced"
            if ctx.cuda:
                try:
                    train(ctx, c, copt, batch, dt)
                    control += ", and its step ran"
                except Exception as e:  # the crash defect 1 describes: a device mismatch in AdamW's step
                    control += f", its step raised {type(e).__name__}"
            f[key] = {"amp": amp if ctx.cuda else "fp32", "state_tensors": n, "misplaced": bad[:5],
                      "step_after_restore": step, "scaler_scale": scale, "old_order_misplaced": len(cbad)}
            ctx.check(f"{key}: restored state on its parameter's device and dtype", n > 0 and not bad and scale_ok,
                      f"{n - len(bad)}/{n} state tensors on {target}; step after restore: {step}; "
                      f"GradScaler scale restored: {scale_ok}" + (f"; e.g. {bad[0]}" if bad else ""))
            ctx.check(f"{key}: control, the old order is caught", len(cbad) > 0, control)
        except Exception as e:  # one case failing must not hide the other
            f[key] = {"error": repr(e)[:500], "traceback": traceback.format_exc()[-2000:]}
            ctx.check(f"{key}: restored state on its parameter's device and dtype", False, repr(e)[:300])
        finally:
            m = opt = c = copt = None
            free(ctx)


def sec_amp(ctx: Ctx) -> None:
    f, s = ctx.figures(), ctx.sizes
    batches = make_batches(ctx, s.max_update_steps)
    for kind, prec in itertools.product(("detr", "frcnn"), ("bf16", "fp16", "fp32")):
        key, dt = f"{kind}/{prec}", DTYPES[prec]
        if prec == "fp16" and not ctx.cuda:
            ctx.check(f"{key}: trains and evaluates", None, "fp16 + GradScaler needs CUDA")
            continue
        try:
            m, _ = build(ctx, kind)
            opt = prepare(ctx, m, dt)
            trainable = [p for p in m.parameters() if p.requires_grad]
            before = [p.detach().clone() for p in trainable]
            dtypes: dict[str, str] = {}
            if kind == "detr":  # DETR's raw outputs in training: the boxes that feed the matcher and the losses
                hook = m.detr.register_forward_hook(lambda mod, i, o: dtypes.update(
                    train_logits=str(o["pred_logits"].dtype), train_boxes=str(o["pred_boxes"].dtype)))
            else:  # the RPN's decoded proposals, which the RoI heads sample from in training
                hook = m.model.rpn.register_forward_hook(lambda mod, i, o: dtypes.update(
                    train_proposals=str(o[0][0].dtype)))
            losses, changed, steps = [], 0, 0
            while steps < s.max_update_steps and not changed:  # GradScaler skips steps whose grads overflow
                losses.append(train(ctx, m, opt, batches[steps:steps + 1], dt)["loss"])
                steps += 1
                changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, trainable))
            hook.remove()
            del before
            m.eval()
            with torch.no_grad(), engine.autocast(ctx.dev, dt):
                outs = m(batches[0][0])
            dtypes["eval_boxes"] = str(outs[0]["boxes"].dtype)
            finite = all(bool(torch.isfinite(o["boxes"]).all() and torch.isfinite(o["scores"]).all()) for o in outs)
            fp32 = all(v == str(torch.float32) for k, v in dtypes.items() if "boxes" in k or "proposals" in k)
            f[key] = {"losses": losses, "params_updated": changed, "trainable_tensors": len(trainable),
                      "steps": steps, "scale": opt.scaler.get_scale() if opt.scaler is not None else None,
                      "dtypes": dtypes, "eval_finite": finite, **peaks(ctx)}
            ok = all(math.isfinite(v) for v in losses) and changed > 0 and finite and fp32
            ctx.check(f"{key}: trains and evaluates", ok,
                      f"loss {losses[-1]:.3f}, {changed}/{len(trainable)} tensors updated after {steps} step(s), "
                      f"box dtypes {dtypes}, eval finite {finite}")
        except Exception as e:  # one precision failing must not hide the others
            f[key] = {"error": repr(e)[:500], "traceback": traceback.format_exc()[-2000:]}
            ctx.check(f"{key}: trains and evaluates", False, repr(e)[:300])
        finally:
            m = opt = None
            free(ctx)


def regime_cases(ctx: Ctx) -> list[tuple[str, str, str, int]]:
    """(kind, regime, placement, rank): seed 000's regimes; --smoke keeps one of each kind of code path."""
    if ctx.smoke:
        return [("detr", "full", "", 0), ("detr", "lora_only", "attention_only", 4), ("frcnn", "partial", "", 0)]
    return [("detr", "full", "", 0), ("detr", "partial", "", 0), ("detr", "lora_only", "attention_only", 8),
            ("detr", "lora_only", "attention_ffn", 16), ("frcnn", "full", "", 0), ("frcnn", "partial", "", 0)]


def case_key(kind: str, regime: str, placement: str, rank: int) -> str:
    return f"{kind}/{regime}" + (f"/{placement}/r{rank}" if placement else "")


def sec_regimes(ctx: Ctx) -> None:
    f, s = ctx.figures(), ctx.sizes
    dt = engine.amp_dtype_for("auto", ctx.dev)
    distinct = make_batches(ctx, min(6, s.warm + s.steps))
    ids = list(range(1, s.num_classes + 1))
    for kind, regime, placement, rank in regime_cases(ctx):
        key = case_key(kind, regime, placement, rank)
        try:
            m, counts = build(ctx, kind, regime, placement or "attention_only", rank or 8)
            opt = prepare(ctx, m, dt)
            free(ctx)
            losses, ips, _ = timed(ctx, m, opt, cycled(distinct, s.warm + s.steps), dt, s.warm)
            row: dict[str, Any] = {"amp": str(dt), "trainable_params": counts["trainable_params"],
                                   "total_params": counts["total_params"], "loss": losses["loss"],
                                   "train_images_per_s": round(ips, 2), **peaks(ctx)}
            if ctx.cuda:
                row["syncs_per_step"] = count_syncs(lambda: train(ctx, m, opt, distinct[:1], dt))
                torch.cuda.reset_peak_memory_stats()
            if s.warm:
                engine.predict(m, distinct[:1], ctx.dev, ids, amp_dtype=dt)
            sync(ctx)
            t = time.perf_counter()
            engine.predict(m, distinct, ctx.dev, ids, amp_dtype=dt)
            sync(ctx)
            row["eval_images_per_s"] = round(len(distinct) * s.batch / (time.perf_counter() - t), 2)
            row["peak_alloc_eval_mb"] = peaks(ctx)["peak_alloc_mb"]
            fits = None
            if ctx.cuda:  # full.yaml: LoRA trials on half an A10G, the others on a whole one
                share = 0.5 if regime == "lora_only" else 1.0
                row["a10g_need_mib"] = round(row["peak_reserved_mb"] + (ctx.context_mb or 0), 1)
                fits = row["a10g_need_mib"] <= share * A10G_MIB
            f[key] = row
            ctx.check(f"{key} trains", math.isfinite(losses["loss"]) and ips > 0 and fits is not False,
                      f"{ips:.1f} img/s train, {row['eval_images_per_s']:.1f} img/s eval, peak alloc "
                      f"{row['peak_alloc_mb']} / reserved {row['peak_reserved_mb']} MiB, "
                      f"syncs/step {row.get('syncs_per_step')}, fits its A10G share: {fits}")
        except Exception as e:
            f[key] = {"error": repr(e)[:500], "traceback": traceback.format_exc()[-2000:]}
            ctx.check(f"{key} trains", False, repr(e)[:300])
        finally:
            m = opt = None
            free(ctx)


def write_jpegs(ctx: Ctx, root: str, n: int) -> tuple[str, str]:
    """n textured JPEGs (about COCO's file sizes) with boxes, and their COCO annotation file."""
    import numpy as np
    from PIL import Image, ImageDraw

    s, rng = ctx.sizes, np.random.default_rng(0)
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir)
    images, anns = [], []
    for i in range(n):
        h, w = s.shapes[i % len(s.shapes)]
        base = Image.fromarray((rng.random((max(2, h // 16), max(2, w // 16), 3)) * 255).astype("uint8"))
        pixels = np.asarray(base.resize((w, h), Image.BICUBIC)) + rng.normal(0, 12, (h, w, 3))
        im = Image.fromarray(pixels.clip(0, 255).astype("uint8"))
        draw = ImageDraw.Draw(im)
        for _ in range(s.boxes):
            bw, bh = int(rng.integers(4, w // 2)), int(rng.integers(4, h // 2))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, s.num_classes + 1)),
                         "bbox": [x0, y0, bw, bh], "area": bw * bh, "iscrowd": 0})
        im.save(os.path.join(img_dir, f"{i:06d}.jpg"), quality=90)
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "height": h, "width": w})
    ann_file = os.path.join(root, "instances.json")
    with open(ann_file, "w") as fh:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": k, "name": f"class{k}"} for k in range(1, s.num_classes + 1)]}, fh)
    return img_dir, ann_file


def sec_loader(ctx: Ctx) -> None:
    """Defect 2: JPEG decoding in the training process (loader_workers 0) against worker processes."""
    from torch.utils.data import DataLoader

    from detsweep.data.coco import CocoDetection, collate_fn

    f, s = ctx.figures(), ctx.sizes
    t = time.perf_counter()
    img_dir, ann_file = write_jpegs(ctx, tempfile.mkdtemp(dir=ctx.tmp), s.jpegs)
    ds = CocoDetection(img_dir, ann_file, train=True)
    kb = sum(os.path.getsize(os.path.join(img_dir, n)) for n in os.listdir(img_dir)) / len(ds) / 1024
    f.update(images=len(ds), mean_jpeg_kb=round(kb, 1), write_s=round(time.perf_counter() - t, 1))
    dt = engine.amp_dtype_for("auto", ctx.dev)
    workers = (0, s.loader_workers)

    def loader(nw: int) -> DataLoader:
        return DataLoader(ds, batch_size=s.batch, shuffle=True, collate_fn=collate_fn, num_workers=nw,
                          pin_memory=ctx.cuda, persistent_workers=nw > 0, prefetch_factor=4 if nw else None)

    for nw in workers:
        it = iter(loader(nw))
        next(it)  # worker start-up is not throughput
        t, k = time.perf_counter(), 0
        for images, _ in it:
            [im.to(ctx.dev, non_blocking=True) for im in images]
            k += len(images)
        sync(ctx)
        f[f"loader_only_nw{nw}_images_per_s"] = round(k / (time.perf_counter() - t), 1)
        m, _ = build(ctx, "detr")
        opt = prepare(ctx, m, dt)
        it = iter(loader(nw))
        if s.warm:
            train(ctx, m, opt, itertools.islice(it, s.warm), dt)
        with GpuUtil(ctx) as util:
            sync(ctx)
            t = time.perf_counter()
            train(ctx, m, opt, itertools.islice(it, s.loader_steps), dt)
            sync(ctx)
        f[f"e2e_nw{nw}_images_per_s"] = round(s.loader_steps * s.batch / (time.perf_counter() - t), 2)
        f[f"e2e_nw{nw}_gpu_util"] = util.mean
        del m, opt, it
        free(ctx)
    e0, en = (f[f"e2e_nw{nw}_images_per_s"] for nw in workers)
    gpu_only = (ctx.report["sections"].get("regimes", {}).get("figures", {}).get("detr/full") or {})
    f["gpu_only_images_per_s"] = gpu_only.get("train_images_per_s")
    f[f"nw{workers[1]}_vs_nw0"] = round(en / e0, 3)
    ctx.check(f"loader_workers {workers[1]} vs 0, DETR full end to end", ctx.gate(en >= e0),
              f"{e0:.1f} -> {en:.1f} img/s ({en / e0:.2f}x; GPU-only {f['gpu_only_images_per_s']}); GPU util "
              f"{f['e2e_nw0_gpu_util']} -> {f[f'e2e_nw{workers[1]}_gpu_util']} %; loader "
              f"alone {f['loader_only_nw0_images_per_s']} -> {f[f'loader_only_nw{workers[1]}_images_per_s']} img/s")


def child_trial(ctx: Ctx, a: dict[str, Any]) -> dict[str, Any]:
    """One LoRA trial's training steps in its own process, as a 0.5-GPU Ray worker runs it."""
    if a.get("fraction") and ctx.cuda:  # before the first allocation: the cap is the allocator's
        torch.cuda.set_per_process_memory_fraction(a["fraction"], ctx.dev)
    ctx.weights = a["weights"]
    s = ctx.sizes
    m, counts = build(ctx, "detr", "lora_only", "attention_only", 8)
    dt = engine.amp_dtype_for("auto", ctx.dev)
    opt = prepare(ctx, m, dt)
    batches = cycled(make_batches(ctx, min(6, s.warm + s.trial_steps)), s.warm + s.trial_steps)
    if s.warm:
        train(ctx, m, opt, batches[:s.warm], dt)
    if a.get("barrier"):  # both processes start their timed steps together
        open(os.path.join(a["barrier"], str(os.getpid())), "w").close()
        end = time.time() + 120
        while len(os.listdir(a["barrier"])) < a["n_procs"] and time.time() < end:
            time.sleep(0.02)
    sync(ctx)
    t0 = time.time()
    losses = train(ctx, m, opt, batches[s.warm:], dt)
    sync(ctx)
    t1 = time.time()
    used = None
    if ctx.cuda:
        free_b, total_b = torch.cuda.mem_get_info()
        used = mib(total_b - free_b)
    return {"images_per_s": round(s.trial_steps * s.batch / (t1 - t0), 2), "t_start": t0, "t_end": t1,
            "loss": losses["loss"], "trainable_params": counts["trainable_params"], "device_used_mb": used,
            "fraction": a.get("fraction") if ctx.cuda else None, **peaks(ctx)}


def sec_fraction(ctx: Ctx) -> None:
    """Defect 8 / P7: two 0.5-GPU LoRA trials on one GPU (Ray packs them there) against one alone."""
    f = ctx.figures()
    free(ctx)
    timeout = 120 if ctx.smoke else 200
    weights = {"detr": weights_file(ctx, "detr")}
    f["solo"] = solo = run_child(ctx, "trial", {"weights": weights}, timeout)
    barrier = tempfile.mkdtemp(dir=ctx.tmp)
    pair: list[dict[str, Any]] = [{}, {}]

    def go(i: int) -> None:
        pair[i] = run_child(ctx, "trial", {"weights": weights, "fraction": FRACTION, "barrier": barrier,
                                           "n_procs": 2}, timeout)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    f["pair"] = pair
    errors = [r["error"] for r in [solo, *pair] if "error" in r]
    if errors:
        ctx.check("two LoRA trials on one device", False, errors[0][-400:])
        return
    overlap = (min(r["t_end"] for r in pair) - max(r["t_start"] for r in pair)) / max(
        r["t_end"] - r["t_start"] for r in pair)
    agg = sum(r["images_per_s"] for r in pair)
    f.update(aggregate_images_per_s=round(agg, 2), aggregate_vs_solo=round(agg / solo["images_per_s"], 3),
             timed_overlap=round(overlap, 3))
    if ctx.cuda:
        cap = FRACTION * torch.cuda.get_device_properties(ctx.dev).total_memory / 2**20
        ctx.check(f"two LoRA trials fit under set_per_process_memory_fraction({FRACTION})",
                  all(r["peak_reserved_mb"] <= cap for r in pair),
                  f"reserved per process {[r['peak_reserved_mb'] for r in pair]} MiB (alone "
                  f"{solo['peak_reserved_mb']}; cap {cap:.0f}), allocated {[r['peak_alloc_mb'] for r in pair]} "
                  f"MiB; device used with both {max(r['device_used_mb'] for r in pair)} MiB")
    else:
        ctx.check(f"two LoRA trials fit under set_per_process_memory_fraction({FRACTION})", None,
                  "needs CUDA (two CPU processes ran)")
    ctx.check("two LoRA trials on one device vs one alone, aggregate images/s", ctx.gate(agg >= solo["images_per_s"]),
              f"alone {solo['images_per_s']:.1f}, pair {[r['images_per_s'] for r in pair]} -> {agg:.1f} img/s "
              f"({agg / solo['images_per_s']:.2f}x); timed steps overlapped {overlap:.0%}")


def child_ddp(ctx: Ctx, a: dict[str, Any]) -> dict[str, Any]:
    """World-1 process group (NCCL on CUDA, gloo on CPU, as Ray's TorchConfig picks), DDP wrapped with the
    arguments ray.train.torch.prepare_model passes when it wraps (world > 1; at world 1 Ray does not wrap, so
    the reducer's unused-parameter check would never run). The reducer raises at the next forward when a
    parameter that requires grad got none, hence 2 steps each."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from detsweep import dist as ddist

    ctx.weights = a["weights"]
    backend = "nccl" if ctx.cuda else "gloo"
    if ctx.cuda:
        torch.cuda.set_device(ctx.dev)  # Ray's TorchConfig does this before the train function
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{a['port']}", rank=0, world_size=1)
    wrap = {"device_ids": [ctx.dev], "output_device": ctx.dev} if ctx.cuda else {}
    dt = engine.amp_dtype_for("auto", ctx.dev)
    batches = make_batches(ctx, 2)
    out: dict[str, Any] = {"backend": backend, "regimes": {}}
    for kind, regime, placement, rank in [tuple(c) for c in a["cases"]] + [("control", "lora_only", "", 0)]:
        key = case_key(kind, regime, placement, rank)
        try:
            m, _ = build(ctx, "detr" if kind == "control" else kind, regime, placement or "attention_only", rank or 4)
            if kind == "control":  # a trainable parameter no loss uses: DDP must refuse it
                m.register_parameter("gc_unused", torch.nn.Parameter(torch.zeros(1)))
            opt = prepare(ctx, m, dt)
            train(ctx, DDP(m, **wrap), opt, batches, dt)
            out["regimes"][key] = "ok"
        except Exception as e:
            out["regimes"][key] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            m = opt = None
            free(ctx)
    dets = [{"image_id": i, "category_id": 1, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.5} for i in range(100)]
    out["gather_ok"] = engine.gather_detections(dets) == dets
    out["all_reduce_ok"] = ddist.all_reduce_mean({"loss": 2.0}, ctx.dev) == {"loss": 2.0}
    out["broadcast_ok"] = ddist.broadcast_object({"epoch": 3}) == {"epoch": 3}
    dist.destroy_process_group()
    return out


def sec_ddp(ctx: Ctx) -> None:
    f = ctx.figures()
    free(ctx)
    cases = [c for c in regime_cases(ctx) if c[2] != "attention_ffn"]
    weights = {kind: weights_file(ctx, kind) for kind in ("detr", "frcnn")}
    r = run_child(ctx, "ddp", {"port": free_port(), "cases": cases, "weights": weights},
                  120 if ctx.smoke else 240)
    f.update(r)
    if "error" in r:
        ctx.check("world-1 DDP", False, r["error"][-400:])
        return
    for key, result in r["regimes"].items():
        if key.startswith("control"):
            ctx.check(f"control: an unused trainable parameter raises under DDP ({r['backend']})",
                      "finished reduction" in result, result[:200])
        else:
            ctx.check(f"{key}: 2 DDP steps, world 1, {r['backend']}", result == "ok", result[:300])
    ctx.check(f"object collectives and all_reduce over {r['backend']}",
              r["gather_ok"] and r["all_reduce_ok"] and r["broadcast_ok"],
              f"gather_detections {r['gather_ok']}, all_reduce_mean {r['all_reduce_ok']}, "
              f"broadcast_object {r['broadcast_ok']}")


def child_all_reduce(ctx: Ctx, a: dict[str, Any]) -> dict[str, Any]:
    """One rank of a 2-rank all_reduce (NCCL, one GPU each; gloo on CPU): correct sums, bus bandwidth."""
    import torch.distributed as dist

    rank, world = a["rank"], a["world"]
    dev = torch.device("cuda", rank) if ctx.cuda else torch.device("cpu")
    if ctx.cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if ctx.cuda else "gloo", init_method=f"tcp://127.0.0.1:{a['port']}",
                            rank=rank, world_size=world)
    ones = torch.ones(a["numel"], device=dev)
    dist.all_reduce(ones)  # also the warm-up: NCCL builds its rings at the first collective
    correct = bool((ones == world).all())
    x = torch.full((a["numel"],), float(rank), device=dev)
    sync(ctx)
    t = time.perf_counter()
    for _ in range(a["iters"]):
        dist.all_reduce(x)
    sync(ctx)
    seconds = (time.perf_counter() - t) / a["iters"]
    dist.destroy_process_group()
    # nccl-tests' bus bandwidth for all_reduce: 2 (n-1)/n of the buffer crosses each link
    busbw = 2 * (world - 1) / world * a["numel"] * 4 / seconds / 1e9
    return {"rank": rank, "correct": correct, "mib": mib(a["numel"] * 4), "ms": round(seconds * 1e3, 2),
            "busbw_gb_s": round(busbw, 2)}


def all_reduce_pair(ctx: Ctx, env: dict[str, str], timeout: float) -> list[dict[str, Any]]:
    port, out = free_port(), [{}, {}]
    args = {"world": 2, "port": port, "numel": 2**26 if ctx.cuda else 2**16, "iters": 5 if ctx.cuda else 2}

    def go(rank: int) -> None:
        out[rank] = run_child(ctx, "all_reduce", {**args, "rank": rank}, timeout, env)

    threads = [threading.Thread(target=go, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out


def sec_nccl(ctx: Ctx) -> None:
    """The 2-GPU all_reduce of a multi-GPU node (docs/cluster.md): with NCCL_P2P_DISABLE=1, the g5 workaround
    (ray-project/ray#39471) that cluster.yaml gives Ray's workers, and with P2P on, to see whether this node
    needs it. One GPU: SKIP. --smoke: the same two ranks over gloo."""
    f = ctx.figures()
    n = torch.cuda.device_count() if ctx.cuda else 0
    f["gpus"] = n
    if ctx.cuda and n < 2:
        ctx.check("all_reduce over 2 GPUs", None, f"needs 2 GPUs, this node has {n}")
        return
    backend = "NCCL" if ctx.cuda else "gloo"
    runs = {"p2p_disabled": {"NCCL_P2P_DISABLE": "1"}, "p2p_on": {"NCCL_P2P_DISABLE": "0"}}
    for name, env in runs.items():
        if name == "p2p_on" and not ctx.cuda:
            ctx.check("all_reduce with P2P on", None, "needs 2 CUDA devices")
            continue
        f[name] = ranks = all_reduce_pair(ctx, env, 120 if name == "p2p_disabled" else 60)
        errors = [r["error"] for r in ranks if "error" in r]
        ok = not errors and all(r["correct"] for r in ranks)
        detail = errors[0][-300:] if errors else (
            f"sums correct: {ok}, {ranks[0]['ms']} ms per {ranks[0]['mib']:.0f} MiB, bus bandwidth "
            f"{ranks[0]['busbw_gb_s']} GB/s")
        if name == "p2p_disabled":
            ctx.check(f"all_reduce over 2 ranks ({backend}, NCCL_P2P_DISABLE=1)", ok, detail)
        else:  # a measurement: on g5 this is the failure the workaround avoids
            ctx.check("all_reduce with P2P on (NCCL_P2P_DISABLE=0)", True,
                      detail + ("" if ok else " -> keep NCCL_P2P_DISABLE=1 on this node type"))


def sec_seed000(ctx: Ctx) -> None:
    """Seed 000's table with the trial's own training loop (AdamW, grad clip 0.1, amp auto, batch 4), on
    batches already on the device: training compute, not data loading."""
    f, s = ctx.figures(), ctx.sizes
    dt = engine.amp_dtype_for("auto", ctx.dev)
    distinct = make_batches(ctx, 6 if not ctx.smoke else 2)
    rows = [("fasterrcnn_r50_fpn full", "frcnn", "full", 0), ("detr_r50 full", "detr", "full", 0),
            ("detr_r50 lora_only r4 attention_only", "detr", "lora_only", 4)]
    for i, (name, kind, regime, rank) in enumerate(rows):
        try:
            t_build = time.perf_counter()
            m, counts = build(ctx, kind, regime, "attention_only", rank or 8)
            opt = prepare(ctx, m, dt)
            free(ctx)
            steps = s.seed000_steps
            if not ctx.smoke:  # as many steps as the budget leaves, from 3 timed after 1 warm-up
                _, _, probe_s = timed(ctx, m, opt, cycled(distinct, 4), dt, warm=1)
                allowance = (ctx.left() - 10) / (len(rows) - i) - (time.perf_counter() - t_build)
                steps = max(10, min(s.seed000_steps, int(allowance / (probe_s / 3))))
            losses, _, seconds = timed(ctx, m, opt, cycled(distinct, steps), dt, warm=0)
            row = {"trainable_params": counts["trainable_params"], "total_params": counts["total_params"],
                   "amp": str(dt), "steps_run": steps, "seconds": round(seconds, 2),
                   "s_per_step": round(seconds / steps, 4), "loss": losses["loss"], **peaks(ctx),
                   f"seconds_{s.seed000_steps}_steps": round(seconds / steps * s.seed000_steps, 1),
                   "extrapolated": steps < s.seed000_steps}
            f[name] = row
            ctx.save()
            scaled = f" (ran {steps} of {s.seed000_steps}, scaled to the budget)" if row["extrapolated"] else ""
            ctx.check(name, math.isfinite(losses["loss"]),
                      f"{counts['trainable_params']:,} trainable params, peak alloc {row['peak_alloc_mb']} / "
                      f"reserved {row['peak_reserved_mb']} MiB, {row[f'seconds_{s.seed000_steps}_steps']} s per "
                      f"{s.seed000_steps} steps{scaled}")
        except Exception as e:
            f[name] = {"error": repr(e)[:500], "traceback": traceback.format_exc()[-2000:]}
            ctx.check(name, False, repr(e)[:300])
        finally:
            m = opt = None
            free(ctx)


@contextlib.contextmanager
def knob(name: str):
    """One setting on for the duration; everything restored after."""
    bench, prec = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    try:
        if name == "cudnn_benchmark":
            torch.backends.cudnn.benchmark = True
        if name == "tf32":  # cuDNN convolutions use TF32 by default already; matmuls do not
            torch.set_float32_matmul_precision("high")
        yield
    finally:
        torch.backends.cudnn.benchmark = bench
        torch.set_float32_matmul_precision(prec)


def sec_knobs(ctx: Ctx) -> None:
    """Settings the worker does not set today, A/B against its defaults on the same step."""
    f, s = ctx.figures(), ctx.sizes
    distinct = make_batches(ctx, min(6, s.warm + s.steps))
    runs = [("detr", "fp32", "default"), ("detr", "fp32", "channels_last")]
    if ctx.cuda:
        runs = [(k, "bf16", n) for k in ("detr", "frcnn") for n in ("default", "channels_last", "cudnn_benchmark")]
        runs += [("detr", "fp32", "default"), ("detr", "fp32", "tf32")]
    for kind, prec, name in runs:
        key = f"{kind}/{prec}/{name}"
        try:
            with knob(name):
                m, _ = build(ctx, kind)
                if name == "channels_last":
                    m.to(memory_format=torch.channels_last)
                opt = prepare(ctx, m, DTYPES[prec])
                losses, ips, _ = timed(ctx, m, opt, cycled(distinct, s.warm + s.steps), DTYPES[prec], s.warm)
            base = f.get(f"{kind}/{prec}/default", {}).get("images_per_s")
            f[key] = {"images_per_s": round(ips, 2), "vs_default": round(ips / base, 3) if base else None,
                      "loss": losses["loss"]}
            if name != "default":
                ctx.check(f"{key} vs default", math.isfinite(losses["loss"]),
                          f"{ips:.1f} vs {base:.1f} img/s ({ips / base:.2f}x)")
        except Exception as e:
            f[key] = {"error": repr(e)[:500]}
            ctx.check(f"{key} vs default", False, repr(e)[:300])
        finally:
            m = opt = None
            free(ctx)
    if not ctx.cuda:
        ctx.check("cudnn.benchmark and TF32", None, "needs CUDA")


# name -> (function, optional, seconds it needs at least to be started)
SECTIONS: dict[str, tuple[Callable[[Ctx], None], bool, float]] = {
    "env": (sec_env, False, 0), "resume": (sec_resume, False, 0), "amp": (sec_amp, False, 0),
    "regimes": (sec_regimes, False, 0), "loader": (sec_loader, False, 0), "fraction": (sec_fraction, False, 0),
    "ddp": (sec_ddp, False, 0), "nccl": (sec_nccl, False, 0), "knobs": (sec_knobs, True, 45),
    "seed000": (sec_seed000, True, 60),
}
CHILDREN = {"trial": child_trial, "ddp": child_ddp, "all_reduce": child_all_reduce}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"), help="folder for gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="every section on CPU with tiny models")
    ap.add_argument("--only", default="", help=f"comma-separated sections, of {list(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="optional sections start only within this many seconds of the start (default 450)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--child-args", default="{}", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    only = [n for n in a.only.split(",") if n]
    unknown = [n for n in only if n not in SECTIONS]
    if unknown:
        ap.error(f"--only: {unknown} not among the sections {list(SECTIONS)}")
    warnings.filterwarnings("ignore", category=UserWarning)
    if a.smoke:  # tiny models gain nothing from threads, and on a shared CPU OpenMP spinning slows them (conftest)
        torch.set_num_threads(1)
    ctx = Ctx(a.out, a.smoke, a.budget_s)
    if a.child:
        print(RESULT_TAG + json.dumps(CHILDREN[a.child](ctx, json.loads(a.child_args)), default=str), flush=True)
        return 0
    sha = None
    with contextlib.suppress(OSError):  # a copied tree may have no .git, a GPU machine no git
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    ctx.report["meta"] = {"argv": sys.argv[1:], "smoke": a.smoke, "device": str(ctx.dev), "host": socket.gethostname(),
                          "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": a.budget_s,
                          "git_sha": sha or None, "planned": only or list(SECTIONS)}
    for name, (fn, optional, needs_s) in SECTIONS.items():
        if only and name not in only:
            continue
        ctx.section = name
        sec = ctx.report["sections"][name] = {"status": "SKIP", "seconds": 0.0, "figures": {}}
        print(f"== {name} (t={time.time() - T0:.0f} s)", flush=True)
        if optional and ctx.left() < needs_s:
            ctx.check("section", None, f"time budget: {ctx.left():.0f} s left of --budget-s {a.budget_s:.0f}")
        else:
            t, cpu = time.time(), cpu_seconds()
            try:
                fn(ctx)
            except Exception as e:  # a section that breaks records why and the next one runs
                sec["error"] = traceback.format_exc()[-3000:]
                ctx.check("section", False, f"{type(e).__name__}: {str(e)[:300]}")
            sec["seconds"] = round(time.time() - t, 1)
            sec["cpu_s"] = round(cpu_seconds() - cpu, 1)  # this process and its children
        statuses = {c["status"] for c in ctx.report["checks"] if c["section"] == name}
        sec["status"] = "FAIL" if "FAIL" in statuses else "PASS" if "PASS" in statuses else "SKIP"
        ctx.save()
    counts = {k: sum(c["status"] == k for c in ctx.report["checks"]) for k in ("PASS", "FAIL", "SKIP")}
    ctx.report["summary"] = {**counts, "seconds": round(time.time() - T0, 1)}
    ctx.save()
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {time.time() - T0:.0f} s; "
          f"figures: {ctx.path}", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
