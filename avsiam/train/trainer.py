"""The training loop shared by pretraining and finetuning, on DeepSpeed.

One code path from one CPU process to 64 GPUs: the process joins whatever launcher started it
(``avsiam.launch.distributed``), wraps the model in ``deepspeed.initialize`` (ZeRO 0-3, fp32 /
fp16 / bf16 from the recipe) and trains epoch by epoch:

* the lr of every parameter group follows the recipe's per-epoch step decay (after an optional
  linear warmup), set by this loop before every step (DeepSpeed's scheduler hooks would skip
  fp16 overflow steps);
* all ranks save a DeepSpeed checkpoint when the :class:`~avsiam.train.state.CheckpointPolicy`
  says so (every epoch end, every ``checkpoint_every`` optimizer steps, where ``max_steps``
  stops a run), its ``client_state`` the :class:`~avsiam.train.state.TrainState` (position,
  selection history, tracking run id, elapsed time); the last ``keep_checkpoints`` are kept,
  plus the best epoch's;
* a run started in an output folder that has a checkpoint continues from ``latest``, and
  (with per-step RNG derived from the step number and per-sample augmentation seeds from the
  sampler) reproduces the loss sequence of an uninterrupted run;
* finetuning validates on the held-out ``val`` split at each epoch end and selects the best
  epoch; pretraining reports retrieval recall@k on it;
* at the end the selected checkpoint is consolidated with DeepSpeed's ``zero_to_fp32`` into
  ``weights.safetensors`` (fp32), loadable at any world size, and the run's
  :class:`~avsiam.train.state.RunSummary` is written to ``summary.json``;
* a diverged run (``avsiam.train.divergence``) stops at the step it diverged on every rank,
  writes no weights or summary, and its tracking run ends FAILED, as on any other exception.
"""

from __future__ import annotations

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
from avsiam.launch.distributed import all_reduce_mean, barrier, broadcast_object, init_distributed, on_cpu
from avsiam.tracking import flatten_params, make_tracker, redact_credentials
from avsiam.train import checkpointing
from avsiam.train.divergence import DivergenceGuard, from_deepspeed
from avsiam.train.ds_config import deepspeed_config
from avsiam.train.metrics_log import JsonlLog, StepTimer, peak_memory_mb, process_age_seconds
from avsiam.train.state import CheckpointPolicy, RunSummary, TrainState
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


class Trainer:
    """One rank's part of a training run: the engine and its task, the data, the state, the
    checkpoint policy, the lr schedule and the tracking. ``fit()`` is the whole procedure."""

    def __init__(self, recipe: RecipeConfig, data: str | Path, output: str | Path, init_weights: str | None = None) -> None:
        import deepspeed

        self.recipe, self.output = recipe, Path(output)
        self.env = env = init_distributed()
        self.cpu = on_cpu()
        self.device = torch.device("cpu") if self.cpu else torch.device("cuda", env.local_rank)
        self.dtype = DTYPES[recipe.precision]
        if self.cpu and recipe.precision == "fp16":
            raise ConfigError("fp16 is not supported on the CPU (DeepSpeed's CPU accelerator); use precision=fp32 or bf16")
        if env.is_main:
            write_config(recipe, self.output)
        barrier()
        self.checkpoint_dir = self.output / "checkpoints"
        self.index = index = load_index(data)
        if env.is_main:
            index.check_shards()  # O(shards), before the other ranks wait in deepspeed.initialize
        self.task = task = make_task(recipe, index)

        torch.manual_seed(mix_seed(recipe.seed, 0))  # identical initial weights on every rank
        model = task.build_model(init_weights)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=task.param_groups(model), config=deepspeed_config(recipe, env.world_size, self.cpu)
        )
        self.state = TrainState()
        self.resumed = checkpointing.latest_tag(self.checkpoint_dir)
        if self.resumed:
            _, client_state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=self.resumed)
            self.state.load_state_dict(client_state or {})
            log.info("resuming from %s/%s at epoch %s step %s", self.checkpoint_dir, self.resumed, self.state.epoch,
                     self.state.global_step)
        self.policy = CheckpointPolicy(every=recipe.checkpoint_every, keep=recipe.keep_checkpoints)
        self.schedule = LrSchedule.of(recipe)
        self.guard = DivergenceGuard(recipe.precision)
        self.guard.load_state_dict(self.state.divergence)

        self.dataset = task.train_dataset()
        self.val_loader = task.val_loader(env)
        self.sampler = DistributedClipSampler(
            len(self.dataset), world_size=env.world_size, rank=env.rank, seed=recipe.seed,
            weights=task.sampler_weights(self.dataset),
        )
        self.clips_per_step = recipe.batch_size_per_gpu * recipe.gradient_accumulation_steps
        self.steps_per_epoch = self.sampler.samples_per_rank // self.clips_per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{index.location}: the train split ({len(self.dataset)} clips over {env.world_size} ranks) is smaller "
                f"than one optimizer step ({self.clips_per_step} clips per rank); lower batch_size_per_gpu"
            )
        all_steps = recipe.epochs * self.steps_per_epoch
        self.total_steps = all_steps if recipe.max_steps is None else min(recipe.max_steps, all_steps)
        # One loader for the whole run: its workers persist across epochs (the sampler runs in this
        # process, so set_epoch before each iter() still decides every epoch's order).
        self.loader = DataLoader(self.dataset, batch_size=recipe.batch_size_per_gpu, sampler=self.sampler,
                                 num_workers=recipe.num_workers, drop_last=True, pin_memory=not self.cpu,
                                 persistent_workers=recipe.num_workers > 0)
        self.metrics_log = (JsonlLog(self.output / "metrics.jsonl", resume_after_step=self.state.global_step if self.resumed else None)
                            if env.is_main else None)
        # Opened last: from here on fit() ends the run whatever happens.
        self.tracker = make_tracker(
            env.rank, self.output, run_id=self.state.tracking_run_id,
            run_name=f"{recipe.stage}-{recipe.model}-{recipe.recipe}",
            tags={"avsiam.stage": recipe.stage, "avsiam.recipe": recipe.recipe, "avsiam.model": recipe.model,
                  "avsiam.version": __version__, "avsiam.dataset_digest": index.dataset_digest},
        )
        self.session_started = time.perf_counter()
        self.startup_seconds = process_age_seconds()

    def fit(self) -> RunSummary:
        """Train epoch by epoch until ``epochs`` or ``max_steps``; validate and save at each
        epoch end; consolidate the selected checkpoint. Any exception ends the tracking run
        FAILED (KILLED on Ctrl-C) and propagates."""
        state, recipe = self.state, self.recipe
        try:
            self.log_run_inputs()
            self.engine.train()
            batches = None
            while state.epoch <= recipe.epochs and state.global_step < self.total_steps:
                self.sampler.set_epoch(state.epoch, start=state.step_in_epoch * self.clips_per_step)
                batches, timer = iter(self.loader), StepTimer()
                while state.step_in_epoch < self.steps_per_epoch and state.global_step < self.total_steps:
                    self.train_step(batches, timer)
                    if self.policy.save_after_step(state, self.steps_per_epoch, self.total_steps):
                        self.save()
                    timer.restart()
                if state.step_in_epoch < self.steps_per_epoch:  # stopped by max_steps inside the epoch
                    break
                self.end_epoch()
            # The last references to the loaders' persistent workers: they stop here, not at exit.
            batches = self.loader = self.val_loader = None
            return self.finish()
        except BaseException as exc:
            # The run's end, whatever ended it: a divergence, a bug, a lost rank (Ctrl-C: KILLED).
            self.tracker.set_tags({"avsiam.failure": redact_credentials(f"{type(exc).__name__}: {exc}")})
            self.tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise

    def log_run_inputs(self) -> None:
        recipe, env = self.recipe, self.env
        self.tracker.log_params({**flatten_params(recipe.model_dump(mode="json")), "world_size": env.world_size,
                                 "steps_per_epoch": self.steps_per_epoch, "dataset_digest": self.index.dataset_digest})
        # Each session's: at 64 ranks, imports from a shared filesystem can take minutes.
        self.tracker.log_metrics({"startup_s": self.startup_seconds}, step=self.state.global_step)
        report = self.task.load_report
        if report is not None and env.is_main:
            path = self.output / "init_load_report.txt"
            path.write_text(f"{report}\n")
            self.tracker.set_tags(report.tags())
            self.tracker.log_artifact(path)

    def train_step(self, batches, timer: StepTimer) -> None:
        """One optimizer step (``gradient_accumulation_steps`` micro-batches) at the schedule's
        lr; logs it and stops the run if it diverged."""
        recipe, state, engine = self.recipe, self.state, self.engine
        lr = self.schedule.step_lr(state.epoch, state.global_step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        losses, extras = [], {}
        for micro in range(recipe.gradient_accumulation_steps):
            batch = next(batches)
            timer.data_ready()
            ctx = step_context(recipe.seed, self.env, state.global_step, micro, self.device, self.dtype)
            loss, extras = self.task.step_loss(engine, batch, ctx)
            engine.backward(loss)
            try:
                engine.step()
            except Exception as exc:
                if diverged := from_deepspeed(exc, state.global_step + 1, lr):
                    raise diverged from exc
                raise
            losses.append(loss.detach().float())
            timer.compute_done()
        state.step_done()
        step_seconds, wait = timer.lap()
        mean_loss = float(all_reduce_mean(torch.stack(losses).mean()))
        record = {
            "step": state.global_step, "epoch": state.epoch, "loss": mean_loss, "lr": lr,
            "samples_per_s": self.clips_per_step * self.env.world_size / step_seconds, "step_time_s": step_seconds,
            "data_wait_s": wait, "peak_memory_mb": peak_memory_mb(self.cpu), **extras,
        }
        if self.metrics_log:
            self.metrics_log.write(record)
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        self.tracker.log_metrics(numeric, step=state.global_step)
        grad_norm = engine.get_global_grad_norm()  # a tensor under ZeRO 1/2, None where not computed
        self.guard.check_step(state.global_step, mean_loss, lr, None if grad_norm is None else float(grad_norm))

    def end_epoch(self) -> None:
        """Validate on the held-out split, record the epoch, save."""
        state = self.state
        record: dict[str, Any] = {"epoch": state.epoch, "global_step": state.global_step, "tag": checkpointing.step_tag(state.global_step)}
        if self.val_loader is not None:
            ctx = step_context(self.recipe.seed, self.env, state.global_step, 0, self.device, self.dtype)
            record.update(self.task.validate(self.engine.module, self.val_loader, ctx, self.env))
            self.tracker.log_metrics({f"val_{k}": v for k, v in record.items() if isinstance(v, float)}, step=state.global_step)
        state.epoch_done(record)
        self.save()

    def elapsed_seconds(self) -> float:
        return self.state.elapsed_seconds + time.perf_counter() - self.session_started

    def save(self) -> None:
        """A checkpoint of every rank at the current step, the state as its client_state; then
        the policy's pruning (the best epoch's checkpoint is protected)."""
        self.tracker.flush()  # the steps a resume will not redo are in MLflow or the spool first
        state = self.state.model_copy(update={"elapsed_seconds": self.elapsed_seconds(), "tracking_run_id": self.tracker.run_id,
                                              "divergence": self.guard.state_dict()})
        checkpointing.save(self.engine, self.checkpoint_dir, state.global_step, state.state_dict())
        best = self.state.best_epoch(self.task.selection_metric)
        checkpointing.prune(self.checkpoint_dir, self.policy, {best["tag"]} if best else set(), self.env)

    def finish(self) -> RunSummary:
        """Consolidate the selected checkpoint (the best validated epoch when finetuning, else
        the latest), write the summary, close the tracking run."""
        recipe, env, state = self.recipe, self.env, self.state
        barrier()
        best = state.best_epoch(self.task.selection_metric) if recipe.stage == "finetune" else None
        tag = best["tag"] if best else checkpointing.latest_tag(self.checkpoint_dir)
        weights = self.output / "weights.safetensors"
        elapsed = self.elapsed_seconds()
        summary = RunSummary(
            stage=recipe.stage, model=recipe.model, recipe=recipe.recipe, global_step=state.global_step,
            weights=str(weights.resolve()), checkpoint=f"{self.checkpoint_dir.resolve()}/{tag}",
            selected_epoch=best["epoch"] if best else (state.history[-1]["epoch"] if state.history else None),
            selection_metric=f"val_{self.task.selection_metric}" if best else None,
            gpu_hours=elapsed * env.world_size / 3600.0, wall_seconds=elapsed, startup_seconds=self.startup_seconds,
            world_size=env.world_size,
            dataset_digest=self.index.dataset_digest, tracking_run_id=self.tracker.run_id, history=state.history,
            final_validation=(best or state.history[-1]) if state.history else None,
        )
        if env.is_main:
            checkpointing.consolidate(self.checkpoint_dir, tag, weights, recipe.zero_stage)
            if recipe.stage == "finetune":
                # The weights' class list beside them: with config.yaml, what labelling new clips needs.
                (self.output / CLASSES_NAME).write_text(class_labels_csv(self.index.classes))
            summary.write(self.output)
            self.tracker.log_metrics({"gpu_hours": summary.gpu_hours}, step=state.global_step)
            self.tracker.set_tags({"avsiam.weights": summary.weights, "avsiam.checkpoint": summary.checkpoint})
            self.tracker.finish("FINISHED")
        barrier()
        return broadcast_object(summary)


def train(recipe: RecipeConfig, data: str | Path, output: str | Path, init_weights: str | None = None) -> RunSummary:
    """Train ``recipe`` on the staged dataset ``data`` into ``output``; returns the summary."""
    return Trainer(recipe, data, output, init_weights).fit()
