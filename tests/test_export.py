"""`python -m detsweep.export`: the merged model in the official layouts loads strictly into a fresh
model and gives the trial's outputs; DETR's keys are facebookresearch/detr's; ONNX matches torch."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from detsweep import export
from detsweep.models.backbone import pad_images
from detsweep.models.detr import build_detr
from detsweep.models.detr_detector import build_detr_detector
from detsweep.models.lora import apply_lora, merged_state_dict
from detsweep.models.weights import load_detr_weights
from tests.conftest import FIXTURES
from tests.test_predict import DETR_FULL, DETR_LORA, FRCNN, build_sweep_folder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, synthetic_root):
    return build_sweep_folder(tmp_path_factory.mktemp("sweep"), synthetic_root)


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.rand(3, 64, 80, generator=g), torch.rand(3, 48, 56, generator=g)]


def _export(results, trial_id, out, *extra) -> dict:
    assert export.main([str(results), trial_id, "--out", str(out), *extra]) == 0
    return json.loads(export.meta_path(out).read_text())


@pytest.mark.parametrize("trial_id", [DETR_FULL, DETR_LORA])
def test_exported_detr_loads_strictly_into_a_fresh_build_detr_and_gives_the_trials_outputs(sweep, tmp_path, trial_id):
    results, models = sweep
    out = tmp_path / "detr.pth"
    meta = _export(results, trial_id, out)
    state = torch.load(out, map_location="cpu", weights_only=True)["model"]  # the official checkpoint's shape
    fresh = build_detr(**meta["builder_args"]).eval()
    fresh.load_state_dict(state, strict=True)
    trained = models[trial_id]  # as trained: a LoRA trial still has its adapters
    assert any("lora_A" in k for k in trained.state_dict()) == (trial_id == DETR_LORA)
    prepared = trained._prepare(_images())
    with torch.no_grad():
        want, got = trained.detr(prepared), fresh(prepared)
    for key in ("pred_logits", "pred_boxes"):  # merged equals unmerged within 1e-5
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)

    assert meta["trial_id"] == trial_id and meta["layout"] == "facebookresearch/detr" and meta["format"] == "state_dict"
    assert meta["lora_merged"] == (trial_id == DETR_LORA) and meta["checked"]["max_abs_diff"] <= 1e-5
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    ckpt_meta = json.loads((results.parent / f"train-{trial_id}" / "checkpoint_000001" / "meta.json").read_text())
    assert meta["label_map"] == ckpt_meta["label_map"] and meta["config"]["trial_id"] == trial_id
    assert meta["preprocessing"]["normalize"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["builder_args"]["num_classes"] == len(ckpt_meta["label_map"]["category_ids"])
    # The export is also a `weights:` file for a later sweep: our own loader takes it as it is.
    again = build_detr(**meta["builder_args"])
    assert load_detr_weights(again, str(out))["class_embed"] == "loaded"


def test_exported_faster_rcnn_loads_strictly_into_torchvisions_faster_rcnn(sweep, tmp_path):
    results, models = sweep
    out = tmp_path / "frcnn.pth"
    meta = _export(results, FRCNN, out)
    state = torch.load(out, map_location="cpu", weights_only=True)["model"]
    assert "roi_heads.box_predictor.cls_score.weight" in state and not any(k.startswith("model.") for k in state)
    fresh = export.build_official("faster_rcnn", meta["builder_args"])
    assert type(fresh).__module__.startswith("torchvision.")
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        want, got = models[FRCNN](_images()), fresh(_images())
    for w, g in zip(want, got):
        assert len(w["scores"]) == len(g["scores"]) > 0
        torch.testing.assert_close(g["boxes"], w["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(g["scores"], w["scores"], rtol=0, atol=1e-5)
        assert torch.equal(g["labels"], w["labels"] + 1)  # torchvision's 0 is background
    assert meta["layout"] == "torchvision FasterRCNN" and "label 0 is background" in meta["preprocessing"]["labels"]


def test_a_merged_detr_r50_has_exactly_the_official_keys_and_shapes():
    """DETR-R50 with LoRA on attention and FFN, merged: the 458 (key, shape) entries of the official
    checkpoint, in its order, and nothing else (no adapter, no parametrization, no num_batches_tracked)."""
    official = json.loads((FIXTURES / "detr" / "detr_r50_keys.json").read_text())
    cfg = official["config"]
    kw = {k: cfg[k] for k in ("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries",
                              "num_classes", "dropout", "aux_loss")}
    model = build_detr_detector(backbone="resnet50", **kw)
    apply_lora(model, rank=4, alpha=8, placement="attention_ffn")
    plain = build_detr_detector(backbone="resnet50", **kw)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    state = export.official_state_dict("detr", plain)
    assert [[k, list(v.shape)] for k, v in state.items()] == official["entries"]
    with pytest.raises(ValueError, match="not a merged detr detector"):
        export.official_state_dict("detr", model)


def test_onnx_export_matches_torch_in_onnx_runtime(sweep, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    results, models = sweep
    out = tmp_path / "detr.onnx"
    meta = _export(results, DETR_LORA, out, "--format", "onnx")
    assert meta["format"] == "onnx" and meta["checked"]["max_abs_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 72, 60, generator=g), torch.rand(3, 40, 52, generator=g), torch.rand(3, 64, 64, generator=g)]
    batch, mask = pad_images(images)  # another batch size and other image sizes than the export's example
    logits, boxes = session.run(None, {"images": batch.numpy(), "mask": mask.numpy()})
    trained = models[DETR_LORA]
    with torch.no_grad():
        want = trained.detr((batch - trained.image_mean) / trained.image_std, mask)
    np.testing.assert_allclose(logits, want["pred_logits"].numpy(), atol=1e-4)
    np.testing.assert_allclose(boxes, want["pred_boxes"].numpy(), atol=1e-4)


def test_onnx_of_faster_rcnn_is_refused_with_the_alternative(sweep, tmp_path, capsys):
    results, _ = sweep
    assert export.main([str(results), FRCNN, "--out", str(tmp_path / "f.onnx"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "DETR only" in err and "--format state_dict" in err and not (tmp_path / "f.onnx").exists()


def test_user_errors_are_one_line(sweep, tmp_path, capsys):
    results, _ = sweep
    assert export.main([str(results), "nope", "--out", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("detsweep.export: error: trial 'nope' is not in") and DETR_LORA in err
    folder = results.parent / f"train-{DETR_FULL}" / "checkpoint_000001"
    assert export.main([str(folder), DETR_FULL, "--out", str(tmp_path / "x.pth")]) == 2
    assert "give no TRIAL_ID" in capsys.readouterr().err
    assert export.main([str(folder), "--out", str(tmp_path / "y.pth")]) == 0  # a checkpoint folder alone


def test_help():
    proc = subprocess.run([sys.executable, "-m", "detsweep.export", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--format" in proc.stdout and "onnx" in proc.stdout
