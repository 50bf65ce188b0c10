"""torch.distributed helpers (rank, world size, gather, reduce). Usable without Ray: every
function degrades to the single-process answer when no process group is initialised."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def gather_objects(obj: Any) -> list[Any]:
    """All ranks' `obj`, in rank order, on every rank (picklable objects)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list[Any] | None:
    """All ranks' `obj`, in rank order, on rank 0 only (None elsewhere): what metrics need,
    without copying every rank's detections to every other rank."""
    if not is_dist():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each scalar over ranks (one collective for the whole dict)."""
    if not values:
        return {}
    keys = sorted(values)
    if is_dist() and dist.get_backend() != "nccl":
        device = torch.device("cpu")  # gloo reduces host tensors; NCCL needs them on the GPU
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
        t /= world_size()
    return dict(zip(keys, t.tolist()))


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical model init, so DDP's broadcast is a no-op check."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
