"""Benchmark: one DETR-R50 training step (forward, official loss, backward, clip, AdamW) at 256 px, batch 2.

Run: .venv/bin/python bench/detr_step.py [--steps 5] [--threads 1] [--no-write]
Compares, side by side in one run: the "full" regime (layer2-4 + transformer + heads train, the official recipe)
and a frozen backbone (lora_only / partial-like: the backbone runs under no_grad), on CPU and on CUDA if present.
Each variant runs in its own process so its peak RSS is its own. Writes the section
"## DETR training step (bench/detr_step.py)" of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time

TITLE = "DETR training step (bench/detr_step.py)"
VARIANTS = ("full", "frozen_backbone")
IMAGE_SIZE, BATCH = 256, 2
logger = logging.getLogger("bench.detr_step")


def run_variant(variant: str, device_name: str, steps: int, threads: int) -> dict:
    """Time `steps` training steps after one warm-up step; report images/s and peak memory growth."""
    import psutil
    import torch

    from detsweep.models.detr_detector import build_detr_detector

    device = torch.device(device_name)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    detector = build_detr_detector(num_classes=91).to(device).train()
    if variant == "frozen_backbone":
        for p in detector.detr.backbone.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(detector.param_groups(lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4))
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device) for _ in range(BATCH)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 120.0, 200.0], [100.0, 50.0, 250.0, 140.0]], device=device),
                "labels": torch.tensor([3, 17], device=device)} for _ in range(BATCH)]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses = detector(images, targets)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(detector.parameters(), 0.1)  # official max_norm
        optimizer.step()

    rss_before = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    step()  # warm-up: allocator, optimizer state, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # note: kernels are async; time them to completion
    elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "variant": variant, "device": device_name, "threads": threads, "steps": steps,
        "images_per_s": BATCH * steps / elapsed, "s_per_step": elapsed / steps,
        "cpu_s_per_step": cpu_elapsed / steps,  # all threads; robust to other jobs sharing the cores
        "trainable_params": sum(p.numel() for p in detector.parameters() if p.requires_grad),
        # ru_maxrss is KiB on Linux and the process peak; this process did nothing big before rss_before.
        "peak_rss_delta_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) / 2**20,
    }
    if device.type == "cuda":
        result["peak_cuda_delta_mb"] = (torch.cuda.max_memory_allocated() - allocated_before) / 2**20
        result["gpu_name"] = torch.cuda.get_device_name(device)
    return result


def run_in_subprocess(variant: str, device_name: str, steps: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--device", device_name, "--steps", str(steps),
           "--threads", str(threads)]
    from results_md import child_json

    return child_json(cmd, f"variant {variant} on {device_name}")


def format_table(rows: list[dict]) -> str:
    """Markdown table; ratios compare each variant with `full` on the same device and thread count."""
    lines = ["| device | threads | variant | trainable params | s/step | images/s | speed-up vs full | CPU s/step | "
             "peak RSS Δ (MB) | peak CUDA Δ (MB) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {(r["device"], r["threads"]): r for r in rows if r["variant"] == "full"}
    for r in rows:
        full = base[(r["device"], r["threads"])]
        cuda = f"{r['peak_cuda_delta_mb']:.0f}" if "peak_cuda_delta_mb" in r else "–"
        threads = r["threads"] if r["device"] == "cpu" else "–"
        lines.append(f"| {r['device']} | {threads} | {r['variant']} | {r['trainable_params']:,} | "
                     f"{r['s_per_step']:.3f} | {r['images_per_s']:.2f} | {r['images_per_s'] / full['images_per_s']:.2f}x | "
                     f"{r['cpu_s_per_step']:.2f} | {r['peak_rss_delta_mb']:.0f} | {cuda} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed CPU steps per variant (after 1 warm-up step)")
    parser.add_argument("--cuda-steps", type=int, default=20, help="timed steps per variant on CUDA")
    parser.add_argument("--threads", default="1",
                        help="comma-separated torch CPU thread counts to compare (1 = a Ray Train worker with "
                             "cpus_per_worker: 1, see worker.py)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.device, args.steps, int(args.threads))))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    thread_counts = [int(t) for t in args.threads.split(",")]
    devices = [("cpu", args.steps, t) for t in thread_counts]
    devices += [("cuda", args.cuda_steps, thread_counts[0])] if torch.cuda.is_available() else []
    rows, load_before = [], os.getloadavg()[0]
    for device_name, steps, threads in devices:
        for variant in VARIANTS:
            rows.append(run_in_subprocess(variant, device_name, steps, threads))
            logger.info("%s", rows[-1])
    gpu = next((r["gpu_name"] for r in rows if "gpu_name" in r), None)
    text = "\n".join([
        f"## {TITLE}", "",
        f"DETR-R50 (41.5 M params, 91 classes, 100 queries, aux loss), batch {BATCH} of {IMAGE_SIZE}x{IMAGE_SIZE} "
        "images with 2 boxes each; one step = forward + SetCriterion + backward + clip 0.1 + AdamW. "
        f"Timed over {args.steps} CPU steps" + (f" / {args.cuda_steps} CUDA steps" if gpu else "")
        + " after one warm-up step; each variant in a fresh process.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU threads visible (shared; 1-min load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after: CPU timings scale with it), torch "
        f"{torch.__version__}" + (f", GPU {gpu}" if gpu else ", no GPU") + ".",
        "`full`: stem + layer1 frozen (official), layer2-4 + transformer + heads train. "
        "`frozen_backbone`: no backbone parameter trains, so DETR runs the backbone under `torch.no_grad()` "
        "(lora_only; partial trains layer4 so it sits in between). "
        "CPU s/step = process CPU time (all threads) per step, less sensitive than wall time to other jobs on "
        "shared cores. Peak RSS Δ = process peak RSS minus RSS after building the model (weights excluded, optimizer state "
        "and activations included); peak CUDA Δ = `max_memory_allocated` growth over the same span.", "",
        format_table(rows), "",
    ])
    full_by_threads = {r["threads"]: r for r in rows if r["device"] == "cpu" and r["variant"] == "full"}
    if len(full_by_threads) > 1:
        lo, hi = min(full_by_threads), max(full_by_threads)
        ratio = full_by_threads[hi]["s_per_step"] / full_by_threads[lo]["s_per_step"]
        text += (f"\n{hi} threads vs {lo}: the full step takes {ratio:.2f}x the wall time. Above 1x, the threads wait "
                 "on each other while other jobs hold the shared cores; a Ray worker with cpus_per_worker: 1 runs "
                 "1 thread.\n")
    print(text)
    if not args.no_write:
        from results_md import RESULTS, write_section  # bench/ is on sys.path when run as a script

        write_section(TITLE, text)
        logger.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()
