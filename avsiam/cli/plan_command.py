"""``avsiam plan``: memory per GPU, fit, FLOPs and GPU-hours of a recipe on a cluster.

Model states follow DeepSpeed's mixed-precision ZeRO optimizers; activations the per-block
estimate of Korthikanti et al. 2022 as the training code runs on the card: timm's attention
calls ``scaled_dot_product_attention``, whose fused kernels (FlashAttention on sm80+, the
memory-efficient kernel on V100) store no N^2 attention scores (``--attention standard``: the
estimate with them, as without fused attention); the GPU-hours assume a utilisation of the
card's dense 16-bit peak (``--mfu``).
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from avsiam.config import RECIPES, SIZES, resolve_recipe
from avsiam.plan.hardware import GIB, KNOWN_GPUS, cluster_gpu, gpu_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory, fit and GPU-hours of a recipe on a cluster", description=__doc__)
    p.add_argument("--model", required=True, choices=SIZES, help="model size")
    p.add_argument("--stage", required=True, choices=RECIPES, help="the recipe (e.g. pretrain_as2m)")
    p.add_argument("--gpu", help=f"the card (default: the recipe's cluster); one of {', '.join(KNOWN_GPUS)}")
    p.add_argument("--gpus", type=int, help="number of GPUs (default: the recipe's)")
    p.add_argument("--zero", type=int, help="ZeRO stage 0-3 (default: the recipe's)")
    p.add_argument("--activation-checkpointing", action="store_true", help="checkpoint every transformer block")
    p.add_argument("--attention", choices=["fused", "standard"], default="fused",
                   help="fused (default: what training runs on a GPU, no N^2 scores stored) or the standard estimate")
    p.add_argument("--mfu", type=float, help="assumed utilisation of the peak (default: the planner's DEFAULT_UTILISATION)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # The planner builds models on the meta device (torch, timm): imported when planning, not
    # at every `avsiam` start-up.
    from avsiam.plan.planner import DEFAULT_UTILISATION, capacity_plan

    recipe = resolve_recipe(args.model, args.stage)
    gpu = gpu_spec(args.gpu) if args.gpu else cluster_gpu(recipe.gpu_type)
    plan = capacity_plan(
        recipe,
        gpu,
        num_gpus=args.gpus,
        zero_stage=args.zero,
        activation_checkpointing=args.activation_checkpointing,
        utilisation=DEFAULT_UTILISATION if args.mfu is None else args.mfu,
        fused_attention=args.attention == "fused",
    )
    if args.json:
        print(json.dumps(plan, indent=1))
    else:
        Console(width=160).print(plan_table(plan))
    return 0


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def plan_table(plan: dict) -> Table:
    p = plan
    paper = "; ".join(f"{h['gpu_hours']} {h['gpu']}-h ({h['source']})" for h in p["paper_gpu_hours"]) or "-"
    by_stage = ", ".join(f"ZeRO {stage}: {_gib(b)}" for stage, b in p["model_state_bytes_per_gpu_by_zero_stage"].items())
    rows = [
        ("recipe", f"{p['model']}/{p['recipe']} on {p['num_gpus']} x {p['gpu']}, {p['precision']}, ZeRO {p['zero_stage']}"),
        (
            "batch",
            f"{p['micro_batch_per_gpu']} per GPU x {p['gradient_accumulation_steps']} accumulation = {p['global_batch']} global",
        ),
        ("parameters", f"{p['params'] / 1e6:.2f} M ({p['trainable_params'] / 1e6:.2f} M trainable)"),
        ("model states per GPU", f"{_gib(p['model_state_bytes_per_gpu'])} ({by_stage})"),
        (
            "activations per GPU",
            f"{_gib(p['activation_bytes_per_gpu_without_checkpointing'])} without checkpointing, "
            f"{_gib(p['activation_bytes_per_gpu_with_checkpointing'])} with; {p['attention']}",
        ),
        (
            "needed per GPU",
            f"{_gib(p['required_bytes_per_gpu'])} of {_gib(p['gpu_memory_bytes'])} "
            f"(activation checkpointing {'on' if p['activation_checkpointing'] else 'off'}; +10 % and 1.5 GiB margins)",
        ),
        ("fits", "yes" if p["fits"] else f"no: {_gib(-p['headroom_bytes'])} short"),
        (
            "train FLOPs per sample",
            f"{p['flops_per_sample'] / 1e9:.1f} GFLOP (+{p['recompute_flops_per_sample'] / 1e9:.1f} recomputed)",
        ),
        ("samples", f"{p['samples_per_epoch']:,} per epoch x {p['epochs']} epochs"),
        (
            "predicted",
            f"{p['predicted_gpu_hours']:.1f} GPU-hours ({p['predicted_wall_clock_hours']:.1f} h wall clock) at "
            f"{p['utilisation']:.0%} of {p['peak_flops_per_gpu'] / 1e12:.1f} TFLOPS",
        ),
        ("paper", paper),
    ]
    table = Table(title="AVSiam capacity plan", show_header=False)
    table.add_column("quantity")
    table.add_column("value", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table
