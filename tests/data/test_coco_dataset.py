"""LabelMap (gappy ids, subsets, checkpoints), CocoDetection targets/flips, collate, build_datasets."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detsweep.data.check import DataError
from detsweep.data.coco import CocoDetection, LabelMap, build_dataset_splits, build_datasets, collate_fn
from detsweep.data.images import ImageReadError

# Listed out of id order on purpose: the mapping must sort by id.
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"},
              {"id": 18, "name": "dog"}]


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _write_coco(image_dir: Path, ann_file: Path, first_id: int = 10) -> dict:
    """Three images: one with mixed annotations, one 20x20 with a dog, one with none."""
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    a, b, c = first_id, first_id + 1, first_id + 2
    images = [{"id": c, "file_name": "c.png", "width": 24, "height": 16},  # out of order on purpose
              {"id": a, "file_name": "a.png", "width": 40, "height": 30},
              {"id": b, "file_name": "b.png", "width": 20, "height": 20}]
    sizes = {"a.png": (30, 40), "b.png": (20, 20), "c.png": (16, 24)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        Image.fromarray(_pixels(h, w, i)).save(image_dir / name)
    anns = [
        {"image_id": a, "category_id": 3, "bbox": [2.0, 3.0, 10.0, 5.0], "iscrowd": 0},  # car, kept
        {"image_id": a, "category_id": 1, "bbox": [20.5, 4.0, 30.0, 40.0], "iscrowd": 0},  # person, clipped
        {"image_id": a, "category_id": 1, "bbox": [0.0, 0.0, 40.0, 30.0], "iscrowd": 1},  # crowd: dropped
        {"image_id": a, "category_id": 90, "bbox": [5.0, 5.0, 0.0, 4.0], "iscrowd": 0},  # zero width: dropped
        {"image_id": a, "category_id": 18, "bbox": [45.0, 1.0, 5.0, 5.0], "iscrowd": 0},  # outside: dropped
        {"image_id": b, "category_id": 18, "bbox": [1.0, 2.0, 3.0, 4.0], "iscrowd": 0},  # dog
    ]
    for i, ann in enumerate(anns):
        ann.update(id=100 * first_id + i, area=ann["bbox"][2] * ann["bbox"][3])
    coco = {"images": images, "annotations": anns, "categories": CATEGORIES}
    ann_file.write_text(json.dumps(coco))
    return coco


@pytest.fixture()
def tiny(tmp_path) -> tuple[Path, Path]:
    _write_coco(tmp_path / "images", tmp_path / "ann.json")
    return tmp_path / "images", tmp_path / "ann.json"


# ---- LabelMap -------------------------------------------------------------------------------------

def test_label_map_gappy_ids_both_ways():
    lm = LabelMap.from_coco({"categories": CATEGORIES})
    assert lm.category_ids == (1, 3, 18, 90)
    assert lm.names == ("person", "car", "dog", "toothbrush")
    assert lm.num_classes == 4
    assert [lm.to_label(i) for i in (1, 3, 18, 90)] == [0, 1, 2, 3]
    assert [lm.to_category_id(k) for k in range(4)] == [1, 3, 18, 90]
    with pytest.raises(KeyError, match=r"category id 2 is not in the label map \[1, 3, 18, 90\]"):
        lm.to_label(2)
    with pytest.raises(KeyError, match=r"label 4 is out of range 0..3"):
        lm.to_category_id(4)


def test_label_map_subset_sorted_by_id_and_from_file(tiny):
    lm = LabelMap.from_coco(tiny[1], ["toothbrush", "person", "dog"])
    assert lm.category_ids == (1, 18, 90) and lm.names == ("person", "dog", "toothbrush")
    assert lm.to_label(90) == 2 and 3 not in lm and 18 in lm


def test_label_map_unknown_class_lists_available():
    with pytest.raises(ValueError) as err:
        LabelMap.from_coco({"categories": CATEGORIES}, ["dog", "cat"])
    assert str(err.value) == "unknown class 'cat'; available: ['car', 'dog', 'person', 'toothbrush']"
    with pytest.raises(ValueError, match=r"classes must not repeat, got \['dog', 'dog'\]"):
        LabelMap.from_coco({"categories": CATEGORIES}, ["dog", "dog"])


def test_label_map_checkpoint_roundtrip():
    lm = LabelMap.from_coco({"categories": CATEGORIES}, ["car", "dog"])
    stored = json.loads(json.dumps(lm.as_dict()))
    assert stored == {"category_ids": [3, 18], "names": ["car", "dog"]}
    back = LabelMap.from_dict(stored)
    assert back == lm and back.to_label(18) == 1
    assert pickle.loads(pickle.dumps(lm)).to_category_id(1) == 18  # DataLoader workers pickle it


def test_label_map_rejects_unsorted_ids():
    with pytest.raises(ValueError, match=r"must be unique and ascending, got \[5, 2\]"):
        LabelMap((5, 2), ("a", "b"))


# ---- CocoDetection ------------------------------------------------------------------------------

def test_targets_xyxy_contiguous_and_filtered(tiny):
    ds = CocoDetection(*tiny)
    assert len(ds) == 3 and ds.image_ids == [10, 11, 12]
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    assert torch.equal(image, torch.from_numpy(_pixels(30, 40, 0)).permute(2, 0, 1).float() / 255)
    assert target["image_id"] == 10 and target["orig_size"] == (30, 40)
    # car as is; person clipped to the 40x30 image; crowd, zero-width and outside boxes gone
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 8.0], [20.5, 4.0, 40.0, 30.0]]))
    assert target["labels"].tolist() == [1, 0] and target["labels"].dtype == torch.int64
    _, target = ds[1]
    assert target["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]] and target["labels"].tolist() == [2]


def test_image_without_objects_kept_with_empty_target(tiny):
    _, target = CocoDetection(*tiny)[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["orig_size"] == (16, 24)


def test_label_map_subset_drops_other_classes(tiny):
    lm = LabelMap.from_coco(tiny[1], ["person", "dog"])
    ds = CocoDetection(*tiny, label_map=lm)
    _, target = ds[0]
    assert target["labels"].tolist() == [0] and target["boxes"].tolist() == [[20.5, 4.0, 40.0, 30.0]]
    assert ds[1][1]["labels"].tolist() == [1]


def test_coco_gt_keeps_everything_for_evaluation(tiny):
    gt = CocoDetection(*tiny, label_map=LabelMap.from_coco(tiny[1], ["dog"])).coco_gt
    assert gt == json.loads(tiny[1].read_text())


def test_hflip_flips_image_and_boxes(tiny):
    plain_image, plain = CocoDetection(*tiny)[0]
    image, target = CocoDetection(*tiny, train=True, hflip_prob=1.0)[0]
    assert torch.equal(image, plain_image.flip(-1))
    assert torch.equal(target["boxes"], torch.tensor([[28.0, 3.0, 38.0, 8.0], [0.0, 4.0, 19.5, 30.0]]))
    assert torch.equal(target["labels"], plain["labels"])


def test_no_flip_outside_training(tiny):
    torch.manual_seed(0)
    ds_eval = CocoDetection(*tiny, train=False, hflip_prob=1.0)
    ds_train_noflip = CocoDetection(*tiny, train=True, hflip_prob=0.0)
    reference = CocoDetection(*tiny)[0][1]["boxes"]
    for ds in (ds_eval, ds_train_noflip):
        assert all(torch.equal(ds[0][1]["boxes"], reference) for _ in range(5))


def test_hflip_probability_is_respected(tiny):
    torch.manual_seed(0)
    ds = CocoDetection(*tiny, train=True, hflip_prob=0.5)
    flipped = sum(ds[1][1]["boxes"][0, 0].item() != 1.0 for _ in range(200))
    assert 70 < flipped < 130


def test_bad_hflip_prob_and_missing_folder(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"hflip_prob must be in \[0, 1\], got 1.5"):
        CocoDetection(*tiny, hflip_prob=1.5)
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nowhere"):
        CocoDetection(tmp_path / "nowhere", tiny[1])


def test_missing_image_file_is_named_when_the_dataset_is_built(tiny):
    """An interrupted copy of COCO fails when the worker builds its dataset, not mid-epoch."""
    image_dir, ann_file = tiny
    (image_dir / "b.png").unlink()
    with pytest.raises(FileNotFoundError) as err:
        CocoDetection(image_dir, ann_file)
    assert str(err.value) == (f"1 of the 3 images that {ann_file} lists are missing from {image_dir}, "
                              f"e.g. {image_dir / 'b.png'}")
    assert CocoDetection(image_dir, ann_file, image_ids=[10, 12]).image_ids == [10, 12]  # only its own images


def test_collate_and_dataloader_keep_lists(tiny):
    loader = torch.utils.data.DataLoader(CocoDetection(*tiny), batch_size=3, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert [tuple(im.shape) for im in images] == [(3, 30, 40), (3, 20, 20), (3, 16, 24)]
    assert [t["image_id"] for t in targets] == [10, 11, 12]
    assert collate_fn([]) == ([], [])


# ---- build_datasets -----------------------------------------------------------------------------

def _coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    _write_coco(root / "images" / "train2017", root / "annotations" / "instances_train2017.json", first_id=10)
    _write_coco(root / "images" / "val2017", root / "annotations" / "instances_val2017.json", first_id=20)
    return root


def test_build_synthetic(tmp_path):
    train, val, lm, val_ann = build_datasets(kind="synthetic", root=tmp_path, train_images=6, val_images=3,
                                             image_size=64, classes=None, seed=0)
    assert lm.category_ids == (3, 7, 12, 18, 25)
    assert (len(train), len(val)) == (6, 3) and train.train and not val.train
    assert val_ann == tmp_path / "synth-v1-s64-t6-v3-c5-seed0" / "annotations" / "instances_val.json"
    image, target = train[0]
    assert image.shape == (3, 64, 64) and target["labels"].max() < 5 and len(target["boxes"]) >= 1


def test_build_synthetic_num_classes(tmp_path):
    _, _, lm, _ = build_datasets(kind="synthetic", root=tmp_path, train_images=2, val_images=1, image_size=48,
                                 classes=None, num_classes=3)
    assert lm.category_ids == (3, 7, 12) and lm.names == ("red_square", "green_circle", "blue_triangle")


def test_build_synthetic_class_subset_filters_val_gt_for_cocoeval(tmp_path):
    kw = dict(kind="synthetic", root=tmp_path, train_images=12, val_images=6, image_size=64, seed=0)
    train, val, lm, val_ann = build_datasets(classes=["magenta_ring", "red_square"], **kw)
    assert lm.category_ids == (3, 25) and lm.names == ("red_square", "magenta_ring")
    assert build_datasets(classes=["red_square", "magenta_ring"], **kw)[3] == val_ann  # deterministic cache
    gt = json.loads(val_ann.read_text())
    full = json.loads((val_ann.parent.parent / "instances_val.json").read_text())
    assert [c["id"] for c in gt["categories"]] == [3, 25]
    assert gt["images"] == full["images"]  # every val image stays, so false positives count
    assert gt["annotations"] == [a for a in full["annotations"] if a["category_id"] in (3, 25)]
    assert len(val) == 6 and all(len(train[i][1]["labels"]) >= 1 for i in range(len(train)))

    # Perfect detections of the subset score AP 1.0 on the filtered GT.
    dets = []
    for i in range(len(val)):
        _, t = val[i]
        for (x1, y1, x2, y2), label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            dets.append({"image_id": t["image_id"], "category_id": lm.to_category_id(label),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(val_ann))
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_build_coco_layout_and_first_n_images(tmp_path):
    """Each split of the fixture holds a zero-width box and a box outside its image: skipped and counted,
    and COCOeval scores the cleaned val file."""
    root = _coco_root(tmp_path)
    splits = build_dataset_splits(kind="coco", root=root, train_images=2, val_images=0, image_size=800,
                                  classes=None, on_invalid="skip")
    train, val, lm, val_ann = splits.train, splits.val, splits.label_map, splits.val_ann
    assert lm.category_ids == (1, 3, 18, 90)
    assert train.image_ids == [10, 11] and val.image_ids == [20, 21, 22]
    assert splits.skipped == {"n_skipped_images": 0, "n_skipped_boxes": 4}
    assert val_ann.parent == root / "annotations" / ".detsweep-cache"
    assert sorted(a["id"] for a in json.loads(val_ann.read_text())["annotations"]) == [2000, 2001, 2002, 2005]

    _, val, _, val_ann = build_datasets(kind="coco", root=root, train_images=None, val_images=1,
                                        image_size=800, classes=None, on_invalid="skip")
    assert val.image_ids == [20]
    gt = json.loads(val_ann.read_text())
    assert [im["id"] for im in gt["images"]] == [20] and {a["image_id"] for a in gt["annotations"]} == {20}


def test_build_coco_subset_trains_only_on_images_with_those_classes(tmp_path):
    train, val, lm, val_ann = build_datasets(kind="coco", root=_coco_root(tmp_path), train_images=0,
                                             val_images=0, image_size=800, classes=["dog"], on_invalid="skip")
    assert lm.category_ids == (18,)
    assert train.image_ids == [11]  # image 12 has no dog, and image 10's lies outside it (skipped)
    assert val.image_ids == [20, 21, 22]
    gt = json.loads(val_ann.read_text())
    assert {a["category_id"] for a in gt["annotations"]} == {18} and len(gt["images"]) == 3


def test_build_coco_missing_path_is_named(tmp_path):
    """A worker without a split's annotations or images says which path it lacks."""
    root = _coco_root(tmp_path)
    shutil.rmtree(root / "images" / "val2017")
    with pytest.raises(FileNotFoundError) as err:
        build_datasets(kind="coco", root=root, train_images=0, val_images=0, image_size=800, classes=None,
                       on_invalid="skip")
    assert str(err.value) == f"image folder not found: {root / 'images' / 'val2017'}"
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(ValueError) as err:
        build_datasets(kind="coco", root=root, train_images=0, val_images=0, image_size=800, classes=None)
    assert str(err.value).startswith(f"{str(root)!r} has no annotations/instances_val2017.json (a COCO 2017 root")


@pytest.mark.parametrize("on_invalid, outcome", [
    ("error", "refused"), ("skip", {"n_skipped_images": 1, "n_skipped_boxes": 4})])
def test_build_coco_missing_image_file_is_named_or_skipped(tmp_path, on_invalid, outcome):
    root = _coco_root(tmp_path)
    (root / "images" / "val2017" / "c.png").unlink()
    if outcome == "refused":
        with pytest.raises(DataError) as err:
            build_datasets(kind="coco", root=root, train_images=0, val_images=0, image_size=800, classes=None,
                           on_invalid=on_invalid)
        assert f"1 images whose file is not in the image folder, e.g. image 22 {root / 'images/val2017/c.png'}" \
            in str(err.value)
        return
    splits = build_dataset_splits(kind="coco", root=root, train_images=0, val_images=0, image_size=800,
                                  classes=None, on_invalid=on_invalid)
    assert splits.skipped == outcome and splits.val.image_ids == [20, 21]


def test_image_unreadable_mid_run_names_the_file(tiny):
    ds = CocoDetection(*tiny)
    (tiny[0] / "a.png").write_bytes(b"truncated on a network filesystem")
    with pytest.raises(ImageReadError) as err:
        ds[0]
    assert str(err.value).startswith(f"cannot read image {tiny[0] / 'a.png'}: UnidentifiedImageError: ")


def test_build_unknown_kind():
    with pytest.raises(ValueError) as err:
        build_datasets(kind="voc", root=".", train_images=1, val_images=1, image_size=64, classes=None)
    assert str(err.value) == "data kind 'voc' is not one of ['synthetic', 'coco']"
