"""QTA-LoFTR: the official checkpoint format, strict loading with named errors, and the matching network.

The official indoor/outdoor checkpoints cannot be downloaded here, so checkpoints are written by
`write_random_checkpoint` in the official format (Lightning dict, `matcher.` prefix) with random weights; the key
names and shapes are checked against the list dumped from the upstream network (shared docs).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from markerless.errors import MarkerlessError, MissingWeightsError
from markerless.models.qta_loftr import (
    QTALoFTR,
    confs,
    load_qta_loftr,
    resolve_conf,
    write_random_checkpoint,
)

KEYS_FILE = Path(__file__).resolve().parents[2] / "shared" / "docs" / "qta-loftr-state-dict-keys.txt"


def official_keys() -> list[tuple[str, tuple[int, ...]]]:
    path = Path(os.environ.get("MARKERLESS_QTA_KEYS", KEYS_FILE))
    if not path.is_file():
        pytest.skip(f"official key list {path} not found (set MARKERLESS_QTA_KEYS)")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            rows.append((name, tuple(ast.literal_eval(shape))))
    return rows


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("w") / "qta-indoor.ckpt", "qta_indoor", seed=3)


def test_state_dict_has_the_official_keys_and_shapes():
    want = official_keys()
    assert len(want) == 259
    for name in confs:
        model = QTALoFTR(resolve_conf(name))
        got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
        assert got == want, name


def test_random_checkpoint_is_in_the_official_format_and_loads_strictly(ckpt: Path):
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert len(raw["state_dict"]) == 259
    assert all(k.startswith("matcher.") for k in raw["state_dict"])
    model = load_qta_loftr(resolve_conf("qta_indoor"), weights_dir=ckpt.parent)  # through the manifest name
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, raw["state_dict"][f"matcher.{key}"]), key
    assert model.pos_encoding.temp_bug_fix
    assert model.loftr_coarse.layers[0].attn.py_att.topks == [64, 16, 16]
    assert model.coarse_matching.thr == 0.1


def _corrupt(ckpt: Path, tmp_path: Path, edit) -> Path:
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    edit(raw["state_dict"])
    out = tmp_path / "broken.ckpt"
    torch.save(raw, out)
    return out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("matcher.loftr_coarse.layers.3.attn.py_att.weight"),
         "missing keys: loftr_coarse.layers.3.attn.py_att.weight"),
        (
            lambda sd: sd.__setitem__("matcher.backbone.conv1.weight", torch.zeros(128, 3, 7, 7)),
            "wrong shapes: backbone.conv1.weight (128, 3, 7, 7) (expected (128, 1, 7, 7))",
        ),
        (lambda sd: sd.__setitem__("matcher.coarse_matching.bin_score", torch.tensor(1.0)),
         "unexpected keys: coarse_matching.bin_score"),
    ],
)
def test_bad_checkpoint_names_the_key_and_the_file(ckpt: Path, tmp_path: Path, edit, message: str):
    broken = _corrupt(ckpt, tmp_path, edit)
    with pytest.raises(MarkerlessError, match="not a QTA-LoFTR checkpoint") as info:
        load_qta_loftr(resolve_conf("qta_indoor"), path=broken)
    assert message in str(info.value)
    assert str(broken) in str(info.value)
    assert info.value.reason == "bad_weights"


def test_not_a_lightning_checkpoint(tmp_path: Path):
    path = tmp_path / "plain.ckpt"
    torch.save({"weights": 1}, path)
    with pytest.raises(MarkerlessError, match="no 'state_dict' entry"):
        load_qta_loftr(resolve_conf("qta_indoor"), path=path)


def test_missing_file_names_the_file_and_the_fetch_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MARKERLESS_WEIGHTS_DIR", raising=False)
    with pytest.raises(MissingWeightsError) as info:
        load_qta_loftr(resolve_conf("qta_outdoor"), weights_dir=tmp_path)
    assert "qta-outdoor.ckpt" in str(info.value)
    assert str(tmp_path) in str(info.value)
    assert "markerless weights fetch qta-outdoor" in str(info.value)


def test_confs_and_overrides():
    conf = resolve_conf("qta_indoor", {"match_threshold": 0.3})
    assert conf["match_threshold"] == 0.3 and confs["qta_indoor"]["match_threshold"] == 0.1
    assert resolve_conf("qta_indoor_fast")["topks"] == [16, 8, 8]
    assert resolve_conf("qta_outdoor")["weights"] == "qta-outdoor"
    with pytest.raises(ValueError, match="unknown keys \\['topk'\\]"):
        resolve_conf("qta_indoor", {"topk": [1, 1, 1]})
    with pytest.raises(ValueError, match="unknown dense matcher conf"):
        resolve_conf("qta_indoor_slow")


def test_kornia_default_config_is_not_mutated():
    from kornia.feature.loftr.loftr import default_cfg

    QTALoFTR(resolve_conf("qta_indoor", {"match_threshold": 0.05}))
    assert default_cfg["coarse"]["temp_bug_fix"] is False
    assert default_cfg["match_coarse"]["thr"] == 0.2


def test_pair_forward_returns_grid_and_refined_keypoints(ckpt: Path):
    """Random weights give no match above 0.1, so the threshold is 0 here: every mutual nearest neighbour."""
    model = load_qta_loftr(resolve_conf("qta_outdoor", {"match_threshold": 0.0}), path=ckpt)
    gen = torch.Generator().manual_seed(0)
    image0 = torch.rand(1, 1, 128, 256, generator=gen)  # 16x32 coarse cells: the minimum for top-K 32
    image1 = torch.roll(image0, shifts=(0, 8), dims=(2, 3))
    with torch.inference_mode():
        out = model(image0, image1)
    m = len(out["confidence"])
    assert m > 0
    assert out["keypoints0"].shape == out["keypoints1"].shape == (m, 2)
    assert torch.all(out["keypoints0"] % 8 == 0)  # coarse grid of image0
    assert torch.all((out["keypoints1"] - out["keypoints1"].round()).abs().sum(1) > 0)  # refined off the grid
    border = 2 * 8
    assert out["keypoints0"][:, 0].min() >= border and out["keypoints0"][:, 0].max() < 256 - border
    with pytest.raises(ValueError, match="top-K 32 exceeds"):
        model(image0[:, :, :64], image1[:, :, :64])


def test_padding_features_are_the_response_to_black_pixels(ckpt: Path):
    """Padded feature maps equal those of a black-padded image away from the content (by the receptive field)."""
    model = load_qta_loftr(resolve_conf("qta_indoor"), path=ckpt)
    torch.manual_seed(1)
    for module in model.backbone.modules():  # random BN statistics: a black image must not map to zero
        if isinstance(module, torch.nn.BatchNorm2d):
            module.bias.data.normal_(0, 0.5)
            module.running_mean.data.normal_(0, 0.5)
    model.load_state_dict(model.state_dict())  # drops the cached padding features
    image = torch.rand(1, 1, 64, 64)
    canvas = torch.zeros(1, 1, 256, 256)
    canvas[:, :, :64, :64] = image
    with torch.inference_mode():
        padded, mask = model.pad_features(model.extract(image), (32, 32))
        direct = model.extract(canvas)
    assert mask.sum() == 8 * 8 and mask[0, :8, :8].all()
    far_c, far_f = slice(16, 24), slice(64, 96)  # 8 coarse cells from the content and from the canvas border
    assert padded["coarse"][0, :, far_c, far_c].abs().max() > 1
    tol = {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(padded["coarse"][..., far_c, far_c], direct["coarse"][..., far_c, far_c], **tol)
    torch.testing.assert_close(padded["fine"][..., far_f, far_f], direct["fine"][..., far_f, far_f], **tol)
    torch.testing.assert_close(padded["coarse"][..., :8, :8], model.extract(image)["coarse"])
