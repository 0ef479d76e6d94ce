"""``avsiam train pretrain|finetune`` and ``avsiam evaluate``.

Without ``--nproc`` the command trains in this process: alone, or as one rank of a launcher
that started it (torchrun, ``deepspeed``, srun: RANK/WORLD_SIZE/LOCAL_RANK in the
environment). With ``--nproc N`` it checks its inputs, then starts the same command as N local
ranks itself (the local backend of ``avsiam launch``), supervised as one unit.

A run that diverges exits with status 3 after one message (from rank 0) naming the step.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from avsiam.config import RECIPES, SIZES, ConfigError, explicit_settings, load_recipe_file, resolve_recipe


def _common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, choices=SIZES, help="model size")
    p.add_argument("--data", required=True, help="the staged dataset (from `avsiam stage`): its folder or s3:// prefix, or its index.json")
    p.add_argument("--output", required=True, type=Path, help="run folder (resumes from its checkpoint if it has one)")
    p.add_argument("--variant", help="named override set from presets/variants.yaml (e.g. cav, cav_mae, cav_mae_multi_ratio: Table 3)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. epochs=1 max_steps=20 arch.depth=2")


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="pretrain or finetune with DeepSpeed", description=__doc__)
    stages = train.add_subparsers(dest="stage", metavar="STAGE", required=True)
    p = stages.add_parser("pretrain", help="contrastive + MAE pretraining", description=__doc__)
    _common(p)
    p.add_argument("--recipe", default="pretrain_as2m", choices=[r for r in RECIPES if r.startswith("pretrain")])
    p.add_argument("--init", help="timm ViT weights (local safetensors/.pth) to initialise the encoder from")
    p.add_argument("--nproc", type=int, help="run on N local ranks, started and supervised by this command")
    p.set_defaults(handler=run_train)
    p = stages.add_parser("finetune", help="finetune a pretrained model on labelled clips", description=__doc__)
    _common(p)
    p.add_argument("--recipe", required=True, choices=[r for r in RECIPES if r.startswith("finetune")])
    p.add_argument("--init", help="pretrained weights (this project's weights.safetensors, or a published AVSiam checkpoint)")
    p.add_argument("--nproc", type=int, help="run on N local ranks, started and supervised by this command")
    p.set_defaults(handler=run_train)

    p = sub.add_parser("evaluate", help="score weights on the test split (results.json, per_class.csv)",
                       description="Evaluate weights deterministically: 10-frame aggregation, mAP or accuracy, "
                       "audio-only and visual-only scores, per-class AP; retrieval recall@k for pretrained weights.")
    _common(p, model_required=False)
    p.add_argument("--recipe", choices=RECIPES, help="the recipe (with --model; required unless --config)")
    p.add_argument("--config", type=Path, help="the resolved recipe of the run that trained the weights (its config.yaml), "
                   "instead of --model, --recipe, --variant and overrides")
    p.add_argument("--weights", required=True, type=Path, help="weights.safetensors of a training run")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.set_defaults(handler=run_evaluate)


def check_run_folder(path: Path) -> None:
    """``--output`` must be (or be creatable as) a writable folder; checked without creating it."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is a file" if existing == path else f"is under {existing}, which is a file"
                raise ConfigError(f"--output {path}: {where}, not a folder")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise ConfigError(f"--output {path}: {existing} is not writable")
            return


def _preflight(args: argparse.Namespace, recipe) -> None:
    """Check every input before any process is launched or any model is built."""
    from avsiam.data.index import load_index
    from avsiam.train.tasks import make_task

    check_run_folder(args.output)
    index = load_index(args.data)
    index.check_shards()
    make_task(recipe, index)
    if args.init and not Path(args.init).is_file():
        raise FileNotFoundError(f"--init {args.init}: no such file")


def run_train(args: argparse.Namespace) -> int:
    from avsiam.launch.distributed import barrier, exit_finished_process, shutdown_distributed
    from avsiam.train.divergence import DIVERGED_EXIT_STATUS, TrainingDiverged
    from avsiam.train.trainer import train, write_config

    recipe = resolve_recipe(args.model, args.recipe, args.overrides, variant=args.variant)
    if args.stage == "finetune" and args.init:
        from avsiam.model.weights import resolve_checkpoint_recipe

        # A published checkpoint brings the architecture it was trained with (each rank resolves it the same way).
        recipe = resolve_checkpoint_recipe(recipe, args.init, explicit_settings(args.overrides, args.variant), "--init")
    launched = "RANK" in os.environ
    if not launched:
        _preflight(args, recipe)
    if args.nproc and not launched:
        from avsiam.launch.backends import launch

        write_config(recipe, args.output)  # refuses a mismatching resume before launching
        entry = ["train", args.stage, "--model", args.model, "--recipe", args.recipe, "--data", str(args.data),
                 "--output", str(args.output), *(["--init", str(args.init)] if args.init else []),
                 *(["--variant", args.variant] if args.variant else []), *args.overrides]
        return launch("local", entry, gpus_per_node=args.nproc, output_dir=args.output)
    try:
        summary = train(recipe, args.data, args.output, init_weights=args.init)
    except TrainingDiverged as exc:
        # Every rank raised at the same step. Rank 0 reports, then all leave together: the
        # launcher kills the whole group as soon as one rank exits, which could cut the report.
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"avsiam train: error: {exc}", file=sys.stderr, flush=True)
        barrier()
        shutdown_distributed()
        return DIVERGED_EXIT_STATUS
    shutdown_distributed()
    if int(os.environ.get("RANK", 0)) == 0:
        print(summary.model_dump_json(indent=1, exclude={"history"}))
    exit_finished_process()


def _evaluated_recipe(args: argparse.Namespace):
    """The recipe to evaluate ``--weights`` with: presets, or the run's config.yaml; a
    published checkpoint brings the architecture it was trained with."""
    from avsiam.model.weights import PUBLISHED_ARCHITECTURE, resolve_checkpoint_recipe

    if args.config is None:
        if not (args.model and args.recipe):
            raise ConfigError("evaluate: pass --model and --recipe, or --config (a training run's config.yaml)")
        recipe = resolve_recipe(args.model, args.recipe, args.overrides, variant=args.variant)
        explicit = explicit_settings(args.overrides, args.variant)
    else:
        given = [flag for flag, value in (("--model", args.model), ("--recipe", args.recipe), ("--variant", args.variant),
                                          ("overrides", args.overrides)) if value]
        if given:
            raise ConfigError(f"evaluate: --config {args.config} is the whole recipe; drop {', '.join(given)}")
        recipe = load_recipe_file(args.config)
        explicit = {f"arch.{name}": getattr(recipe.arch, name) for name in PUBLISHED_ARCHITECTURE}
    return resolve_checkpoint_recipe(recipe, args.weights, explicit, "--weights")


def run_evaluate(args: argparse.Namespace) -> int:
    from avsiam.eval.evaluate import evaluate
    from avsiam.launch.distributed import exit_finished_process, shutdown_distributed

    check_run_folder(args.output)
    recipe = _evaluated_recipe(args)
    results = evaluate(recipe, args.weights, args.data, args.output, split=args.split)
    shutdown_distributed()
    if int(os.environ.get("RANK", 0)) == 0:
        print(results.model_dump_json(indent=1, exclude_none=True))
    exit_finished_process()

