"""NetVLAD: the official checkpoint format, the forward pass against an independent NumPy reference, the `.pt`
cache, hloc's preprocessing, the `global-feats-netvlad.h5` layout and the missing-weights error.

Test double: the real Pitts30K checkpoint (550 MB) cannot be downloaded here, so `write_random_checkpoint` writes a
`.mat` with the official struct layout and the real shapes (VGG16, 512 x 64 VLAD, 32768 x 4096 WPCA) and random
weights. The NumPy reference reads that file itself, the way hloc's loader indexes it, and shares no code with
the model: its convolutions are sums of shifted matrix products in float64.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from scipy.io import loadmat, savemat

from markerless.errors import BadImageError, MarkerlessError, MissingWeightsError
from markerless.models import netvlad
from markerless.models.netvlad import NetVLADExtractor, load_netvlad, write_random_checkpoint
from markerless.scene import h5io

CHECKPOINT_FILE = "VGG16-NetVLAD-Pitts30K.mat"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / CHECKPOINT_FILE
    write_random_checkpoint(path, seed=3)
    return path


@pytest.fixture(scope="module")
def extractor(checkpoint: Path) -> NetVLADExtractor:
    return NetVLADExtractor(checkpoint, "cpu")


@pytest.fixture(scope="module")
def kitchen_images() -> list[np.ndarray]:
    root = os.environ.get("MARKERLESS_KITCHEN_DIR")
    if not root:
        pytest.skip("MARKERLESS_KITCHEN_DIR not set: the NetVLAD reference test needs real kitchen keyframes")
    with zipfile.ZipFile(Path(root) / "kitchen-poly.zip") as archive:
        names = sorted(n for n in archive.namelist() if "/keyframes/images/" in n and n.endswith(".jpg"))
        raw = [archive.read(names[i]) for i in (0, 40, 80)]
    images = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for b in raw]
    # Shrunk for the float64 reference's speed; the third size is not a multiple of 16 (floor-mode pooling).
    sizes = [(320, 240), (320, 240), (250, 190)]
    return [cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im, size in zip(images, sizes, strict=True)]


# ----------------------------------------------------------------------------------------------- NumPy reference


def _l2(x: np.ndarray, axis: int) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Cross-correlation, zero padding 1, MatConvNet filter S x S x IN x OUT (dim 0 = rows), x: C x H x W."""
    channels, height, width = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((weight.shape[3], height * width))
    for dy in range(3):
        for dx in range(3):
            window = padded[:, dy : dy + height, dx : dx + width].reshape(channels, -1)
            out += weight[dy, dx].astype(np.float64).T @ window
    return out.reshape(-1, height, width) + bias.astype(np.float64)[:, None, None]


def _maxpool2x2(x: np.ndarray) -> np.ndarray:
    channels, height, width = x.shape
    x = x[:, : height // 2 * 2, : width // 2 * 2]
    return x.reshape(channels, height // 2, 2, width // 2, 2).max(axis=(2, 4))


def reference_netvlad(mat_path: Path, image: np.ndarray) -> np.ndarray:
    """hloc's NetVLAD forward pass in float64 NumPy, walking the MatConvNet layer list of the file."""
    net = loadmat(mat_path, struct_as_record=False, squeeze_me=True)["net"]
    layers = net.layers
    x = np.clip(image.astype(np.float64), 0, 255) - net.meta.normalization.averageImage[0, 0]
    x = x.transpose(2, 0, 1)
    for layer in layers[:29]:  # conv1_1 .. conv5_3
        if layer.type == "conv":
            x = _conv3x3(x, layer.weights[0], layer.weights[1])
        elif layer.type == "relu":
            x = np.maximum(x, 0)
        elif layer.type == "pool":
            x = _maxpool2x2(x)
        else:
            raise AssertionError(f"unexpected layer {layer.name} ({layer.type}) before conv5_3")
    assert layers[28].name == "conv5_3" and layers[30].name == "vlad_core" and layers[33].name == "WPCA"
    feats = _l2(x.reshape(x.shape[0], -1), axis=0)  # D x N, preL2
    assign = layers[30].weights[0].astype(np.float64)  # D x K
    centres = -layers[30].weights[1].astype(np.float64)  # stored negated
    logits = assign.T @ feats  # K x N
    soft = np.exp(logits - logits.max(axis=0))
    soft /= soft.sum(axis=0)
    vlad = np.zeros_like(centres)
    for k in range(centres.shape[1]):
        vlad[:, k] = ((feats - centres[:, k : k + 1]) * soft[k]).sum(axis=1)
    vlad = _l2(_l2(vlad, axis=0).reshape(-1), axis=0)  # intra-normalisation, flatten (d * K + k), L2
    wpca = layers[33].weights[0].reshape(vlad.size, -1)
    whitened = np.concatenate([vlad @ wpca[:, i : i + 512].astype(np.float64) for i in range(0, wpca.shape[1], 512)])
    return _l2(whitened + layers[33].weights[1], axis=0)


# ----------------------------------------------------------------------------------------------------- tests


def test_checkpoint_has_the_official_struct_layout(checkpoint: Path) -> None:
    """What hloc's loader indexes is where hloc looks for it, with the official shapes."""
    net = loadmat(checkpoint, struct_as_record=False, squeeze_me=True)["net"]
    layers = net.layers
    assert len(layers) == 35
    convs = [i for i, layer in enumerate(layers[:29]) if layer.type == "conv"]
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert [layers[i].type for i in (4, 9, 16, 23)] == ["pool"] * 4
    widths = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    for n, i in enumerate(convs):
        assert layers[i].weights[0].shape == (3, 3, widths[n], widths[n + 1])
        assert layers[i].weights[1].shape == (widths[n + 1],)
    assert [layers[i].name for i in range(29, 35)] == ["preL2", "vlad_core", "postL2", "finalL2", "WPCA", "finalL2"]
    assert layers[30].weights[0].shape == layers[30].weights[1].shape == (512, 64)
    assert layers[33].weights[0].shape == (32768, 4096)  # 1 x 1 x 32768 x 4096, squeezed by loadmat
    assert layers[33].weights[1].shape == (4096,)
    assert net.meta.normalization.averageImage[0, 0].shape == (3,)
    unsqueezed = loadmat(checkpoint, struct_as_record=False)["net"][0, 0].layers[0, 33][0, 0].weights
    assert unsqueezed[0, 0].shape == (1, 1, 32768, 4096)
    assert unsqueezed[0, 0].dtype == np.float32


def test_descriptors_match_numpy_reference(
    checkpoint: Path, extractor: NetVLADExtractor, kitchen_images: list[np.ndarray]
) -> None:
    descriptors = extractor(kitchen_images)
    assert descriptors.shape == (3, 4096) and descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-6)
    for image, desc in zip(kitchen_images, descriptors, strict=True):
        np.testing.assert_allclose(desc, reference_netvlad(checkpoint, image), rtol=0, atol=1e-4)
    assert not np.allclose(descriptors[0], descriptors[1], atol=1e-3)  # image-dependent, not a constant


def test_unwhitened_mode_is_the_vlad_vector_before_wpca(checkpoint: Path, extractor: NetVLADExtractor) -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    vlad = NetVLADExtractor(checkpoint, "cpu", {"whiten": False})([image])[0]
    assert vlad.shape == (32768,)
    wpca = loadmat(checkpoint, struct_as_record=False, squeeze_me=True)["net"].layers[33].weights
    whitened = vlad.astype(np.float64) @ wpca[0] + wpca[1]
    np.testing.assert_allclose(extractor([image])[0], whitened / np.linalg.norm(whitened), atol=1e-5)


def test_batches_mixed_sizes_in_input_order(checkpoint: Path, extractor: NetVLADExtractor) -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(48, 64, 3), (40, 72, 3)] * 3]
    small_batches = NetVLADExtractor(checkpoint, "cpu", {"batch_size": 2})
    together = small_batches(images)
    alone = np.concatenate([extractor([image]) for image in images])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert not np.allclose(together[0], together[2], atol=1e-4)


def test_pt_cache_is_used_then_rebuilt_when_the_mat_changes(
    checkpoint: Path, extractor: NetVLADExtractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = netvlad.cache_path(checkpoint)
    assert cache.is_file()  # written by the first load (the `extractor` fixture)
    calls: list[Path] = []
    convert = netvlad.state_dict_from_mat
    monkeypatch.setattr(netvlad, "state_dict_from_mat", lambda path: calls.append(path) or convert(path))
    image = np.random.default_rng(2).integers(0, 256, (32, 48, 3), dtype=np.uint8)

    cached = NetVLADExtractor(checkpoint, "cpu")
    assert calls == []
    np.testing.assert_array_equal(cached([image]), extractor([image]))

    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the .mat was replaced
    NetVLADExtractor(checkpoint, "cpu")
    assert calls == [checkpoint]
    NetVLADExtractor(checkpoint, "cpu")
    assert calls == [checkpoint]  # the rebuilt cache matches again

    cache.write_bytes(b"torn write")
    NetVLADExtractor(checkpoint, "cpu")
    assert len(calls) == 2 and cache.stat().st_size > 1000


def test_preprocessing_only_shrinks_with_float_area_resize(extractor: NetVLADExtractor) -> None:
    rng = np.random.default_rng(4)
    large = rng.integers(0, 256, (1001, 1500, 3), dtype=np.uint8)
    shrunk = extractor.preprocess(large)
    assert shrunk.shape == (683, 1024, 3) and shrunk.dtype == np.float32  # round(1001 * 1024 / 1500) = 683
    expected = cv2.resize(large.astype(np.float32), (1024, 683), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(shrunk, expected)
    small = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    np.testing.assert_array_equal(extractor.preprocess(small), small.astype(np.float32))


@pytest.mark.parametrize(
    "image", [np.zeros((32, 32), np.uint8), np.zeros((32, 32, 3), np.float32), np.zeros((32, 32, 4), np.uint8)]
)
def test_rejects_non_rgb_uint8_images(extractor: NetVLADExtractor, image: np.ndarray) -> None:
    with pytest.raises(BadImageError, match="HxWx3 uint8"):
        extractor([image])


def test_checkpoint_with_wrong_layout_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / CHECKPOINT_FILE
    layers = np.empty((3,), dtype=object)
    for i in range(3):
        layers[i] = {"name": f"conv{i}", "type": "conv", "weights": np.empty((0,), dtype=object)}
    savemat(bad, {"net": {"layers": layers, "meta": {"normalization": {"averageImage": np.zeros(3)}}}})
    with pytest.raises(MarkerlessError, match="3 layers") as info:
        NetVLADExtractor(bad, "cpu")
    assert info.value.reason == "bad_weights" and str(bad) in str(info.value)


def test_missing_checkpoint_error_names_file_search_path_and_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("NETVLAD_MODEL_DIR", "TORCH_HOME", "MARKERLESS_WEIGHTS_DIR", "MARKERLESS_WEIGHTS_MANIFEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    empty = tmp_path / "weights"
    with pytest.raises(MissingWeightsError) as info:
        load_netvlad(empty, "cpu")
    message = str(info.value)
    assert info.value.reason == "missing_weights"
    assert CHECKPOINT_FILE in message
    assert str(empty) in message and str(tmp_path / "home" / ".cache" / "torch" / "hub" / "netvlad") in message
    assert "markerless weights fetch netvlad-pitts30k" in message


def test_load_netvlad_finds_the_file_in_the_weights_dir(
    checkpoint: Path, extractor: NetVLADExtractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MARKERLESS_WEIGHTS_DIR", raising=False)
    loaded = load_netvlad(checkpoint.parent, "cpu")
    image = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(loaded([image]), extractor([image]))


def _hloc_list_names(fd: h5py.File) -> list[str]:
    """hloc's `list_h5_names`: the parent group of every dataset."""
    names: set[str] = set()
    fd.visititems(lambda _, obj: names.add(obj.parent.name.strip("/")) if isinstance(obj, h5py.Dataset) else None)
    return sorted(names)


def test_global_feats_h5_round_trips_in_hloc_layout(tmp_path: Path) -> None:
    """hloc-written files are read by markerless, markerless-written files read as hloc does (h5py only)."""
    rng = np.random.default_rng(6)
    names = ["keyframes/images/1700000000000000.jpg", "keyframes/images/1700000000333330.jpg", "query.jpg"]
    desc = _l2(rng.standard_normal((3, 4096)), axis=1).astype(np.float32)
    sizes = {name: (640, 480) for name in names}

    hloc_file = tmp_path / "hloc" / "global-feats-netvlad.h5"
    hloc_file.parent.mkdir()
    for name, d in zip(names, desc, strict=True):  # hloc: append mode, once per image, float16 (as_half)
        with h5py.File(hloc_file, "a", libver="latest") as fd:
            group = fd.create_group(name)
            group.create_dataset("global_descriptor", data=d.astype(np.float16))
            group.create_dataset("image_size", data=np.array(sizes[name], dtype=np.int64))
    read_names, read_desc = h5io.read_global_descriptors(hloc_file, names)
    assert read_names == names
    np.testing.assert_array_equal(read_desc, desc.astype(np.float16).astype(np.float32))

    ours = tmp_path / "ours" / "global-feats-netvlad.h5"
    ours.parent.mkdir()
    h5io.write_global_descriptors(ours, dict(zip(names, desc, strict=True)), sizes)
    with h5py.File(ours, "r") as fd:
        assert _hloc_list_names(fd) == sorted(names)
        assert list(fd.keys()) == ["keyframes", "query.jpg"]  # '/' in names makes nested groups, as in hloc
        for name, d in zip(names, desc, strict=True):
            stored = fd[name]["global_descriptor"]
            assert stored.shape == (4096,) and stored.dtype == np.float16
            np.testing.assert_array_equal(stored[()], d.astype(np.float16))
            size = fd[name]["image_size"]
            assert size.dtype == np.int64 and size[()].tolist() == [640, 480]

