"""The sweep file: every bad input is one line naming file, key, value and what is allowed;
grid expansion prunes meaningless combinations and gives stable ids."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from detsweep.models.registry import LORA_PLACEMENTS, MODELS, REGIMES
from detsweep.sweep import SweepError, TrialConfig, expand, load_sweep, parse_sweep
from detsweep.sweep.plan import max_concurrent

REPO = Path(__file__).resolve().parents[2]
SEED000_GRID = {"model": ["detr_r50", "fasterrcnn_r50_fpn"], "regime": ["full", "lora_only", "partial"],
                "lora.rank": [4, 8, 16], "lora.placement": ["attention_only", "attention_ffn"]}

BAD = [
    ({"name": "x", "grid": {"lora.placement": ["attn"]}},
     "f.yaml: grid.lora.placement: 'attn' is not one of ['attention_only', 'attention_ffn', 'decoder_only', 'qv_only', "
     "'backbone_attention', 'backbone_attention+transformer', 'box_head']"),
    ({"name": "x", "grid": {"model": ["yolo"]}},
     "f.yaml: grid.model: 'yolo' is not one of ['detr_r50', 'fasterrcnn_r50_fpn']"),
    ({"name": "x", "grid": {"regime": ["half"]}},
     "f.yaml: grid.regime: 'half' is not one of ['full', 'lora_only', 'partial', 'two_stage']"),
    ({"name": "x", "train": {"lr": "fast"}}, "f.yaml: train.lr: 'fast' must be of type float"),
    ({"name": "x", "train": {"epochs": 1.5}}, "f.yaml: train.epochs: 1.5 must be of type int"),
    ({"name": "x", "train": {"epochs": 0}}, "f.yaml: train.epochs: 0 must be > 0"),
    ({"name": "x", "trian": {}},
     "f.yaml: trian: unknown key; allowed keys are ['name', 'data', 'model', 'lora', 'two_stage', 'train', 'eval', "
     "'resources', 'resources_by_regime', 'fault_tolerance', 'grid', 'extra_trials', 'scheduler', 'bases', "
     "'search', 'cost', 'storage', 'max_concurrent_trials']"),
    ({"name": "x", "model": {"detr": {"layers": 3}}},
     "f.yaml: model.detr.layers: unknown key; allowed keys are ['backbone', 'weights', 'num_queries', "
     "'hidden_dim', 'nheads', 'enc_layers', 'dec_layers', 'dim_feedforward', 'dropout', 'aux_loss', "
     "'min_size', 'max_size', 'regimes', 'class_loss', 'focal_alpha', 'focal_gamma', 'loss_weights']"),
    ({"name": "x", "model": {"detr": {"backbone": "vit"}}},
     "f.yaml: model.detr.backbone: 'vit' is not one of ['resnet18', 'resnet34', 'resnet50', 'resnet101', "
     "'vit_b_16', 'dinov2_vits14', 'dinov2_vitb14']"),
    ({"name": "x", "resources": {"ddp_workers": 2, "gpus_per_worker": 0.5}},
     "f.yaml: resources.gpus_per_worker: 0.5 is fractional, which needs ddp_workers: 1 (got 2); NCCL "
     "cannot run two ranks of one trial on one GPU"),
    ({"name": "x", "resources_by_regime": {"lora_only": {"ddp_workers": 2, "gpus_per_worker": 0.25}}},
     "f.yaml: resources_by_regime.lora_only.gpus_per_worker: 0.25 is fractional, which needs ddp_workers: 1 "
     "(got 2); NCCL cannot run two ranks of one trial on one GPU"),
    ({"name": "x", "scheduler": "hyperband"}, "f.yaml: scheduler.kind: 'hyperband' is not one of ['none', 'asha']"),
    ({"name": "x", "grid": {"train.foo": [1]}},
     "f.yaml: grid.train.foo: unknown key 'train.foo'; allowed keys are ['epochs', 'batch_size_per_worker', "
     "'lr', 'lr_backbone', 'weight_decay', 'grad_clip', 'lr_schedule', 'lr_drop_epoch', 'warmup_steps', "
     "'amp', 'seed', 'accumulate', 'ema', 'patience', 'profile']"),
    ({"name": "x", "grid": {"train.lr": 0.1}}, "f.yaml: grid.train.lr: 0.1 must be a non-empty list"),
    ({"name": "x", "grid": {"train.seed": [0, "one"]}}, "f.yaml: grid.train.seed: 'one' must be of type int"),
    ({"name": "x", "model": {"detr": {"weights": "/nonexistent/detr.pth"}}},
     "f.yaml: model.detr.weights: '/nonexistent/detr.pth' is neither one of ['none', 'coco', 'imagenet', 'lvd142m'] "
     "nor an existing "
     "checkpoint file"),
    ({"name": "x", "data": {"kind": "coco", "root": "/nonexistent/coco"}},
     "f.yaml: data.root: '/nonexistent/coco' is not a directory (run `python -m detsweep.data coco2017 "
     "--root DIR` first)"),
    ({"name": "x", "eval": {"calibration": {"match_iou": 1.5}}},
     "f.yaml: eval.calibration.match_iou: 1.5 must be in (0, 1]"),
    ({"data": {}}, "f.yaml: name: required key is missing"),
    ({"name": "x", "grid": {"lora.rank": [8, 0]}}, "f.yaml: grid.lora.rank: 0 must be > 0"),
    ({"name": "x", "grid": {"eval.calibration.match_iou": [2.0]}},
     "f.yaml: grid.eval.calibration.match_iou: 2.0 must be in (0, 1]"),
    ({"name": "x", "grid": {"model.detr.weights": ["/nonexistent/a.pth"]}},
     "f.yaml: grid.model.detr.weights: '/nonexistent/a.pth' is neither one of ['none', 'coco', 'imagenet', "
     "'lvd142m'] nor an "
     "existing "
     "checkpoint file"),
    ({"name": "a/b"}, "f.yaml: name: 'a/b' must be letters, digits, '_', '-' or '.' (it names a folder)"),
    ({"name": "x", "scheduler": {"kind": "asha", "metric": "accuracy"}},
     "f.yaml: scheduler.metric: 'accuracy' is not one of ['ap', 'ap50', 'ap75', 'ar100', 'loss', 'ece', 'nll', "
     "'brier']"),
    ({"name": "x", "fault_tolerance": {"keep": 0}},
     "f.yaml: fault_tolerance.keep: 0 must be >= 1"),
    ({"name": "x", "model": {"faster_rcnn": {"trainable_backbone_layers": 9}}},
     "f.yaml: model.faster_rcnn.trainable_backbone_layers: 9 must be in [0, 5] or null"),
    ({"name": "x", "model": {"detr": {"hidden_dim": 33, "nheads": 1}}},
     "f.yaml: model.detr.hidden_dim: 33 must be > 0 and even (half of it encodes y, half x)"),
    ({"name": "x", "model": {"detr": {"dim_feedforward": 0}}}, "f.yaml: model.detr.dim_feedforward: 0 must be > 0"),
    ({"name": "x", "model": {"faster_rcnn": {"max_size": 0}}}, "f.yaml: model.faster_rcnn.max_size: 0 must be > 0"),
    ({"name": "x", "model": {"detr": {"min_size": 0}}}, "f.yaml: model.detr.min_size: 0 must be > 0 or null"),
    ({"name": "x", "resources": {"cpus_per_worker": 0}}, "f.yaml: resources.cpus_per_worker: 0.0 must be > 0"),
    (["not", "a", "mapping"], "f.yaml: the sweep file must be a mapping, got list"),
    ({"name": "x", "resources_by_regime": {"lora_only": 5}}, "f.yaml: resources_by_regime.lora_only: 5 must be a mapping"),
    ({"name": "x", "resources_by_regime": {"lora_only": None}},
     "f.yaml: resources_by_regime.lora_only: None must be a mapping"),
    ({"name": "x", "resources_by_regime": {"lora_only": {"gpus": 1}}},
     "f.yaml: resources_by_regime.lora_only.gpus: unknown key; allowed keys are ['ddp_workers', 'cpus_per_worker', "
     "'gpus_per_worker', 'backend']"),
    ({"name": "x", "resources_by_regime": {"half": {}}},
     "f.yaml: resources_by_regime.half: unknown regime; allowed are ['full', 'lora_only', 'partial', 'two_stage']"),
    ({"name": "x", "grid": {"resources.gpus_per_worker": [1, 0.5]}},
     "f.yaml: grid.resources.gpus_per_worker: 0.5 is fractional, which needs ddp_workers: 1 (got 2); NCCL cannot "
     "run two ranks of one trial on one GPU"),
    ({"name": "x", "resources": {"ddp_workers": 1, "gpus_per_worker": 0.5}, "grid": {"resources.ddp_workers": [1, 2]}},
     "f.yaml: grid.resources.ddp_workers: 2 must be 1 with a fractional gpus_per_worker (0.5); NCCL cannot run two "
     "ranks of one trial on one GPU"),
    ({"name": "x", "resources": {"backend": "nccl", "gpus_per_worker": 1}, "grid": {"resources.gpus_per_worker": [0]}},
     "f.yaml: grid.resources.gpus_per_worker: 0.0 must be > 0 with backend 'nccl'; use backend 'gloo' or 'auto'"),
    ({"name": "x", "data": {"classes": ["person"]}},
     "f.yaml: data.classes: ['person'] must be among the synthetic classes that data.num_classes 5 makes, "
     "['red_square', 'green_circle', 'blue_triangle', 'yellow_diamond', 'magenta_ring'] (a subset by other names "
     "needs data.kind 'coco')"),
    ({"name": "x", "data": {"classes": ["cyan_cross"]}, "grid": {"data.num_classes": [8, 2]}},
     "f.yaml: grid.data.num_classes: 2 makes the synthetic classes ['red_square', 'green_circle'], which lack some "
     "of data.classes ['cyan_cross']; the order is ['red_square', 'green_circle', 'blue_triangle', 'yellow_diamond', "
     "'magenta_ring', 'cyan_cross', 'orange_bar', 'white_star']"),
    ({"name": "x", "data": {"kind": "coco", "classes": ["dog", "dog"]}},
     "f.yaml: data.classes: ('dog', 'dog') must be null or a non-empty list of distinct class names"),
    ({"name": "x", "train": {"epochs": 2}, "scheduler": {"kind": "asha", "grace_period": 3}},
     "f.yaml: scheduler.grace_period: 3 must be <= train.epochs (2) with scheduler asha (no trial is stopped "
     "before grace_period epochs)"),
    ({"name": "x", "train": {"epochs": 10}, "scheduler": {"kind": "asha", "grace_period": 3},
      "grid": {"train.epochs": [10, 2]}},
     "f.yaml: grid.train.epochs: 2 must be >= scheduler.grace_period (3) with scheduler asha (no trial is stopped "
     "before grace_period epochs)"),
    ({"name": "x", "train": {"epochs": 3, "lr_drop_epoch": 4}},
     "f.yaml: train.lr_drop_epoch: 4 must be <= train.epochs (3) (the step schedule lowers the rate at that epoch)"),
    ({"name": "x", "train": {"epochs": 30, "lr_drop_epoch": 20}, "grid": {"train.epochs": [30, 12]}},
     "f.yaml: grid.train.epochs: 12 must be >= train.lr_drop_epoch (20) (the step schedule lowers the rate at that "
     "epoch)"),
    ({"name": "x", "train": {"epochs": 30}, "grid": {"train.epochs": [10, 20], "train.lr_drop_epoch": [8, 15]}},
     "f.yaml: grid.train.lr_drop_epoch: 15 must be <= train.epochs (10) (the step schedule lowers the rate at that "
     "epoch)"),
]

_COCO_ARCH = "with model.detr.weights 'coco' (the official DETR-R50's architecture)"
_COCO_CUT = "with model.detr.weights 'coco' (the official DETR-R50 has {n}; a smaller model keeps the first ones)"
# `model.detr.weights: coco` into a model the official checkpoint cannot fill, set directly, by a grid
# axis, or by two grid axes together.
DETR_COCO_BAD = [
    ({"backbone": "resnet18"}, {}, f"f.yaml: model.detr.backbone: 'resnet18' must be 'resnet50' {_COCO_ARCH}"),
    ({"hidden_dim": 128}, {}, f"f.yaml: model.detr.hidden_dim: 128 must be 256 {_COCO_ARCH}"),
    ({"nheads": 4}, {}, f"f.yaml: model.detr.nheads: 4 must be 8 {_COCO_ARCH}"),
    ({"enc_layers": 3}, {}, f"f.yaml: model.detr.enc_layers: 3 must be 6 {_COCO_ARCH}"),
    ({"dim_feedforward": 1024}, {}, f"f.yaml: model.detr.dim_feedforward: 1024 must be 2048 {_COCO_ARCH}"),
    ({"num_queries": 300}, {}, "f.yaml: model.detr.num_queries: 300 must be <= 100 " + _COCO_CUT.format(n=100)),
    ({"dec_layers": 8}, {}, "f.yaml: model.detr.dec_layers: 8 must be <= 6 " + _COCO_CUT.format(n=6)),
    ({}, {"model.detr.num_queries": [100, 200]},
     "f.yaml: grid.model.detr.num_queries: 200 must be <= 100 " + _COCO_CUT.format(n=100)),
    ({}, {"model.detr.dec_layers": [3, 7]},
     "f.yaml: grid.model.detr.dec_layers: 7 must be <= 6 " + _COCO_CUT.format(n=6)),
    ({}, {"model.detr.backbone": ["resnet50", "resnet101"]},
     f"f.yaml: grid.model.detr.backbone: 'resnet101' must be 'resnet50' {_COCO_ARCH}"),
    ({"weights": "none", "num_queries": 200}, {"model.detr.weights": ["none", "coco"]},
     "f.yaml: model.detr.num_queries: 200 must be <= 100 " + _COCO_CUT.format(n=100)),
    ({"weights": "none"}, {"model.detr.weights": ["none", "coco"], "model.detr.num_queries": [50, 200]},
     "f.yaml: grid.model.detr.num_queries: 200 must be <= 100 " + _COCO_CUT.format(n=100)),
    ({"weights": "none"}, {"model.detr.hidden_dim": [128, 256], "model.detr.weights": ["none", "coco"]},
     f"f.yaml: grid.model.detr.hidden_dim: 128 must be 256 {_COCO_ARCH}"),
]


@pytest.mark.parametrize("raw,message", BAD, ids=[m.split(": ")[1] for _, m in BAD])
def test_bad_sweep_is_one_line(raw, message):
    with pytest.raises(SweepError) as e:
        parse_sweep(raw, "f.yaml")
    assert str(e.value) == message
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("detr,grid,message", DETR_COCO_BAD, ids=[m.split(": ")[1] for _, _, m in DETR_COCO_BAD])
def test_detr_coco_weights_reject_what_the_official_checkpoint_cannot_fill(detr, grid, message):
    raw = {"name": "x", "model": {"detr": {"weights": "coco", **detr}}, "grid": grid}
    with pytest.raises(SweepError) as e:
        parse_sweep(raw, "f.yaml")
    assert str(e.value) == message


def test_detr_coco_weights_accept_the_official_shape_and_truncations():
    sweep = parse_sweep({"name": "x", "model": {"detr": {"weights": "coco", "num_queries": 50}},
                         "grid": {"model.detr.dec_layers": [6, 3], "model.detr.weights": ["coco", "none"],
                                  "model.detr.num_queries": [100, 20]}}, "f.yaml")
    assert sweep.model.detr.num_queries == 50
    # Beyond the official sizes is fine without the checkpoint.
    no_checkpoint = parse_sweep({"name": "x", "model": {"detr": {"num_queries": 300, "dec_layers": 8}}})
    assert (no_checkpoint.model.detr.num_queries, no_checkpoint.model.detr.dec_layers) == (300, 8)


def test_seed000_matrix_expands_to_its_nine_real_trials():
    trials = expand(parse_sweep({"name": "s", "grid": SEED000_GRID}))
    assert [t.trial_id for t in trials] == [
        "detr_r50-full",
        "detr_r50-lora_only-r4-attention_only", "detr_r50-lora_only-r4-attention_ffn",
        "detr_r50-lora_only-r8-attention_only", "detr_r50-lora_only-r8-attention_ffn",
        "detr_r50-lora_only-r16-attention_only", "detr_r50-lora_only-r16-attention_ffn",
        "detr_r50-partial", "fasterrcnn_r50_fpn-full"]
    by_id = {t.trial_id: t for t in trials}
    assert by_id["detr_r50-full"].lora is None
    assert by_id["detr_r50-lora_only-r16-attention_ffn"].lora.rank == 16
    # Faster R-CNN's partial regime is available when its family lists it.
    sweep = parse_sweep({"name": "s", "grid": SEED000_GRID, "model": {"faster_rcnn": {"regimes": ["full", "partial"]}}})
    assert [t.trial_id for t in expand(sweep)][-2:] == ["fasterrcnn_r50_fpn-full", "fasterrcnn_r50_fpn-partial"]


def test_extra_axes_name_the_trial_and_are_deduplicated_where_meaningless():
    sweep = parse_sweep({"name": "s", "grid": {
        "model": ["detr_r50", "fasterrcnn_r50_fpn"], "regime": ["full"], "train.seed": [0, 1],
        "model.detr.dec_layers": [6, 3]}})
    ids = [t.trial_id for t in expand(sweep)]
    # id parts of extra axes sorted by dotted key (model.detr.dec_layers < train.seed), whatever the
    # YAML order; the grid order still decides the trial order
    assert ids == ["detr_r50-full-dec_layers6-seed0", "detr_r50-full-dec_layers3-seed0",
                   "detr_r50-full-dec_layers6-seed1", "detr_r50-full-dec_layers3-seed1",
                   "fasterrcnn_r50_fpn-full-seed0", "fasterrcnn_r50_fpn-full-seed1"]
    t = expand(sweep)[1]
    assert t.detector.dec_layers == 3 and t.train.seed == 0 and t.axes == {"train.seed": 0, "model.detr.dec_layers": 3}


def test_colliding_trial_ids_are_an_error_not_a_lost_trial():
    with pytest.raises(SweepError, match=r"^f.yaml: grid: two different trials would share the id "
                                         r"'detr_r50-full-lr0.0001'"):
        expand(parse_sweep({"name": "s", "grid": {"train.lr": [1e-4, 1.00000001e-4]}}, "f.yaml"))


def test_model_label_names_the_backbone_that_runs():
    sweep = parse_sweep({"name": "s", "model": {"detr": {"backbone": "resnet18"}, "faster_rcnn": {"backbone": "resnet101"}},
                         "grid": {"model": ["detr_r50", "fasterrcnn_r50_fpn"]}})
    assert [t.trial_id for t in expand(sweep)] == ["detr_r18-full", "fasterrcnn_r101_fpn-full"]


def test_coco_root_must_hold_the_annotation_files(tmp_path):
    with pytest.raises(SweepError) as e:
        parse_sweep({"name": "s", "data": {"kind": "coco", "root": str(tmp_path), "format": "coco2017"}}, "f.yaml")
    assert str(e.value) == (f"f.yaml: data.root: {str(tmp_path)!r} has no annotations/instances_train2017.json (a "
                            "COCO 2017 root holds annotations/instances_{train,val}2017.json + "
                            "images/{train2017,val2017}/; `python -m detsweep.data coco2017 --root DIR` fetches it)")
    with pytest.raises(SweepError) as e:  # format: auto (the default) names every layout it knows
        parse_sweep({"name": "s", "data": {"kind": "coco", "root": str(tmp_path)}}, "f.yaml")
    assert str(e.value).startswith(f"f.yaml: data.root: {str(tmp_path)!r} holds no dataset layout detsweep knows "
                                   "(coco2017: annotations/instances_{train,val}2017.json")


def _coco_root(tmp_path):
    """What a cluster's head holds (cluster.yaml syncs only annotations/ there): no images."""
    (tmp_path / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (tmp_path / "annotations" / f"instances_{split}2017.json").write_text("{}")
    return tmp_path


def test_coco_root_with_annotations_only_passes_the_driver_check(tmp_path):
    """The driver reads nothing of COCO; the workers check the images when they build their datasets."""
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "data": {"kind": "coco", "root": str(_coco_root(tmp_path / "coco"))},
                                    "grid": SEED000_GRID}))
    assert len(expand(load_sweep(path, check_paths=True))) == 9


def test_image_counts_default_by_data_kind(tmp_path):
    assert parse_sweep({"name": "s"}).data.train_images == 64
    coco = parse_sweep({"name": "s", "data": {"kind": "coco", "root": str(_coco_root(tmp_path))}})
    assert (coco.data.train_images, coco.data.val_images) == (0, 0)  # all of COCO, not 64 images


def test_trial_ids_are_stable_and_configs_round_trip():
    a = expand(parse_sweep({"name": "s", "grid": SEED000_GRID}))
    b = expand(parse_sweep({"name": "s", "grid": dict(reversed(list(SEED000_GRID.items())))}))
    assert sorted(t.trial_id for t in a) == sorted(t.trial_id for t in b)
    for t in a:
        assert TrialConfig.from_dict(t.to_dict()) == t


def test_resources_by_regime_and_concurrency_for_a_four_gpu_node():
    sweep = parse_sweep({"name": "s", "grid": SEED000_GRID,
                         "resources": {"ddp_workers": 2, "cpus_per_worker": 8, "gpus_per_worker": 1},
                         "resources_by_regime": {"lora_only": {"ddp_workers": 1, "cpus_per_worker": 4,
                                                               "gpus_per_worker": 0.5}}})
    trials = expand(sweep)
    lora = [t for t in trials if t.regime == "lora_only"]
    assert all(t.resources.gpus_per_worker == 0.5 and t.resources.ddp_workers == 1 for t in lora)
    assert max_concurrent(lora, {"CPU": 48, "GPU": 4}) == 6  # 8 fit, 6 exist
    assert max_concurrent([t for t in trials if t.regime == "full"], {"CPU": 48, "GPU": 4}) == 2
    assert max_concurrent(trials, {"CPU": 2, "GPU": 0}) == 1


def test_validator_names_equal_the_models_own_registries():
    from detsweep.models.lora import PLACEMENT_NAMES
    from detsweep.models.regimes import REGIMES as MODEL_REGIMES

    assert tuple(LORA_PLACEMENTS) == tuple(PLACEMENT_NAMES)
    # every regime a sweep names is one the models apply, or two_stage: `heads`, then one of them
    assert set(REGIMES) <= set(MODEL_REGIMES) | {"two_stage"} and "heads" in MODEL_REGIMES


def test_rules_between_keys_hold_for_every_trial_not_for_overridden_values():
    """A sweep value every trial overrides by a grid axis is not checked against the other keys."""
    sweep = parse_sweep({"name": "x", "train": {"epochs": 2, "lr_drop_epoch": 4},
                         "scheduler": {"kind": "asha", "grace_period": 3}, "grid": {"train.epochs": [5, 10]}})
    assert [t.train.epochs for t in expand(sweep)] == [5, 10]
    # A synthetic class subset picks among the classes that num_classes makes (the data layer supports it).
    subset = parse_sweep({"name": "x", "data": {"num_classes": 6, "classes": ["cyan_cross", "red_square"]}})
    assert subset.data.classes == ("cyan_cross", "red_square")
    assert parse_sweep({"name": "x", "model": {"detr": {"weights": "imagenet", "backbone": "resnet18"}}})


def test_cli_resources_by_regime_not_a_mapping_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "resources_by_regime": {"lora_only": 5}}))
    out = _cli(str(path), "--dry-run")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: {path}: resources_by_regime.lora_only: 5 must be a mapping"]


def test_shipped_sweeps_load(tmp_path):
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path, check_paths=False)
        assert expand(sweep), path
    smoke = expand(load_sweep(REPO / "sweeps" / "smoke.yaml"))
    assert {t.regime for t in smoke} == {"full", "lora_only", "partial", "two_stage"}
    detr_placements = ("attention_only", "attention_ffn", "decoder_only", "qv_only")
    assert {(t.lora.rank, t.lora.placement) for t in smoke if t.lora and t.family == "detr"} >= {
        (r, p) for r in (4, 8) for p in detr_placements}  # every transformer placement trains in the demo
    # and one trial per newer axis: a ViT backbone with LoRA in it, a two_stage trial, Faster R-CNN's LoRA,
    # a second augmentation recipe beside the grid's hflip
    assert {(t.family, t.regime, t.detector.backbone, t.lora and t.lora.placement) for t in smoke[-4:-1]} == {
        ("detr", "lora_only", "dinov2_vits14", "backbone_attention+transformer"),
        ("detr", "two_stage", "resnet18", None), ("faster_rcnn", "lora_only", "resnet18", "box_head")}
    assert {t.data.augment for t in smoke} == {"hflip", "photometric"}
    full = expand(load_sweep(REPO / "sweeps" / "full.yaml", check_paths=False))
    assert len(full) == 9


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detsweep.run", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_bad_file_exits_2_with_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "grid": {"lora.placement": ["attn"]}}))
    out = _cli(str(path), "--dry-run")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {path}: grid.lora.placement: 'attn' is not one of ['attention_only', 'attention_ffn', "
        f"'decoder_only', 'qv_only', 'backbone_attention', 'backbone_attention+transformer', 'box_head']"]
    missing = _cli(str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: no such sweep file"
    path.write_text("name: [unclosed")
    assert _cli(str(path)).returncode == 2
    bad_res = _cli("sweeps/smoke.yaml", "--dry-run", "--assume-resources", "CPU=abc")
    assert bad_res.returncode == 2 and bad_res.stderr.strip() == (
        "error: --assume-resources: 'CPU=abc' is not CPU=N or GPU=M (e.g. CPU=48,GPU=4)")


def test_cli_dry_run_prints_the_plan_and_starts_nothing():
    out = _cli("sweeps/full.yaml", "--dry-run", "--assume-resources", "CPU=48,GPU=4")
    assert out.returncode == 0, out.stderr
    assert "9 trials, up to 8 at once" in out.stdout
    assert "detr_r50-lora_only-r16-attention_ffn" in out.stdout
    assert "cluster: CPU=48, GPU=4 (assumed)" in out.stdout
    assert "ray" not in out.stderr.lower()


def test_cli_help():
    out = _cli("--help")
    assert out.returncode == 0 and "--dry-run" in out.stdout and "--resume" in out.stdout


def test_cli_guards_an_earlier_run_before_ray_starts(tmp_path):
    (tmp_path / "smoke" / "tune").mkdir(parents=True)
    out = _cli("sweeps/smoke.yaml", "--output-dir", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: {tmp_path / 'smoke'} already holds a run of sweep 'smoke'; pass --resume "
                                  f"to continue it, --fresh to start over, or --output-dir for another folder")
    fresh = tmp_path / "other"
    out = _cli("sweeps/smoke.yaml", "--output-dir", str(fresh), "--resume")
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: --resume: no earlier run of sweep 'smoke' in {fresh / 'smoke'}"


RECIPE_BAD = [
    ({"train": {"accumulate": 0}}, "f.yaml: train.accumulate: 0 must be >= 1"),
    ({"train": {"ema": {"decay": 1.0}}}, "f.yaml: train.ema.decay: 1.0 must be in (0, 1)"),
    ({"train": {"patience": 0}}, "f.yaml: train.patience: 0 must be >= 1 evaluations, or null (off)"),
    ({"eval": {"every": 0}}, "f.yaml: eval.every: 0 must be >= 1 epochs"),
    ({"eval": {"best_metric": "loss"}},
     "f.yaml: eval.best_metric: 'loss' is not one of ['ap', 'ap50', 'ap75', 'ar100', 'val_loss']"),
    ({"train": {"epochs": 6}, "eval": {"every": 2}, "scheduler": {"kind": "asha", "grace_period": 3}},
     "f.yaml: scheduler.grace_period: 3 must be a multiple of eval.every with scheduler asha and eval.every 2 "
     "(results come only at epochs 2, 4, ... and the last)"),
]


@pytest.mark.parametrize("changes,message", RECIPE_BAD, ids=[m.split(": ")[1] for _, m in RECIPE_BAD])
def test_recipe_keys_are_checked_at_load_time(changes, message):
    with pytest.raises(SweepError) as e:
        parse_sweep({"name": "x", **changes}, "f.yaml")
    assert str(e.value) == message


def test_an_asha_rung_on_an_evaluated_epoch_is_accepted():
    sweep = parse_sweep({"name": "x", "train": {"epochs": 6}, "eval": {"every": 2},
                         "scheduler": {"kind": "asha", "grace_period": 4}}, "f.yaml")
    assert sweep.eval.every == 2 and sweep.scheduler.grace_period == 4
