"""Efficiency metrics: parameter counts, PhaseMeter on CPU (and CUDA when present), reductions, RSS."""
from __future__ import annotations

import sys
import time

import pytest
import torch

from detsweep.metrics.efficiency import (
    PhaseMeter, count_parameters, device_info, peak_rss_mb, reduce_phase_stats,
)


def test_count_parameters_frozen_and_tied():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 4, bias=False))  # 15 + 12
    model[0].weight.requires_grad_(False)  # 12 frozen
    assert count_parameters(model) == {"total_params": 27, "trainable_params": 15, "trainable_frac": 15 / 27}
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3, bias=False))
    tied[1].weight = tied[0].weight
    assert count_parameters(tied)["total_params"] == 9
    assert count_parameters(torch.nn.Identity()) == {"total_params": 0, "trainable_params": 0, "trainable_frac": 0.0}


def test_phase_meter_excludes_warmup_steps_on_cpu():
    meter = PhaseMeter(torch.device("cpu"), warmup_steps=2)
    meter.start()
    for _ in range(2):  # slow warm-up steps
        time.sleep(0.3)
        meter.step(4)
    for _ in range(3):
        time.sleep(0.02)
        meter.step(4)
    out = meter.stop()
    assert out["images"] == 20
    assert out["seconds"] >= 0.66
    assert out["peak_vram_mb"] is None
    # 12 images over >= 0.06 s: at most 200/s; counting the warm-up would give ~30/s.
    assert 60 < out["images_per_s"] <= 200


def test_phase_meter_falls_back_to_all_steps():
    meter = PhaseMeter("cpu", warmup_steps=2)
    meter.start()
    for _ in range(2):
        time.sleep(0.05)
        meter.step(3)
    out = meter.stop()
    assert out["images"] == 6
    assert 0 < out["images_per_s"] <= 6 / 0.1


def test_phase_meter_misuse_and_empty_phase():
    meter = PhaseMeter("cpu")
    with pytest.raises(RuntimeError, match=r"PhaseMeter.step\(\) called before start\(\)"):
        meter.step(1)
    with pytest.raises(RuntimeError, match=r"PhaseMeter.stop\(\) called before start\(\)"):
        meter.stop()
    meter.start()
    out = meter.stop()
    assert (out["images"], out["images_per_s"], out["peak_vram_mb"]) == (0, 0.0, None)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        PhaseMeter("cpu", warmup_steps=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_phase_meter_peak_vram_on_cuda():
    device = torch.device("cuda")
    big = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # 256 MiB before start: reset drops it
    del big
    meter = PhaseMeter(device, warmup_steps=1)
    meter.start()
    for _ in range(3):
        x = torch.empty(64 << 20, dtype=torch.uint8, device=device)  # 64 MiB per step
        meter.step(2)
        del x
    out = meter.stop()
    assert 64 <= out["peak_vram_mb"] < 200 and out["peak_vram_reserved_mb"] >= out["peak_vram_mb"]
    assert out["images_per_s"] > 0
    assert device_info(device)["gpu_name"] == torch.cuda.get_device_name(0)


class _FakeEvent:
    """torch.cuda.Event on the host clock: lets a CPU-only machine run PhaseMeter's CUDA path."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return (end.t - self.t) * 1000.0


def test_phase_meter_on_cuda_times_steps_with_events_and_synchronizes_once_at_stop(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * 2**20)
    meter = PhaseMeter("cuda", warmup_steps=1)
    meter.start()
    started = len(syncs)
    for _ in range(4):
        time.sleep(0.01)
        meter.step(2)
    assert len(syncs) == started  # a sync per step would stall the GPU's queue every iteration
    out = meter.stop()
    assert len(syncs) == started + 1
    assert out["images"] == 8 and out["peak_vram_mb"] == 3.0 and out["peak_vram_reserved_mb"] == 4.0
    assert 6 / 0.5 < out["images_per_s"] <= 6 / 0.03  # 6 images after the warm-up step, in 3 x >= 10 ms


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_phase_meter_on_cuda_measures_gpu_time_without_a_sync_per_step(monkeypatch):
    device = torch.device("cuda")
    x = torch.randn(4096, 4096, device=device)
    real_synchronize, syncs = torch.cuda.synchronize, []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: (syncs.append(d), real_synchronize(d)))
    meter = PhaseMeter(device, warmup_steps=1)
    meter.start()
    for _ in range(6):
        for _ in range(10):
            x = torch.tanh(x @ x)  # queued: the host runs ahead of the GPU
        meter.step(4)
    during = len(syncs)
    out = meter.stop()
    assert during == 1 and len(syncs) == 2  # start() and stop() only
    # Timed as the GPU reached each step: no faster than the wall clock allows.
    assert 0 < out["images_per_s"] <= 1.5 * out["images"] / out["seconds"]


def test_reduce_phase_stats():
    ranks = [
        {"seconds": 10.0, "images": 100, "images_per_s": 12.5, "peak_vram_mb": None},
        {"seconds": 11.0, "images": 90, "images_per_s": 10.0, "peak_vram_mb": None},
    ]
    assert reduce_phase_stats(ranks) == {"seconds": 11.0, "images": 190, "images_per_s": 22.5, "peak_vram_mb": None,
                                         "peak_vram_reserved_mb": None}
    ranks[0]["peak_vram_mb"], ranks[1]["peak_vram_mb"] = 900.0, 1200.0
    ranks[0]["peak_vram_reserved_mb"], ranks[1]["peak_vram_reserved_mb"] = 1400.0, 1300.0  # the caching allocator's
    assert reduce_phase_stats(ranks)["peak_vram_mb"] == 1200.0
    assert reduce_phase_stats(ranks)["peak_vram_reserved_mb"] == 1400.0
    with pytest.raises(ValueError, match="at least one rank, got an empty list"):
        reduce_phase_stats([])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_peak_rss_matches_proc_high_water_mark():
    with open("/proc/self/status") as f:
        vm_hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    assert peak_rss_mb() == pytest.approx(vm_hwm_kib / 1024, rel=0.05)
    assert peak_rss_mb() > 10


def test_device_info():
    assert device_info("cpu") == {"device": "cpu", "gpu_name": None}
    with pytest.raises(ValueError, match=r"device type 'meta' is not supported; allowed: \['cpu', 'cuda'\]"):
        device_info("meta")
