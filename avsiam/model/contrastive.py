"""Symmetric InfoNCE over the global batch, with an all-gather that carries gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [b, D] from every rank into [world * b, D]; gradients flow back.

    In backward each rank receives the sum over ranks of the gradient of its slice. Every rank
    computes the same global loss, so that sum is world_size times the true gradient, and DDP's
    (or DeepSpeed's) averaging over ranks divides it back out: the update is the exact gradient
    of the global loss. Needs the same per-rank batch on every rank (drop the last partial
    batch). Without an initialised process group of more than one rank, returns ``x``.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return torch.cat(all_gather(x), dim=0)
    return x


def info_nce(audio: torch.Tensor, visual: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between paired rows of ``audio`` and ``visual`` [B, D].

    Returns (loss, accuracy): the mean of the audio->visual and visual->audio cross-entropies of
    cosine similarity / temperature, and the mean hit rate of the argmax in both directions.
    """
    # fp32 even under autocast: dividing by a temperature of 0.05 turns bf16's ~4e-3 rounding
    # of a cosine into ~0.08 of logit, and the B x B similarity costs next to nothing.
    with torch.autocast(device_type=audio.device.type, enabled=False):
        audio = F.normalize(audio.float(), dim=-1)
        visual = F.normalize(visual.float(), dim=-1)
        logits = audio @ visual.T / temperature
        targets = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    with torch.no_grad():
        hits = (logits.argmax(dim=1) == targets).float().mean() + (logits.argmax(dim=0) == targets).float().mean()
        accuracy = hits / 2
    return loss, accuracy
