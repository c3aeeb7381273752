"""hloc HDF5 layouts, checked with h5py directly."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from markerless.scene.h5io import (
    read_global_descriptors,
    read_local_features,
    write_global_descriptors,
    write_local_features,
)


def test_local_features_layout_and_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    feats = {f"rgb/{i}.jpg": {"keypoints": rng.random((7, 2), dtype=np.float32) * 100,
                               "descriptors": rng.random((7, 128), dtype=np.float32),
                               "scales": np.ones(7, np.float32), "oris": np.zeros(7, np.float32),
                               "image_size": np.array([640, 480])} for i in range(3)}
    path = tmp_path / "feats-sift.h5"
    write_local_features(path, feats)
    with h5py.File(path) as fd:  # hloc's layout: nested groups, D x N descriptors in float16
        grp = fd["rgb"]["1.jpg"]
        assert grp["descriptors"].shape == (128, 7) and grp["descriptors"].dtype == np.float16
        assert grp["keypoints"].dtype == np.float32 and grp["image_size"].dtype == np.int64
        assert {"scores", "scales", "oris"} <= set(grp)
    back = read_local_features(path)
    assert sorted(back) == sorted(feats)
    assert np.allclose(back["rgb/2.jpg"]["descriptors"], feats["rgb/2.jpg"]["descriptors"], atol=1e-3)
    assert np.array_equal(back["rgb/0.jpg"]["keypoints"], feats["rgb/0.jpg"]["keypoints"])


def test_global_descriptors_read_hloc_written_file(tmp_path: Path) -> None:
    """A file written the way hloc writes it (h5py only) is read in the requested order."""
    path = tmp_path / "global-feats-netvlad.h5"
    with h5py.File(path, "w") as fd:
        for i in range(3):
            grp = fd.create_group(f"db/{i}.jpg")
            grp.create_dataset("global_descriptor", data=np.full(4096, i, np.float16))
            grp.create_dataset("image_size", data=np.array([640, 480]))
    names, desc = read_global_descriptors(path, ["db/2.jpg", "db/0.jpg"])
    assert names == ["db/2.jpg", "db/0.jpg"] and desc.dtype == np.float32 and desc[0, 0] == 2
    write_global_descriptors(tmp_path / "out.h5", {"a/b.jpg": desc[0]}, {"a/b.jpg": (640, 480)})
    assert read_global_descriptors(tmp_path / "out.h5")[1].shape == (1, 4096)

