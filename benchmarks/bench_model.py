"""Pretraining step time next to analytic FLOPs, so utilisation can be read off.

Times forward + backward of the pretraining model (contrastive + MAE, one summed loss) for each
size at its batch, and prints the analytic FLOPs per sample of every step kind for the paper's
sizes (``avsiam.model.flops``).

    .venv/bin/python benchmarks/bench_model.py                       # tiny@8 and base@2 on CPU
    .venv/bin/python benchmarks/bench_model.py --runs base:64 --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from avsiam.config import arch_config
from avsiam.model import build_pretrain_model, flops_summary


def step_seconds(size: str, batch: int, device: torch.device, amp: str | None, steps: int) -> float:
    arch = arch_config(size)
    model = build_pretrain_model(arch).to(device)
    audio = torch.randn(batch, arch.audio_frames, arch.mel_bins, device=device)
    frames = torch.randn(batch, 3, arch.img_size, arch.img_size, device=device)
    autocast = (
        torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])
        if amp
        else contextlib.nullcontext()
    )
    times = []
    for step in range(steps + 1):  # the first step warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model(audio, frames)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["tiny:8", "base:2"], help="size:batch pairs to time")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    print(f"device {device}, {torch.get_num_threads()} CPU threads, amp {args.amp or 'off (fp32)'}")
    print(f"{'size':>6} {'batch':>5} {'step s':>9} {'GFLOP/sample':>13} {'achieved TFLOP/s':>17}")
    for run in args.runs:
        size, batch = run.split(":")
        seconds = step_seconds(size, int(batch), device, args.amp, args.steps)
        per_sample = flops_summary(arch_config(size))["pretrain_train"]
        achieved = per_sample * int(batch) / seconds / 1e12
        print(f"{size:>6} {batch:>5} {seconds:9.3f} {per_sample / 1e9:13.1f} {achieved:17.4f}")

    print("\nanalytic GFLOP per sample (5 ratios 0-0.8, MAE 75 % with stop-gradient, 10 eval frames)")
    summaries = {size: flops_summary(arch_config(size)) for size in ("base", "large", "huge")}
    print(f"{'':>28}" + "".join(f"{size:>10}" for size in summaries))
    for key in summaries["base"]:
        print(f"{key:>28}" + "".join(f"{s[key] / 1e9:10.1f}" for s in summaries.values()))


if __name__ == "__main__":
    main()
