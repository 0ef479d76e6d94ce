"""Analytic FLOPs against a table computed by hand from the architectures' token counts and
widths (F(N, D) = 24 N D^2 + 4 N^2 D per block), in GFLOP per sample."""

from __future__ import annotations

import pytest

from avsiam.config import arch_config
from avsiam.model.flops import (
    contrastive_train_flops,
    encoder_forward_flops,
    eval_flops,
    finetune_train_flops,
    flops_summary,
    mae_train_flops,
)

FIVE_RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8)
EIGHT_RATIOS = tuple(i / 10 for i in range(8))


@pytest.mark.parametrize(
    ("size", "audio", "frame", "contrastive5", "contrastive8", "mae", "mae_sg", "finetune", "evaluation"),
    [
        ("base", 96.8, 34.9, 232.0, 251.1, 242.0, 179.6, 465, 678),
        ("large", 335.3, 122.5, 808.9, 876.1, 455.6, 236.9, 1492, 1957),
        ("huge", 897.7, 333.2, 2174.3, 2355.1, 1114.0, 528.7, 3934, 5034),
    ],
)
def test_flops_match_the_hand_computed_table(
    size, audio, frame, contrastive5, contrastive8, mae, mae_sg, finetune, evaluation
) -> None:
    arch = arch_config(size)

    def approx(gflop: float):
        return pytest.approx(gflop * 1e9, rel=0.003)  # the table rounds to 0.1 GFLOP

    assert encoder_forward_flops(arch, "audio") == approx(audio)
    assert encoder_forward_flops(arch, "visual") == approx(frame)
    assert contrastive_train_flops(arch, FIVE_RATIOS) == approx(contrastive5)
    assert contrastive_train_flops(arch, EIGHT_RATIOS) == approx(contrastive8)
    # the table's MAE rows count only the removed tokens' predictions, as this decoder computes them
    assert mae_train_flops(arch, stop_gradient=False) == approx(mae)
    assert mae_train_flops(arch, stop_gradient=True) == approx(mae_sg)
    assert finetune_train_flops(arch, "multimodal") == approx(finetune)
    assert eval_flops(arch, 10) == approx(evaluation)


def test_summary_mixes_heads_with_the_published_probabilities() -> None:
    summary = flops_summary(arch_config("base"))
    expected = 0.5 * summary["finetune_train_multimodal"] + 0.25 * (
        summary["finetune_train_audio"] + summary["finetune_train_visual"]
    )
    assert summary["finetune_train_mixed"] == pytest.approx(expected)
    assert summary["pretrain_train"] == pytest.approx(summary["contrastive_train"] + summary["mae_train"])
