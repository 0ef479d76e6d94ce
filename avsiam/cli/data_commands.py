"""``avsiam synth`` and ``avsiam stage``: make and stage audio-visual datasets."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from avsiam.data.manifest import load_manifest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic audio-visual dataset in the official layouts",
        description="Write DIR/videos/*.mp4 (10 s, H.264 + AAC) and labels in the VGGSound csv "
        "format, or with --multi-label the AudioSet segments csv format plus class_labels_indices.csv. "
        "Same seed, same bytes.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--classes", type=int, default=8, help="number of classes (default 8)")
    p.add_argument("--clips", type=int, default=80, help="number of clips (default 80)")
    p.add_argument("--multi-label", action="store_true", help="AudioSet-style multi-label dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.set_defaults(handler=run_synth)

    p = sub.add_parser(
        "stage",
        help="turn downloaded clips + a label file into a staged dataset (manifest, wavs, frames)",
        description="Decode every clip into a 16 kHz mono wav and 10 frames (224x224), in parallel, "
        "quarantining bad clips in quarantine.csv, and write manifest.json with the dataset digest. "
        "Label files: the official VGGSound csv, an AudioSet segments csv (with --classes), or a "
        "CAV-MAE datafile (with --classes). Re-staging reuses unchanged clips.",
    )
    p.add_argument("--videos", type=Path, help="folder of the clips (mp4) named as the label file implies")
    p.add_argument("--labels", type=Path, action="append", required=True, help="label file (repeatable, e.g. train and eval segments)")
    p.add_argument("--classes", type=Path, help="class_labels_indices.csv (AudioSet / CAV-MAE datafiles)")
    p.add_argument("--out", required=True, type=Path, help="output folder (STAGED)")
    p.add_argument("--split", choices=["train", "val", "test"], help="split for every clip (default: from the csv or the file name)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of train clips held out as 'val' for model selection")
    p.add_argument("--max-bad-fraction", type=float, default=0.2, help="fail when more clips than this are bad")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run_stage)


def run_synth(args: argparse.Namespace) -> int:
    from avsiam.data.synthetic import generate_synthetic_dataset

    ds = generate_synthetic_dataset(args.out, args.classes, args.clips, multi_label=args.multi_label, seed=args.seed, workers=args.workers)
    kind = "multi-label (AudioSet layout)" if ds.multi_label else "single-label (VGGSound layout)"
    print(f"wrote {ds.num_clips} clips ({ds.num_train} train, {ds.num_test} test), {ds.num_classes} classes, {kind}")
    print(f"videos: {ds.videos_dir}")
    for path in ds.label_files:
        print(f"labels: {path}")
    return 0


def run_stage(args: argparse.Namespace) -> int:
    from avsiam.data.staging import StagingError, stage_dataset

    try:
        result = stage_dataset(
            args.labels, args.out, videos_dir=args.videos, classes_csv=args.classes, split=args.split,
            val_fraction=args.val_fraction, max_bad_fraction=args.max_bad_fraction, workers=args.workers,
            seed=args.seed,
        )
    except StagingError as exc:
        print(f"avsiam stage: error: {exc}", file=sys.stderr)
        return 1
    manifest = load_manifest(result.manifest_path)
    splits = ", ".join(f"{k} {v}" for k, v in manifest.split_counts().items())
    print(f"staged {result.staged}, reused {result.reused}, quarantined {len(result.quarantined)} of {result.total} clips")
    print(f"splits: {splits}; classes: {manifest.num_classes} ({'multi' if manifest.multi_label else 'single'}-label)")
    print(f"manifest: {result.manifest_path}")
    print(f"dataset digest: {manifest.dataset_digest}")
    for clip_id, _source, reason in result.quarantined[:10]:
        print(f"  quarantined {clip_id}: {reason}")
    return 0
