"""`python -m detsweep.predict`: a trial's model on your images. The trial is rebuilt from its saved config
(`<sweep root>/trials.json`) and its checkpoint folder (`model.pt`, the label map in `meta.json`); it writes
per image a PNG with the boxes, class names and scores, and one COCO-results `detections.json`.

```
python -m detsweep.predict RESULTS.parquet TRIAL_ID IMAGES... [--out DIR] [--score 0.5] [--device cuda|cpu]
python -m detsweep.predict CHECKPOINT_DIR IMAGES...          (a train-<id>/checkpoint_* folder)
```
`locate_trial` and `rebuild_model` are shared with `detsweep.export`.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detsweep.checkpoint import MODEL_STATE, latest_checkpoint, read_meta
from detsweep.data.coco import LabelMap
from detsweep.models.registry import NAMED_WEIGHTS  # any other `weights` is a file path
from detsweep.storage import RESULTS_FILE, TRIALS_FILE, exists, filesystem, is_local, join, read_parquet, \
    train_run_name
from detsweep.sweep.resume import load_trials
from detsweep.sweep.spec import TrialConfig

log = logging.getLogger("detsweep.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class PredictError(ValueError):
    """A user error (unknown trial, missing file); the CLI prints it on one line and exits 2."""


# --------------------------------------------------------------------------------------------
# Finding a trial: its config, its checkpoint folder, its label map
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FoundTrial:
    trial: TrialConfig
    checkpoint: str  # the checkpoint folder (local path or URI)
    meta: dict[str, Any]  # its meta.json
    label_map: LabelMap
    root: str  # the sweep folder holding trials.json


def _parent(uri: str) -> str:
    return str(Path(uri).parent) if is_local(uri) else uri.rstrip("/").rsplit("/", 1)[0]


def _configs(root: str) -> dict[str, dict[str, Any]]:
    saved = load_trials(root)
    if saved is None:
        raise PredictError(f"{join(root, TRIALS_FILE)} is missing: the trial configs are unknown "
                           f"(a sweep run by an older detsweep?)")
    return {e["trial_id"]: e["config"] for e in saved["trials"]}


def _trial_config(config: dict[str, Any], root: str) -> TrialConfig:
    try:
        return TrialConfig.from_dict(config)
    except (ValueError, KeyError, TypeError) as e:
        raise PredictError(f"{join(root, TRIALS_FILE)}: trial {config.get('trial_id')!r} is not a config "
                           f"this detsweep can read: {e}") from None


def _found(trial: TrialConfig, checkpoint: str, root: str) -> FoundTrial:
    meta = read_meta(checkpoint)
    if meta is None:
        raise PredictError(f"{checkpoint} is not a checkpoint folder: no readable meta.json")
    if meta.get("trial_id") != trial.trial_id:
        raise PredictError(f"{checkpoint}/meta.json is of trial {meta.get('trial_id')!r}, not {trial.trial_id!r}")
    return FoundTrial(trial, checkpoint, meta, LabelMap.from_dict(meta["label_map"]), root)


def _from_results(results: str, trial_id: str) -> FoundTrial:
    root = _parent(results)
    table = read_parquet(results)
    if table is None:
        raise PredictError(f"results file not found: {results}")
    rows = {r["trial_id"]: r for r in table.select(
        [c for c in ("trial_id", "status", "error", "checkpoint_path") if c in table.column_names]).to_pylist()}
    configs = _configs(root)
    if trial_id not in rows and trial_id not in configs:
        known = list(dict.fromkeys([*rows, *configs]))
        raise PredictError(f"trial {trial_id!r} is not in {results}; its trials are: {', '.join(known)}")
    row = rows.get(trial_id, {})
    if trial_id not in configs:
        raise PredictError(f"trial {trial_id!r} is in {results} but not in {join(root, TRIALS_FILE)}")
    # The row's path was right where the sweep ran; a moved sweep folder still has train-<id>/ beside it.
    checkpoint = row.get("checkpoint_path")
    if not checkpoint or not exists(checkpoint):
        checkpoint = latest_checkpoint(join(root, train_run_name(trial_id)))
    if checkpoint is None:
        why = f" (status {row.get('status')}: {row.get('error') or 'no error recorded'})" if row else ""
        raise PredictError(f"trial {trial_id!r} has no checkpoint under {join(root, train_run_name(trial_id))}{why}")
    if row.get("status") not in (None, "ok"):
        log.warning("trial %s ended with status %s (%s); using its latest checkpoint", trial_id, row["status"],
                    row.get("error") or "no error recorded")
    return _found(_trial_config(configs[trial_id], root), checkpoint, root)


def _from_checkpoint(folder: str) -> FoundTrial:
    meta = read_meta(folder)
    if meta is None:
        raise PredictError(f"{folder} is neither a results file nor a checkpoint folder (no readable meta.json)")
    root = _parent(folder)
    for _ in range(3):  # checkpoint_* -> train-<id> -> the sweep folder
        if exists(join(root, TRIALS_FILE)):
            break
        root = _parent(root)
    else:
        raise PredictError(f"no {TRIALS_FILE} in the folders above {folder}: the trial's config is unknown")
    configs = _configs(root)
    if meta["trial_id"] not in configs:
        raise PredictError(f"trial {meta['trial_id']!r} of {folder} is not in {join(root, TRIALS_FILE)}; "
                           f"its trials are: {', '.join(configs)}")
    return _found(_trial_config(configs[meta["trial_id"]], root), folder, root)


def is_results_file(source: str) -> bool:
    return source.endswith(".parquet") or source.rstrip("/").rsplit("/", 1)[-1] == RESULTS_FILE


def locate_trial(source: str, trial_id: str | None = None) -> FoundTrial:
    """A trial from a results file (`results.parquet`, with its `trial_id`) or from a checkpoint folder
    (its meta.json names the trial; trials.json is found in the folders above it)."""
    source = os.path.expanduser(source) if is_local(source) else source
    if is_results_file(source):
        if trial_id is None:
            raise PredictError(f"{source} is a results file: give a TRIAL_ID after it")
        return _from_results(source, trial_id)
    return _from_checkpoint(source)


# --------------------------------------------------------------------------------------------
# Rebuilding its model
# --------------------------------------------------------------------------------------------
def _load_tensors(uri: str) -> dict[str, Any]:
    """A torch file (local or URI), on the CPU, weights_only."""
    if is_local(uri):
        return torch.load(uri, map_location="cpu", weights_only=True)
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def _check_base_weights(trial: TrialConfig) -> None:
    weights = trial.detector.weights
    if weights not in NAMED_WEIGHTS and not weights.startswith("base:") and not Path(weights).expanduser().is_file():
        raise PredictError(f"trial {trial.trial_id!r}: its base weights file {weights!r} "
                           f"(model.{trial.family}.weights in its config) does not exist")


def _plain(trial: TrialConfig, label_map: LabelMap) -> nn.Module:
    """The trial's architecture with no weights loaded."""
    from detsweep.models import build_model

    return build_model(trial.model, dataclasses.replace(trial.detector, weights="none"),
                       num_classes=label_map.num_classes, category_ids=list(label_map.category_ids))


def rebuild_model(found: FoundTrial) -> nn.Module:
    """The trial's detector built by its worker's own `build_trial_model`, holding the checkpoint's weights,
    in eval mode on the CPU. A LoRA trial is its base weights (`model.<family>.weights`, the frozen random
    parts re-drawn with `train.seed` as the worker drew them) plus the checkpoint's adapters and heads;
    `load_lora_state_dict` refuses a base whose hash differs from the one the checkpoint records."""
    from detsweep import dist, engine
    from detsweep.models.trial import build_trial_model  # the worker's own builder, Ray-free

    trial = found.trial
    lora = trial.lora is not None  # lora_only, or a two_stage into lora_only: the checkpoint holds adapters
    if trial.family == "detr" and not lora:
        # The checkpoint holds every DETR weight, and DETR's layout does not depend on where it started, so the
        # base is not needed. (Faster R-CNN's is: pretrained weights switch its BatchNorm to FrozenBatchNorm.)
        trial = dataclasses.replace(trial, detector=dataclasses.replace(trial.detector, weights="none"))
        if getattr(trial, "base_run", None) is not None:
            trial = dataclasses.replace(trial, base_run=None)
    _check_base_weights(trial)
    dist.seed_everything(trial.train.seed)  # the worker seeds before it builds
    try:
        model, _ = build_trial_model(trial, found.label_map)
    except OSError as e:  # a missing pretraining, a failed download, an unreadable file
        raise PredictError(f"trial {trial.trial_id!r}: could not load its base weights "
                           f"{trial.detector.weights!r}: {e}") from e
    state_uri = join(found.checkpoint, MODEL_STATE)
    try:
        engine.load_model_state(model, trial.regime, _load_tensors(state_uri))
    except (ValueError, RuntimeError, OSError) as e:  # OSError: model.pt missing or unreadable
        if lora and "base weights" in str(e):
            raise PredictError(f"trial {trial.trial_id!r}: its adapters were trained on other base weights than "
                               f"model.{trial.family}.weights={trial.detector.weights!r} with train.seed="
                               f"{trial.train.seed} give now ({e})") from None
        raise PredictError(f"{state_uri} does not fit trial {trial.trial_id!r}'s model: {e}") from None
    return model.eval()


def merged_model(found: FoundTrial, model: nn.Module) -> nn.Module:
    """`model` itself, or for a LoRA trial a plain copy of its architecture holding the merged weights
    (W + alpha/r·B·A): no adapter cost at inference, and the plain (official) state-dict keys."""
    if found.trial.lora is None:
        return model
    from detsweep.models.lora import merged_state_dict

    plain = _plain(found.trial, found.label_map)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    return plain.eval()


# --------------------------------------------------------------------------------------------
# Images in, PNGs and COCO results out
# --------------------------------------------------------------------------------------------
def collect_images(specs: list[str]) -> list[Path]:
    """Files, folders (their image files, sorted) and globs, in the order given, each file once."""
    paths: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise PredictError(f"no image found at {spec!r} (a file, a folder of {'/'.join(IMAGE_SUFFIXES)} "
                               f"files, or a glob)")
        paths += found
    return list(dict.fromkeys(p.resolve() for p in paths))


def read_image(path: Path) -> torch.Tensor | None:
    """[3, H, W] float in 0..1 (EXIF orientation applied), or None when the file is not a readable image."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    try:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        log.warning("skipped %s: not a readable image (%s)", path, e)
        return None
    return pil_to_tensor(rgb).float() / 255.0


def _chunks(paths: list[Path], size: int) -> Iterator[list[tuple[Path, torch.Tensor | None]]]:
    for start in range(0, len(paths), size):  # read lazily: a folder of photos need not fit in memory
        yield [(p, read_image(p)) for p in paths[start:start + size]]


def _forward(model: nn.Module, images: list[torch.Tensor], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`model` on `images`, one forward per image size: both detectors pad a batch to its largest image,
    which moves the other images' scores (by ~0.01 on small images), so an image's detections would
    depend on its batch-mates. Returns the outputs in the order of `images`, on the CPU."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    outputs: list[dict[str, torch.Tensor]] = [{}] * len(images)
    for members in by_size.values():
        for i, out in zip(members, model([images[i].to(device) for i in members])):
            outputs[i] = {k: v.cpu() if k == "labels" else v.float().cpu() for k, v in out.items()}
    return outputs


def _png_name(path: Path, used: set[str]) -> str:
    name, n = path.stem, 1
    while name in used:  # two folders holding the same file name
        n += 1
        name = f"{path.stem}-{n}"
    used.add(name)
    return name


def _draw(image: torch.Tensor, out: dict[str, torch.Tensor], names: list[str], out_dir: Path, name: str,
          score: float) -> None:
    from detsweep.metrics.visuals import draw_predictions

    none = {"boxes_xyxy": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    [drawn] = draw_predictions([image], [out], [none], names, out_dir, score_threshold=score, prefix=name)
    os.replace(drawn, out_dir / f"{name}.png")


@torch.no_grad()
def predict_images(model: nn.Module, paths: list[Path], label_map: LabelMap, out_dir: Path, *, score: float,
                   device: torch.device, batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """Run `model` (the detector contract, eval mode) over `paths`, `batch_size` at a time; write `<name>.png` per image,
    `detections.json` (COCO results: image_id, original category_id, bbox [x, y, w, h] absolute, score;
    score >= `score`) and `images.json` (COCO `images` entries: id, file_name, width, height).
    Returns {"images", "skipped" (paths), "detections"}."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    names, used = list(label_map.names), set()
    detections, images, skipped = [], [], []
    bar = tqdm(total=len(paths), unit="image", desc="predict", disable=not progress)
    for batch in _chunks(paths, batch_size):
        readable = [(p, im) for p, im in batch if im is not None]
        skipped += [p for p, im in batch if im is None]
        for (path, image), out in zip(readable, _forward(model, [im for _, im in readable], device)):
            keep = out["scores"] >= score
            out = {k: v[keep] for k, v in out.items()}
            image_id, name = len(images) + 1, _png_name(path, used)
            images.append({"id": image_id, "file_name": str(path), "height": int(image.shape[1]),
                           "width": int(image.shape[2]), "drawn": f"{name}.png"})
            for (x0, y0, x1, y1), s, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
                detections.append({"image_id": image_id, "category_id": label_map.to_category_id(label),
                                   "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)], "score": round(s, 5)})
            _draw(image, out, names, out_dir, name, score)
        bar.update(len(batch))
    bar.close()
    (out_dir / "detections.json").write_text(json.dumps(detections))
    (out_dir / "images.json").write_text(json.dumps(images, indent=1))
    return {"images": len(images), "skipped": skipped, "detections": len(detections)}


def pick_device(name: str | None) -> torch.device:
    """`--device`: cuda when there is one, else cpu; a CUDA device asked for where there is none is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PredictError(f"--device {name!r} is not a device; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: no CUDA device is available here; use --device cpu")
    return device


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detsweep.predict",
        description="Run a sweep trial's model on images: per image a PNG with boxes, class names and scores, "
                    "and one COCO-results detections.json with the dataset's original category ids.",
        epilog="SOURCE is a results.parquet followed by a TRIAL_ID, or a trial's checkpoint folder "
               "(<sweep>/train-<id>/checkpoint_*) alone. IMAGES are files, folders or globs (quote globs).")
    p.add_argument("source", metavar="SOURCE", help="results.parquet (then TRIAL_ID) or a checkpoint folder")
    p.add_argument("rest", nargs="+", metavar="[TRIAL_ID] IMAGES", help="the trial id (after a results file), "
                   "then image files, folders or globs")
    p.add_argument("--out", default=None, help="output folder (default: ./predictions-<trial id>)")
    p.add_argument("--score", type=float, default=0.5,
                   help="keep detections with score >= this, in the PNGs and detections.json (default: "
                        "%(default)s; 0 keeps every detection, as COCOeval wants)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 for user errors, one line on stderr)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    try:
        if not 0.0 <= args.score <= 1.0 or args.batch_size < 1:
            raise PredictError(f"--score must be in [0, 1] and --batch-size >= 1, got {args.score} and "
                               f"{args.batch_size}")
        trial_id, specs = (args.rest[0], args.rest[1:]) if is_results_file(args.source) else (None, args.rest)
        if not specs:
            raise PredictError("no IMAGES given after the trial id")
        device = pick_device(args.device)
        paths = collect_images(specs)
        found = locate_trial(args.source, trial_id)
        model = merged_model(found, rebuild_model(found))
    except PredictError as e:
        print(f"detsweep.predict: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"predictions-{found.trial.trial_id}").expanduser()
    summary = predict_images(model, paths, found.label_map, out, score=args.score, device=device,
                             batch_size=args.batch_size, progress=not args.quiet)
    print(f"trial {found.trial.trial_id} (checkpoint of epoch {found.meta['epoch']}): {summary['images']} images, "
          f"{summary['detections']} detections with score >= {args.score}; wrote {summary['images']} PNGs, "
          f"detections.json and images.json to {out}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable images: {', '.join(map(str, summary['skipped']))}")
    if not summary["images"]:
        print("detsweep.predict: error: none of the images could be read", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
