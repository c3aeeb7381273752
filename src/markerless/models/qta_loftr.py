"""QuadTree-attention LoFTR (QTA-LoFTR) that loads the official ``indoor.ckpt`` / ``outdoor.ckpt`` unchanged.

Only the coarse transformer differs from LoFTR (see :mod:`markerless.models.quadtree_attention`); everything else is
kornia's LoFTR code, whose parameter names and shapes already match the checkpoints: ResNet-FPN 8/2 backbone,
sine positional encoding in its fixed form (``temp_bug_fix=True``, the QTA training default), dual-softmax coarse
matching, fine preprocessing, the linear-attention fine transformer and expectation-based fine matching. The module
tree is arranged so that ``state_dict()`` has exactly the 259 keys of the official checkpoints
(``docs/qta-loftr-state-dict-keys.txt``).

The forward pass is split in two so a keyframe's backbone features can be computed once at registration:
``extract(images)`` (the backbone, independent of the other image) and ``match(feats0, feats1, ...)``.
Two images of different sizes are matched by padding their feature maps to a common canvas with the backbone's
response to black pixels (:meth:`QTALoFTR.pad_features`), which stands in for the zero-padded images of the
official MegaDepth evaluation while keeping cached features independent of the image they are later matched with.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from markerless.errors import MarkerlessError, Reason
from markerless.models.quadtree_attention import LocalFeatureTransformer

# Presets named as SceneScape's `match_dense.confs` (scenescape-mqtt.md §4.3). SceneScape passes its qta_* confs
# through hloc's `match_dense`; where a key it set never reached the model, the comment says which value we use.
# The keys are explained at `qta_indoor`; `_AT_1024` is what the indoor-fast and outdoor presets share.
_AT_1024: dict[str, Any] = {
    "match_threshold": 0.2,
    "border_rm": 2,
    "resize_max": 1024,
    "dfactor": 32,
    "cell_size": 0,
    "max_error": 0,
    "half": True,
    "gpu_batch_size": 16,
    "feature_cache_mb": 4096,
}
confs: dict[str, dict[str, Any]] = {
    "qta_indoor": {
        "weights": "qta-indoor",  # manifest name of the checkpoint (ScanNet-trained)
        "topks": [64, 16, 16],  # QuadTree top-K per level, coarse to fine (SceneScape's effective value)
        "match_threshold": 0.1,  # dual-softmax confidence threshold (LoFTR default 0.2)
        "border_rm": 2,  # coarse cells dropped along the image border (QTA eval configs)
        "resize_max": 832,  # longer image side after downscaling; images are never upscaled
        "dfactor": 32,  # H and W are resized to multiples of this (QuadTree needs 32)
        "cell_size": 1,  # keyframe keypoint quantisation cell in pixels (hloc match_dense; 0 = exact)
        "max_error": 1,  # keyframe keypoint bin in pixels (hloc match_dense; 0 = exact)
        "half": True,  # float16 autocast on CUDA (ignored on CPU)
        "gpu_batch_size": 16,  # keyframe pairs per forward on CUDA (1 on CPU, where batching gains nothing)
        "feature_cache_mb": 4096,  # keyframe features kept in (GPU) memory between queries, least recently used out
    },
    "qta_indoor_fast": {
        "weights": "qta-indoor",
        # SceneScape sets top-level `topks` / `match_threshold`, which its nested model conf never reads, so it
        # actually ran [32, 16, 16] and 0.2. We apply the values it asked for, which is what "fast" means.
        "topks": [16, 8, 8],
        **_AT_1024,  # match_threshold 0.2
    },
    "qta_outdoor": {
        "weights": "qta-outdoor",  # MegaDepth-trained
        # SceneScape's (ineffective) top-level keys ask for what its base conf already sets: [32, 16, 16] and 0.2.
        # QTA's own MegaDepth config trains and tests with [16, 8, 8].
        "topks": [32, 16, 16],
        **_AT_1024,  # match_threshold 0.2
    },
}

_D_COARSE = 256
_LAYER_NAMES = ["self", "cross"] * 4


def resolve_conf(conf_name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preset ``conf_name`` with ``overrides`` applied (a new dict; unknown names and keys raise ValueError)."""
    if conf_name not in confs:
        raise ValueError(f"unknown dense matcher conf {conf_name!r}; known: {', '.join(confs)}")
    conf = copy.deepcopy(confs[conf_name])
    unknown = sorted(set(overrides or {}) - set(conf))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in overrides of {conf_name!r}; known: {', '.join(conf)}")
    conf.update(copy.deepcopy(overrides or {}))
    return conf


def _kornia_config(conf: dict[str, Any]) -> dict[str, Any]:
    """kornia's LoFTR config for the shared submodules, as a deep copy (kornia < 0.9 mutated its module default)."""
    from kornia.feature.loftr.loftr import default_cfg

    cfg = copy.deepcopy(default_cfg)
    cfg["coarse"]["temp_bug_fix"] = True
    cfg["match_coarse"].update({"thr": float(conf["match_threshold"]), "border_rm": int(conf["border_rm"])})
    return cfg


class QTALoFTR(nn.Module):
    """QTA-LoFTR inference network; ``state_dict()`` keys and shapes are those of the official checkpoints."""

    def __init__(self, conf: dict[str, Any]) -> None:
        super().__init__()
        from kornia.feature.loftr.backbone import build_backbone
        from kornia.feature.loftr.loftr_module import FinePreprocess
        from kornia.feature.loftr.loftr_module import LocalFeatureTransformer as LinearTransformer
        from kornia.feature.loftr.utils.coarse_matching import CoarseMatching
        from kornia.feature.loftr.utils.fine_matching import FineMatching
        from kornia.feature.loftr.utils.position_encoding import PositionEncodingSine

        cfg = _kornia_config(conf)
        self.stride_c, self.stride_f = cfg["resolution"]
        self.backbone = build_backbone(cfg)
        self.pos_encoding = PositionEncodingSine(_D_COARSE, temp_bug_fix=True)
        self.loftr_coarse = LocalFeatureTransformer(_D_COARSE, cfg["coarse"]["nhead"], _LAYER_NAMES, conf["topks"])
        self.coarse_matching = CoarseMatching(cfg["match_coarse"])
        self.fine_preprocess = FinePreprocess(cfg)
        self.loftr_fine = LinearTransformer(cfg["fine"])
        self.fine_matching = FineMatching()
        self._padding: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def min_coarse_tokens(self) -> int:
        """Fewest cells a coarse map needs (the coarsest of its 3 pyramid levels must hold the first top-K)."""
        return 16 * self.loftr_coarse.layers[0].attn.py_att.topks[0]

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        self._padding.clear()  # derived from the backbone weights
        return super().load_state_dict(state_dict, *args, **kwargs)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone features of grayscale images ``[B, 1, H, W]`` in [0, 1], H and W multiples of 8.

        Returns ``coarse [B, 256, H/8, W/8]`` (no positional encoding yet: it is added on the matching canvas)
        and ``fine [B, 128, H/2, W/2]``.
        """
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] % 8 or images.shape[3] % 8:
            raise ValueError(
                f"expected grayscale images [B, 1, H, W] with H, W multiples of 8; got {tuple(images.shape)}"
            )
        coarse, fine = self.backbone(images)
        return {"coarse": coarse, "fine": fine}

    def _padding_features(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's coarse and fine response to black pixels, away from any image border (computed once)."""
        key = (device, dtype)
        if key not in self._padding:
            size = 256  # border effects reach ~7 coarse cells in: the centre of a 256x256 black image is free of them
            with torch.inference_mode():
                feats = self.extract(torch.zeros(1, 1, size, size, device=device))
            mid_c, mid_f = size // 16, size // 4
            self._padding[key] = (
                feats["coarse"][0, :, mid_c, mid_c].to(dtype).clone(),
                feats["fine"][0, :, mid_f, mid_f].to(dtype).clone(),
            )
        return self._padding[key]

    def pad_features(
        self, feats: dict[str, torch.Tensor], hw_c: tuple[int, int]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Place features on a larger ``hw_c`` coarse canvas (top-left), as if the image had been padded with black.

        Returns the padded ``coarse`` / ``fine`` maps and the coarse validity mask ``[B, hc, wc]`` (bool).
        """
        coarse, fine = feats["coarse"], feats["fine"]
        b, _, h, w = coarse.shape
        hc, wc = hw_c
        if hc < h or wc < w:
            raise ValueError(f"canvas {hc}x{wc} is smaller than the coarse map {h}x{w}")
        mask = torch.zeros(b, hc, wc, dtype=torch.bool, device=coarse.device)
        mask[:, :h, :w] = True
        if (hc, wc) == (h, w):
            return {"coarse": coarse, "fine": fine}, mask
        pad_c, pad_f = self._padding_features(coarse.device, coarse.dtype)
        r = self.stride_c // self.stride_f
        out_c = pad_c.view(1, -1, 1, 1).expand(b, -1, hc, wc).clone()
        out_f = pad_f.view(1, -1, 1, 1).expand(b, -1, hc * r, wc * r).clone()
        out_c[:, :, :h, :w] = coarse
        out_f[:, :, : h * r, : w * r] = fine
        return {"coarse": out_c, "fine": out_f}, mask

    def match(
        self,
        feats0: dict[str, torch.Tensor],
        feats1: dict[str, torch.Tensor],
        mask0: torch.Tensor | None = None,
        mask1: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Match batched pairs of :meth:`extract` features of equal shape (pad them first).

        Args:
            feats0, feats1: ``coarse [B, 256, hc, wc]`` and ``fine [B, 128, 4hc, 4wc]``.
            mask0, mask1: coarse validity ``[B, hc, wc]`` from :meth:`pad_features`; matches only between valid
                cells, border removal measured from the valid extent.

        Returns:
            ``keypoints0``, ``keypoints1`` ``[M, 2]`` (x, y) in pixels of the canvas (keypoints0 on the 8-pixel
            coarse grid, keypoints1 refined), ``confidence [M]``, ``batch_indexes [M]``.
        """
        feat_c0, feat_c1 = self.pos_encoding(feats0["coarse"]), self.pos_encoding(feats1["coarse"])
        if feat_c0.shape != feat_c1.shape:
            raise ValueError(f"pad both sides to one canvas first: {tuple(feat_c0.shape)} vs {tuple(feat_c1.shape)}")
        b, _, hc, wc = feat_c0.shape
        data: dict[str, Any] = {
            "bs": b,
            "stride_c": self.stride_c,
            "stride_f": self.stride_f,
            "hw0_c": feat_c0.shape[2:],
            "hw1_c": feat_c1.shape[2:],
            "hw0_f": feats0["fine"].shape[2:],
            "hw1_f": feats1["fine"].shape[2:],
        }
        tokens0, tokens1 = self.loftr_coarse(feat_c0, feat_c1)
        mask_c0 = mask_c1 = None
        if mask0 is not None and mask1 is not None:
            data.update({"mask0": mask0, "mask1": mask1})
            mask_c0, mask_c1 = mask0.flatten(1), mask1.flatten(1)
        self.coarse_matching(tokens0, tokens1, data, mask_c0=mask_c0, mask_c1=mask_c1)
        fine0, fine1 = self.fine_preprocess(feats0["fine"], feats1["fine"], tokens0, tokens1, data)
        if fine0.shape[0]:
            fine0, fine1 = self.loftr_fine(fine0, fine1)
        self.fine_matching(fine0, fine1, data)
        return {
            "keypoints0": data["mkpts0_f"],
            "keypoints1": data["mkpts1_f"],
            "confidence": data["mconf"],
            "batch_indexes": data["m_bids"],
        }

    def forward(self, image0: torch.Tensor, image1: torch.Tensor) -> dict[str, torch.Tensor]:
        """Match two batches of grayscale images ``[B, 1, H, W]`` of one size (H, W multiples of 32)."""
        if image0.shape != image1.shape:
            raise ValueError(f"images must have the same shape; got {tuple(image0.shape)} and {tuple(image1.shape)}")
        feats = self.extract(torch.cat([image0, image1]))
        b = image0.shape[0]
        return self.match({k: v[:b] for k, v in feats.items()}, {k: v[b:] for k, v in feats.items()})


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The network weights of a QTA-LoFTR Lightning checkpoint, ``matcher.`` prefix stripped.

    ``weights_only=False``: Lightning checkpoints pickle non-tensor training state (callbacks, hyper-parameters)
    that the weights-only unpickler refuses. Unpickling runs code, so only files from the weights manifest (trusted
    upstream URL, size and SHA-256 checked by ``markerless weights fetch``) or written by
    :func:`write_random_checkpoint` are loaded here.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt or truncated files fail in many ways inside the unpickler
        raise MarkerlessError(f"{path}: cannot read the QTA-LoFTR checkpoint: {exc!r}",
                              reason=Reason.BAD_WEIGHTS) from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise MarkerlessError(
            f"{path}: not a PyTorch-Lightning checkpoint (no 'state_dict' entry)", reason=Reason.BAD_WEIGHTS
        )
    return {(k[len("matcher.") :] if k.startswith("matcher.") else k): v for k, v in ckpt["state_dict"].items()}


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise ``MarkerlessError`` naming the file and every missing, unexpected or misshaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)
    ]
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped))
        if keys
    ]
    if problems:
        raise MarkerlessError(f"{path}: not a QTA-LoFTR checkpoint; {'; '.join(problems)}", reason=Reason.BAD_WEIGHTS)


def load_qta_loftr(conf: dict[str, Any], path: Path | None = None, weights_dir: Path | None = None) -> QTALoFTR:
    """Build QTA-LoFTR for ``conf`` and load its checkpoint strictly, in eval mode on the CPU.

    ``path`` defaults to ``markerless.models.weights.resolve(conf["weights"], weights_dir)``, which never downloads and
    raises ``MissingWeightsError`` naming the file, the directories searched and the fetch command.
    """
    if path is None:
        from markerless.models.weights import resolve

        path = resolve(conf["weights"], weights_dir)
    model = QTALoFTR(conf)
    state = read_checkpoint(path)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.eval()


def write_random_checkpoint(path: Path, conf_name: str, seed: int = 0) -> Path:
    """Write a checkpoint in the official format (Lightning dict, ``matcher.``-prefixed keys) with random weights.

    A test and benchmark utility for machines that cannot download the real files: the architecture, key names,
    shapes and loading path are the real ones; the matches are meaningless.
    """
    conf = resolve_conf(conf_name)
    torch.manual_seed(seed)
    model = QTALoFTR(conf)
    ckpt = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "1.3.5",
        "state_dict": {f"matcher.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"random_weights": True, "conf": conf_name, "seed": seed},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path
