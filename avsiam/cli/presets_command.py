"""``avsiam presets``: the paper's recipes (Tables 4-6) and the tiny demo recipes."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from avsiam.config import RECIPES, SIZES, preset_summary, resolve_recipe

TABLE_COLUMNS = (
    "model", "recipe", "lr", "head_lr_multiplier", "lr_decay_start_epoch", "lr_decay_rate",
    "lr_decay_step", "epochs", "batch_size_per_gpu", "num_gpus", "gpu_type",
    "class_balanced_sampling", "mixup", "loss", "precision",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the recipes of Tables 4-6", description=__doc__)
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per recipe")
    p.add_argument("--model", choices=SIZES, action="append", help="only this model size (repeatable)")
    p.add_argument("--recipe", choices=RECIPES, action="append", help="only this recipe (repeatable)")
    p.add_argument("--paper", action="store_true", help="only the paper's 12 recipes (base, large, huge)")
    p.add_argument("--variant", help="apply a named override set (presets/variants.yaml), e.g. cav")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every listed recipe")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    sizes = args.model or [s for s in SIZES if not (args.paper and s == "tiny")]
    recipes = args.recipe or list(RECIPES)
    summaries = [preset_summary(resolve_recipe(s, r, args.overrides, variant=args.variant)) for s in sizes for r in recipes]
    if args.json:
        print(json.dumps(summaries, indent=1))
        return 0
    table = Table(title="AVSiam recipes (Tables 4-6 of the supplement; tiny = CPU demo)")
    for col in TABLE_COLUMNS:
        table.add_column(col, overflow="fold")
    for s in summaries:
        table.add_row(*("-" if s[c] is None else str(s[c]) for c in TABLE_COLUMNS))
    Console(width=220).print(table)
    return 0
