"""The DeepSpeed configuration of a run, derived from its resolved recipe.

The optimizer is the tables' Adam with *coupled* L2 weight decay: DeepSpeed's ``"type":
"Adam"`` silently runs AdamW unless ``adam_w_mode`` is false. The lr schedule is not given to
DeepSpeed: it is a per-epoch step decay that the training loop drives itself (DeepSpeed would
also skip scheduler steps on fp16 overflow steps).
"""

from __future__ import annotations

from typing import Any

from avsiam.config import RecipeConfig


def deepspeed_config(recipe: RecipeConfig, world_size: int, on_cpu: bool) -> dict[str, Any]:
    """A DeepSpeed config dict for ``recipe`` running on ``world_size`` ranks."""
    micro = recipe.batch_size_per_gpu
    accumulation = recipe.gradient_accumulation_steps
    optimizer_params: dict[str, Any] = {
        "lr": recipe.lr,
        "betas": list(recipe.betas),
        "eps": 1e-8,
        "weight_decay": recipe.weight_decay,
        "adam_w_mode": False,
    }
    if on_cpu:
        # torch.optim.Adam: no JIT-compiled CPU Adam op needed for CPU runs and tests.
        optimizer_params["torch_adam"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
        "gradient_clipping": recipe.gradient_clipping,
        "optimizer": {"type": "Adam", "params": optimizer_params},
        "zero_optimization": {"stage": recipe.zero_stage},
        "steps_per_print": 10**9,  # the engine logs its own metrics
        "wall_clock_breakdown": False,
    }
    if recipe.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    elif recipe.precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config
