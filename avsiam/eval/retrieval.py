"""Cross-modal retrieval: recall@k and median rank, audio->visual and visual->audio.

Clip i's audio embedding and visual embedding are a pair; every other clip is a distractor.
Embeddings are L2-normalised and compared by cosine similarity.

The similarity matrix S = A V^T holds both directions (audio query i against visual clip j is
S[i, j]; visual query j against audio clip i is the same number), so it is computed once, in
float32 with torch on the training device, a block of rows at a time (it never exists whole:
200 k clips would be 160 GB): each block's rows give their audio->visual ranks, its columns
add to the visual->audio ranks. It is 2 N^2 D FLOP (3.4e13 for Base on AudioSet-2M's ~177 k
validation clips) and can be split over ranks: :func:`rank_counts` takes any range of rows,
so each rank computes its share once and only the counts are gathered
(:func:`avsiam.eval.predict.distributed_retrieval_recall`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from avsiam.eval.metrics import ArrayLike

# Similarities computed per matrix product (128 MB in float32, in buffers allocated once): as
# many rows as keep the GEMM efficient (~170 rows at 200 k clips).
_BLOCK_ELEMENTS = 2**25
# Two similarities this close are a tie. The true-match similarities are computed apart from
# the GEMM (in float64), and the GEMM's float32 rounding of a cosine of unit vectors is well
# below this, so a distractor identical to the true match ties with it whatever the order of
# the GEMM's sums.
TIE_TOLERANCE = 1e-6


def _checked_embeddings(audio_emb: ArrayLike, visual_emb: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    audio, visual = torch.as_tensor(audio_emb), torch.as_tensor(visual_emb)
    for name, emb in (("audio_emb", audio), ("visual_emb", visual)):
        if emb.ndim != 2:
            raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(emb.shape)}")
        if emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(emb.shape)}")
        if not torch.isfinite(emb).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if audio.shape != visual.shape:
        raise ValueError(f"audio_emb {tuple(audio.shape)} and visual_emb {tuple(visual.shape)} must have the same shape [N, D]")
    return audio, visual


def _l2_normalised(emb: torch.Tensor) -> torch.Tensor:
    # The floor keeps an all-zero embedding at zero (similar to nothing) instead of dividing by zero.
    emb = emb.detach().to(torch.float64)
    return emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)


def rank_counts(audio: torch.Tensor, visual: torch.Tensor, rows: range | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ranks from the rows ``rows`` (default: all) of the similarity matrix of L2-normalised
    float32 ``audio`` and ``visual`` embeddings on one device (:func:`normalised_pairs`).

    Returns ``(a2v, v2a)``: ``a2v[k]`` is the 1-based rank of visual clip i among all visual
    clips for audio query i = ``rows[k]``; ``v2a[j]`` counts the audio clips of ``rows`` that
    rank at or above audio clip j for visual query j (clip j itself included when it is in
    ``rows``), so summed over a partition of the rows it is the visual->audio rank. A
    distractor tied with the true match (within :data:`TIE_TOLERANCE`) counts as ranked above
    it, so a collapsed model that embeds every clip alike ranks every true match last rather
    than first; the true match itself counts once, whatever the GEMM's rounding of it.
    """
    n = audio.shape[0]
    rows = range(n) if rows is None else rows
    # The true matches' similarities, in float64 from the float32 vectors the GEMM multiplies.
    threshold = ((audio.double() * visual.double()).sum(dim=1) - TIE_TOLERANCE).to(torch.float32)
    a2v = np.empty(len(rows), dtype=np.int64)
    v2a = torch.zeros(n, dtype=torch.int64, device=audio.device)
    visual_t = visual.T
    block_rows = max(1, min(len(rows), _BLOCK_ELEMENTS // n))
    similarity = torch.empty(block_rows, n, device=audio.device)
    above = torch.empty(block_rows, n, dtype=torch.bool, device=audio.device)
    # Counted as float32 0/1 (sums exact up to 2^24 = 16.7 M clips): summing floats is
    # several times faster than summing bools on CPUs, and no slower on GPUs.
    counted = torch.empty(block_rows, n, device=audio.device)
    for offset in range(0, len(rows), block_rows):
        block = rows[offset : offset + block_rows]
        k = len(block)
        torch.mm(audio[block.start : block.stop], visual_t, out=similarity[:k])
        own = similarity[:k].diagonal(offset=block.start)  # the block's true matches
        own_missed = (own < threshold[block.start : block.stop]).long()  # rounded below their own threshold
        torch.ge(similarity[:k], threshold[block.start : block.stop, None], out=above[:k])
        a2v[offset : offset + k] = (counted[:k].copy_(above[:k]).sum(dim=1).long() + own_missed).cpu().numpy()
        torch.ge(similarity[:k], threshold[None, :], out=above[:k])
        v2a += counted[:k].copy_(above[:k]).sum(dim=0).long()
        v2a[block.start : block.stop] += own_missed
    return a2v, v2a.cpu().numpy()


def recall_summary(a2v: np.ndarray, v2a: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """``<direction>_R<k>`` (fraction of queries ranked within k) and ``<direction>_median_rank``
    of the audio->visual and visual->audio ranks."""
    summary: dict[str, float] = {}
    for prefix, ranks in (("a2v", a2v), ("v2a", v2a)):
        summary.update({f"{prefix}_R{k}": float(np.mean(ranks <= k)) for k in ks})
        summary[f"{prefix}_median_rank"] = float(np.median(ranks))
    return summary


def checked_ks(ks: Sequence[int]) -> list[int]:
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    return [int(k) for k in ks]  # so the keys read "R5", never "R5.0" (MLflow-safe names: no "@")


def normalised_pairs(audio_emb: ArrayLike, visual_emb: ArrayLike, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Checked, L2-normalised (in float64, then rounded once) float32 (audio, visual)
    embeddings on ``device``."""
    audio, visual = _checked_embeddings(audio_emb, visual_emb)
    return (_l2_normalised(audio).to(device, torch.float32), _l2_normalised(visual).to(device, torch.float32))


def retrieval_recall(
    audio_emb: ArrayLike, visual_emb: ArrayLike, ks: Sequence[int] = (1, 5, 10), device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Recall@k and median rank of retrieving each clip's pair, in both directions.

    ``audio_emb`` and ``visual_emb`` are ``[N, D]`` numpy arrays or torch tensors whose row i
    belong to the same clip. Returns ``{"a2v_R<k>": ..., "a2v_median_rank": ..., "v2a_R<k>":
    ..., "v2a_median_rank": ...}``: ``a2v`` queries with audio and searches the visual
    embeddings, ``v2a`` the reverse. R@k is the fraction in [0, 1] of queries whose true match
    ranks within the top k; ranks are 1-based, ties counting against the true match.

    For reference, embeddings that carry no information score R@k = k/N (chance) and a median
    rank of about N/2, so compare R@k across evaluation sets only at equal N.
    """
    ks = checked_ks(ks)
    return recall_summary(*rank_counts(*normalised_pairs(audio_emb, visual_emb, device)), ks)
