"""Cost metrics of one trial: parameter counts, per-phase wall time / throughput / peak VRAM, host RSS.

Per-rank numbers only; the caller gathers the stop() dicts across ranks and reduces them with
`reduce_phase_stats`. MB means MiB (2**20 bytes) throughout.
"""
from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch

_MIB = float(1 << 20)


def count_parameters(model: torch.nn.Module) -> dict[str, Any]:
    """`{"total_params", "trainable_params", "trainable_frac"}`; shared parameters count once."""
    total = trainable = 0
    for p in model.parameters():  # parameters() already deduplicates tied weights
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {
        "total_params": total,
        "trainable_params": trainable,
        "trainable_frac": trainable / total if total else 0.0,
    }


class PhaseMeter:
    """Wall time, throughput and peak VRAM of one phase (a train epoch or an eval pass) on one rank.

    Usage: `start()`, then `step(n_images)` after every iteration, then `stop()`. The first
    `warmup_steps` steps (cuDNN autotuning, allocator growth, lazy init) are left out of images/s.
    On CUDA, steps are timed with CUDA events on the current stream, as the GPU reaches them: `step()`
    never waits for the GPU, and `stop()` synchronizes once.
    """

    def __init__(self, device: torch.device | str, warmup_steps: int = 2) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.device = torch.device(device)
        self.warmup_steps = warmup_steps
        self._t0: float | None = None

    def _mark(self) -> float | torch.cuda.Event:
        """A point in time: an event recorded on the GPU's stream on CUDA (no sync), else the host clock."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _seconds(self, start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
        """Time between two marks; for events, only once the GPU has reached both (after the sync in stop)."""
        if isinstance(start, float):
            return end - start
        return start.elapsed_time(end) / 1000.0  # milliseconds

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # earlier work must not count towards this phase
            torch.cuda.reset_peak_memory_stats(self.device)
        self._steps = 0
        self._images = 0
        self._warm_images = 0
        self._t0 = time.perf_counter()
        self._m0 = self._m_warm = self._m_last = self._mark()

    def step(self, n_images: int) -> None:
        """Record one finished iteration that processed `n_images` images on this rank."""
        if self._t0 is None:
            raise RuntimeError("PhaseMeter.step() called before start()")
        self._m_last = self._mark()
        self._steps += 1
        self._images += n_images
        if self._steps == self.warmup_steps:
            self._m_warm, self._warm_images = self._m_last, self._images

    def stop(self) -> dict[str, Any]:
        """`{"seconds", "images", "images_per_s", "peak_vram_mb", "peak_vram_reserved_mb"}` (VRAM None off
        CUDA). Allocated is what tensors held at most; reserved is what the caching allocator held from the
        GPU, which is what packing trials onto one GPU must fit.

        images/s counts only steps after the warm-up; with no more steps than `warmup_steps` it falls
        back to all steps. It is 0.0 when no images were recorded.
        """
        if self._t0 is None:
            raise RuntimeError("PhaseMeter.stop() called before start()")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the phase's one sync: its kernels have finished
        seconds = time.perf_counter() - self._t0
        if self._steps > self.warmup_steps:
            images, elapsed = self._images - self._warm_images, self._seconds(self._m_warm, self._m_last)
        else:
            images, elapsed = self._images, self._seconds(self._m0, self._m_last)
        cuda = self.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(self.device) / _MIB if cuda else None
        reserved = torch.cuda.max_memory_reserved(self.device) / _MIB if cuda else None
        self._t0 = None
        return {
            "seconds": seconds,
            "images": self._images,
            "images_per_s": images / elapsed if images and elapsed > 0 else 0.0,
            "peak_vram_mb": peak,
            "peak_vram_reserved_mb": reserved,
        }


def reduce_phase_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the `PhaseMeter.stop()` dicts of all ranks (DESIGN.md: throughput summed, VRAM max).

    Returns `{"seconds": max, "images": sum, "images_per_s": sum, "peak_vram_mb": max or None,
    "peak_vram_reserved_mb": max or None}`.
    """
    if not stats:
        raise ValueError("reduce_phase_stats needs the stats of at least one rank, got an empty list")

    def most(key: str) -> float | None:
        values = [s[key] for s in stats if s.get(key) is not None]
        return max(values) if values else None

    return {
        "seconds": max(s["seconds"] for s in stats),
        "images": sum(s["images"] for s in stats),
        "images_per_s": sum(s["images_per_s"] for s in stats),
        "peak_vram_mb": most("peak_vram_mb"),
        "peak_vram_reserved_mb": most("peak_vram_reserved_mb"),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux but bytes on macOS.
    return peak / _MIB if sys.platform == "darwin" else peak / 1024.0


def device_info(device: torch.device | str) -> dict[str, str | None]:
    """`{"device": "cpu" | "cuda", "gpu_name": str | None}` for the results row."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device type {device.type!r} is not supported; allowed: ['cpu', 'cuda']")
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": device.type, "gpu_name": gpu_name}


