"""The evaluation report's figures: the confusion matrix and the reliability diagram (PNG files, matplotlib's Agg
backend: no window, no display needed)."""

from __future__ import annotations

import numpy as np


def plot_confusion(confusion: np.ndarray, report: dict, path: str) -> None:
    """Draws the row-normalized confusion matrix (each row: where that true class's examples went)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    names = [row["name"] for row in report["per_class"]]
    count = len(names)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.35 * count, 16)
    figure, axes = plt.subplots(figsize=(side, side * 0.9))
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    if count <= 40:
        axes.set_xticks(range(count), names, rotation=90 if max(map(len, names)) > 3 else 0)
        axes.set_yticks(range(count), names)
        if count <= 20:
            for true, predicted in zip(*np.nonzero(confusion)):
                axes.text(
                    predicted,
                    true,
                    str(confusion[true, predicted]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if rates[true, predicted] > 0.5 else "black",
                )
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    accuracy, dataset = report["accuracy"], report["dataset"]
    axes.set_title(
        f"{report['model']['name']} on {dataset['name']}:{dataset['split']}: "
        f"top-1 {accuracy['top1']:.2%} of {accuracy['count']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_reliability(result: dict, path: str, title: str) -> None:
    """The reliability diagram: accuracy per confidence bin (bars) against the diagonal, with each bin's share of
    the examples below it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    rows = result["bins"]
    width = 1.0 / result["bin_count"]
    lowers = [row["lower"] for row in rows]
    total = max(sum(row["count"] for row in rows), 1)
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    accuracy = [row["accuracy"] or 0.0 for row in rows]
    gap = [(row["confidence"] or 0.0) - (row["accuracy"] or 0.0) if row["count"] else 0.0 for row in rows]
    top.bar(lowers, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black", label="accuracy")
    top.bar(lowers, gap, bottom=accuracy, width=width, align="edge", color="tab:red", alpha=0.3, label="gap")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    ece = result["ece"]
    top.set_title(f"{title}\nECE {ece:.2%} ({result['bin_count']} bins)" if ece is not None else title)
    top.legend(loc="upper left")
    bottom.bar(lowers, [row["count"] / total for row in rows], width=width, align="edge", color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top softmax probability)")
    bottom.set_ylabel("share")
    figure.savefig(path, dpi=100)
    plt.close(figure)
