"""PNG plots for evaluation reports and training runs (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import NDArray

from train.ec57 import COLS, ROWS


def plot_confusion(matrix: NDArray[np.int64], path: Path) -> None:
    """EC57 matrix: reference rows (N S V F Q X) by detected columns (N S V F Q O), counts."""
    fig, ax = plt.subplots(figsize=(6, 5))
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if shown[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(COLS)), COLS)
    ax.set_yticks(range(len(ROWS)), ROWS)
    ax.set_xlabel("detected (O = missed)")
    ax.set_ylabel("reference (X = no reference beat)")
    ax.set_title("EC57 beat-by-beat confusion (gross)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_record(rows: list[dict[str, Any]], path: Path) -> None:
    """Per-record table: QRS Se/+P and S/V Se/+P (%)."""
    keys = ["qrs_se", "qrs_ppv", "S_se", "S_ppv", "V_se", "V_ppv"]
    cells = [[r["record"]] + ["-" if np.isnan(r[k]) else f"{100 * r[k]:.1f}" for k in keys] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=["record", "QRS Se", "QRS +P", "S Se", "S +P", "V Se", "V +P"],
                     loc="center")
    table.scale(1, 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss, validation score and gradient norms per epoch."""
    epochs = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].plot(epochs, [h["train_loss"] for h in history])
    axes[0].set_title("training loss")
    axes[1].plot(epochs, [h["val_score"] for h in history], label="score")
    for key in ("S_f1", "V_f1"):
        axes[1].plot(epochs, [h["val"][key] for h in history], label=key)
    axes[1].set_title("validation (DS1 records)")
    axes[1].legend()
    axes[2].plot(epochs, [h["grad_norm_median"] for h in history], label="median")
    axes[2].plot(epochs, [h["grad_norm_max"] for h in history], label="max")
    axes[2].set_yscale("log")
    axes[2].set_title("gradient norm (before clipping)")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
