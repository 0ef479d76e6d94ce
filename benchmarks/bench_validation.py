"""Epoch-end validation throughput: the split read by DataLoader workers vs in the rank's own process.

A validation pass as the trainer runs it (``eval_loader`` + ``predict_probabilities``: every
clip's fbank and 10 frames from the shards, the finetuning model on all 10 frames) over a
staged synthetic split, with the recipe's ``--workers`` DataLoader workers (persistent, as in
training: their start-up is paid once per run, not per validation) and with none (the replaced
code, ``num_workers=0``: the rank decodes while the model waits). Clips per second of whole
passes and of the input pipeline alone, medians of ``--repeats`` interleaved passes; the
model is ``--model`` (tiny by default: on this CPU a Base forward would hide the input
pipeline entirely, as it does not on a GPU). Where the model runs on the CPU too, the workers
and the model share its cores; on a GPU node the model runs on the GPU while the workers decode.

    .venv/bin/python benchmarks/bench_validation.py [--clips 64] [--workers 2] [--repeats 3] [--model tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_loader import staged_train_split  # the same staged clips as the loader benchmark

from avsiam.config import resolve_recipe
from avsiam.data.datasets import EvalClips
from avsiam.eval.predict import eval_loader, predict_probabilities
from avsiam.launch.distributed import DistEnv
from avsiam.model import build_finetune_model_from_recipe


def decoded_per_second(loader) -> float:
    """Clips/s of the input pipeline alone (what the workers take off the rank's process)."""
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(loader.dataset) / (time.perf_counter() - start)


def clips_per_second(model, loader) -> tuple[float, dict[str, np.ndarray]]:
    start = time.perf_counter()
    probabilities = predict_probabilities(model, loader, multi_label=False)
    return len(loader.dataset) / (time.perf_counter() - start), probabilities


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    recipe = resolve_recipe(args.model, "finetune_vggsound")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-validation-") as tmp:
        root = Path(tmp)
        index = staged_train_split(root, args.clips)
        model = build_finetune_model_from_recipe(recipe, index.num_classes)
        dataset = EvalClips(index, "train", recipe)
        env = DistEnv(0, 1, 0)
        loaders = {
            "in the rank's process (before)": eval_loader(dataset, env, recipe.batch_size_per_gpu, 0),
            f"{args.workers} persistent workers": eval_loader(dataset, env, recipe.batch_size_per_gpu, args.workers, persistent=True),
        }
        next(iter(loaders[f"{args.workers} persistent workers"]))  # the workers start once per run
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        decoded: dict[str, list[float]] = {name: [] for name in loaders}
        outputs = {}
        for _ in range(args.repeats):
            for name, loader in loaders.items():
                rate, outputs[name] = clips_per_second(model, loader)
                rates[name].append(rate)
                decoded[name].append(decoded_per_second(loader))
        first, second = outputs.values()
        assert all(np.array_equal(first[head], second[head]) for head in first)  # the same work
    before = "in the rank's process (before)"
    base, base_decoded = statistics.median(rates[before]), statistics.median(decoded[before])
    print(f"validation clips/s, {args.model} model, {args.clips} clips (fbank + 10 frames each), median of {args.repeats}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'input pipeline':>34} {'pass':>8} {'ratio':>6} {'decoding only':>14} {'ratio':>6}")
    for name in loaders:
        rate, dec = statistics.median(rates[name]), statistics.median(decoded[name])
        print(f"{name:>34} {rate:8.1f} {rate / base:5.2f}x {dec:14.1f} {dec / base_decoded:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
