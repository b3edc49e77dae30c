"""The PNG of a run's training and held-out loss curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt

LOSS_PLOT_FILE = "loss.png"


def plot_losses(history: list[dict[str, float]], path: Path, title: str) -> Path:
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        axes.plot(
            [h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss"
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy per answer token")
    axes.set_yscale("log")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
