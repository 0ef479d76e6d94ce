"""Cross-modal retrieval recall and median rank."""

import numpy as np
import pytest
import torch

from avsiam.eval import retrieval, retrieval_recall

KEYS = ["a2v_R1", "a2v_R5", "a2v_R10", "a2v_median_rank", "v2a_R1", "v2a_R5", "v2a_R10", "v2a_median_rank"]


def test_identical_embeddings_retrieve_perfectly():
    emb = np.random.default_rng(0).normal(size=(64, 16))
    result = retrieval_recall(emb, emb)
    assert sorted(result) == sorted(KEYS)
    assert result["a2v_R1"] == result["v2a_R1"] == 1.0
    assert result["a2v_median_rank"] == result["v2a_median_rank"] == 1.0


def test_scale_does_not_matter_after_l2_normalisation():
    emb = np.random.default_rng(1).normal(size=(32, 8))
    scales = np.random.default_rng(2).uniform(0.1, 10.0, size=(32, 1))
    assert retrieval_recall(emb, emb * scales)["a2v_R1"] == 1.0


def test_hand_computed_ranks():
    # Clips 0 and 1 swap their visual embeddings; clip 2 keeps its own.
    audio = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    visual = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    # Audio 0 is orthogonal to its visual 0 and ranks it last (3); likewise clip 1; clip 2 ranks 1st.
    result = retrieval_recall(audio, visual, ks=(1, 2, 3))
    for direction in ("a2v", "v2a"):
        assert result[f"{direction}_R1"] == pytest.approx(1 / 3)
        assert result[f"{direction}_R2"] == pytest.approx(1 / 3)
        assert result[f"{direction}_R3"] == 1.0
        assert result[f"{direction}_median_rank"] == 3.0


def test_known_permutation_keeps_only_its_fixed_points_at_rank_one():
    rng = np.random.default_rng(3)
    n = 50
    audio = rng.normal(size=(n, 128))  # near-orthogonal: only the permuted copy is similar
    perm = np.arange(n)
    perm[:40] = np.roll(perm[:40], 1)  # clips 40..49 are fixed points
    result = retrieval_recall(audio, audio[perm], ks=(1, n))
    for direction in ("a2v", "v2a"):
        assert result[f"{direction}_R1"] == pytest.approx(10 / n)
        assert result[f"{direction}_R{n}"] == 1.0


def test_random_embeddings_score_chance():
    rng = np.random.default_rng(4)
    n = 1000
    ks = (10, 100, 500)
    result = retrieval_recall(rng.normal(size=(n, 32)), rng.normal(size=(n, 32)), ks=ks)
    for direction in ("a2v", "v2a"):
        for k in ks:
            chance = k / n
            tolerance = 4 * np.sqrt(chance * (1 - chance) / n)
            assert result[f"{direction}_R{k}"] == pytest.approx(chance, abs=tolerance)
        assert result[f"{direction}_median_rank"] == pytest.approx(n / 2, rel=0.1)


def test_ties_count_against_the_true_match():
    # A collapsed model embeds every clip alike; it must not score perfect recall.
    collapsed = np.ones((5, 4))
    result = retrieval_recall(collapsed, collapsed, ks=(1, 5))
    assert result["a2v_R1"] == result["v2a_R1"] == 0.0
    assert result["a2v_R5"] == 1.0
    assert result["a2v_median_rank"] == 5.0


def test_blocked_ranking_matches_one_block(monkeypatch):
    rng = np.random.default_rng(5)
    audio, visual = rng.normal(size=(37, 8)), rng.normal(size=(37, 8))
    whole = retrieval_recall(audio, visual)
    monkeypatch.setattr(retrieval, "_QUERY_BLOCK", 5)
    assert retrieval_recall(audio, visual) == whole


def test_torch_inputs_give_the_numpy_result():
    rng = np.random.default_rng(6)
    audio, visual = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    expected = retrieval_recall(audio, visual)
    assert retrieval_recall(torch.from_numpy(audio), torch.from_numpy(visual).requires_grad_()) == expected
    assert retrieval_recall(torch.from_numpy(audio), visual) == expected


@pytest.mark.parametrize(
    ("audio", "visual", "message"),
    [
        (np.zeros(4), np.zeros(4), "audio_emb must be 2-D"),
        (np.zeros((4, 2)), np.zeros((4, 2, 1)), "visual_emb must be 2-D"),
        (np.zeros((0, 2)), np.zeros((0, 2)), "audio_emb is empty"),
        (np.zeros((4, 2)), np.zeros((5, 2)), "must have the same shape"),
        (np.zeros((4, 2)), np.zeros((4, 3)), "must have the same shape"),
        (np.full((2, 2), np.nan), np.zeros((2, 2)), "NaN or infinite"),
    ],
)
def test_bad_shapes_raise_value_error(audio, visual, message):
    with pytest.raises(ValueError, match=message):
        retrieval_recall(audio, visual)


@pytest.mark.parametrize("ks", [(), (0,), (1, -5), (2.5,)])
def test_bad_ks_raise_value_error(ks):
    with pytest.raises(ValueError, match="ks must be positive integers"):
        retrieval_recall(np.eye(3), np.eye(3), ks=ks)
