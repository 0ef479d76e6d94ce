"""The capacity plan of a recipe on a cluster: memory per GPU, whether it fits, and GPU-hours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from avsiam.config import ConfigError, RecipeConfig
from avsiam.config.paper import PAPER_PRETRAINING_HOURS
from avsiam.plan.compute import (
    TRAIN_CLIPS,
    ParameterCount,
    count_parameters,
    predicted_gpu_hours,
    recompute_flops_per_sample,
    train_flops_per_sample,
)
from avsiam.plan.hardware import Gpu, attention_kernel, training_precision
from avsiam.plan.memory import ZERO_STAGES, activation_bytes, block_runs, model_state_bytes, required_bytes

# Utilisation of the dense 16-bit peak assumed for the prediction (the FLOPs the GPU executes,
# recomputation included): ViT training typically sustains 30-45 %.
DEFAULT_UTILISATION = 0.35


@dataclass(frozen=True)
class MemoryPlan:
    zero_stage: int
    activation_checkpointing: bool
    model_states: int
    activations: int
    required: int  # model states + activations + fragmentation and framework margins
    available: int

    @property
    def fits(self) -> bool:
        return self.required <= self.available


def memory_plan(
    recipe: RecipeConfig,
    params: ParameterCount,
    gpu: Gpu,
    num_gpus: int,
    zero_stage: int,
    activation_checkpointing: bool,
    fused_attention: bool = False,
) -> MemoryPlan:
    states = model_state_bytes(params.total, params.largest_layer, zero_stage, num_gpus)
    activations = activation_bytes(block_runs(recipe), recipe.batch_size_per_gpu, activation_checkpointing, fused_attention)
    return MemoryPlan(
        zero_stage, activation_checkpointing, states, activations, required_bytes(states, activations), gpu.memory_bytes
    )


def memory_options(recipe: RecipeConfig) -> list[tuple[int, bool]]:
    """(ZeRO stage, activation checkpointing) from the fastest to the most memory-saving: the
    recipe's stage, then checkpointing (one more forward per step), then ZeRO 3 (a parameter
    all-gather per layer in forward and backward)."""
    options = [(recipe.zero_stage, False), (recipe.zero_stage, True), (3, True)]
    return list(dict.fromkeys(options))


def choose_memory_plan(recipe: RecipeConfig, params: ParameterCount, gpu: Gpu, num_gpus: int) -> MemoryPlan:
    """The first of :func:`memory_options` that fits the card with the margins, under the
    standard (conservative) activation estimate."""
    for zero_stage, checkpointing in memory_options(recipe):
        plan = memory_plan(recipe, params, gpu, num_gpus, zero_stage, checkpointing)
        if plan.fits:
            return plan
    raise ConfigError(
        f"{recipe.model}/{recipe.recipe}: {recipe.batch_size_per_gpu} clips per GPU do not fit a {gpu.name} "
        f"even with ZeRO 3 and activation checkpointing ({plan.required / 2**30:.1f} GiB needed)"
    )


def capacity_plan(
    recipe: RecipeConfig,
    gpu: Gpu,
    num_gpus: int | None = None,
    zero_stage: int | None = None,
    activation_checkpointing: bool = False,
    utilisation: float = DEFAULT_UTILISATION,
    fused_attention: bool = True,
) -> dict[str, Any]:
    """Everything ``avsiam plan --json`` prints (key names are an interface). ``num_gpus`` and
    ``zero_stage`` default to the recipe's. Activations are planned as the training code runs
    them on ``gpu``: fused attention (:func:`~avsiam.plan.hardware.attention_kernel`);
    ``fused_attention=False`` is the standard estimate with the N^2 scores stored."""
    num_gpus = recipe.num_gpus if num_gpus is None else num_gpus
    zero_stage = recipe.zero_stage if zero_stage is None else zero_stage
    if num_gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {num_gpus}")
    if zero_stage not in ZERO_STAGES:
        raise ConfigError(f"--zero must be one of {ZERO_STAGES}, got {zero_stage}")
    if not 0 < utilisation <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {utilisation}")
    precision = training_precision(recipe.precision, gpu)
    params = count_parameters(recipe)
    runs = block_runs(recipe)
    memory = memory_plan(recipe, params, gpu, num_gpus, zero_stage, activation_checkpointing, fused_attention)
    flops = train_flops_per_sample(recipe)
    recompute = recompute_flops_per_sample(recipe) if activation_checkpointing else 0.0
    gpu_hours = predicted_gpu_hours(recipe, flops + recompute, gpu.peak_flops[precision], utilisation)
    micro = recipe.batch_size_per_gpu
    return {
        "model": recipe.model,
        "recipe": recipe.recipe,
        "gpu": gpu.name,
        "num_gpus": num_gpus,
        "precision": precision,
        "zero_stage": zero_stage,
        "activation_checkpointing": activation_checkpointing,
        "attention": (f"fused: scaled_dot_product_attention, {attention_kernel(gpu)} kernel on this card (no N^2 scores stored)"
                      if fused_attention else "standard estimate (N^2 scores stored, as without fused attention)"),
        "micro_batch_per_gpu": micro,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "global_batch": micro * recipe.gradient_accumulation_steps * num_gpus,
        "params": params.total,
        "trainable_params": params.trainable,
        "largest_layer_params": params.largest_layer,
        "model_state_bytes_per_gpu": memory.model_states,
        "model_state_bytes_per_gpu_by_zero_stage": {
            str(stage): model_state_bytes(params.total, params.largest_layer, stage, num_gpus) for stage in ZERO_STAGES
        },
        "activation_bytes_per_gpu": memory.activations,
        "activation_bytes_per_gpu_without_checkpointing": activation_bytes(runs, micro, False, fused_attention),
        "activation_bytes_per_gpu_with_checkpointing": activation_bytes(runs, micro, True, fused_attention),
        "required_bytes_per_gpu": memory.required,
        "gpu_memory_bytes": gpu.memory_bytes,
        "headroom_bytes": memory.available - memory.required,
        "fits": memory.fits,
        "flops_per_sample": flops,
        "recompute_flops_per_sample": recompute,
        "samples_per_epoch": TRAIN_CLIPS[recipe.dataset],
        "epochs": recipe.epochs,
        "peak_flops_per_gpu": gpu.peak_flops[precision],
        "utilisation": utilisation,
        "predicted_gpu_hours": gpu_hours,
        "predicted_wall_clock_hours": gpu_hours / num_gpus,
        "paper_gpu_hours": PAPER_PRETRAINING_HOURS.get(recipe.model, []) if recipe.stage == "pretrain" else [],
    }
