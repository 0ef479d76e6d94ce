"""Cross-modal retrieval: recall@k and median rank, audio->visual and visual->audio.

Clip i's audio embedding and visual embedding are a pair; every other clip is a distractor.
Embeddings are L2-normalised and compared by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from avsiam.eval.metrics import ArrayLike, as_float64_array

# Queries are ranked in blocks so the similarity matrix never has to exist whole: for a
# 20k-clip evaluation set it would take 3.2 GB in float64.
_QUERY_BLOCK = 1024


def _checked_embeddings(audio_emb: ArrayLike, visual_emb: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    audio, visual = as_float64_array(audio_emb), as_float64_array(visual_emb)
    for name, emb in (("audio_emb", audio), ("visual_emb", visual)):
        if emb.ndim != 2:
            raise ValueError(f"{name} must be 2-D [N, D], got shape {emb.shape}")
        if emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if audio.shape != visual.shape:
        raise ValueError(f"audio_emb {audio.shape} and visual_emb {visual.shape} must have the same shape [N, D]")
    return audio, visual


def _l2_normalised(emb: np.ndarray) -> np.ndarray:
    # The floor keeps an all-zero embedding at zero (similar to nothing) instead of dividing by zero.
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _ranks_of_true_matches(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """1-based rank of gallery row i among all gallery rows for query row i.

    A distractor tied with the true match counts as ranked above it, so a collapsed model that
    embeds every clip alike ranks every true match last rather than first.
    """
    ranks = np.empty(queries.shape[0], dtype=np.int64)
    for start in range(0, queries.shape[0], _QUERY_BLOCK):
        stop = min(start + _QUERY_BLOCK, queries.shape[0])
        similarity = queries[start:stop] @ gallery.T
        true_similarity = similarity[np.arange(stop - start), np.arange(start, stop)]
        ranks[start:stop] = (similarity >= true_similarity[:, None]).sum(axis=1)
    return ranks


def _recall_summary(prefix: str, ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    summary = {f"{prefix}_R{k}": float(np.mean(ranks <= k)) for k in ks}
    summary[f"{prefix}_median_rank"] = float(np.median(ranks))
    return summary


def retrieval_recall(audio_emb: ArrayLike, visual_emb: ArrayLike, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k and median rank of retrieving each clip's pair, in both directions.

    ``audio_emb`` and ``visual_emb`` are ``[N, D]`` numpy arrays or torch tensors whose row i
    belong to the same clip. Returns ``{"a2v_R<k>": ..., "a2v_median_rank": ..., "v2a_R<k>":
    ..., "v2a_median_rank": ...}``: ``a2v`` queries with audio and searches the visual
    embeddings, ``v2a`` the reverse. R@k is the fraction in [0, 1] of queries whose true match
    ranks within the top k; ranks are 1-based, ties counting against the true match.

    For reference, embeddings that carry no information score R@k = k/N (chance) and a median
    rank of about N/2, so compare R@k across evaluation sets only at equal N.
    """
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    ks = [int(k) for k in ks]  # so the keys read "R5", never "R5.0" (MLflow-safe names: no "@")
    audio, visual = _checked_embeddings(audio_emb, visual_emb)
    audio, visual = _l2_normalised(audio), _l2_normalised(visual)
    return {
        **_recall_summary("a2v", _ranks_of_true_matches(audio, visual), ks),
        **_recall_summary("v2a", _ranks_of_true_matches(visual, audio), ks),
    }
