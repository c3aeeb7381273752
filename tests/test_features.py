"""SIFT extraction in worker processes gives exactly what the resident extractor gives."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from markerless.pipeline.features import SiftExtractor, SiftWorkers, confs


def _textured(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(small, (320, 240), interpolation=cv2.INTER_NEAREST), (5, 5), 1.5)


def test_process_pool_extraction_equals_in_process(tmp_path: Path) -> None:
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), _textured(i))
    local = SiftExtractor(confs["sift"])
    with SiftWorkers(confs["sift"], workers=2) as workers:
        pooled = [future.result() for future in [workers.submit(path) for path in paths]]
    assert len(pooled) == len(paths)
    for path, got in zip(paths, pooled, strict=True):
        expected = local(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
        assert len(expected["keypoints"]) > 50
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
