"""``avsiam synth`` and ``avsiam stage``: make and stage audio-visual datasets."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# The staging module imports torch, torchaudio, PyAV and torchvision: seconds that every
# `avsiam` command would pay at start-up for its defaults. They apply where an option
# is left out: these options are passed only when given.
_STAGING_OPTIONS_WITH_LIBRARY_DEFAULTS = ("clips_per_shard", "silence_threshold_dbfs", "silent_audio")


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
        help="turn downloaded clips + label files into a staged dataset (WebDataset shards + index)",
        description="Decode every clip into a 16 kHz mono wav and 10 frames (224x224), written as WebDataset shards "
        "with an index (index.json + clip table), quarantining bad clips in quarantine.csv. Label files: the official "
        "VGGSound csv, AudioSet segments csvs (with --classes), or a CAV-MAE datafile (with --classes). One Prefect task "
        "per shard on Ray: a temporary local cluster of --workers CPUs, or --address. Staging again decodes only shards "
        "whose clips changed; a killed run keeps its finished shards. Folders may be s3:// prefixes.",
    )
    p.add_argument("--videos", help="folder or s3:// prefix of the clips (mp4), named as the label files imply")
    p.add_argument("--labels", action="append", required=True, help="label file, local or s3:// (repeatable: train and eval segments)")
    p.add_argument("--classes", help="class_labels_indices.csv (AudioSet / CAV-MAE datafiles), local or s3://")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix (STAGED)")
    p.add_argument("--split", choices=["train", "val", "test"], help="split for every clip (default: from the csv or the file name)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of train clips held out as 'val' for model selection")
    p.add_argument("--max-bad-fraction", type=float, default=0.2, help="fail when more clips than this are bad")
    p.add_argument("--clips-per-shard", type=int,
                   help="clips per shard (default: StagingRequest's, 1000 = ~0.5 GB of AudioSet-sized clips)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPUs of the temporary local Ray cluster")
    p.add_argument("--address", help="an existing Ray cluster (auto, or ray://head:10001) instead of a local one")
    p.add_argument("--silence-threshold-dbfs", type=float,
                   help="a clip whose staged audio never peaks above this level is silent (default: StagingRequest's, -60 dBFS)")
    p.add_argument("--silent-audio", choices=["quarantine", "warn"],
                   help="quarantine silent clips (the default), or stage them and list them in quarantine.csv with a warning")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run_stage)


def run_synth(args: argparse.Namespace) -> int:
    from avsiam.synthetic import generate_synthetic_dataset

    ds = generate_synthetic_dataset(args.out, args.classes, args.clips, multi_label=args.multi_label, seed=args.seed, workers=args.workers)
    kind = "multi-label (AudioSet layout)" if ds.multi_label else "single-label (VGGSound layout)"
    print(f"wrote {ds.num_clips} clips ({ds.num_train} train, {ds.num_test} test), {ds.num_classes} classes, {kind}")
    print(f"videos: {ds.videos_dir}")
    for path in ds.label_files:
        print(f"labels: {path}")
    return 0


def run_stage(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from avsiam.config import ConfigError
    from avsiam.data.sources import local_copy
    from avsiam.data.staging import StagingError, StagingRequest, plan_clips
    from flows.staging import run_staging

    try:
        request = StagingRequest(labels=args.labels, out=args.out, videos=args.videos, classes_csv=args.classes,
                                 split=args.split, val_fraction=args.val_fraction, max_bad_fraction=args.max_bad_fraction,
                                 seed=args.seed, **{name: value for name in _STAGING_OPTIONS_WITH_LIBRARY_DEFAULTS
                                                    if (value := getattr(args, name)) is not None})
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise ConfigError(problems) from None
    # Read and check the label files here first: a typo or a bad row is then one clear line in
    # a second, not a flow failure after Prefect and Ray have started (the flow reads them again).
    with tempfile.TemporaryDirectory(prefix="avsiam-labels-") as tmp:
        plan_clips(request.videos, [local_copy(f, Path(tmp)) for f in request.labels],
                   local_copy(request.classes_csv, Path(tmp)) if request.classes_csv else None, request.split)
    try:
        summary = run_staging(request, address=args.address, workers=args.workers)
    except StagingError as exc:
        print(f"avsiam stage: error: {exc}", file=sys.stderr)
        return 1
    splits = ", ".join(f"{k} {v}" for k, v in summary.splits.items())
    print(f"staged {summary.num_clips} clips in {summary.shards} shards ({summary.shards_built} built, "
          f"{summary.shards_reused} reused; {summary.decoded} clips decoded, {summary.copied} copied), "
          f"{summary.quarantined} quarantined, {summary.staged_with_warning} staged with a warning")
    print(f"splits: {splits}; {'multi' if summary.multi_label else 'single'}-label")
    print(f"dataset: {summary.location}")
    print(f"dataset digest: {summary.dataset_digest}")
    return 0
