"""Report plots (PNG): per-class AP of an evaluation, and the loss curve of a training run."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training or CI machines
import matplotlib.pyplot as plt  # noqa: E402


def plot_per_class_ap(per_class_csv: Path, out_png: Path, top: int = 40) -> Path:
    """Horizontal bars of each head's per-class AP (the ``top`` classes by multimodal AP)."""
    with Path(per_class_csv).open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    heads = [k for k in rows[0] if k.startswith("ap_")] if rows else []
    rows = [r for r in rows if r.get(heads[0], "") != ""] if heads else []
    rows.sort(key=lambda r: float(r[heads[0]]), reverse=True)
    rows = rows[:top]
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(rows) + 1.5))
    height = 0.8 / max(len(heads), 1)
    for i, head in enumerate(heads):
        ax.barh([j + i * height for j in range(len(rows))], [float(r[head] or 0) for r in rows], height=height, label=head[3:])
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))], [r["display_name"][:40] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("average precision")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    ax.set_title("Per-class AP")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_loss_curve(records: list[dict], title: str, out_png: Path) -> Path:
    """Training loss (and its components, when logged) per optimizer step, from the records of
    a run's ``metrics.jsonl``."""
    keys = [k for k in ("loss", "loss_contrastive", "loss_mae") if records and k in records[0]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        ax.plot([r["step"] for r in records], [r[key] for r in records], label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
