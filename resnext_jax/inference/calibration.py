"""Calibration for the evaluation report: expected calibration error (ECE) and the reliability diagram.

A model is calibrated when, among the examples it predicts with confidence p (its top softmax probability), a
fraction p is right. ECE (Guo et al., 2017) bins the examples by confidence into `bins` equal-width bins
(0, 1/M], (1/M, 2/M], ..., ((M-1)/M, 1] and averages |accuracy - mean confidence| over the bins, weighted by
their share of the examples:

    ECE = sum over bins b of  n_b / n * |accuracy_b - confidence_b|

15 bins, as in the paper and torchmetrics' default. The reliability diagram (`figures.plot_reliability`) draws
accuracy_b against confidence_b; a calibrated model lies on the diagonal.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BINS = 15
RELIABILITY_PNG = "reliability.png"


def confidence(logits):
    """Top softmax probability per row of `logits` (..., classes), in float32 (works on numpy and jax arrays)."""
    import jax

    return jax.nn.softmax(logits.astype(np.float32), axis=-1).max(axis=-1)


def calibration(confidences, correct, bins: int = DEFAULT_BINS) -> dict:
    """ECE and the per-bin table of `confidences` (top softmax probability per example) and `correct` (bools).

    Returns {'ece', 'bin_count', 'bins': [{'lower', 'upper', 'count', 'confidence', 'accuracy'}, ...]} with one
    row per bin (confidence and accuracy None for an empty bin); 'ece' is None without examples.
    """
    confidences = np.asarray(confidences, np.float64).reshape(-1)
    correct = np.asarray(correct, bool).reshape(-1)
    # Bin b holds (b/M, (b+1)/M]: ceil(p * M) - 1, with p = 0 in the first bin.
    index = np.clip(np.ceil(confidences * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    confidence_sum = np.bincount(index, weights=confidences, minlength=bins)
    correct_sum = np.bincount(index, weights=correct.astype(np.float64), minlength=bins)
    rows, ece = [], 0.0
    for b in range(bins):
        n = int(count[b])
        mean_confidence = confidence_sum[b] / n if n else None
        accuracy = correct_sum[b] / n if n else None
        if n:
            ece += n / len(confidences) * abs(accuracy - mean_confidence)
        rows.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": n,
                "confidence": None if mean_confidence is None else float(mean_confidence),
                "accuracy": None if accuracy is None else float(accuracy),
            }
        )
    return {"ece": float(ece) if len(confidences) else None, "bin_count": bins, "bins": rows}
