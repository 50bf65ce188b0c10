"""`python -m detsweep.data {check,coco2017,subset,stats,synthetic}`: the dataset doctor and data
preparation commands.

User errors print one line and exit with status 2; `check` exits 0 clean, 1 with problems, 2 unusable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "python -m detsweep.data"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (status 2), like the rest of detsweep's CLIs."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _coco2017(args: argparse.Namespace) -> None:
    from detsweep.data.download import fetch_coco2017

    root = fetch_coco2017(args.root, splits=args.splits, keep_archives=args.keep_archives)
    print(f"COCO 2017 ready in {root}: images/{{{','.join(s + '2017' for s in args.splits)}}}, annotations/")


def _subset(args: argparse.Namespace) -> None:
    from detsweep.data.subset import write_subset

    counts = write_subset(args.root, args.classes, args.out)
    width = max(len(c) for c in counts)
    print(f"wrote subset of {len(counts)} classes to {args.out}; boxes per class:")
    for name in args.classes:
        print(f"  {name:<{width}} {counts[name]:>8}")


def _stats(args: argparse.Namespace) -> None:
    from detsweep.data.stats import dataset_stats, format_stats

    path = Path(args.path)
    if path.is_dir():
        files = sorted((path / "annotations").glob("instances_*.json")) or sorted(path.glob("instances_*.json"))
        if not files:
            raise FileNotFoundError(f"no instances_*.json under {path} or {path / 'annotations'}")
    else:
        files = [path]
    print("\n\n".join(format_stats(dataset_stats(f)) for f in files))


def _source(args: argparse.Namespace):
    """The dataset `check` examines: a sweep file's data section, a root (layout as `format: auto`
    detects it, or --format), or explicit annotation files."""
    from types import SimpleNamespace

    from detsweep.data.sources import Source, Split, explicit_splits, resolve

    if args.sweep:
        from detsweep.sweep import SweepError, load_sweep

        try:
            d = load_sweep(args.sweep).data
        except SweepError as e:
            raise ValueError(str(e)) from None
        if d.kind == "synthetic":
            from detsweep.data.synthetic import ensure_synthetic

            folder = ensure_synthetic(d.root, train_images=d.train_images, val_images=d.val_images,
                                      image_size=d.image_size, seed=d.seed, num_classes=d.num_classes)
            return Source("coco", {s: Split(s, folder / "annotations" / f"instances_{s}.json", folder / "images" / s)
                                   for s in ("train", "val")}, root=folder)
        return resolve(d.root, d.format, d.train, d.val, d.test)
    if args.root:
        return resolve(args.root, args.format)
    if args.train_ann:
        given = {s: SimpleNamespace(annotations=getattr(args, f"{s}_ann"), images=getattr(args, f"{s}_images"))
                 if getattr(args, f"{s}_ann") else None for s in ("train", "val", "test")}
        return explicit_splits(given, args.format)
    raise ValueError("give a sweep file, --root DIR, or --train-ann FILE --val-ann FILE")


def _check(args: argparse.Namespace) -> int:
    from detsweep.data.doctor import diagnose, format_report, write_json
    from detsweep.data.sources import SourceError

    try:
        source = _source(args)
    except SourceError as e:
        raise ValueError(f"{e.key.replace('data.', '--') if not args.sweep else e.key}: {e}") from None
    report = diagnose(source, decode=not args.headers_only, workers=args.workers)
    print(format_report(report))
    if args.json:
        write_json(report, Path(args.json))
        print(f"report: {args.json}")
    if args.samples and report.error is None:
        from detsweep.data.samples import write_samples

        for name, sc in report.checks.items():
            out = write_samples(sc, args.samples, Path(args.out) / f"samples_{name}.png")
            if out is not None:
                print(f"samples: {out}")
    return report.exit_code


def _synthetic(args: argparse.Namespace) -> None:
    from detsweep.data.synthetic import ensure_synthetic

    folder = ensure_synthetic(args.root, train_images=args.train_images, val_images=args.val_images,
                              image_size=args.image_size, seed=args.seed, num_classes=args.num_classes)
    print(folder)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Prepare detection data for detsweep.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from detsweep.data.sources import FORMATS

    p = sub.add_parser("check", help="the dataset doctor: every image decoded, every box and id checked",
                       description="Check a dataset before any GPU hour is spent: per split, image counts, "
                                   "unreadable images (all decoded, in parallel), sizes against the JSON, EXIF "
                                   "orientation, bad boxes, unknown and duplicate ids, crowd, images without "
                                   "objects, instances per class, and val's classes against train's. Exit 0 "
                                   "clean, 1 with problems, 2 unusable.")
    p.add_argument("sweep", nargs="?", metavar="SWEEP.yaml", help="check the data section of this sweep file")
    p.add_argument("--root", metavar="DIR", help="a dataset root; its layout is detected as format: auto does")
    p.add_argument("--format", default="auto", choices=FORMATS, help="the layout of --root, or the export of "
                   "--train-ann (default: auto)")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}-ann", metavar="FILE", help=f"the {split} split's COCO annotation file")
        p.add_argument(f"--{split}-images", metavar="DIR", help="its image folder (default: beside the file, or "
                       "images/<subset> next to an annotations/ folder)")
    p.add_argument("--headers-only", action="store_true", help="read image headers instead of decoding every image")
    p.add_argument("--workers", type=int, metavar="N", help="threads reading images (default: 2 per CPU, at most 8)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--samples", type=int, default=0, metavar="N",
                   help="draw N sample images per split with their boxes into OUT/samples_<split>.png")
    p.add_argument("--out", default=".", metavar="OUT", help="folder for the sample grids (default: .)")
    p.set_defaults(func=_check)

    p = sub.add_parser("coco2017", help="download, verify and unzip COCO 2017 (resumable, idempotent)",
                       description="Download COCO 2017 from images.cocodataset.org, verify each zip against the "
                                   "sha256 manifest, unzip into ROOT/images/{train2017,val2017} and ROOT/annotations.")
    p.add_argument("--root", required=True, help="target folder")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"],
                   help="image splits to fetch (annotations always; default: train val)")
    p.add_argument("--keep-archives", action="store_true", help="keep the zips after unzipping")
    p.set_defaults(func=_coco2017)

    p = sub.add_parser("subset", help="write a COCO-format class subset (images are symlinked)",
                       description="Keep only CLASSES: train keeps images with at least one of them, val keeps all "
                                   "images (so false positives count). Category ids stay the original ones.")
    p.add_argument("--root", required=True, help="COCO root (annotations/instances_*2017.json) or one annotation file")
    p.add_argument("--classes", nargs="+", required=True, help="category names, e.g. person car dog")
    p.add_argument("--out", required=True, help="output folder (becomes a COCO root)")
    p.set_defaults(func=_subset)

    p = sub.add_parser("stats", help="counts, box sizes and sanity checks of COCO annotations",
                       description="Print images, boxes per class, box-size histograms and sanity checks.")
    p.add_argument("path", metavar="DIR_OR_ANN_FILE", help="an annotation file, or a folder with instances_*.json")
    p.set_defaults(func=_stats)

    p = sub.add_parser("synthetic", help="generate (or find) the synthetic shapes dataset",
                       description="Generate the synthetic COCO-format shapes dataset into a cache folder under "
                                   "ROOT keyed by its parameters, and print that folder.")
    p.add_argument("--root", required=True, help="cache folder")
    p.add_argument("--train-images", type=int, default=64)
    p.add_argument("--val-images", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synthetic)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        code = args.func(args) or 0
    except (ValueError, OSError) as e:  # ChecksumError is a ValueError; FileNotFoundError an OSError
        message = str(e).replace("\n", " ")
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyError as e:  # a COCO file without a required field
        print(f"{PROG} {args.command}: error: malformed COCO annotations: missing key {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted (downloads resume on the next run)", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
