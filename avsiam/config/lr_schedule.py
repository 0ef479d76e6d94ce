"""The learning-rate schedule of the tables: a linear warmup over the first optimizer steps and
the published per-epoch step decay, one object the training loop asks for each step's lr."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from avsiam.config.schema import RecipeConfig


@dataclass(frozen=True)
class LrSchedule:
    """Backbone lr of each optimizer step; parameter groups scale it by their ``lr_scale``.

    * Step decay: ``lr * decay_rate**k`` in 1-based epoch e, k the milestones (``decay_start``,
      ``decay_start + decay_step``, ...) at or below e - 1: ``MultiStepLR(milestones=
      range(decay_start, 1000, decay_step))`` stepped at the end of each epoch, as the
      published training loops do.
    * Warmup: the optimizer step after ``global_step`` steps runs at ``(global_step + 1) /
      warmup_steps`` of that, up to 1 (``LinearLR(start_factor=1/warmup_steps,
      total_iters=warmup_steps - 1)`` stepped every optimizer step); 0 steps: no warmup.

    Both are functions of (epoch, step), so a resumed run has no scheduler state to restore.
    """

    lr: float
    decay_start_epoch: int
    decay_rate: float
    decay_step: int
    warmup_steps: int = 0

    @classmethod
    def of(cls, recipe: RecipeConfig) -> LrSchedule:
        return cls(recipe.lr, recipe.lr_decay_start_epoch, recipe.lr_decay_rate, recipe.lr_decay_step, recipe.warmup_steps)

    def epoch_lr(self, epoch: int) -> float:
        """The decayed lr of 1-based ``epoch``, before warmup."""
        if epoch < 1:
            raise ValueError(f"epochs are 1-based, got {epoch}")
        done = epoch - 1
        milestones_passed = 0 if done < self.decay_start_epoch else (done - self.decay_start_epoch) // self.decay_step + 1
        return self.lr * self.decay_rate**milestones_passed

    def step_lr(self, epoch: int, global_step: int) -> float:
        """The lr of the optimizer step taken after ``global_step`` steps, in ``epoch``."""
        warmup = min(1.0, (global_step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.epoch_lr(epoch) * warmup
