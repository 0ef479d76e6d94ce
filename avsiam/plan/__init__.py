"""Capacity planning: memory per GPU, fit, FLOPs and GPU-hours of a recipe on a cluster, and
the DeepSpeed configs of the paper's runs generated from it (``deepspeed_configs/``)."""

from avsiam.plan.hardware import KNOWN_GPUS, Gpu, cluster_gpu, gpu_spec, training_precision
from avsiam.plan.planner import DEFAULT_UTILISATION, MemoryPlan, capacity_plan, choose_memory_plan, memory_plan

__all__ = [
    "DEFAULT_UTILISATION",
    "KNOWN_GPUS",
    "Gpu",
    "MemoryPlan",
    "capacity_plan",
    "choose_memory_plan",
    "cluster_gpu",
    "gpu_spec",
    "memory_plan",
    "training_precision",
]
