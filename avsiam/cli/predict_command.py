"""``avsiam predict``: label new videos with a finetuned model.

``--model`` takes a registered model (``models:/avsiam-tiny-finetune_vggsound@champion``), a
run's model (``runs:/RUN_ID/model``), a training run's ``weights.safetensors`` (with the
``config.yaml`` and class list the run wrote beside it), or a published AVSiam finetuned
checkpoint with ``--recipe`` and ``--classes``. Each clip (a video file, or every
video in a folder) is decoded as staging decodes it and scored as evaluation scores it; the
output is, per clip, its id and the top-k classes with their probabilities (multimodal, and
audio-only / visual-only), or one JSON record per line with ``--json``. A clip that cannot be
decoded gets an error line naming it and the others go on; the exit status is 1 when any clip
failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avsiam.config import RECIPES, SIZES, ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="label video clips with a finetuned model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or weights.safetensors")
    p.add_argument("clips", nargs="+", metavar="CLIP_OR_FOLDER", help="video files, or folders of them")
    p.add_argument("--top-k", type=int, default=5, help="classes to show per clip (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON record per clip, naming its file")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    published = p.add_argument_group("a published AVSiam finetuned checkpoint as --model")
    published.add_argument("--recipe", choices=[r for r in RECIPES if r.startswith("finetune")],
                           help="the recipe it was finetuned with (its architecture follows from the checkpoint)")
    published.add_argument("--classes", type=Path, help="its class list (class_labels_indices.csv)")
    published.add_argument("--size", choices=SIZES, help="model size (default: read from the checkpoint's layout)")
    p.set_defaults(handler=run)


def _clip_files(arguments: list[str]) -> tuple[list[tuple[str, Path | None]], bool]:
    """((argument or file, path or None when it is neither a video nor a folder), any folder?)."""
    from avsiam.eval.labeling import VIDEO_SUFFIXES

    files: list[tuple[str, Path | None]] = []
    folders = False
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            folders = True
            videos = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            files += [(str(p), p) for p in videos] or [(argument, None)]
        else:
            files.append((argument, path if path.is_file() else None))
    return files, folders


def _labeler(args: argparse.Namespace, device: str):
    from avsiam.eval.labeling import ClipLabeler

    model = args.model
    if args.size and not (args.recipe or args.classes):
        raise ConfigError("predict: --size is for a published checkpoint, with --recipe and --classes")
    if args.recipe or args.classes:
        if not (args.recipe and args.classes):
            raise ConfigError("predict: a published checkpoint needs both --recipe and --classes")
        if not Path(model).is_file():
            raise FileNotFoundError(f"--model {model}: no such file")
        return ClipLabeler.from_published(model, args.recipe, args.classes, size=args.size).to(device)
    if model.endswith(".safetensors") or Path(model).is_file():
        return ClipLabeler.from_run_folder(model).to(device)
    import mlflow.pyfunc

    loaded = mlflow.pyfunc.load_model(model).unwrap_python_model()
    labeler = getattr(loaded, "labeler", None)
    if labeler is None:
        raise ValueError(f"--model {model}: not an avsiam model (its pyfunc is {type(loaded).__name__})")
    return labeler.to(device)


def _print_record(record: dict) -> None:
    print(f"{record['clip']}  ({record['file']})")
    heads = [("multimodal" if "audio_only" in record or "visual_only" in record else "", record["top"])]
    heads += [(head.replace("_", "-"), record[head]) for head in ("audio_only", "visual_only") if head in record]
    for head, top in heads:
        if head:
            print(f"  {head}:")
        for entry in top:
            print(f"    {entry['probability']:.4f}  {entry['class']}")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from avsiam.eval.labeling import check_top_k, clip_name

    check_top_k(args.top_k)
    files, folders = _clip_files(args.clips)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    labeler = _labeler(args, device)
    failed = 0
    # A bar for folders, on a terminal only (disable=None); records go to stdout, the bar to stderr.
    for file, path in tqdm(files, desc="clips", unit="clip", disable=None if folders else True, file=sys.stderr):
        if path is None:
            reason = "no video files in the folder" if Path(file).is_dir() else "no such file"
            record = {"clip": clip_name(file), "file": file, "error": f"{file}: {reason}"}
        else:
            record = labeler.label(path, clip_name(file), file, args.top_k)
        failed += "error" in record
        if args.json:
            print(json.dumps(record), flush=True)
        elif "error" in record:
            print(f"avsiam predict: error: {record['error']}", file=sys.stderr, flush=True)
        else:
            _print_record(record)
    if failed:
        print(f"avsiam predict: {failed} of {len(files)} clips could not be labelled", file=sys.stderr)
    return 1 if failed else 0
