"""GPU check: real DeepSpeed pretraining steps at the paper's per-GPU batch, in bf16 and in fp16
with dynamic loss scaling, against the analytic FLOPs and the planner's memory prediction.

Each precision builds what ``avsiam train pretrain`` builds (the recipe's model, parameter
groups, DeepSpeed config and step loss: ``avsiam.train``), runs ``--warmup`` untimed and
``--steps`` timed optimizer steps on one device with random inputs of the recipe's shapes (the
input pipeline is ``bench_loader.py``'s), and prints

* samples/s and step time (median);
* model-FLOPs utilisation: the planner's analytic FLOPs per sample (``avsiam.plan.compute``,
  no recomputation) x samples/s over the card's dense peak for that precision;
* peak memory (``torch.cuda.max_memory_allocated``) next to the planner's model states +
  activations for one GPU (``avsiam plan --gpus 1``, fused attention) and its total with margins;
* for fp16, the loss scale reached and the overflow steps DeepSpeed skipped;
* on a GPU, the rate of a large matrix product in the same precision measured on the card
  (``--no-measure-peak`` skips it), and the MFU against that: the datasheet peak is a lead,
  the measured one what this card and this PyTorch can reach.

``benchmarks/gpu_check.sh`` runs Base, Large and Huge in one go on a lent device.

One process, one device; on an H100/H200-class card the whole check (model builds, DeepSpeed's
first FusedAdam build included) takes 2-4 minutes:

    .venv/bin/python benchmarks/gpu_check.py                       # base, bf16 and fp16, batch 96
    .venv/bin/python benchmarks/gpu_check.py --json gpu_check.json --steps 20
    .venv/bin/python benchmarks/gpu_check.py --torch-adam      # a device without nvcc

``--device cpu --model tiny --precisions fp32 --batch 2`` runs the same code on the CPU (no
MFU without ``--peak-tflops``, no GPU memory): what the tests do.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from avsiam.config import resolve_recipe
from avsiam.launch.distributed import init_distributed, on_cpu
from avsiam.plan.compute import train_flops_per_sample
from avsiam.plan.hardware import gpu_of_device, gpu_spec
from avsiam.plan.planner import capacity_plan
from avsiam.train.ds_config import deepspeed_config
from avsiam.train.tasks import DTYPES, PretrainTask, step_context

GIB = 2**30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(dtype: torch.dtype, device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """The card's dense matrix rate in ``dtype``: an n x n x n product on random data (zeros
    run faster than real data), timed with CUDA events after warm-up, median of ``repeats``."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began.record()
        a @ b
        ended.record()
        ended.synchronize()
        times.append(began.elapsed_time(ended) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times) / 1e12


def profile_steps(steps: int, task, engine, batch, recipe, env, device: torch.device, precision: str) -> dict:
    """Where a step's time goes: ``steps`` more steps under torch.profiler. Prints the operators
    by device time and returns the kernels' time per step; over the unprofiled step time that is
    the device's busy share (a low share: the step waits on the host, its Python and launches)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for step in range(steps):
            ctx = step_context(recipe.seed, env, 10_000 + step, 0, device, DTYPES[precision])
            loss, _ = task.step_loss(engine, batch, ctx)
            engine.backward(loss)
            engine.step()
        synchronize(device)
    events = prof.key_averages()
    print(f"-- {recipe.model} {precision}: {steps} profiled steps, top operators by {'device' if on_gpu else 'CPU'} time")
    print(events.table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total", row_limit=25))
    # Kernels only: an operator's row repeats the time of the kernels it launched (torch's table total).
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    return {"steps": steps, "device_s_per_step": kernel_us / 1e6 / steps if on_gpu else None,
            "kernel_launches_per_step": sum(e.count for e in events if e.device_type == DeviceType.CUDA) / steps if on_gpu else None}


def check_precision(args, precision: str, env, device: torch.device, gpu) -> dict:
    import deepspeed

    overrides = [("precision", precision)] + ([("batch_size_per_gpu", args.batch)] if args.batch else [])
    recipe = resolve_recipe(args.model, "pretrain_as2m", overrides)
    task = PretrainTask(recipe, index=None)  # the index is only read by the data and validation
    torch.manual_seed(0)
    model = task.build_model(None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = deepspeed_config(recipe, 1, device.type == "cpu")
    if args.torch_adam:  # no FusedAdam JIT build (it needs nvcc); the step runs torch's Adam
        config["optimizer"]["params"]["torch_adam"] = True
    engine, *_ = deepspeed.initialize(model=model, model_parameters=task.param_groups(model), config=config)
    b, arch = recipe.batch_size_per_gpu, recipe.arch
    batch = {"audio": torch.randn(b, arch.audio_frames, arch.mel_bins), "frame": torch.randn(b, 3, arch.img_size, arch.img_size)}
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        synchronize(device)
        began = time.perf_counter()
        ctx = step_context(recipe.seed, env, step, 0, device, DTYPES[precision])
        loss, _ = task.step_loss(engine, batch, ctx)
        engine.backward(loss)
        engine.step()
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - began)
            losses.append(float(loss.detach().float()))
    if args.profile:
        result_profile = profile_steps(args.profile, task, engine, batch, recipe, env, device, precision)
    step_s = statistics.median(times)
    samples_per_s = b / step_s
    flops = train_flops_per_sample(recipe)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (gpu.peak_flops.get(precision) if gpu else None)
    result = {
        "model": recipe.model, "recipe": recipe.recipe, "precision": precision, "batch_per_gpu": b,
        "zero_stage": recipe.zero_stage, "optimizer": "torch Adam" if config["optimizer"]["params"].get("torch_adam") else "FusedAdam",
        "steps": args.steps, "step_s": step_s, "samples_per_s": samples_per_s,
        "flops_per_sample": flops, "achieved_tflops": flops * samples_per_s / 1e12,
        "mfu": flops * samples_per_s / peak if peak else None,
        "losses_finite": all(map(math.isfinite, losses)),
    }
    if device.type == "cuda" and args.measure_peak:
        measured = matmul_tflops(DTYPES[precision], device)
        result.update({"measured_matmul_tflops": measured, "mfu_of_measured": result["achieved_tflops"] / measured})
    if device.type == "cuda":
        plan = capacity_plan(recipe, gpu, num_gpus=1)
        result.update({
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "planned_states_plus_activations_gib": (plan["model_state_bytes_per_gpu"] + plan["activation_bytes_per_gpu"]) / GIB,
            "planned_required_gib": plan["required_bytes_per_gpu"] / GIB,
        })
    if args.profile:
        busy = result_profile["device_s_per_step"]
        result["profile"] = {**result_profile, "device_busy_share": busy / step_s if busy else None}
    if precision == "fp16":
        result.update({"loss_scale": float(engine.optimizer.cur_scale), "skipped_steps": int(engine.skipped_steps)})
    del engine, model
    gc.collect()  # the engine holds reference cycles: free its memory before the next precision
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def print_table(results: list[dict]) -> None:
    def cell(value, fmt: str) -> str:
        width = int(fmt.split(".")[0])
        return f"{'-':>{width}}" if value is None else format(value, fmt)

    print(f"{'model':>6} {'prec':>5} {'batch':>5} {'step s':>8} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'GEMM TF/s':>9} {'of GEMM':>7} {'peak GiB':>9} {'plan GiB':>9} {'plan+margin':>12} {'fp16 scale / skipped':>21}")
    for r in results:
        fp16 = f"{r['loss_scale']:.0f} / {r['skipped_steps']}" if "loss_scale" in r else "-"
        print(f"{r['model']:>6} {r['precision']:>5} {r['batch_per_gpu']:>5} {r['step_s']:8.3f} {r['samples_per_s']:10.1f} "
              f"{r['achieved_tflops']:8.2f} {cell(r['mfu'], '6.1%')} {cell(r.get('measured_matmul_tflops'), '9.1f')} "
              f"{cell(r.get('mfu_of_measured'), '7.1%')} {cell(r.get('peak_memory_gib'), '9.2f')} "
              f"{cell(r.get('planned_states_plus_activations_gib'), '9.2f')} {cell(r.get('planned_required_gib'), '12.2f')} {fp16:>21}")
    for r in results:
        p = r.get("profile") or {}
        if p.get("device_s_per_step"):
            print(f"{r['model']} {r['precision']}: kernels {p['device_s_per_step'] * 1e3:.0f} ms of a {r['step_s'] * 1e3:.0f} ms step "
                  f"({p['device_busy_share']:.0%} busy), {p['kernel_launches_per_step']:.0f} kernel launches per step")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=None, help="clips per GPU (default: the recipe's, the paper's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gpu", default=None, help="the planner's GPU name (default: detected from the device)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the peak to compute MFU against (default: the card's)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--torch-adam", action="store_true",
                        help="torch's Adam instead of DeepSpeed's FusedAdam (whose first use JIT-builds it with nvcc)")
    parser.add_argument("--no-measure-peak", dest="measure_peak", action="store_false",
                        help="skip timing the card's matrix product (MFU against the datasheet only)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many more steps (torch.profiler): the top operators and the device's busy share")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    # The device is the one DeepSpeed's accelerator finds, as in training.
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --device cpu runs the check on the CPU", file=sys.stderr)
        return 2
    if args.device == "cpu" and torch.cuda.is_available():
        print("gpu_check: a CUDA device is visible; set CUDA_VISIBLE_DEVICES= to check on the CPU", file=sys.stderr)
        return 2
    env = init_distributed()
    device = torch.device("cpu") if on_cpu() else torch.device("cuda", env.local_rank)
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = gpu_spec(args.gpu) if args.gpu else gpu_of_device(props.name, props.total_memory)
        print(f"device {props.name} ({props.total_memory / GIB:.0f} GiB), planned as {gpu.name}; "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    results = [check_precision(args, precision, env, device, gpu) for precision in args.precisions]
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    bad = [r["precision"] for r in results if not r["losses_finite"]]
    if bad:
        print(f"gpu_check: non-finite losses in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
