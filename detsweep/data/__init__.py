"""Detection data: synthetic and COCO-format datasets, COCO 2017 download, subsets and stats.

Exports resolve lazily, so `python -m detsweep.data` and torch-free callers never import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ensure_synthetic": "synthetic",
    "LabelMap": "coco",
    "CocoDetection": "coco",
    "collate_fn": "coco",
    "build_datasets": "coco",
    "fetch_coco2017": "download",
    "download_file": "download",
    "write_subset": "subset",
    "dataset_stats": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'detsweep.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
