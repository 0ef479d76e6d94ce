"""Multi-ratio audio masking: the vectorised masking vs a per-sample Python loop.

The loop is the published recipe: per clip, ``random.sample`` picks the time columns and
frequency rows to mark, the clip's noise is built, then each ratio chunk is argsorted. Both
produce the kept-token indices of a batch split into one bucket per mask ratio.

    .venv/bin/python benchmarks/bench_masking.py [--batch 96] [--repeats 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from avsiam.model.masking import (
    MARKED_NOISE_OFFSET,
    TF_MARKED_FRACTION,
    keep_lowest,
    num_kept,
    ratio_buckets,
    time_frequency_noise,
)

RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8)
GRID = (8, 64)  # (frequency, time) patches of a 128 x 1024 fbank at patch 16


def per_sample_loop(batch: int, device: torch.device) -> list[torch.Tensor]:
    freq, time_ = GRID
    perm = torch.randperm(batch).tolist()
    size = -(-batch // len(RATIOS))  # torch.chunk's chunk size
    kept = []
    for k, ratio in enumerate(RATIOS):
        clips = perm[k * size : (k + 1) * size]
        if not clips:
            continue
        rows = []
        for _ in clips:
            noise = torch.rand(freq, time_, device=device)
            noise[:, random.sample(range(time_), int(time_ * ratio * TF_MARKED_FRACTION))] = MARKED_NOISE_OFFSET
            noise[random.sample(range(freq), int(freq * ratio * TF_MARKED_FRACTION)), :] = MARKED_NOISE_OFFSET
            rows.append(noise.flatten())
        kept.append(torch.stack(rows).argsort(dim=1)[:, : num_kept(freq * time_, ratio)])
    return kept


def vectorised(batch: int, device: torch.device) -> list[torch.Tensor]:
    kept = []
    for ratio, clips in zip(RATIOS, ratio_buckets(batch, len(RATIOS), device=device), strict=True):
        if clips.shape[0] and ratio > 0:
            noise = time_frequency_noise(clips.shape[0], GRID, ratio, device=device)
            kept.append(keep_lowest(noise, num_kept(GRID[0] * GRID[1], ratio)))
    return kept


def timed(fn, batch: int, device: torch.device, repeats: int) -> float:
    fn(batch, device)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    random.seed(0)
    loop = timed(per_sample_loop, args.batch, device, args.repeats)
    fast = timed(vectorised, args.batch, device, args.repeats)
    print(f"audio tf masking, batch {args.batch}, ratios {RATIOS}, device {device}, {torch.get_num_threads()} threads")
    print(f"  per-sample loop (published): {loop * 1e3:8.2f} ms")
    print(f"  vectorised:                  {fast * 1e3:8.2f} ms")
    print(f"  speed-up:                    {loop / fast:8.1f}x")


if __name__ == "__main__":
    main()
