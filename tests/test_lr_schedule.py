"""The learning-rate schedule against torch.optim.lr_scheduler's warmup and step decay."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import LinearLR, MultiStepLR

from avsiam.config import LrSchedule, resolve_recipe


@pytest.mark.parametrize("warmup_steps", [0, 1, 7, 40])
def test_schedule_matches_linear_warmup_chained_with_multistep_decay(warmup_steps: int) -> None:
    schedule = LrSchedule(lr=1e-3, decay_start_epoch=3, decay_rate=0.5, decay_step=2, warmup_steps=warmup_steps)
    epochs, steps_per_epoch = 9, 5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=schedule.lr)
    # Chainable schedulers on one optimizer multiply: warmup per optimizer step, decay per epoch.
    warmup = LinearLR(optimizer, start_factor=1 / warmup_steps, total_iters=warmup_steps - 1) if warmup_steps > 1 else None
    decay = MultiStepLR(optimizer, milestones=list(range(schedule.decay_start_epoch, 1000, schedule.decay_step)), gamma=0.5)
    global_step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            assert schedule.step_lr(epoch, global_step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
            optimizer.step()
            if warmup is not None:
                warmup.step()
            global_step += 1
        assert schedule.epoch_lr(epoch) == pytest.approx(schedule.lr * 0.5 ** max(0, (epoch - 1 - 3) // 2 + 1) if epoch > 3 else schedule.lr)
        decay.step()


def test_schedule_of_a_recipe_and_its_listing() -> None:
    recipe = resolve_recipe("base", "finetune_as20k", [("warmup_steps", 100)])
    schedule = LrSchedule.of(recipe)
    assert (schedule.lr, schedule.warmup_steps) == (recipe.lr, 100)
    assert recipe.lr_schedule == [schedule.epoch_lr(e) for e in range(1, recipe.epochs + 1)]
    assert schedule.step_lr(1, 0) == pytest.approx(recipe.lr / 100) and schedule.step_lr(1, 99) == recipe.lr
    with pytest.raises(ValueError, match="1-based"):
        schedule.epoch_lr(0)
