"""A trial's checkpoint folder (one per reported epoch, uploaded by Ray Train under
`<sweep root>/train-<trial id>/checkpoint_*`): its file names, its `meta.json`, and which folder
holds the latest epoch. Torch-free: the driver reads meta.json; the worker writes the tensors.

```
checkpoint_*/
  model.pt          the model's state dict (a LoRA trial: only its adapters and heads), CPU tensors
  train_state.pt    optimizer, LR schedule, GradScaler, epoch, history, totals, the epoch's metrics
  meta.json         trial_id, epoch, regime, model, label_map, saved_at
  detections.json   COCO results of the epoch's val pass; plots and predictions/ on the last epoch
```
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import pyarrow.fs as pafs

from detsweep.storage import filesystem, join

MODEL_STATE = "model.pt"
TRAIN_STATE = "train_state.pt"
META = "meta.json"
DETECTIONS = "detections.json"


def write_meta(folder: str, *, trial_id: str, epoch: int, regime: str, model: str,
               label_map: dict[str, Any]) -> None:
    """`meta.json` of a local checkpoint folder; `saved_at` (unix time) breaks ties between epochs."""
    with open(os.path.join(folder, META), "w") as f:
        json.dump({"trial_id": trial_id, "epoch": epoch, "regime": regime, "model": model,
                   "label_map": label_map, "saved_at": time.time()}, f)


def read_meta(folder_uri: str) -> dict[str, Any] | None:
    """The `meta.json` of a checkpoint folder (local or URI), None when absent or unreadable."""
    fs, path = filesystem(folder_uri)
    try:
        with fs.open_input_stream(f"{path}/{META}") as f:
            meta = json.loads(f.read())
        int(meta["epoch"])
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(run_uri: str) -> str | None:
    """The `checkpoint_*` folder of a Ray Train run that holds the latest epoch, by the `epoch` of
    its `meta.json` (Ray names the folders by each node's local clock, which restarts and clock
    skew can reorder); a folder without a readable meta.json (an upload cut short) is skipped.
    None when the run has no complete checkpoint."""
    fs, path = filesystem(run_uri)
    best: tuple[tuple[int, float], str] | None = None
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        meta = read_meta(join(run_uri, info.base_name))
        if meta is None:
            continue
        key = (int(meta["epoch"]), float(meta.get("saved_at", 0.0)))
        if best is None or key > best[0]:
            best = (key, info.base_name)
    return join(run_uri, best[1]) if best else None
