"""benchmarks.bench_2d's per-image prediction seconds: every round's pool and test predictions over
the images they predicted, the template's own prediction and other stages left out."""

from __future__ import annotations

import pytest

from benchmarks.bench_2d import predict_seconds_per_image


def test_predict_seconds_per_image_counts_pool_and_test_predictions_of_every_round():
    stages = {"encode": 30.0, "round1/predict": 40.0, "round1/predict_test": 20.0,
              "round1/predict_template": 5.0, "round2/predict": 30.0, "round2/predict_test": 10.0}
    # (40 + 20 + 30 + 10) s over (100 + 50 + 100 + 50) images
    assert predict_seconds_per_image(stages, 100, 50)["predict"] == pytest.approx(100 / 300, abs=0.005)
    assert predict_seconds_per_image({"encode": 3.0}, 10, 10) == {}
