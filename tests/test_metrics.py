"""Classification metrics, checked against scikit-learn as the oracle."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import accuracy_score, average_precision_score

from avsiam.eval import accuracy, average_precision_per_class, mean_average_precision, per_class_table


def multilabel_data(seed: int, n: int = 200, c: int = 12, decimals: int = 1):
    """Scores rounded to ``decimals`` so many clips tie, and every class has a positive."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < 0.2).astype(np.int64)
    targets[rng.integers(0, n, size=c), np.arange(c)] = 1
    scores = np.round(rng.random((n, c)) + 0.3 * targets, decimals)
    return scores, targets


def sklearn_ap(targets: np.ndarray, scores: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns for a class without positives; we never ask it
        return average_precision_score(targets, scores)


# --- average precision against the oracle -------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [1, 2, 8])
def test_per_class_ap_matches_sklearn(seed, decimals):
    scores, targets = multilabel_data(seed, decimals=decimals)
    expected = [sklearn_ap(targets[:, c], scores[:, c]) for c in range(targets.shape[1])]
    np.testing.assert_allclose(average_precision_per_class(scores, targets), expected, rtol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_map_matches_sklearn_macro(seed):
    scores, targets = multilabel_data(seed)
    expected = average_precision_score(targets, scores, average="macro")
    assert mean_average_precision(scores, targets) == pytest.approx(expected, rel=1e-12)


@st.composite
def scored_targets(draw):
    n = draw(st.integers(1, 30))
    c = draw(st.integers(1, 5))
    # Small integer scores make ties the rule rather than the exception.
    score_values = st.integers(-3, 3).map(float) | st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False)
    scores = draw(arrays(np.float64, (n, c), elements=score_values))
    targets = draw(arrays(np.int64, (n, c), elements=st.integers(0, 1)))
    return scores, targets


@settings(max_examples=200, deadline=None)
@given(scored_targets())
def test_ap_matches_sklearn_on_generated_data(data):
    scores, targets = data
    per_class = average_precision_per_class(scores, targets)
    for c in range(targets.shape[1]):
        if targets[:, c].any():
            assert per_class[c] == pytest.approx(sklearn_ap(targets[:, c], scores[:, c]), rel=1e-9, abs=1e-12)
        else:
            assert math.isnan(per_class[c])


def test_tied_scores_enter_the_ranking_together():
    # One threshold holding 1 positive and 1 negative: precision 1/2 at recall 1, whatever the sort order.
    for targets in ([1, 0], [0, 1]):
        assert average_precision_per_class(np.zeros((2, 1)), np.array(targets)[:, None])[0] == 0.5


def test_perfect_ranking_and_all_positive_class_score_one():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3]])
    targets = np.array([[1, 1], [1, 1], [0, 1]])
    np.testing.assert_array_equal(average_precision_per_class(scores, targets), [1.0, 1.0])


# --- classes without positives --------------------------------------------------------------


def test_class_without_positives_is_nan_and_left_out_of_the_mean():
    scores, targets = multilabel_data(seed=7, c=6)
    targets[:, [1, 4]] = 0
    per_class = average_precision_per_class(scores, targets)
    assert np.isnan(per_class[[1, 4]]).all()
    assert not np.isnan(per_class[[0, 2, 3, 5]]).any()
    kept = [0, 2, 3, 5]
    expected = average_precision_score(targets[:, kept], scores[:, kept], average="macro")
    assert mean_average_precision(scores, targets) == pytest.approx(expected, rel=1e-12)


def test_map_without_any_positive_raises():
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(np.random.default_rng(0).random((5, 3)), np.zeros((5, 3)))


# --- class-index targets and input types ------------------------------------------------------


def test_ap_accepts_class_indices_as_one_hot():
    rng = np.random.default_rng(3)
    scores, indices = rng.random((50, 4)), rng.integers(0, 4, size=50)
    one_hot = np.eye(4, dtype=np.int64)[indices]
    np.testing.assert_array_equal(
        average_precision_per_class(scores, indices), average_precision_per_class(scores, one_hot)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_torch_inputs_give_the_numpy_result(dtype):
    scores, targets = multilabel_data(seed=1, decimals=2)
    scores_t = torch.tensor(scores, dtype=dtype, requires_grad=True)
    # The oracle sees the same values the tensor holds after rounding to its dtype.
    scores_seen = scores_t.detach().double().numpy()
    expected = average_precision_score(targets, scores_seen, average="macro")
    assert mean_average_precision(scores_t, torch.tensor(targets)) == pytest.approx(expected, rel=1e-12)
    assert accuracy(scores_t, torch.tensor(targets)) == accuracy(scores_seen, targets)


# --- accuracy ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_accuracy_with_index_targets_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores, indices = rng.random((300, 10)), rng.integers(0, 10, size=300)
    expected = accuracy_score(indices, scores.argmax(axis=1))
    assert accuracy(scores, indices) == pytest.approx(expected)
    assert accuracy(torch.from_numpy(scores).float(), torch.from_numpy(indices)) == pytest.approx(expected)


def test_accuracy_with_one_hot_and_soft_targets_matches_sklearn():
    rng = np.random.default_rng(4)
    scores, indices = rng.random((300, 10)), rng.integers(0, 10, size=300)
    expected = accuracy_score(indices, scores.argmax(axis=1))
    one_hot = np.eye(10)[indices]
    soft = 0.9 * one_hot + 0.01  # label smoothing keeps the argmax
    assert accuracy(scores, one_hot) == pytest.approx(expected)
    assert accuracy(scores, soft) == pytest.approx(expected)


def test_accuracy_counts_hits():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert accuracy(scores, np.array([0, 1, 1, 0])) == 0.5


# --- per-class table -------------------------------------------------------------------------


def test_per_class_table_rows():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.7, 0.3, 0.5]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    rows = per_class_table(scores, targets, ["Speech", "Music", "Silence"])
    assert [(r["index"], r["name"], r["num_positives"]) for r in rows] == [
        (0, "Speech", 2),
        (1, "Music", 2),
        (2, "Silence", 0),
    ]
    assert rows[0]["ap"] == 1.0
    assert rows[1]["ap"] == pytest.approx(sklearn_ap(targets[:, 1], scores[:, 1]))
    assert math.isnan(rows[2]["ap"])


def test_per_class_table_needs_one_name_per_class():
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        per_class_table(np.zeros((2, 3)), np.ones((2, 3)), ["a", "b"])


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (np.zeros(4), np.zeros(4), "scores must be 2-D"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2)), "scores must be 2-D"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "scores is empty"),
        (np.zeros((3, 0)), np.zeros((3, 0)), "scores is empty"),
        (np.zeros((4, 3)), np.zeros((5, 3)), "targets has 5 rows but scores has 4"),
        (np.zeros((4, 3)), np.zeros((4, 2)), "targets has 2 classes but scores has 3"),
        (np.zeros((4, 3)), np.zeros((4, 3, 1)), "targets must be class indices"),
        (np.full((2, 2), np.nan), np.ones((2, 2)), "NaN or infinite"),
        (np.zeros((2, 3)), np.array([0, 3]), r"class indices must lie in \[0, 3\)"),
        (np.zeros((2, 3)), np.array([0, -1]), r"class indices must lie in \[0, 3\)"),
        (np.zeros((2, 3)), np.array([0.5, 1.0]), "integer class indices"),
    ],
)
@pytest.mark.parametrize("metric", [average_precision_per_class, mean_average_precision, accuracy])
def test_bad_input_raises_value_error(metric, scores, targets, message):
    with pytest.raises(ValueError, match=message):
        metric(scores, targets)


def test_ap_rejects_soft_targets():
    with pytest.raises(ValueError, match="must be binary"):
        average_precision_per_class(np.zeros((2, 2)), np.array([[0.9, 0.1], [0.1, 0.9]]))
