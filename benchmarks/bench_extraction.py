"""Feature-extraction throughput: fbank (load_fbank) and 10-frame extraction per clip.

Frame extraction is timed with seeking (``method="seek"``) and with the published approach of
decoding every frame (``method="decode_all"``), interleaved in the same run so both see the
same machine load; the speed-up is decode_all time / seek time. Besides the two real clips,
a synthetic long clip (a full-length video rather than a 10 s cut) shows what seeking saves
when most of the file lies outside the sampled span.

    .venv/bin/python benchmarks/bench_extraction.py [--repeats 5] [--long-seconds 60] [clip ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch

from avsiam.data.audio import load_fbank
from avsiam.data.video import extract_frames

REAL = Path(__file__).resolve().parents[2] / "shared/data/real"
DEFAULT_CLIPS = [REAL / "00W1lcxW-WU_40.000.mp4", REAL / "KlsG1EnBEjc_000361.mp4"]


def median_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each run, the runs interleaved so that all see the same machine load."""
    for run in runs.values():
        run()  # warm-up: first-call costs (kernels, mel banks, codec tables) are not throughput
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def write_long_clip(path: Path, seconds: int, fps: int = 25, width: int = 640, height: int = 360) -> None:
    """A video-only clip of a moving gradient with a keyframe every 2 s (a common YouTube GOP)."""
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x, y, x + y], axis=-1).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"g": str(2 * fps), "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(seconds * fps):
            image = gradient + np.uint8(k % 256)  # wraps around: the picture keeps changing
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def describe(path: Path) -> str:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return f"{stream.codec_context.width}x{stream.codec_context.height}, {container.duration / 1e6:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", nargs="*", type=Path, default=DEFAULT_CLIPS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--long-seconds", type=int, default=60, help="length of the synthetic long clip (0: none)")
    # DataLoader workers run torch single-threaded; on a busy machine more intra-op threads
    # mostly wait for each other.
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        video_clips = list(args.clips)
        if args.long_seconds:
            long_clip = Path(tmp) / f"synthetic_{args.long_seconds}s_gop2s.mp4"
            write_long_clip(long_clip, args.long_seconds)
            video_clips.append(long_clip)

        print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (median), PyAV {av.__version__}\n")
        header = f"{'clip':34} {'video':18} {'fbank/s':>8} {'seek/s':>8} {'all/s':>8} {'speed-up':>9}"
        print(header)
        print("-" * len(header))
        for path in video_clips:
            runs = {
                "seek": partial(extract_frames, path, method="seek"),
                "decode_all": partial(extract_frames, path, method="decode_all"),
            }
            if path in args.clips:  # the synthetic clip has no audio
                runs["fbank"] = partial(load_fbank, path)
            seconds = median_seconds(runs, args.repeats)
            fbank = f"{1 / seconds['fbank']:8.2f}" if "fbank" in seconds else f"{'-':>8}"
            speed_up = seconds["decode_all"] / seconds["seek"]
            print(
                f"{path.name:34} {describe(path):18} {fbank} {1 / seconds['seek']:8.2f} "
                f"{1 / seconds['decode_all']:8.2f} {speed_up:8.2f}x"
            )
        print("\nfbank/s: load_fbank clips/s; seek/s, all/s: extract_frames clips/s (10 frames, 224x224)")


if __name__ == "__main__":
    main()
