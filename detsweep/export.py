"""`python -m detsweep.export`: a trial's model as one plain file to deploy, LoRA merged, with
`<name>.meta.json` beside it (label map, preprocessing, how to build the model that loads it, the trial's config).

- `state_dict`: `{"model": state_dict}` in the official layouts: DETR's is facebookresearch/detr's
  (`detr-r50-e632da11.pth` has it; `model.load_state_dict(ckpt["model"])` with strict=True), Faster R-CNN's
  is torchvision's `FasterRCNN`. Before it is written, a fresh model of that layout loads it strictly and must
  give the trial's own outputs.
- `onnx` (DETR): images [B, 3, H, W] in 0..1 (zero-padded) and mask [B, H, W] (True on padding) ->
  pred_logits, pred_boxes; checked against torch with ONNX Runtime.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detsweep.predict import FoundTrial, PredictError, is_results_file, locate_trial, merged_model, rebuild_model
from detsweep.storage import write_atomic, write_bytes_atomic

log = logging.getLogger("detsweep.export")

FORMATS = ("state_dict", "onnx")
TOLERANCE = 1e-4  # the exported model against the trial's, on one probe image (fp32 on the CPU)
_PREFIX = {"detr": "detr.", "faster_rcnn": "model."}  # our detector wrapper's attribute holding the official model


class ExportError(PredictError):
    """A user error; the CLI prints it on one line and exits 2."""


def official_state_dict(family: str, module: nn.Module) -> dict[str, Tensor]:
    """The official model's state dict inside our detector wrapper (LoRA must be merged already): DETR's keys
    as in facebookresearch/detr (`transformer.encoder.layers.0.self_attn.in_proj_weight`, ...), Faster R-CNN's
    as in torchvision's `FasterRCNN` (`backbone.body.conv1.weight`, `roi_heads.box_predictor.cls_score.weight`)."""
    prefix, state = _PREFIX[family], module.state_dict()
    outside = [k for k in state if not k.startswith(prefix)]
    if outside or any("parametrizations" in k or "lora_" in k for k in state):
        raise ValueError(f"not a merged {family} detector: keys {outside[:3] or [k for k in state if 'lora_' in k][:3]}")
    return {k[len(prefix):]: v.detach().clone().contiguous() for k, v in state.items()}


def builder_args(found: FoundTrial) -> dict[str, Any]:
    """The arguments of the official builder that makes a model this state dict loads into: DETR's
    `build_detr` (ours, or the official `models/detr.py` with these args), torchvision's `FasterRCNN`."""
    d, k = found.trial.detector, found.label_map.num_classes
    if found.trial.family == "detr":
        return {"backbone": d.backbone, "hidden_dim": d.hidden_dim, "nheads": d.nheads, "enc_layers": d.enc_layers,
                "dec_layers": d.dec_layers, "dim_feedforward": d.dim_feedforward, "num_queries": d.num_queries,
                "num_classes": k, "dropout": d.dropout, "aux_loss": d.aux_loss, "pre_norm": False, "dilation": False}
    pretrained = d.weights != "none"
    return {"backbone": d.backbone, "num_classes": k + 1, "min_size": d.min_size, "max_size": d.max_size,
            "frozen_batchnorm": pretrained, "frozen_batchnorm_eps": 0.0 if d.weights == "coco" else 1e-5,
            "box_score_thresh": 0.0, "box_detections_per_img": 100,
            "rpn_post_nms_top_n_test": d.rpn_post_nms_top_n_test,
            "box_batch_size_per_image": d.box_batch_size_per_image}


def build_official(family: str, args: dict[str, Any]) -> nn.Module:
    """A fresh model of the official layout, from `builder_args` (random weights, eval mode)."""
    if family == "detr":
        from detsweep.models.detr import build_detr

        return build_detr(**args).eval()
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    a = dict(args)
    eps = a.pop("frozen_batchnorm_eps")

    def frozen(n: int) -> nn.Module:  # COCO_V1 predates torchvision's eps fix (pytorch/vision#2933)
        return FrozenBatchNorm2d(n, eps=eps)

    body = resnet_fpn_backbone(backbone_name=a.pop("backbone"), weights=None,
                               norm_layer=frozen if a.pop("frozen_batchnorm") else nn.BatchNorm2d, trainable_layers=5)
    return FasterRCNN(body, **a).eval()


def preprocessing(found: FoundTrial) -> dict[str, Any]:
    """What goes into the exported model and what comes out, in words and numbers."""
    from detsweep.models.detr_detector import IMAGENET_MEAN, IMAGENET_STD

    d, k = found.trial.detector, found.label_map.num_classes
    common = {"input": "RGB, float32 in [0, 1], [3, H, W] per image",
              "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    if found.trial.family == "detr":
        return {**common,
                "resize": None if d.min_size is None else {"min_size": d.min_size, "max_size": d.max_size,
                                                           "rule": "official get_size_with_aspect_ratio"},
                "batch": "zero-pad bottom/right to the largest H and W; mask [B, H, W] True on padding",
                "output": f"pred_logits [B, {d.num_queries}, {k + 1}] (index {k} = no object), pred_boxes "
                          f"[B, {d.num_queries}, 4] (cx, cy, w, h) normalised to the unpadded image",
                "postprocess": "official PostProcess: p = softmax(pred_logits)[..., :-1]; score, label = p.max(-1)",
                "labels": f"label i in 0..{k - 1} is category_ids[i]"}
    return {**common, "resize": {"min_size": d.min_size, "max_size": d.max_size},
            "inside_the_model": "torchvision's GeneralizedRCNNTransform resizes and normalises: pass [3, H, W] "
                                "images in [0, 1]",
            "output": "per image boxes [N, 4] (x1, y1, x2, y2) in input pixels, scores [N], labels [N]",
            "labels": f"label 0 is background; label i in 1..{k} is category_ids[i - 1]"}


def _probe(found: FoundTrial) -> Tensor:
    size = found.trial.detector.min_size or found.trial.data.image_size or 64
    return torch.rand(3, size, size + size // 4, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def check_state_dict(found: FoundTrial, state: dict[str, Tensor], trial_model: nn.Module) -> float:
    """Load `state` strictly into a fresh official model and return the largest difference from
    `trial_model` (the trial as trained: LoRA unmerged) on a probe image; ExportError above TOLERANCE."""
    family = found.trial.family
    fresh = build_official(family, builder_args(found))
    fresh.load_state_dict(state, strict=True)
    image = _probe(found)
    if family == "detr":
        inner = trial_model.detr
        prepared = trial_model._prepare([image])  # the wrapper's resize + ImageNet normalisation
        want, got = inner(prepared), fresh(prepared)
        pairs = [(want["pred_logits"], got["pred_logits"]), (want["pred_boxes"], got["pred_boxes"])]
    else:
        want, got = trial_model([image])[0], fresh([image])[0]
        if len(want["scores"]) != len(got["scores"]):
            raise ExportError(f"the exported Faster R-CNN finds {len(got['scores'])} boxes on the probe image, "
                              f"the trial's model {len(want['scores'])}")
        pairs = [(want["boxes"], got["boxes"]), (want["scores"], got["scores"]),
                 (want["labels"].float() + 1, got["labels"].float())]
    diff = max((float((a.float() - b.float()).abs().max()) for a, b in pairs if a.numel()), default=0.0)
    if diff > TOLERANCE:
        raise ExportError(f"the exported model differs from the trial's by {diff:.3g} (> {TOLERANCE}) on a probe image")
    return diff


class DetrOnnx(nn.Module):
    """DETR for ONNX: ImageNet normalisation, then the official model on a padded batch and its mask."""

    def __init__(self, detr: nn.Module, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.detr = detr
        self.register_buffer("mean", mean.view(1, 3, 1, 1).clone())
        self.register_buffer("std", std.view(1, 3, 1, 1).clone())

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.detr((images - self.mean) / self.std, mask)
        return out["pred_logits"], out["pred_boxes"]


def export_onnx(found: FoundTrial, merged: nn.Module, trial_model: nn.Module, out: Path) -> float:
    """Write the DETR ONNX graph (dynamic batch, height and width) and return the largest difference between
    ONNX Runtime and the trial's torch model on a probe batch; ExportError above TOLERANCE."""
    if found.trial.family != "detr":
        raise ExportError("--format onnx is offered for DETR only: Faster R-CNN's torchvision post-processing "
                          "(data-dependent box counts) is not exported; use --format state_dict")
    import onnxruntime

    from detsweep.models.backbone import pad_images

    wrapper = DetrOnnx(merged.detr, merged.image_mean, merged.image_std).eval()
    image = _probe(found)
    # Batch 2 of two sizes: an example of batch 1 would fix the batch dimension at 1 in the graph.
    batch, mask = pad_images([image, image[:, : image.shape[1] * 3 // 4]])
    program = torch.onnx.export(wrapper, (batch, mask), dynamo=True, input_names=["images", "mask"],
                                output_names=["pred_logits", "pred_boxes"],
                                dynamic_shapes=({0: "batch", 2: "height", 3: "width"}, {0: "batch", 1: "height",
                                                                                       2: "width"}))
    program.save(str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": batch.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        want = trial_model.detr((batch - wrapper.mean) / wrapper.std, mask)
    diff = max(float(abs(g - w.numpy()).max()) for g, w in zip(got, (want["pred_logits"], want["pred_boxes"])))
    if diff > TOLERANCE:
        raise ExportError(f"ONNX Runtime differs from torch by {diff:.3g} (> {TOLERANCE}) on a probe batch")
    return diff


def export_trial(found: FoundTrial, out: Path, fmt: str = "state_dict") -> dict[str, Any]:
    """Write the trial's merged model to `out` in `fmt` and `<out stem>.meta.json` beside it; returns the meta."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    trial_model = rebuild_model(found)
    merged = merged_model(found, trial_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        state = official_state_dict(found.trial.family, merged)
        diff = check_state_dict(found, state, trial_model)
        write_atomic(str(out), lambda stream: torch.save({"model": state}, stream))
    else:
        diff = export_onnx(found, merged, trial_model, out)
    trial, lm = found.trial, found.label_map
    meta = {"trial_id": trial.trial_id, "sweep": trial.sweep, "model": trial.model, "family": trial.family,
            "regime": trial.regime, "format": fmt, "file": out.name, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
            "layout": "facebookresearch/detr" if trial.family == "detr" else "torchvision FasterRCNN",
            "lora_merged": trial.lora is not None, "builder_args": builder_args(found),
            "label_map": {"category_ids": list(lm.category_ids), "names": list(lm.names)},
            "preprocessing": preprocessing(found), "checked": {"max_abs_diff": diff, "tolerance": TOLERANCE},
            "checkpoint": found.checkpoint, "epoch": found.meta.get("epoch"), "torch_version": torch.__version__,
            "config": json.loads(json.dumps(dataclasses.asdict(trial)))}
    write_bytes_atomic(json.dumps(meta, indent=1).encode(), str(meta_path(out)))
    return meta


def meta_path(out: Path) -> Path:
    return out.with_name(out.stem + ".meta.json")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detsweep.export",
        description="Export a sweep trial's model, LoRA merged: a state dict in the official layout (DETR: "
                    "facebookresearch/detr's; Faster R-CNN: torchvision's) or an ONNX graph (DETR), with "
                    "<name>.meta.json beside it (label map, preprocessing, builder arguments, the trial's config).",
        epilog="SOURCE is a results.parquet followed by a TRIAL_ID, or a trial's checkpoint folder alone.")
    p.add_argument("source", metavar="SOURCE", help="results.parquet (then TRIAL_ID) or a checkpoint folder")
    p.add_argument("trial_id", nargs="?", metavar="TRIAL_ID", help="the trial, after a results file")
    p.add_argument("--out", required=True, help="the file to write, e.g. detr.pth or detr.onnx")
    p.add_argument("--format", default="state_dict", choices=FORMATS, help="default: %(default)s")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 for user errors, one line on stderr)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    out = Path(args.out).expanduser()
    try:
        if args.trial_id is not None and not is_results_file(args.source):
            raise ExportError(f"{args.source} is a checkpoint folder: it names its trial, give no TRIAL_ID")
        meta = export_trial(locate_trial(args.source, args.trial_id), out, args.format)
    except PredictError as e:
        print(f"detsweep.export: error: {e}", file=sys.stderr)
        return 2
    print(f"trial {meta['trial_id']}: wrote {out} ({meta['format']}, {meta['layout']} layout"
          f"{', LoRA merged' if meta['lora_merged'] else ''}; matches the trial within {meta['checked']['max_abs_diff']:.2g}) "
          f"and {meta_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
