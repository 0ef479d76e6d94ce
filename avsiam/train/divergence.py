"""Stopping a diverged run at the step it diverged, on every rank, before it saves garbage.

A run whose loss went to nan keeps "training" at full cost and, left alone, writes weights,
a summary and a FINISHED tracking run that the next stage would build on. The guard stops it:

* fp32 / bf16: a non-finite loss or global gradient norm is divergence at once (nothing
  downstream recovers from it);
* fp16: DeepSpeed's dynamic loss scaler skips a step whose gradients overflow and lowers the
  scale, which is normal. Divergence is the scale at its floor (``min_loss_scale``) and still
  overflowing, which DeepSpeed reports with a bare ``Exception`` (:func:`from_deepspeed`
  turns it into this error), or ``patience`` consecutive steps with a non-finite loss;
* validation outputs (embeddings, probabilities) that are not finite: the weights diverged
  within the epoch's last steps.

Every value checked is the same on all ranks (the loss is all-reduced, the gradient norm is
global, the scale follows the global overflow flag, validation outputs are gathered), so all
ranks raise at the same step and none is left waiting in a collective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from avsiam.config.schema import Precision

DIVERGED_EXIT_STATUS = 3  # of `avsiam train` when the run diverged (bad input: 2)
LIKELY_CAUSES = (
    "the learning rate is too high for this model and batch (lower lr, or lengthen warmup_steps)",
    "fp16 overflow (train in bf16 or fp32 where the hardware has it)",
    "a corrupt input that passed staging (rerun with the same seed to reproduce the step)",
)


class TrainingDiverged(RuntimeError):
    """The run diverged; the message names the step, the value and the likely causes."""


def _diverged(what: str) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged: {what}; no weights or summary were written. Likely causes: "
                            + "; ".join(LIKELY_CAUSES))


@dataclass
class DivergenceGuard:
    precision: Precision
    patience: int = 20  # fp16 only: consecutive non-finite losses tolerated before the run stops
    bad_steps: int = 0  # fp16: the current run of consecutive non-finite losses

    def check_step(self, step: int, loss: float, lr: float, grad_norm: float | None = None) -> None:
        """Check one optimizer step (``grad_norm``: DeepSpeed's global norm, None where the
        optimizer does not compute it); raises :class:`TrainingDiverged`."""
        where = f"step {step} (lr {lr:.3g})"
        if self.precision == "fp16":
            self.bad_steps = 0 if math.isfinite(loss) else self.bad_steps + 1
            if self.bad_steps >= self.patience:
                raise _diverged(f"{where}: {self.bad_steps} consecutive steps with loss {loss}")
            return
        if not math.isfinite(loss):
            raise _diverged(f"{where} has loss {loss}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise _diverged(f"{where} has gradient norm {grad_norm} (loss {loss:.6g})")

    def state_dict(self) -> dict[str, int]:
        return {"bad_steps": self.bad_steps}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.bad_steps = int(state.get("bad_steps", 0))


def require_finite(outputs: Mapping[str, np.ndarray], step: int, what: str) -> None:
    """Raise :class:`TrainingDiverged` when any of ``outputs`` (e.g. validation embeddings)
    holds a non-finite value."""
    for name, values in outputs.items():
        bad = int(np.size(values) - np.isfinite(values).sum())
        if bad:
            raise _diverged(f"the {what} after step {step} has {bad} non-finite values in {name}")


# What DeepSpeed's DynamicLossScaler raises when it must lower the scale below min_loss_scale.
_DEEPSPEED_SCALE_FLOOR = "loss scale already at minimum"


def from_deepspeed(exc: BaseException, step: int, lr: float) -> TrainingDiverged | None:
    """The divergence error for DeepSpeed's fp16 "loss scale at minimum" exception, else None."""
    if _DEEPSPEED_SCALE_FLOOR not in str(exc):
        return None
    return _diverged(f"step {step} (lr {lr:.3g}) overflows in fp16 at the minimum loss scale")
