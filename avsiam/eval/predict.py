"""Distributed inference over a split: every rank runs its share in lock-step (required under
ZeRO-3, where a forward is a collective), results are gathered and de-duplicated by clip."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from avsiam.data.datasets import EvalClips
from avsiam.data.sampler import DistributedClipSampler
from avsiam.model.finetune import frame_averaged_probabilities
from avsiam.train.distributed import DistEnv, gather_objects


def _loader(dataset: EvalClips, env: DistEnv, batch_size: int, num_workers: int) -> DataLoader:
    # Padded (equal shares, so no rank runs an extra forward), not shuffled; duplicates from
    # the padding are dropped after gathering.
    sampler = DistributedClipSampler(len(dataset), world_size=env.world_size, rank=env.rank, shuffle=False, pad=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)


def _gather_rows(indices: list[np.ndarray], rows: dict[str, list[np.ndarray]], size: int) -> dict[str, np.ndarray]:
    """Concatenate every rank's (index, row) pairs and order them by clip index."""
    local = (np.concatenate(indices), {k: np.concatenate(v) for k, v in rows.items()})
    gathered = gather_objects(local)
    out: dict[str, np.ndarray] = {}
    for name, values in local[1].items():
        merged = np.zeros((size, values.shape[1]), dtype=np.float64)
        for idx, rank_rows in gathered:
            merged[idx] = rank_rows[name]
        out[name] = merged
    return out


@torch.no_grad()
def _run(
    dataset: EvalClips,
    env: DistEnv,
    batch_size: int,
    num_workers: int,
    step: Callable[[dict], dict[str, torch.Tensor]],
) -> dict[str, np.ndarray]:
    indices: list[np.ndarray] = []
    rows: dict[str, list[np.ndarray]] = {}
    for batch in _loader(dataset, env, batch_size, num_workers):
        indices.append(batch["index"].numpy())
        for name, value in step(batch).items():
            rows.setdefault(name, []).append(value.float().cpu().numpy())
    return _gather_rows(indices, rows, len(dataset))


def predict_probabilities(
    model: nn.Module,
    dataset: EvalClips,
    env: DistEnv,
    *,
    multi_label: bool,
    batch_size: int = 8,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, np.ndarray]:
    """{head: class probabilities [N, C]} of a finetuning model over ``dataset`` (all 10 frames
    of each clip fused with its audio; probabilities averaged over frames)."""
    was_training = model.training
    model.eval()

    def step(batch: dict) -> dict[str, torch.Tensor]:
        logits = model(audio=batch["audio"].to(device, dtype), frames=batch["frames"].to(device, dtype))
        return {head: frame_averaged_probabilities(x.float(), multi_label) for head, x in logits.items()}

    try:
        return _run(dataset, env, batch_size, num_workers, step)
    finally:
        model.train(was_training)


def embed_clips(
    encoder: nn.Module,
    dataset: EvalClips,
    env: DistEnv,
    *,
    frame_index: int | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled (audio, visual) embeddings [N, D] for retrieval; the visual embedding is of
    the middle frame unless ``frame_index`` says otherwise."""
    was_training = encoder.training
    encoder.eval()

    def step(batch: dict) -> dict[str, torch.Tensor]:
        frames = batch["frames"]
        k = frames.shape[1] // 2 if frame_index is None else frame_index
        return {
            "audio": encoder(batch["audio"].to(device, dtype), "audio").mean(dim=1),
            "visual": encoder(frames[:, k].to(device, dtype), "visual").mean(dim=1),
        }

    try:
        out = _run(dataset, env, batch_size, num_workers, step)
    finally:
        encoder.train(was_training)
    return out["audio"], out["visual"]
