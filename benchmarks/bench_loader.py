"""Training-sample loading from WebDataset shards vs the per-file layout they replaced.

The same staged clips in two layouts: the shards of ``avsiam stage`` (one ``pread`` of a
sample's byte range per sample), and the one-file-per-clip layout of before (a 16 kHz wav and
10 JPEGs per clip in hashed folders: two random file opens per pretraining sample). The
per-file loader is :class:`PretrainClips` with its reads replaced by file reads, once with
the wav decoded by FFmpeg as before (``load_waveform``) and once with the staged-wav reader
(``decode_wav``), which separates what the layout gains from what the reader gains. All three
give identical tensors for the same keys (checked), so the rates compare the same work.

Rates are pretraining samples per second (fbank + one random frame of ten) over the sampler's
order, in this process and through a DataLoader with ``--workers`` workers, interleaved over
``--repeats`` rounds (medians).

    .venv/bin/python benchmarks/bench_loader.py [--clips 64] [--samples 256] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from avsiam.config import resolve_recipe
from avsiam.data.audio import decode_wav, load_waveform
from avsiam.data.datasets import PretrainClips
from avsiam.data.sampler import DistributedClipSampler
from avsiam.data.shards import AUDIO_MEMBER, FRAME_MEMBERS
from avsiam.data.staging import StagingRequest, stage_dataset
from avsiam.data.video import load_frame
from avsiam.synthetic import generate_synthetic_dataset


class _PerFileSample:
    def __init__(self, folder: Path) -> None:
        self.folder = folder


class PerFilePretrainClips(PretrainClips):
    """The previous layout: ``root/audio/<hh>/<id>.wav`` and ``root/frames/<hh>/<id>/<k>.jpg``."""

    def __init__(self, index, split, recipe, root: Path, ffmpeg_wav: bool) -> None:
        super().__init__(index, split, recipe)
        self.root, self.ffmpeg_wav = root, ffmpeg_wav

    def _sample(self, index: int) -> _PerFileSample:
        clip_id = self.index.clip_id(self.rows[index])
        return _PerFileSample(self.root / clip_id[:2] / clip_id)

    def _waveform(self, sample: _PerFileSample) -> torch.Tensor:
        path = sample.folder / "audio.wav"
        return load_waveform(path) if self.ffmpeg_wav else decode_wav(path.read_bytes(), str(path))

    def _frame(self, sample: _PerFileSample, frame_no: int) -> torch.Tensor:
        return load_frame(sample.folder / f"{frame_no}.jpg")


def write_per_file_layout(index, root: Path) -> None:
    reader = index.reader()
    for row in range(len(index.clips)):
        sample = index.read_sample(reader, row)
        clip_id = index.clip_id(row)
        folder = root / clip_id[:2] / clip_id
        folder.mkdir(parents=True)
        (folder / "audio.wav").write_bytes(sample.media(AUDIO_MEMBER))
        for k, member in enumerate(FRAME_MEMBERS):
            (folder / f"{k}.jpg").write_bytes(sample.media(member))


def staged_train_split(root: Path, clips: int):
    """The index of ``clips`` synthetic clips of 8 classes staged as one train split (32 a shard)."""
    ds = generate_synthetic_dataset(root / "raw", 8, clips, seed=0, workers=2, progress=False)
    return stage_dataset(StagingRequest(labels=[ds.labels_csv], out=root / "staged", videos=ds.videos_dir, split="train",
                                        val_fraction=0, clips_per_shard=32)).index


def rate_in_process(dataset, keys) -> float:
    start = time.perf_counter()
    for key in keys:
        dataset[key]
    return len(keys) / (time.perf_counter() - start)


def rate_with_loader(dataset, sampler, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=workers, drop_last=True)
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["index"])
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    recipe = resolve_recipe("base", "pretrain_as2m")
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root = Path(tmp)
        index = staged_train_split(root, args.clips)
        write_per_file_layout(index, root / "per_file")
        datasets = {
            "shards": PretrainClips(index, "train", recipe),
            "per-file, FFmpeg wav (before)": PerFilePretrainClips(index, "train", recipe, root / "per_file", True),
            "per-file, staged-wav reader": PerFilePretrainClips(index, "train", recipe, root / "per_file", False),
        }
        sampler = DistributedClipSampler(len(datasets["shards"]), seed=0)
        keys = [key for _ in range(-(-args.samples // args.clips)) for key in sampler][: args.samples]
        reference = datasets["shards"][keys[0]]
        for dataset in datasets.values():  # the same work: identical tensors for the same key
            item = dataset[keys[0]]
            assert torch.equal(item["audio"], reference["audio"]) and torch.equal(item["frame"], reference["frame"])
        in_process = {name: [] for name in datasets}
        loaded = {name: [] for name in datasets}
        for _ in range(args.repeats):
            for name, dataset in datasets.items():
                in_process[name].append(rate_in_process(dataset, keys))
                loaded[name].append(rate_with_loader(dataset, sampler, args.workers))
    base = statistics.median(in_process["per-file, FFmpeg wav (before)"])
    base_loader = statistics.median(loaded["per-file, FFmpeg wav (before)"])
    print(f"pretraining samples/s ({args.clips} clips, {args.samples} samples a round, median of {args.repeats})")
    print(f"{'layout':<32}{'1 process':>12}{'ratio':>8}{f'{args.workers} workers':>12}{'ratio':>8}")
    for name in datasets:
        a, b = statistics.median(in_process[name]), statistics.median(loaded[name])
        print(f"{name:<32}{a:>12.1f}{a / base:>8.2f}{b:>12.1f}{b / base_loader:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
