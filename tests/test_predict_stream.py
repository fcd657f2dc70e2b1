"""``detect predict`` streams: never more than one batch of images in memory, same scores as one big call.

The 2,000-image memory / throughput measurement is scripts/bench_predict_stream.py (results in
scripts/results/bench_predict_stream.md); this test guards the property that makes it hold.
"""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

import detect
from detect.base import Detector
from detect.runner import predict_to_folder


@pytest.fixture(scope="module")
def model_dir(brick_set, tmp_path_factory):
    model = detect.create("padim", image_size=64, blur_sigma=1).fit(brick_set.root, progress=False)
    return model.save(tmp_path_factory.mktemp("stream") / "padim")


def test_predict_holds_one_batch_at_a_time_and_matches_a_single_call(model_dir, brick_set, tmp_path, monkeypatch):
    sources = sorted((brick_set.root / "test").rglob("*.png"))
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(45):  # 45 images, batch 4: eleven full batches and a short one
        shutil.copy(sources[i % len(sources)], folder / f"img_{i:03d}.png")

    calls: list[int] = []
    real_predict = Detector.predict

    def recording_predict(self, images, **kwargs):
        calls.append(len(images))
        return real_predict(self, images, **kwargs)

    monkeypatch.setattr(Detector, "predict", recording_predict)
    csv_path = predict_to_folder(model_dir, [folder], tmp_path / "out", batch_size=4, progress=False)
    assert calls == [4] * 11 + [1], "predict must stream batch by batch"
    monkeypatch.setattr(Detector, "predict", real_predict)

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [str(p) for p in sorted(folder.iterdir())]
    whole = detect.load(model_dir).predict(sorted(folder.iterdir()))
    np.testing.assert_allclose([float(r["score"]) for r in rows], whole.scores, rtol=1e-5)
    assert len(list((tmp_path / "out" / "overlays").iterdir())) == 45
