"""Classification metrics: per-class average precision, mAP, top-1 accuracy and a per-class table.

AudioSet is scored by mAP over its classes and VGGSound by top-1 accuracy. Every function takes
``scores`` of shape ``[N, C]`` (one row per clip, one column per class; logits, probabilities or
any other monotone score) as a numpy array or a torch tensor of any dtype or device. Inputs are
converted to float64 numpy first, so a result does not depend on the precision the model ran in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def as_float64_array(x: ArrayLike) -> np.ndarray:
    """``x`` as a float64 numpy array, whether it is a numpy array or a torch tensor."""
    if isinstance(x, torch.Tensor):
        # numpy has no bfloat16, and a CUDA tensor or one that requires grad has no numpy view.
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _checked_scores(scores: ArrayLike) -> np.ndarray:
    scores = as_float64_array(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [N, C], got shape {scores.shape}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores is empty: shape {scores.shape}; need at least one clip and one class")
    if not np.isfinite(scores).all():
        # NaN has no place in a ranking: it would silently scramble the precision-recall curve.
        raise ValueError("scores contains NaN or infinite values")
    return scores


def _checked_targets(targets: ArrayLike, scores_shape: tuple[int, int]) -> np.ndarray:
    targets = as_float64_array(targets)
    if targets.ndim not in (1, 2):
        raise ValueError(f"targets must be class indices [N] or per-class targets [N, C], got shape {targets.shape}")
    if targets.shape[0] != scores_shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} rows but scores has {scores_shape[0]}")
    if targets.ndim == 2 and targets.shape[1] != scores_shape[1]:
        raise ValueError(f"targets has {targets.shape[1]} classes but scores has {scores_shape[1]}")
    return targets


def _checked_class_indices(indices: np.ndarray, num_classes: int) -> np.ndarray:
    if not np.array_equal(indices, np.round(indices)):
        raise ValueError("1-D targets must be integer class indices")
    if indices.min() < 0 or indices.max() >= num_classes:
        raise ValueError(
            f"class indices must lie in [0, {num_classes}), got [{int(indices.min())}, {int(indices.max())}]"
        )
    return indices.astype(np.int64)


def _target_classes(targets: ArrayLike, scores_shape: tuple[int, int]) -> np.ndarray:
    """The single true class of each clip: the index itself, or the argmax of a one-hot or soft row."""
    targets = _checked_targets(targets, scores_shape)
    if targets.ndim == 2:
        return targets.argmax(axis=1)
    return _checked_class_indices(targets, scores_shape[1])


def _positive_indicator(targets: ArrayLike, scores_shape: tuple[int, int]) -> np.ndarray:
    """A boolean ``[N, C]`` matrix of positives from multi-hot targets or class indices."""
    targets = _checked_targets(targets, scores_shape)
    if targets.ndim == 1:
        indices = _checked_class_indices(targets, scores_shape[1])
        return np.eye(scores_shape[1], dtype=bool)[indices]
    if not np.isin(targets, (0.0, 1.0)).all():
        # A soft target (mixup, label smoothing) has no single positive/negative split to rank against.
        raise ValueError("[N, C] targets for average precision must be binary (0 or 1)")
    return targets == 1.0


def _binary_average_precision(scores: np.ndarray, is_positive: np.ndarray) -> float:
    """Step-wise AP of one class, sum over thresholds of (R_n - R_{n-1}) * P_n, as scikit-learn.

    Thresholds are the distinct score values, so tied clips enter the ranking together and the
    order in which ties happen to be sorted cannot change the result. Needs at least one positive.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_positives = np.cumsum(is_positive[order])
    # Index of the last clip at each distinct score: the cut points of the distinct thresholds.
    cut = np.r_[np.flatnonzero(np.diff(sorted_scores)), scores.size - 1]
    true_positives = true_positives[cut]
    precision = true_positives / (cut + 1)
    recall_gain = np.diff(true_positives, prepend=0) / true_positives[-1]
    return float(np.sum(recall_gain * precision))


def average_precision_per_class(scores: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """Average precision of each class, shape ``[C]``.

    ``targets`` is a binary ``[N, C]`` matrix (multi-label, e.g. AudioSet) or ``[N]`` class
    indices (single-label, e.g. VGGSound). A class's AP equals scikit-learn's
    ``average_precision_score(targets[:, c], scores[:, c])``.

    A class with no positive among the N clips has no recall to measure, so its AP is undefined
    and reported as ``nan``. (scikit-learn instead warns and returns 0 for such a class, which
    would drag the mean down for a reason that has nothing to do with the model.)
    """
    scores = _checked_scores(scores)
    positives = _positive_indicator(targets, scores.shape)
    return np.array(
        [
            _binary_average_precision(scores[:, c], positives[:, c]) if positives[:, c].any() else np.nan
            for c in range(scores.shape[1])
        ]
    )


def mean_average_precision(scores: ArrayLike, targets: ArrayLike) -> float:
    """Macro mAP: the mean of :func:`average_precision_per_class` over the classes that have a positive.

    Classes without a positive are excluded from the mean (their AP is undefined, see
    :func:`average_precision_per_class`); :func:`per_class_table` lists them with
    ``num_positives == 0``. When every class has a positive this equals scikit-learn's
    ``average_precision_score(targets, scores, average="macro")``.

    Raises ``ValueError`` when no class has a positive, since the mean would be over nothing.
    """
    per_class = average_precision_per_class(scores, targets)
    defined = ~np.isnan(per_class)
    if not defined.any():
        raise ValueError("no class has a positive target, so mAP is undefined")
    return float(per_class[defined].mean())


def accuracy(scores: ArrayLike, targets: ArrayLike) -> float:
    """Top-1 accuracy as a fraction in [0, 1]: how often the highest score is the true class.

    ``targets`` is ``[N]`` class indices or ``[N, C]`` one-hot or soft targets, whose argmax is
    the true class. Among tied top scores the lowest class index is the prediction.
    """
    scores = _checked_scores(scores)
    true_classes = _target_classes(targets, scores.shape)
    return float(np.mean(scores.argmax(axis=1) == true_classes))


def per_class_table(scores: ArrayLike, targets: ArrayLike, class_names: Sequence[str]) -> list[dict]:
    """One row per class, in class order: ``{"index", "name", "ap", "num_positives"}``.

    ``ap`` is ``nan`` for a class with ``num_positives == 0`` (see :func:`average_precision_per_class`).
    """
    scores = _checked_scores(scores)
    if len(class_names) != scores.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {scores.shape[1]} classes in scores")
    num_positives = _positive_indicator(targets, scores.shape).sum(axis=0)
    per_class = average_precision_per_class(scores, targets)
    return [
        {"index": c, "name": str(name), "ap": float(per_class[c]), "num_positives": int(num_positives[c])}
        for c, name in enumerate(class_names)
    ]
