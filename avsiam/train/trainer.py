"""The training loop shared by pretraining and finetuning, on DeepSpeed.

One code path from one CPU process to 64 GPUs: the process joins whatever launcher started it
(``avsiam.launch.distributed``), wraps the model in ``deepspeed.initialize`` (ZeRO 0-3, fp32 /
fp16 / bf16 from the recipe) and trains epoch by epoch:

* the lr of every parameter group follows the recipe's per-epoch step decay (after an optional
  linear warmup), set by this loop before every step (DeepSpeed's scheduler hooks would skip
  fp16 overflow steps);
* every ``checkpoint_every`` optimizer steps and at every epoch end all ranks save a DeepSpeed
  checkpoint whose ``client_state`` holds the position (epoch, step in epoch, sampler state),
  the tracking run id, the elapsed time and the selection history; the last ``keep_checkpoints``
  are kept, plus the best epoch's;
* a run started in an output folder that has a checkpoint continues from ``latest``, and
  (with per-step RNG derived from the step number and per-sample augmentation seeds from the
  sampler) reproduces the loss sequence of an uninterrupted run;
* finetuning validates on the held-out ``val`` split at each epoch end and selects the best
  epoch; pretraining reports retrieval recall@k on it;
* at the end the selected checkpoint is consolidated with DeepSpeed's ``zero_to_fp32`` into
  ``weights.safetensors`` (fp32), loadable at any world size;
* a diverged run (``avsiam.train.divergence``) stops at the step it diverged on every rank,
  writes no weights or summary, and its tracking run ends FAILED, as on any other exception.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from avsiam import __version__
from avsiam.config import RESUMABLE_FIELDS, ConfigError, LrSchedule, RecipeConfig
from avsiam.data.formats import class_labels_csv
from avsiam.data.index import CLASSES_NAME, load_index
from avsiam.data.sampler import DistributedClipSampler, mix_seed
from avsiam.launch.distributed import DistEnv, all_reduce_mean, barrier, broadcast_object, init_distributed, on_cpu
from avsiam.tracking import flatten_params, make_tracker, redact_credentials
from avsiam.train import checkpointing
from avsiam.train.divergence import DivergenceGuard, from_deepspeed
from avsiam.train.ds_config import deepspeed_config
from avsiam.train.metrics_log import JsonlLog, StepTimer, peak_memory_mb
from avsiam.train.tasks import DTYPES, make_task, step_context

log = logging.getLogger("avsiam.train")


class ResumeMismatch(ConfigError):
    """The output folder holds a checkpoint of a differently configured run."""


def write_config(recipe: RecipeConfig, output: Path) -> Path:
    """Write the resolved configuration to ``output/config.yaml`` before training starts; a
    folder with checkpoints of a different configuration is refused, not silently resumed."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "config.yaml"
    new = recipe.model_dump(mode="json")
    if path.exists() and checkpointing.latest_tag(output / "checkpoints"):
        old = yaml.safe_load(path.read_text()) or {}
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_FIELDS)
        if changed:
            raise ResumeMismatch(
                f"{output} holds checkpoints of a run with a different configuration (changed: {', '.join(changed)}); "
                "use a new --output or remove the folder"
            )
    path.write_text(yaml.safe_dump(new, sort_keys=False))
    return path


def train(recipe: RecipeConfig, data: str | Path, output: str | Path, init_weights: str | None = None) -> dict[str, Any]:
    """Train ``recipe`` on the staged dataset ``data`` into ``output``; returns the summary."""
    import deepspeed

    env = init_distributed()
    output = Path(output)
    cpu = on_cpu()
    device = torch.device("cpu") if cpu else torch.device("cuda", env.local_rank)
    dtype = DTYPES[recipe.precision]
    if cpu and recipe.precision == "fp16":
        raise ConfigError("fp16 is not supported on the CPU (DeepSpeed's CPU accelerator); use precision=fp32 or bf16")
    if env.is_main:
        write_config(recipe, output)
    barrier()
    checkpoint_dir = output / "checkpoints"
    index = load_index(data)
    if env.is_main:
        index.check_shards()  # O(shards), before the other ranks wait in deepspeed.initialize
    task = make_task(recipe, index)

    torch.manual_seed(mix_seed(recipe.seed, 0))  # identical initial weights on every rank
    model = task.build_model(init_weights)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=task.param_groups(model), config=deepspeed_config(recipe, env.world_size, cpu)
    )
    state: dict[str, Any] = {}
    resume_tag = checkpointing.latest_tag(checkpoint_dir)
    if resume_tag:
        _, state = engine.load_checkpoint(str(checkpoint_dir), tag=resume_tag)
        state = state or {}
        log.info("resuming from %s/%s at epoch %s step %s", checkpoint_dir, resume_tag, state.get("epoch"), state.get("global_step"))

    dataset = task.train_dataset()
    val_loader = task.val_loader(env)
    sampler = DistributedClipSampler(
        len(dataset), world_size=env.world_size, rank=env.rank, seed=recipe.seed, weights=task.sampler_weights(dataset)
    )
    per_step = recipe.batch_size_per_gpu * recipe.gradient_accumulation_steps
    steps_per_epoch = sampler.samples_per_rank // per_step
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{index.location}: the train split ({len(dataset)} clips over {env.world_size} ranks) is smaller than one "
            f"optimizer step ({per_step} clips per rank); lower batch_size_per_gpu"
        )
    total_steps = recipe.epochs * steps_per_epoch if recipe.max_steps is None else min(recipe.max_steps, recipe.epochs * steps_per_epoch)

    tracker = make_tracker(
        env.rank, output, run_id=state.get("tracking_run_id"), run_name=f"{recipe.stage}-{recipe.model}-{recipe.recipe}",
        tags={"avsiam.stage": recipe.stage, "avsiam.recipe": recipe.recipe, "avsiam.model": recipe.model,
              "avsiam.version": __version__, "avsiam.dataset_digest": index.dataset_digest},
    )
    try:
        tracker.log_params({**flatten_params(recipe.model_dump(mode="json")), "world_size": env.world_size,
                            "steps_per_epoch": steps_per_epoch, "dataset_digest": index.dataset_digest})
        if task.load_report is not None and env.is_main:
            report = output / "init_load_report.txt"
            report.write_text(f"{task.load_report}\n")
            tracker.set_tags(task.load_report.tags())
            tracker.log_artifact(report)

        epoch = int(state.get("epoch", 1))
        step_in_epoch = int(state.get("step_in_epoch", 0))
        global_step = int(state.get("global_step", 0))
        history: list[dict[str, Any]] = list(state.get("history", []))
        elapsed_before = float(state.get("elapsed_seconds", 0.0))
        started = time.perf_counter()
        metrics_log = JsonlLog(output / "metrics.jsonl", resume_after_step=global_step if resume_tag else None) if env.is_main else None
        guard = DivergenceGuard(recipe.precision)
        guard.load_state_dict(state.get("divergence", {}))

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - started

        def save(next_epoch: int, next_step: int) -> str:
            tracker.flush()  # the steps a resume will not redo are in MLflow or the spool first
            client_state = {
                "epoch": next_epoch, "step_in_epoch": next_step, "global_step": global_step,
                "sampler": {"epoch": next_epoch, "start": next_step * per_step, "seed": recipe.seed},
                "rng": {"torch": torch.get_rng_state()},  # informational: step RNG is derived, not stateful
                "tracking_run_id": tracker.run_id, "elapsed_seconds": elapsed(), "world_size": env.world_size,
                "history": history, "divergence": guard.state_dict(),
            }
            tag = checkpointing.save(engine, checkpoint_dir, global_step, client_state)
            checkpointing.prune(checkpoint_dir, recipe.keep_checkpoints, _protected(history, task.selection_metric), env)
            return tag

        # One loader for the whole run: its workers persist across epochs (the sampler runs in this
        # process, so set_epoch before each iter() still decides every epoch's order).
        loader = DataLoader(dataset, batch_size=recipe.batch_size_per_gpu, sampler=sampler, num_workers=recipe.num_workers,
                            drop_last=True, pin_memory=not cpu, persistent_workers=recipe.num_workers > 0)
        engine.train()
        schedule = LrSchedule.of(recipe)
        while epoch <= recipe.epochs and global_step < total_steps:
            sampler.set_epoch(epoch, start=step_in_epoch * per_step)
            batches = iter(loader)
            timer = StepTimer()
            while step_in_epoch < steps_per_epoch and global_step < total_steps:
                lr = schedule.step_lr(epoch, global_step)
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                losses, extras = [], {}
                for micro in range(recipe.gradient_accumulation_steps):
                    batch = next(batches)
                    timer.data_ready()
                    ctx = step_context(recipe.seed, env, global_step, micro, device, dtype)
                    loss, extras = task.step_loss(engine, batch, ctx)
                    engine.backward(loss)
                    try:
                        engine.step()
                    except Exception as exc:
                        if diverged := from_deepspeed(exc, global_step + 1, lr):
                            raise diverged from exc
                        raise
                    losses.append(loss.detach().float())
                    timer.compute_done()
                global_step += 1
                step_in_epoch += 1
                step_seconds, wait = timer.lap()
                mean_loss = float(all_reduce_mean(torch.stack(losses).mean()))
                record = {
                    "step": global_step, "epoch": epoch, "loss": mean_loss, "lr": lr,
                    "samples_per_s": per_step * env.world_size / step_seconds, "step_time_s": step_seconds,
                    "data_wait_s": wait, "peak_memory_mb": peak_memory_mb(cpu), **extras,
                }
                if metrics_log:
                    metrics_log.write(record)
                numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
                tracker.log_metrics(numeric, step=global_step)
                grad_norm = engine.get_global_grad_norm()  # a tensor under ZeRO 1/2, None where not computed
                guard.check_step(global_step, mean_loss, lr, None if grad_norm is None else float(grad_norm))
                if recipe.checkpoint_every and global_step % recipe.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                    save(epoch, step_in_epoch)
                timer.restart()
            if step_in_epoch < steps_per_epoch:  # stopped by max_steps inside the epoch
                save(epoch, step_in_epoch)
                break
            summary = {"epoch": epoch, "global_step": global_step, "tag": checkpointing.step_tag(global_step)}
            if val_loader is not None:
                summary.update(task.validate(engine.module, val_loader, step_context(recipe.seed, env, global_step, 0, device, dtype), env))
                tracker.log_metrics({f"val_{k}": v for k, v in summary.items() if isinstance(v, float)}, step=global_step)
            history.append(summary)
            epoch, step_in_epoch = epoch + 1, 0
            save(epoch, 0)

        return _finish(recipe, task, env, engine, tracker, output, checkpoint_dir, history, global_step, elapsed(), index)
    except BaseException as exc:
        # The run's end, whatever ended it: a divergence, a bug, a lost rank (Ctrl-C: KILLED).
        tracker.set_tags({"avsiam.failure": redact_credentials(f"{type(exc).__name__}: {exc}")})
        tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _protected(history: list[dict[str, Any]], metric: str) -> set[str]:
    best = _best_epoch(history, metric)
    return {best["tag"]} if best else set()


def _best_epoch(history: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    scored = [h for h in history if metric in h]
    return max(scored, key=lambda h: h[metric]) if scored else None


def _finish(recipe, task, env: DistEnv, engine, tracker, output: Path, checkpoint_dir: Path, history, global_step: int,
            elapsed_seconds: float, index) -> dict[str, Any]:
    """Consolidate the selected checkpoint, write the summary, close the tracking run."""
    barrier()
    best = _best_epoch(history, task.selection_metric) if recipe.stage == "finetune" else None
    tag = best["tag"] if best else checkpointing.latest_tag(checkpoint_dir)
    weights = output / "weights.safetensors"
    gpu_hours = elapsed_seconds * env.world_size / 3600.0
    summary: dict[str, Any] = {
        "stage": recipe.stage, "model": recipe.model, "recipe": recipe.recipe, "global_step": global_step,
        "weights": str(weights.resolve()), "checkpoint": f"{checkpoint_dir.resolve()}/{tag}",
        "selected_epoch": best["epoch"] if best else (history[-1]["epoch"] if history else None),
        "selection_metric": f"val_{task.selection_metric}" if best else None,
        "gpu_hours": gpu_hours, "wall_seconds": elapsed_seconds, "world_size": env.world_size,
        "dataset_digest": index.dataset_digest, "tracking_run_id": tracker.run_id, "history": history,
    }
    if env.is_main:
        checkpointing.consolidate(checkpoint_dir, tag, weights, recipe.zero_stage)
        if recipe.stage == "finetune":
            # The weights' class list beside them: with config.yaml, what labelling new clips needs.
            (output / CLASSES_NAME).write_text(class_labels_csv(index.classes))
        if history:
            summary["final_validation"] = (best or history[-1])
        (output / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        tracker.log_metrics({"gpu_hours": gpu_hours}, step=global_step)
        tracker.set_tags({"avsiam.weights": str(weights.resolve()), "avsiam.checkpoint": summary["checkpoint"]})
        tracker.finish("FINISHED")
    barrier()
    return broadcast_object(summary)
