"""The GPUs the capacity planner knows: memory and dense peak tensor throughput per precision."""

from __future__ import annotations

from dataclasses import dataclass

from avsiam.config import ConfigError

GIB = 2**30
TERA = 1e12


@dataclass(frozen=True)
class Gpu:
    """One card: its memory and its dense (no structured sparsity) peak tensor-core FLOP/s for
    each 16-bit precision it supports."""

    name: str
    memory_bytes: int
    peak_flops: dict[str, float]
    compute_capability: tuple[int, int]


def _gpu(name: str, memory_gib: int, fp16_tflops: float, sm: tuple[int, int], bf16: bool = True) -> Gpu:
    peaks = {"fp16": fp16_tflops * TERA}
    if bf16:
        peaks["bf16"] = fp16_tflops * TERA  # Ampere and Hopper run bf16 at the fp16 rate
    return Gpu(name, memory_gib * GIB, peaks, sm)


def attention_kernel(gpu: Gpu) -> str:
    """The fused kernel ``F.scaled_dot_product_attention`` runs for the model's 16-bit attention on
    ``gpu`` (timm's Attention calls it unless TIMM_FUSED_ATTN=0): FlashAttention on sm80 and
    newer, the memory-efficient kernel on older cards (V100, sm70). Neither stores the N^2
    attention scores, which is what the planner's activation estimate depends on."""
    return "flash" if gpu.compute_capability >= (8, 0) else "memory-efficient"


# Memory is the nominal capacity; the driver keeps a few hundred MiB of it, which the planner's
# fixed framework margin covers.
KNOWN_GPUS: dict[str, Gpu] = {
    gpu.name: gpu
    for gpu in (
        # V100 SXM2: 125 TFLOPS fp16 tensor (the PCIe card: 112). Volta has no bf16.
        _gpu("v100-16gb", 16, 125, (7, 0), bf16=False),
        _gpu("v100-32gb", 32, 125, (7, 0), bf16=False),
        # RTX A5000 datasheet: 27.8 TFLOPS is the fp32 CUDA-core rate, and the "222.2 TFLOPS"
        # tensor figure assumes 2:4 structured sparsity. Dense fp16/bf16 tensor (fp32
        # accumulate, full rate on the professional GA102 cards) is half of it:
        # 64 SMs x 1024 FLOP/clock x 1.695 GHz = 111.1 TFLOPS.
        _gpu("a5000", 24, 111.1, (8, 6)),
        _gpu("a100-40gb", 40, 312, (8, 0)),
        _gpu("a100-80gb", 80, 312, (8, 0)),
        _gpu("h100", 80, 989, (9, 0)),  # SXM5 dense bf16/fp16
        _gpu("h200", 141, 989, (9, 0)),
    )
}

# The card behind each ``gpu_type`` of the presets. The paper does not say which V100; the
# cluster is taken to be the 32 GB SXM2 model, the common one in 64-GPU clusters of its time.
CLUSTER_GPUS = {"V100": "v100-32gb", "A5000": "a5000"}


def gpu_spec(name: str) -> Gpu:
    if name not in KNOWN_GPUS:
        raise ConfigError(f"--gpu: unknown GPU {name!r}; known GPUs: {', '.join(KNOWN_GPUS)}")
    return KNOWN_GPUS[name]


def gpu_of_device(device_name: str, memory_bytes: int) -> Gpu:
    """The known card behind a CUDA device (``torch.cuda.get_device_name`` and its total
    memory): the model from the name, the variant from the memory."""
    name = device_name.lower()
    models = [gpu for gpu in KNOWN_GPUS.values() if gpu.name.split("-")[0] in name]
    if not models:
        raise ConfigError(f"GPU {device_name!r} is not one the planner knows ({', '.join(KNOWN_GPUS)}); pass --gpu")
    # Variants differ in memory: the one nearest the device's (drivers report a little less).
    return min(models, key=lambda gpu: abs(gpu.memory_bytes - memory_bytes))


def cluster_gpu(gpu_type: str) -> Gpu:
    """The card of a recipe's ``gpu_type`` (``CPU`` recipes have none: the caller must name one)."""
    if gpu_type not in CLUSTER_GPUS:
        raise ConfigError(f"recipes on {gpu_type} have no default GPU; pass --gpu ({', '.join(KNOWN_GPUS)})")
    return KNOWN_GPUS[CLUSTER_GPUS[gpu_type]]


def training_precision(recipe_precision: str, gpu: Gpu) -> str:
    """The 16-bit precision a recipe trains in on ``gpu``: its own, or fp16 with dynamic loss
    scaling where the card has no bf16 (V100). The planner models mixed precision only."""
    if recipe_precision == "fp32":
        raise ConfigError("the planner models mixed-precision (fp16/bf16) training; this recipe trains in fp32 (the CPU demo)")
    return recipe_precision if recipe_precision in gpu.peak_flops else "fp16"
