"""Distributed inference over a split: every rank runs its share in lock-step (required under
ZeRO-3, where a forward is a collective), results are gathered and de-duplicated by clip.

The split is read by DataLoader workers (:func:`eval_loader`), like training: the main process
of a rank only runs the model. A loader made with ``persistent=True`` keeps its workers for the
next validation, so an epoch-end validation does not fork them again."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from avsiam.data.datasets import EvalClips
from avsiam.data.sampler import DistributedClipSampler
from avsiam.eval.metrics import ArrayLike
from avsiam.eval.retrieval import checked_ks, normalised_pairs, rank_counts, recall_summary
from avsiam.launch.distributed import DistEnv, gather_objects
from avsiam.model.finetune import frame_averaged_probabilities


def eval_loader(dataset: EvalClips, env: DistEnv, batch_size: int, num_workers: int, persistent: bool = False) -> DataLoader:
    """This rank's share of ``dataset``, in order, read by ``num_workers`` workers."""
    # Padded (equal shares, so no rank runs an extra forward), not shuffled; duplicates from
    # the padding are dropped after gathering.
    sampler = DistributedClipSampler(len(dataset), world_size=env.world_size, rank=env.rank, shuffle=False, pad=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=persistent and num_workers > 0)


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
def _run(loader: DataLoader, step: Callable[[dict], dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    indices: list[np.ndarray] = []
    rows: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        indices.append(batch["index"].numpy())
        for name, value in step(batch).items():
            rows.setdefault(name, []).append(value.float().cpu().numpy())
    return _gather_rows(indices, rows, len(loader.dataset))


def predict_probabilities(
    model: nn.Module,
    loader: DataLoader,
    *,
    multi_label: bool,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, np.ndarray]:
    """{head: class probabilities [N, C]} of a finetuning model over the loader's dataset (all
    10 frames of each clip fused with its audio; probabilities averaged over frames)."""
    was_training = model.training
    model.eval()

    def step(batch: dict) -> dict[str, torch.Tensor]:
        logits = model(audio=batch["audio"].to(device, dtype), frames=batch["frames"].to(device, dtype))
        return {head: frame_averaged_probabilities(x.float(), multi_label) for head, x in logits.items()}

    try:
        return _run(loader, step)
    finally:
        model.train(was_training)


def embed_clips(
    encoder: nn.Module,
    loader: DataLoader,
    *,
    frame_index: int | None = None,
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
        out = _run(loader, step)
    finally:
        encoder.train(was_training)
    return out["audio"], out["visual"]


def distributed_retrieval_recall(
    audio_emb: ArrayLike, visual_emb: ArrayLike, env: DistEnv, device: torch.device | str, ks=(1, 5, 10)
) -> dict[str, float]:
    """:func:`~avsiam.eval.retrieval.retrieval_recall` of embeddings every rank holds, computed
    once: each rank computes a contiguous 1/world of the similarity matrix's rows on ``device``
    and the rank counts are gathered (collective: all ranks must call it with the same
    embeddings)."""
    ks = checked_ks(ks)
    audio, visual = normalised_pairs(audio_emb, visual_emb, device)
    n = audio.shape[0]
    share = range(env.rank * n // env.world_size, (env.rank + 1) * n // env.world_size)
    gathered = gather_objects(rank_counts(audio, visual, share))  # in rank order: the shares are rows 0..n-1
    return recall_summary(np.concatenate([a2v for a2v, _ in gathered]), np.sum([v2a for _, v2a in gathered], axis=0), ks)
