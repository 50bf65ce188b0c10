"""`python -m detsweep.predict`: a trial rebuilt from trials.json + its checkpoint folder draws boxes on
images and writes COCO results; user errors are one line naming what is wrong.

The sweep folder is built here without Ray: tiny trials expanded from a sweep dict, built by the worker's
`build_trial_model`, their trainable weights moved off their init, saved by the worker's `save_checkpoint`
into `train-<id>/checkpoint_000001`, plus trials.json and results.parquet as the driver writes them."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detsweep import dist, engine, predict
from detsweep.cluster import worker
from detsweep.data.coco import build_datasets
from detsweep.results import ResultsStore, config_values
from detsweep.storage import train_run_name
from detsweep.sweep import expand, parse_sweep
from detsweep.sweep.resume import save_trials

DETR_FULL, DETR_LORA, FRCNN = "detr_r18-full", "detr_r18-lora_only-r4-attention_ffn", "fasterrcnn_r18_fpn-full"
FAILED = "detr_r18-partial"  # in trials.json and results.parquet, failed before its first checkpoint


def tiny_sweep(storage: Path, synthetic_root: Path) -> dict:
    return {
        "name": "tiny",
        "data": {"kind": "synthetic", "root": str(synthetic_root), "train_images": 8, "val_images": 4,
                 "image_size": 64, "num_classes": 3},
        "model": {"detr": {"backbone": "resnet18", "num_queries": 8, "hidden_dim": 32, "nheads": 2,
                           "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64, "dropout": 0.0},
                  "faster_rcnn": {"backbone": "resnet18", "min_size": 64, "max_size": 64}},
        "lora": {"rank": 4, "placement": "attention_ffn"},
        "train": {"epochs": 1, "batch_size_per_worker": 2},
        "eval": {"visuals": False},
        "resources": {"ddp_workers": 1, "cpus_per_worker": 1},
        "grid": {"model": ["detr_r50", "fasterrcnn_r50_fpn"], "regime": ["full", "lora_only", "partial"]},
        "storage": str(storage),
    }


def _train_a_little(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable weight off its init (LoRA's B starts at zero, so a fresh adapter is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)


def write_checkpoint(trial, model, label_map, root: Path) -> Path:
    """The trial's last-epoch checkpoint folder, written by the worker's own `save_checkpoint`."""
    opt = engine.prepare_training(model, trial.train, steps_per_epoch=1, to=torch.device("cpu"), amp_dtype=None)
    run = worker.TrialRun(opt, None, history=[{"epoch": 0, "loss": 1.0}])
    data = worker.TrialData(None, None, label_map, None, None, None)
    epoch = trial.train.epochs - 1
    tmp = worker.save_checkpoint(trial, model, run, data, epoch, {"epoch": epoch}, {"_detections": []}, [])
    folder = root / train_run_name(trial.trial_id) / "checkpoint_000001"
    folder.parent.mkdir(parents=True)
    shutil.move(tmp, folder)
    return folder


def build_sweep_folder(tmp: Path, synthetic_root: Path) -> tuple[Path, dict[str, torch.nn.Module]]:
    """(results.parquet, {trial id: the in-memory model that was saved}) of a finished tiny sweep."""
    trials = expand(parse_sweep(tiny_sweep(tmp / "results", synthetic_root)))
    root = Path(trials[0].storage)
    save_trials(str(root), trials, None)
    d = trials[0].data
    _, _, label_map, _ = build_datasets(kind=d.kind, root=d.root, train_images=d.train_images,
                                        val_images=d.val_images, image_size=d.image_size, classes=None,
                                        seed=d.seed, num_classes=d.num_classes)
    store, models = ResultsStore(str(root)), {}
    for i, trial in enumerate(trials):
        row = {"sweep": trial.sweep, "trial_id": trial.trial_id, **config_values(trial.to_dict())}
        if trial.trial_id == FAILED:
            store.upsert_trial({**row, "status": "error", "error": "RuntimeError: CUDA out of memory"})
            continue
        dist.seed_everything(trial.train.seed)  # as the worker's _setup does
        model, _ = worker.build_trial_model(trial, label_map)
        _train_a_little(model, seed=100 + i)
        folder = write_checkpoint(trial, model, label_map, root)
        store.upsert_trial({**row, "status": "ok", "ap": 0.1 * i, "checkpoint_path": str(folder)})
        models[trial.trial_id] = model.eval()
    return root / "results.parquet", models


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, synthetic_root):
    return build_sweep_folder(tmp_path_factory.mktemp("sweep"), synthetic_root)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of grey-noise images (any red pixel in a drawing is a box) and one unreadable file."""
    rng = np.random.default_rng(0)

    def grey(w: int, h: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")

    folder = tmp_path_factory.mktemp("images")
    grey(64, 64).convert("RGB").save(folder / "a.png")
    grey(80, 60).convert("RGB").save(folder / "b.jpg", quality=100)
    (folder / "broken.jpg").write_bytes(b"this is not an image")
    (folder / "notes.txt").write_text("not an image file name, so not collected")
    other = tmp_path_factory.mktemp("more")
    grey(72, 56).save(other / "c.png")  # one channel: read as RGB
    return folder


def _red_pixels(path: Path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)).sum())


def _read(out: Path) -> tuple[list[dict], list[dict]]:
    return json.loads((out / "detections.json").read_text()), json.loads((out / "images.json").read_text())


@pytest.mark.parametrize("trial_id", [DETR_FULL, DETR_LORA, FRCNN])
def test_predict_draws_boxes_and_matches_the_trained_model(sweep, images, tmp_path, capsys, trial_id):
    results, models = sweep
    more = next(images.parent.glob("more*"))
    out = tmp_path / "out"
    argv = [str(results), trial_id, str(images), str(more / "*.png"), "--score", "0", "--out", str(out), "-q"]
    assert predict.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "3 images" in stdout and f"skipped 1 unreadable images: {images / 'broken.jpg'}" in stdout
    detections, entries = _read(out)
    assert [e["drawn"] for e in entries] == ["a.png", "b.png", "c.png"]
    assert [(e["width"], e["height"]) for e in entries] == [(64, 64), (80, 60), (72, 56)]
    for e in entries:  # boxes drawn on a grey image: red pixels; nothing else was written
        assert _red_pixels(out / e["drawn"]) > 50, e
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png", "detections.json", "images.json"]
    meta = json.loads((results.parent / train_run_name(trial_id) / "checkpoint_000001" / "meta.json").read_text())
    assert {d["category_id"] for d in detections} <= set(meta["label_map"]["category_ids"])  # original ids

    # The same numbers as the model the worker trained and saved (a LoRA trial: merged vs with adapters).
    image = torch.from_numpy(np.array(Image.open(images / "a.png").convert("RGB"))).permute(2, 0, 1) / 255.0
    with torch.no_grad():
        want = models[trial_id]([image])[0]
    got = [d for d in detections if d["image_id"] == 1]
    assert len(got) == len(want["scores"]) > 0
    order = torch.argsort(want["scores"], descending=True)
    got.sort(key=lambda d: -d["score"])
    np.testing.assert_allclose([d["score"] for d in got], want["scores"][order].numpy(), atol=1e-4)
    x0, y0, w, h = np.array([d["bbox"] for d in got]).T
    np.testing.assert_allclose(np.stack([x0, y0, x0 + w, y0 + h], 1), want["boxes"][order].numpy(), atol=0.02)


def test_score_threshold_filters_drawings_and_results(sweep, images, tmp_path):
    results, _ = sweep
    out = tmp_path / "out"
    assert predict.main([str(results), DETR_LORA, str(images / "a.png"), "--score", "1", "--out", str(out),
                         "-q", "--batch-size", "1"]) == 0
    detections, _ = _read(out)
    assert detections == [] and _red_pixels(out / "a.png") == 0


def test_a_checkpoint_folder_is_a_source_too(sweep, images, tmp_path, monkeypatch):
    results, _ = sweep
    folder = results.parent / train_run_name(DETR_LORA) / "checkpoint_000001"
    monkeypatch.chdir(tmp_path)
    assert predict.main([str(folder), str(images / "b.jpg"), "--score", "0", "-q"]) == 0
    from_folder, _ = _read(tmp_path / f"predictions-{DETR_LORA}")  # the default --out
    assert predict.main([str(results), DETR_LORA, str(images / "b.jpg"), "--score", "0", "-q",
                         "--out", "again"]) == 0
    assert from_folder == _read(tmp_path / "again")[0]


def _edited_copy(results: Path, tmp: Path, trial_id: str, edit) -> Path:
    """A copy of the sweep folder whose trials.json has `edit(config)` applied to one trial."""
    root = tmp / "copy"
    shutil.copytree(results.parent, root)
    saved = json.loads((root / "trials.json").read_text())
    for entry in saved["trials"]:
        if entry["trial_id"] == trial_id:
            edit(entry["config"])
    (root / "trials.json").write_text(json.dumps(saved))
    return root / "results.parquet"


def _error(argv: list[str], capsys) -> str:
    assert predict.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("detsweep.predict: error: ") and err.count("\n") == 1, err
    return err


def test_wrong_trial_id_lists_the_trial_ids(sweep, images, capsys):
    results, _ = sweep
    err = _error([str(results), "detr_r18-ful", str(images)], capsys)
    assert "'detr_r18-ful' is not in" in err
    for tid in (DETR_FULL, DETR_LORA, FAILED, FRCNN):
        assert tid in err


def test_a_failed_trial_without_checkpoint_says_why(sweep, images, capsys):
    results, _ = sweep
    err = _error([str(results), FAILED, str(images)], capsys)
    assert "has no checkpoint" in err and "status error: RuntimeError: CUDA out of memory" in err


def test_missing_base_weight_file_is_named(sweep, images, tmp_path, capsys):
    results, _ = sweep
    missing = str(tmp_path / "gone" / "detr_base.pth")
    copy_ = _edited_copy(results, tmp_path, DETR_LORA, lambda c: c["detector"].update(weights=missing))
    err = _error([str(copy_), DETR_LORA, str(images)], capsys)
    assert f"base weights file {missing!r}" in err and "model.detr.weights" in err


def test_lora_adapters_on_other_base_weights_are_refused(sweep, images, tmp_path, capsys):
    """The adapter checkpoint records a hash of its base; another seed draws another random base."""
    results, _ = sweep
    copy_ = _edited_copy(results, tmp_path, DETR_LORA, lambda c: c["train"].update(seed=1))
    err = _error([str(copy_), DETR_LORA, str(images)], capsys)
    assert "trained on other base weights" in err and "train.seed=1" in err


def test_unreadable_images_only_is_an_error(sweep, images, capsys):
    results, _ = sweep
    assert predict.main([str(results), DETR_FULL, str(images / "broken.jpg"), "-q",
                         "--out", str(images.parent / "none")]) == 2
    captured = capsys.readouterr()
    assert "skipped 1 unreadable images" in captured.out and "none of the images could be read" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["{results}", DETR_FULL, "{images}/nothing-*.png"], "no image found at"),
    (["{results}", DETR_FULL], "no IMAGES given"),
    (["{results}", DETR_FULL, "{images}", "--score", "1.5"], "--score must be in [0, 1]"),
    (["{images}", "{images}"], "neither a results file nor a checkpoint folder"),
])
def test_user_errors_are_one_line(sweep, images, capsys, argv, message):
    results, _ = sweep
    err = _error([a.format(results=results, images=images) for a in argv], capsys)
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_for_without_cuda(sweep, images, capsys):
    results, _ = sweep
    err = _error([str(results), DETR_FULL, str(images), "--device", "cuda"], capsys)
    assert "no CUDA device" in err


def test_help():
    proc = subprocess.run([sys.executable, "-m", "detsweep.predict", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "TRIAL_ID" in proc.stdout and "--score" in proc.stdout


def test_collect_images_keeps_order_and_each_file_once(images):
    paths = predict.collect_images([str(images / "b.jpg"), str(images), str(images / "*.png")])
    assert [p.name for p in paths] == ["b.jpg", "a.png", "broken.jpg"]
