"""What the paper reports, each number with where it was read: the reference points that
``avsiam compare`` puts next to our scores and ``avsiam plan`` next to its GPU-hours.

The supplement (implementation details, Tables 1-6) has no main results table; its scores and
the Base/Huge pretraining costs were read from a secondary summary."""

from __future__ import annotations

SECONDARY_SUMMARY = "en.papernotes.org's ECCV 2024 summary of the paper, not checked against arXiv 2403.19638"

# Finetuned results in percent (mAP on AudioSet, accuracy on VGGSound), from SECONDARY_SUMMARY.
PAPER_SCORES: dict[tuple[str, str], float] = {
    ("base", "finetune_as20k"): 41.6, ("base", "finetune_as2m"): 50.1, ("base", "finetune_vggsound"): 64.9,
    ("large", "finetune_as20k"): 44.1, ("large", "finetune_as2m"): 52.1, ("large", "finetune_vggsound"): 67.1,
    ("huge", "finetune_as20k"): 45.0, ("huge", "finetune_as2m"): 54.1, ("huge", "finetune_vggsound"): 68.0,
}

# Pretraining cost in V100-hours by model size: the main table's figure first, then others.
PAPER_PRETRAINING_HOURS: dict[str, list[dict[str, object]]] = {
    "base": [
        {"gpu_hours": 177, "gpu": "V100", "source": SECONDARY_SUMMARY},
        {"gpu_hours": 475, "gpu": "V100", "source": "supplement Table 1 (trained from scratch)"},
    ],
    "large": [{"gpu_hours": 310, "gpu": "V100", "source": "supplement Table 2"}],
    "huge": [{"gpu_hours": 800, "gpu": "V100", "source": SECONDARY_SUMMARY}],
}


def main_table_v100_hours(size: str) -> float:
    """The pretraining cost the paper's main table gives the model ``size``."""
    return float(PAPER_PRETRAINING_HOURS[size][0]["gpu_hours"])
