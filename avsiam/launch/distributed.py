"""Process-group setup shared by every launcher: a single process, ranks the local backend
started, the deepspeed launcher, torchrun, or an external launcher (Slurm, Kubernetes) that
sets RANK/WORLD_SIZE/LOCAL_RANK."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from avsiam.launch.local import free_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def on_cpu() -> bool:
    """True when this process trains on the CPU (DeepSpeed's CPU accelerator, gloo)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def init_distributed() -> DistEnv:
    """Join the launcher's process group (gloo on CPU, NCCL on GPUs); a lone process needs none.

    Without a launcher the env vars DeepSpeed expects are filled in for a world of one, so the
    same code path (``deepspeed.initialize``, collectives) runs from 1 CPU process to 64 GPUs.
    """
    import deepspeed

    silence_unavoidable_deprecations()
    deepspeed_readable_arch_list()
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else None)
        if on_cpu():
            barrier()  # every rank has mapped every rank's segment: the names can go
            release_shm_segment(dist.get_rank())
    env = DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if not on_cpu():
        torch.cuda.set_device(env.local_rank)
    return env


def deepspeed_readable_arch_list() -> None:
    """Rewrite TORCH_CUDA_ARCH_LIST so that DeepSpeed's JIT op builder (FusedAdam's first use)
    can read it. CUDA 12.8+ images list arch-specific targets such as ``9.0a``, which the
    builder parses as numbers and fails on ("invalid literal for int() with base 10: '0a'",
    seen on an H200 with torch 2.11+cu130 and DeepSpeed 0.19). FusedAdam uses no arch-specific
    instruction, so the plain capability (``9.0``) builds the same kernel."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").split(";")
    readable = list(dict.fromkeys(re.sub(r"^(\d+\.\d+)[af]", r"\1", arch.strip()) for arch in archs if arch.strip()))
    if readable and readable != [arch.strip() for arch in archs if arch.strip()]:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(readable)


def release_shm_segment(rank: int) -> None:
    """Unlink the POSIX shared-memory segment DeepSpeed's CPU allreduce created for ``rank``
    (when all ranks share one machine; deepspeed/ops/csrc/cpu/comm/shm.cpp names it after the
    user, MASTER_ADDR and MASTER_PORT), once every rank has it mapped. DeepSpeed never unlinks
    it, so each CPU run would leave 64 MiB per rank of RAM in /dev/shm until reboot, killed runs
    included; unlinked early, the memory goes when the last rank using it exits."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    (Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


def silence_unavoidable_deprecations() -> None:
    """Once per process, hide torch's deprecation notices for two collectives this code cannot
    avoid: the differentiable ``all_gather`` of the contrastive loss (its replacement is private)
    and ``all_gather_into_tensor``, which DeepSpeed's ZeRO 1/2 calls every step. Per-call
    ``warnings.catch_warnings`` would not do: entering it resets Python's shown-once registry, so
    every other warning would then repeat at every step."""
    for message in (r".*all_gather is deprecated", r".*all_gather_into_tensor` is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar tensor over ranks (for logging the global loss)."""
    value = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def gather_objects(obj):
    """Every rank's ``obj`` as a list indexed by rank (collective: all ranks must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def exit_finished_process() -> NoReturn:
    """End a process whose command finished (files written and closed, tracking run ended,
    process group left) without the interpreter's teardown of torch, DeepSpeed and gloo:
    2.3 s per rank here, paid by every training and evaluation stage before its launcher sees
    it exit. Logs and standard streams are flushed first. A DataLoader's workers stop when its
    last reference goes (the trainer drops its loaders after the loop); one still alive is held
    in a reference cycle, which a collection breaks, stopping the workers. Only then: a full
    collection of a rank's heap (torch, DeepSpeed, MLflow) costs 0.3-0.4 s here."""
    if multiprocessing.active_children():
        gc.collect()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shutdown_distributed() -> None:
    """Leave the process group once this rank's work is done: wait for the others, then tear
    gloo/NCCL down before the interpreter exits. A group left to interpreter teardown can abort a
    finished rank ("terminate called without an active exception"), and the launcher then
    reports a run that completed as failed."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
