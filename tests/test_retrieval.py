"""Cross-modal retrieval recall and median rank."""

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from avsiam.eval import retrieval, retrieval_recall
from avsiam.eval.predict import distributed_retrieval_recall
from avsiam.eval.retrieval import TIE_TOLERANCE, normalised_pairs, rank_counts
from avsiam.launch.distributed import DistEnv
from avsiam.launch.local import free_port

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
    monkeypatch.setattr(retrieval, "_BLOCK_ELEMENTS", 5 * 37)  # blocks of 5 rows, the last one partial
    assert retrieval_recall(audio, visual) == whole


def test_the_true_match_counts_once_whatever_its_rounding(monkeypatch):
    # A threshold above every similarity stands for a GEMM that rounded the true match below
    # its own (float64) similarity: no distractor outranks it, and it still ranks 1st, not 0th.
    monkeypatch.setattr(retrieval, "TIE_TOLERANCE", -10.0)
    rng = np.random.default_rng(10)
    a2v, v2a = rank_counts(*normalised_pairs(rng.normal(size=(20, 4)), rng.normal(size=(20, 4))))
    assert a2v.tolist() == v2a.tolist() == [1] * 20


def _float64_reference(audio: np.ndarray, visual: np.ndarray, ks) -> dict[str, float]:
    """Recall@k written out in float64 numpy, the whole similarity matrix at once."""
    a = audio / np.linalg.norm(audio, axis=1, keepdims=True)
    v = visual / np.linalg.norm(visual, axis=1, keepdims=True)
    out = {}
    for prefix, similarity in (("a2v", a @ v.T), ("v2a", v @ a.T)):
        true = np.diag(similarity)
        ranks = (similarity >= true[:, None] - TIE_TOLERANCE).sum(axis=1)
        out.update({f"{prefix}_R{k}": float(np.mean(ranks <= k)) for k in ks})
        out[f"{prefix}_median_rank"] = float(np.median(ranks))
    return out


def test_float32_blocked_ranking_matches_a_float64_reference(monkeypatch):
    rng = np.random.default_rng(6)
    n, d = 600, 48
    audio = rng.normal(size=(n, d))
    visual = audio + rng.normal(scale=1.5, size=(n, d))  # partly informative: ranks spread over 1..n
    ks = (1, 5, 10, 50)
    monkeypatch.setattr(retrieval, "_BLOCK_ELEMENTS", 128 * 600)  # several blocks, the last one partial
    assert retrieval_recall(audio, visual, ks=ks) == _float64_reference(audio, visual, ks)


def test_row_shards_rank_like_the_whole_matrix():
    rng = np.random.default_rng(7)
    audio, visual = normalised_pairs(rng.normal(size=(101, 16)), rng.normal(size=(101, 16)))
    whole_a2v, whole_v2a = rank_counts(audio, visual)
    shards = [rank_counts(audio, visual, rows) for rows in (range(0, 34), range(34, 67), range(67, 101))]
    np.testing.assert_array_equal(np.concatenate([a2v for a2v, _ in shards]), whole_a2v)
    np.testing.assert_array_equal(np.sum([v2a for _, v2a in shards], axis=0), whole_v2a)


def test_distributed_recall_in_one_process_is_the_recall():
    rng = np.random.default_rng(8)
    audio, visual = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    assert distributed_retrieval_recall(audio, visual, DistEnv(0, 1, 0), "cpu") == retrieval_recall(audio, visual)


def _rank_recall(rank: int, port: int, audio: np.ndarray, visual: np.ndarray) -> dict[str, float]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        return distributed_retrieval_recall(audio, visual, DistEnv(rank, 2, rank), "cpu")
    finally:
        dist.destroy_process_group()


def _second_rank(port: int, audio, visual, queue) -> None:
    queue.put(_rank_recall(1, port, audio, visual))


def test_two_ranks_each_rank_half_and_agree_on_the_recall():
    rng = np.random.default_rng(9)
    audio = rng.normal(size=(51, 8))  # odd: the shares differ in size
    visual = audio + rng.normal(size=(51, 8))
    port = free_port()
    ctx = mp.get_context("spawn")  # forking after torch's thread pools start can deadlock
    queue = ctx.Queue()
    child = ctx.Process(target=_second_rank, args=(port, audio, visual, queue))
    child.start()
    try:
        first = _rank_recall(0, port, audio, visual)
        second = queue.get(timeout=60)
    finally:
        child.join(timeout=30)
    assert first == second == retrieval_recall(audio, visual)


@pytest.mark.slow
def test_retrieval_benchmark_agrees_with_the_replaced_float64_code():
    """benchmarks/bench_retrieval.py checks the recall of both implementations against each
    other on the rows it times (whole splits and query subsets), and exits 1 if they differ."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_retrieval.py"
    proc = subprocess.run([sys.executable, str(script), "--clips", "300", "900", "--full-up-to", "300", "--queries", "128"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split()[:2] for line in proc.stdout.splitlines()[2:]] == [["300", "300"], ["900", "128"]]
