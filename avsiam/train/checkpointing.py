"""DeepSpeed checkpoints: save with everything needed to resume exactly, keep the last K,
resume from ``latest``, and consolidate to one fp32 safetensors file with DeepSpeed's own
``zero_to_fp32`` (so the weights load at any world size)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from avsiam.launch.distributed import DistEnv, barrier
from avsiam.train.state import CheckpointPolicy

TAG_PATTERN = re.compile(r"^step(\d+)$")


def step_tag(global_step: int) -> str:
    return f"step{global_step}"


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The tag DeepSpeed's ``latest`` file names (written only after a save completed)."""
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (checkpoint_dir / tag).is_dir() else None


def save(engine, checkpoint_dir: Path, global_step: int, client_state: dict[str, Any]) -> str:
    """All ranks call this (DeepSpeed saves each rank's optimizer partition)."""
    tag = step_tag(global_step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state)
    return tag


def prune(checkpoint_dir: Path, policy: CheckpointPolicy, protected: set[str], env: DistEnv) -> None:
    """Delete the step checkpoints ``policy`` does not keep (never ``protected`` or the latest)."""
    barrier()  # every rank has finished writing before anything is removed
    if env.is_main:
        tags = {p.name: int(m.group(1)) for p in checkpoint_dir.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))}
        for tag in policy.to_remove(tags, protected, latest_tag(checkpoint_dir)):
            shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
    barrier()


def consolidate(checkpoint_dir: Path, tag: str, out_path: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Write the fp32 weights of checkpoint ``tag`` to ``out_path`` (safetensors); return them."""
    if zero_stage == 0:
        state = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    tmp = out_path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "source": f"{checkpoint_dir}/{tag}"})
    tmp.replace(out_path)
    return state
