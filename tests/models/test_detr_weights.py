"""DETR checkpoint loading: official layout, head/query/decoder adaptation, torch-hub 'coco' path with hash checks."""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import pytest
import torch

from detsweep.models import weights as weights_mod
from detsweep.models.detr import build_detr
from detsweep.models.weights import load_detr_weights

TINY = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dim_feedforward=32, dropout=0.0,
            aux_loss=True)
BIG = dict(num_classes=20, num_queries=10, dec_layers=3)  # the "pretrained" checkpoint's head sizes
SMALL = dict(num_classes=3, num_queries=4, dec_layers=2)


def _detr(seed: int, **sizes):
    torch.manual_seed(seed)
    return build_detr(**TINY, **sizes)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _detr(0, **BIG).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "detr_big.pth"
    torch.save({"model": state}, path)  # the official layout
    return path, state


def _assert_kept_parts_equal(small, state):
    """Everything except class_embed equals the checkpoint, truncated to the model's queries/decoder layers."""
    for key, value in small.state_dict().items():
        if key.startswith("class_embed."):
            continue
        expected = state[key][: value.shape[0]] if key == "query_embed.weight" else state[key]
        assert torch.equal(value, expected), key


def test_same_config_loads_strictly(big_checkpoint):
    path, state = big_checkpoint
    model = _detr(1, **BIG)
    summary = load_detr_weights(model, str(path))
    assert summary == {"source": str(path), "class_embed": "loaded", "num_queries": "loaded", "dec_layers": "loaded"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_smaller_model_selects_class_rows_by_category_id(big_checkpoint):
    path, state = big_checkpoint
    model = _detr(1, **SMALL)
    summary = load_detr_weights(model, str(path), category_ids=[2, 5, 17])
    assert summary["class_embed"] == "selected"
    assert summary["num_queries"] == "truncated 10->4" and summary["dec_layers"] == "truncated 3->2"
    rows = [2, 5, 17, 20]  # the three classes + the checkpoint's "no object" row
    assert torch.equal(model.class_embed.weight, state["class_embed.weight"][rows])
    assert torch.equal(model.class_embed.bias, state["class_embed.bias"][rows])
    _assert_kept_parts_equal(model, state)
    assert "transformer.decoder.norm.weight" in model.state_dict()


@pytest.mark.parametrize("category_ids", [None, [2, 5, 20]], ids=["no_ids", "id_not_in_checkpoint"])
def test_class_head_stays_fresh_without_usable_ids(big_checkpoint, category_ids, caplog):
    path, state = big_checkpoint
    model = _detr(1, **SMALL)
    fresh = {k: v.clone() for k, v in model.class_embed.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="detsweep.models.weights"):
        summary = load_detr_weights(model, str(path), category_ids=category_ids)
    assert summary["class_embed"] == "reinitialised"
    assert "fresh class head" in caplog.text
    assert torch.equal(model.class_embed.weight, fresh["weight"]) and torch.equal(model.class_embed.bias, fresh["bias"])
    _assert_kept_parts_equal(model, state)


def test_bare_and_prefixed_state_dicts_load(big_checkpoint, tmp_path):
    _, state = big_checkpoint
    for name, saved in (("bare.pth", state), ("detector.pth", {f"detr.{k}": v for k, v in state.items()})):
        torch.save(saved, tmp_path / name)
        model = _detr(1, **BIG)
        load_detr_weights(model, str(tmp_path / name))
        assert torch.equal(model.query_embed.weight, state["query_embed.weight"]), name


def test_official_training_checkpoint_with_args_namespace_loads(big_checkpoint, tmp_path):
    """The official main.py saves model, optimizer, lr_scheduler, epoch and its argparse Namespace."""
    _, state = big_checkpoint
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299,
                "args": argparse.Namespace(lr=1e-4, backbone="resnet18")}, path)
    model = _detr(1, **BIG)
    load_detr_weights(model, str(path))
    assert torch.equal(model.class_embed.weight, state["class_embed.weight"])


def test_none_is_a_no_op():
    model = _detr(1, **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_detr_weights(model, "none") == {"source": "none"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_file_names_the_path_and_choices(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=rf"DETR weights file '{missing}' does not exist; weights must be "
                                                r"'none', 'coco' or the path of a checkpoint file"):
        load_detr_weights(_detr(1, **SMALL), str(missing))


def test_mismatches_that_cannot_be_adapted_raise(big_checkpoint):
    path, _ = big_checkpoint
    with pytest.raises(ValueError, match=r"checkpoint backbone is resnet18 but the model's is resnet34"):
        load_detr_weights(build_detr(**{**TINY, "backbone": "resnet34"}, **BIG), str(path))
    with pytest.raises(ValueError, match=r"checkpoint has 10 queries but the model 12; use num_queries <= 10"):
        load_detr_weights(_detr(1, **{**BIG, "num_queries": 12}), str(path))
    with pytest.raises(ValueError, match=r"checkpoint has 3 decoder layers but the model 4; use dec_layers <= 3"):
        load_detr_weights(_detr(1, **{**BIG, "dec_layers": 4}), str(path))
    with pytest.raises(ValueError, match=r"checkpoint does not fit this DETR .*linear1.weight: checkpoint "
                                         r"\(32, 32\) vs model \(64, 32\)"):
        load_detr_weights(build_detr(**{**TINY, "dim_feedforward": 64}, **BIG), str(path))


def _hub_checkpoints(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert torch.hub.get_dir() == str(tmp_path / "torch_home" / "hub")
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_coco_downloads_via_torch_hub_with_hash_check(big_checkpoint, tmp_path, monkeypatch):
    """Happy path: a file:// URL whose name carries the file's real sha256 prefix, like the official URL."""
    path, state = big_checkpoint
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    served = tmp_path / "served" / f"detr-tiny-{sha[:8]}.pth"
    served.parent.mkdir()
    served.write_bytes(path.read_bytes())
    checkpoints = _hub_checkpoints(tmp_path, monkeypatch)
    monkeypatch.setattr(weights_mod, "DETR_R50_COCO_URL", served.as_uri())

    model = _detr(1, **SMALL)
    assert load_detr_weights(model, "coco", category_ids=[0, 1, 2])["source"] == "coco"
    assert (checkpoints / served.name).read_bytes() == path.read_bytes()  # cached by torch hub
    _assert_kept_parts_equal(model, state)

    served.unlink()  # the second load must come from the verified cache, not the URL
    again = _detr(2, **SMALL)
    load_detr_weights(again, "coco", category_ids=[0, 1, 2])
    assert torch.equal(again.class_embed.weight, model.class_embed.weight)


def test_coco_download_with_wrong_hash_raises(big_checkpoint, tmp_path, monkeypatch):
    path, _ = big_checkpoint
    served = tmp_path / "detr-tiny-00000000.pth"
    served.write_bytes(path.read_bytes())
    checkpoints = _hub_checkpoints(tmp_path, monkeypatch)
    monkeypatch.setattr(weights_mod, "DETR_R50_COCO_URL", served.as_uri())
    with pytest.raises(RuntimeError, match=r'invalid hash value \(expected "00000000"'):
        load_detr_weights(_detr(1, **SMALL), "coco")
    assert not (checkpoints / served.name).exists()  # torch hub keeps no bad download


def test_coco_cached_file_with_wrong_hash_raises(big_checkpoint, tmp_path, monkeypatch):
    """torch hub never re-checks a cached file; we do, so a foreign or truncated cache fails clearly."""
    path, _ = big_checkpoint
    checkpoints = _hub_checkpoints(tmp_path, monkeypatch)
    checkpoints.mkdir(parents=True)
    (checkpoints / "detr-r50-e632da11.pth").write_bytes(path.read_bytes())
    with pytest.raises(RuntimeError, match=r"detr-r50-e632da11.pth has sha256 [0-9a-f]{16}\.\.\., but its name says "
                                           r"it starts with 'e632da11': the file is corrupt or not the official one"):
        load_detr_weights(_detr(1, **SMALL), "coco")
