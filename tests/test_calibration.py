"""Expected calibration error against a worked example, and the reliability diagram."""

import numpy as np
import pytest
from PIL import Image

from resnext_jax.inference.calibration import calibration, confidence
from resnext_jax.inference.figures import plot_reliability


def test_ece_of_hand_made_logits_equals_the_worked_example():
    """Five examples, two classes, logits log(p) so that the softmax gives p back; 10 bins (b/10, (b+1)/10].

    confidence .85 right, .85 wrong -> bin 8: accuracy .5, confidence .85, gap .35, weight 2/5 -> .14
    confidence .65 right            -> bin 6: gap .35, weight 1/5 -> .07
    confidence .75 right            -> bin 7: gap .25, weight 1/5 -> .05
    confidence .55 wrong            -> bin 5: gap .55, weight 1/5 -> .11
    ECE = .14 + .07 + .05 + .11 = .37
    """
    probabilities = np.array([[0.85, 0.15], [0.85, 0.15], [0.65, 0.35], [0.25, 0.75], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 1, 1])
    logits = np.log(probabilities).astype(np.float32) + np.float32(3.0)  # a shift changes no softmax
    confidences = np.asarray(confidence(logits))
    np.testing.assert_allclose(confidences, [0.85, 0.85, 0.65, 0.75, 0.55], rtol=1e-6)
    correct = logits.argmax(-1) == labels
    result = calibration(confidences, correct, bins=10)
    assert result["ece"] == pytest.approx(0.37, abs=1e-6)
    counts = [row["count"] for row in result["bins"]]
    assert counts == [0, 0, 0, 0, 0, 1, 1, 1, 2, 0]
    assert result["bins"][8]["accuracy"] == 0.5 and result["bins"][8]["confidence"] == pytest.approx(0.85)
    assert result["bins"][0]["accuracy"] is None
    # 15 bins: .55 -> (8/15, 9/15], .65 -> (9/15, 10/15], .75 -> (11/15, 12/15], .85 -> (12/15, 13/15]: the same
    # groups, so the same ECE.
    assert calibration(confidences, correct)["ece"] == pytest.approx(0.37, abs=1e-6)


def test_perfect_and_edge_cases():
    # A bin right on its upper edge belongs to it, and confidence 1.0 to the last bin.
    result = calibration([0.5, 1.0, 1.0], [True, True, True], bins=2)
    assert [row["count"] for row in result["bins"]] == [1, 2]
    assert result["ece"] == pytest.approx(0.5 / 3)
    assert calibration([], [], bins=5)["ece"] is None


def test_reliability_diagram_is_a_drawn_png(tmp_path):
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.3, 1.0, 500)
    correct = rng.uniform(size=500) < confidences**2  # overconfident
    result = calibration(confidences, correct)
    path = str(tmp_path / "reliability.png")
    plot_reliability(result, path, "test")
    pixels = np.asarray(Image.open(path).convert("L"), np.float32)
    assert pixels.shape[0] > 300 and pixels.std() > 20
