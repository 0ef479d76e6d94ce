"""Retrieval recall at AudioSet scale: one float32 similarity matrix shared out over ranks, vs
float64 matrices on every rank.

Base-sized embeddings (768-d) of ``--clips`` clips, both directions (audio->visual and
visual->audio), ranked by

* the replaced code: float64 numpy, 1024 queries a block, one similarity matrix per
  direction, every rank ranking every query;
* ``avsiam.eval.retrieval``: float32 torch on the training device (``--device``), one matrix
  for both directions in blocks of rows, each rank computing 1/world of its rows
  (``distributed_retrieval_recall``).

Ranking time is linear in the number of queries, so beyond ``--full-up-to`` clips both are
timed on the first ``--queries`` queries against the whole gallery and scaled to all of them
(stated in the output). Per-rank time at ``--world`` ranks is the new code's share of the
queries; the replaced code's per-rank time is its whole time. The two agree on the recall
(checked on the timed queries).

    .venv/bin/python benchmarks/bench_retrieval.py [--clips 20000 200000] [--world 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from avsiam.eval.retrieval import normalised_pairs, rank_counts

DIM = 768  # Base


def float64_ranks(queries: np.ndarray, gallery: np.ndarray, rows: range, block: int = 1024) -> np.ndarray:
    """The replaced implementation: float64 numpy, exact ties."""
    ranks = np.empty(len(rows), dtype=np.int64)
    for offset in range(0, len(rows), block):
        start, stop = rows.start + offset, min(rows.start + offset + block, rows.stop)
        similarity = queries[start:stop] @ gallery.T
        true = similarity[np.arange(stop - start), np.arange(start, stop)]
        ranks[offset : offset + stop - start] = (similarity >= true[:, None]).sum(axis=1)
    return ranks


def both_float64_directions(audio: np.ndarray, visual: np.ndarray, rows: range) -> tuple[np.ndarray, np.ndarray]:
    return float64_ranks(audio, visual, rows), float64_ranks(visual, audio, rows)


def timed(fn, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--world", type=int, default=16, help="ranks the validation is spread over")
    parser.add_argument("--queries", type=int, default=2048, help="queries timed beyond --full-up-to clips")
    parser.add_argument("--full-up-to", type=int, default=20_000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"{DIM}-d embeddings, both directions, device {args.device}, {torch.get_num_threads()} CPU threads")
    print(f"{'clips':>8} {'timed queries':>14} {'float64, every rank':>20} {'float32, 1 rank':>16} {'ratio':>6} "
          f"{f'float32 per rank at {args.world}':>22} {'ratio':>7}")
    for n in args.clips:
        rng = np.random.default_rng(0)
        audio = rng.standard_normal((n, DIM), dtype=np.float32)
        visual = (audio + 2.0 * rng.standard_normal((n, DIM), dtype=np.float32))
        timed_rows = range(n if n <= args.full_up_to else min(args.queries, n))
        scale = n / len(timed_rows)

        a64 = audio.astype(np.float64)
        v64 = visual.astype(np.float64)
        a64 /= np.linalg.norm(a64, axis=1, keepdims=True)
        v64 /= np.linalg.norm(v64, axis=1, keepdims=True)
        old, old_s = timed(both_float64_directions, a64, v64, timed_rows)
        del a64, v64

        a32, v32 = normalised_pairs(audio, visual, args.device)
        # The same work: the timed rows of the matrix (their a2v ranks and their share of the
        # v2a counts), as the replaced code's a2v and v2a blocks of as many queries are.
        (a2v, _), new_s = timed(rank_counts, a32, v32, timed_rows)
        if n <= args.full_up_to:
            v2a = rank_counts(a32, v32)[1]
            checks = zip(("a2v", "v2a"), old, (a2v, v2a))
        else:
            checks = zip(("a2v",), old, (a2v,))
        for direction, o, w in checks:
            for k in (1, 5, 10):
                if abs(np.mean(o <= k) - np.mean(w <= k)) > 1 / len(timed_rows):
                    print(f"{direction} R@{k} differs: {np.mean(o <= k)} vs {np.mean(w <= k)}", file=sys.stderr)
                    return 1
        old_total, new_total = old_s * scale, new_s * scale
        per_rank = new_total / args.world
        print(f"{n:>8} {len(timed_rows):>14} {old_total:>19.1f}s {new_total:>15.1f}s {old_total / new_total:>5.1f}x "
              f"{per_rank:>21.2f}s {old_total / per_rank:>6.0f}x")
        del a32, v32
    return 0


if __name__ == "__main__":
    sys.exit(main())
