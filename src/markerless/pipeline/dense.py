"""Dense matching stage of localization (``local_feature: "-"``): QTA-LoFTR between a query and its keyframes.

Registration runs the backbone once per keyframe (:meth:`DenseMatcher.cache_keyframes`); a query then costs one
backbone pass plus one transformer pass per retrieved keyframe, with pairs batched on the GPU.
Preprocessing and keypoint quantisation follow hloc's ``match_dense`` (hloc-formats.md §7): grayscale, downscale to
``resize_max``, resize to multiples of ``dfactor``, keypoints mapped back with ``(kp + 0.5) * scale - 0.5``; keyframe
keypoints binned into cells (``cell_size``, ``max_error``) and many-to-one matches removed, the query keeping its
exact coordinates (hloc's localization case). Images of different sizes or aspect ratios are matched on a common
canvas (:meth:`QTALoFTR.pad_features`), which also grows tiny images to the size the top-K needs.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from markerless.errors import BadImageError, MarkerlessError, Reason
from markerless.models.qta_loftr import QTALoFTR, load_qta_loftr, resolve_conf
from markerless.scene.camera import rescale_pixels

CACHE_FORMAT = 1
META_FILE = "meta.json"
# Keys of the conf that the cached features depend on: a cache written with other values is refused.
_CACHE_KEYS = ("weights", "resize_max", "dfactor")


def cache_settings(conf_name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the keyframe cache of `conf_name` with `overrides` depends on (refused with a reason if unknown)."""
    try:
        conf = resolve_conf(conf_name, overrides)
    except ValueError as exc:
        raise MarkerlessError(str(exc), reason=Reason.BAD_SCENE_CONFIG) from None
    return _cache_meta(conf_name, conf)


def _cache_meta(conf_name: str, conf: dict[str, Any]) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "conf": conf_name, **{k: conf[k] for k in _CACHE_KEYS}}


@dataclass(frozen=True)
class PreparedImage:
    """A preprocessed image: ``image`` (H, W) float32 in [0, 1], H and W multiples of ``dfactor``;
    ``scale`` = original / resized size as (x, y), for :func:`to_original`."""

    image: np.ndarray
    scale: np.ndarray


def preprocess(image: np.ndarray, resize_max: int, dfactor: int) -> PreparedImage:
    """hloc ``ImagePairDataset.preprocess``: grayscale, area-downscale to ``resize_max`` (never up), then resize each
    side to a multiple of ``dfactor`` (at least ``dfactor``: a tiny image is enlarged rather than refused)."""
    if image.ndim == 3 and image.shape[2] == 3:
        gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    elif image.ndim == 2:
        gray = image
    else:
        raise BadImageError(f"expected an HxWx3 RGB or HxW gray image; got shape {image.shape}")
    h, w = gray.shape
    if h == 0 or w == 0:
        raise BadImageError(f"empty image of shape {image.shape}")
    gray = gray.astype(np.float32)
    if resize_max and max(h, w) > resize_max:
        s = resize_max / max(h, w)
        gray = cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    rh, rw = gray.shape
    th, tw = (max(dfactor, x // dfactor * dfactor) for x in (rh, rw))
    if (th, tw) != (rh, rw):
        shrink = th <= rh and tw <= rw
        gray = cv2.resize(gray, (tw, th), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return PreparedImage(gray / 255.0, np.array([w / tw, h / th]))


def to_original(kps: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Keypoints of a resized image back to the original one (pixel centres at integers, hloc convention)."""
    return rescale_pixels(kps, scale)


def canvas_size(shapes: Sequence[tuple[int, int]], min_tokens: int) -> tuple[int, int]:
    """Smallest coarse canvas holding every ``(h, w)`` coarse map, both sides multiples of 4 (the QuadTree pyramid),
    with at least ``min_tokens`` cells (the coarsest level must hold the first top-K); grows the shorter side."""
    hc = max(4, max(math.ceil(h / 4) * 4 for h, _ in shapes))
    wc = max(4, max(math.ceil(w / 4) * 4 for _, w in shapes))
    while hc * wc < min_tokens:
        if hc <= wc:
            hc += 4
        else:
            wc += 4
    return hc, wc


def _to_cells(kps: np.ndarray, ps: float) -> np.ndarray:
    """hloc ``to_cpts``: the centre of the ``ps``-pixel cell of each keypoint (unchanged when ``ps`` is 0)."""
    if ps > 0:
        return np.round(np.round((kps + 0.5) / ps) * ps - 0.5, 2)
    return kps


def assign_keypoints(
    kps: np.ndarray, cell_size: float, max_error: float, scores: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Quantise one image's matched keypoints as hloc's ``assign_keypoints(update=True)`` + ``aggregate_matches``.

    Keypoints falling into one ``max(cell_size, max_error)`` cell become one keypoint, placed on the ``max_error``
    bin with the highest summed match score (first seen on ties). With both sizes 0 keypoints are only deduplicated.
    Like hloc, cells are centred on half-integer coordinates for ``ps = 1``.

    Returns:
        keypoints ``(U, 2)`` and, for each input keypoint, the index of its keypoint ``(N,)``.
    """
    kps = np.asarray(kps, dtype=np.float64).reshape(-1, 2)
    if len(kps) == 0:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    scores = np.ones(len(kps)) if scores is None else np.asarray(scores, dtype=np.float64)
    cells = _to_cells(kps, max(cell_size, max_error))
    bins = _to_cells(kps, int(max_error))
    _, ids = np.unique(cells, axis=0, return_inverse=True)
    ids = ids.reshape(-1)
    pairs, pair_of = np.unique(np.column_stack([ids, bins]), axis=0, return_inverse=True)
    pair_of = pair_of.reshape(-1)
    votes = np.zeros(len(pairs))
    np.add.at(votes, pair_of, scores)
    first = np.full(len(pairs), len(kps))
    np.minimum.at(first, pair_of, np.arange(len(kps)))
    order = np.lexsort((first, -votes, pairs[:, 0]))  # by cell, then most votes, then first seen
    cell_start = np.r_[True, pairs[order[1:], 0] != pairs[order[:-1], 0]]
    return pairs[order[cell_start], 1:3], ids


def unique_matches(ids0: np.ndarray, ids1: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices of the matches kept by hloc's ``get_unique_matches``: the best-scoring match of every keypoint on
    each side, intersected (removes many-to-one matches). Sorted."""

    def best_per_id(ids: np.ndarray) -> np.ndarray:
        order = np.lexsort((np.arange(len(ids)), -scores, ids))
        return order[np.r_[True, ids[order[1:]] != ids[order[:-1]]]]

    if len(ids0) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.intersect1d(best_per_id(np.asarray(ids0)), best_per_id(np.asarray(ids1)))


def quantize_matches(
    query_kps: np.ndarray, keyframe_kps: np.ndarray, scores: np.ndarray, cell_size: float, max_error: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Localization case of hloc's aggregation: the keyframe side is binned, the query keeps exact coordinates,
    then many-to-one matches are removed. Returns (query kps, keyframe kps, scores) of the kept matches."""
    q_pts, q_ids = assign_keypoints(query_kps, 0, 0, scores)
    k_pts, k_ids = assign_keypoints(keyframe_kps, cell_size, max_error, scores)
    keep = unique_matches(q_ids, k_ids, np.asarray(scores, dtype=np.float64))
    return q_pts[q_ids[keep]], k_pts[k_ids[keep]], np.asarray(scores, dtype=np.float32)[keep]


@dataclass
class _Features:
    """Backbone features of one preprocessed image, on the matcher's device."""

    coarse: torch.Tensor  # [1, 256, h/8, w/8]
    fine: torch.Tensor  # [1, 128, h/2, w/2]
    scale: np.ndarray  # (2,) original / resized, x then y
    size: tuple[int, int]  # original (height, width)

    @property
    def nbytes(self) -> int:
        return self.coarse.element_size() * self.coarse.numel() + self.fine.element_size() * self.fine.numel()


class DenseMatcher:
    """QTA-LoFTR matcher for one conf: builds the model once, caches keyframe features, matches queries.

    Not thread-safe: use it from the worker thread that owns the models.
    """

    def __init__(
        self,
        conf_name: str,
        overrides: dict[str, Any] | None = None,
        device: str | None = None,
        weights_dir: Path | None = None,
    ) -> None:
        self.conf_name = conf_name
        self.conf = resolve_conf(conf_name, overrides)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: QTALoFTR = load_qta_loftr(self.conf, weights_dir=weights_dir).to(self.device)
        self.half = bool(self.conf["half"]) and self.device.type == "cuda"
        self.batch_size = int(self.conf["gpu_batch_size"]) if self.device.type == "cuda" else 1
        self._memory: OrderedDict[tuple[str, int], _Features] = OrderedDict()
        self._memory_bytes = 0

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half)

    def _extract(self, image: np.ndarray) -> _Features:
        prepared = preprocess(image, int(self.conf["resize_max"]), int(self.conf["dfactor"]))
        tensor = torch.from_numpy(prepared.image)[None, None].to(self.device)
        with torch.inference_mode(), self._autocast():
            feats = self.model.extract(tensor)
        return _Features(feats["coarse"], feats["fine"], prepared.scale, image.shape[:2])

    def _meta(self) -> dict[str, Any]:
        return _cache_meta(self.conf_name, self.conf)

    def cache_keyframes(self, images: Sequence[np.ndarray], cache_dir: Path) -> None:
        """Compute and store the backbone features of every keyframe (``kf{index:05d}.pt``, float16) at
        registration; ``meta.json`` (written last) records the settings they depend on."""
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            feats = self._extract(image)
            torch.save(
                {
                    "coarse": feats.coarse.to("cpu", torch.float16),
                    "fine": feats.fine.to("cpu", torch.float16),
                    "scale": torch.from_numpy(feats.scale),
                    "size": torch.tensor(feats.size),
                },
                cache_dir / f"kf{index:05d}.pt",
            )
        (cache_dir / META_FILE).write_text(json.dumps({**self._meta(), "num_keyframes": len(images)}, indent=1))

    def _check_cache(self, cache_dir: Path) -> None:
        path = cache_dir / META_FILE
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise MarkerlessError(f"dense feature cache {path} unreadable ({exc}): register the scene again",
                                  reason=Reason.SCENE_OUTDATED) from exc
        stale = {k: (meta.get(k), v) for k, v in self._meta().items() if meta.get(k) != v}
        if stale:
            detail = ", ".join(f"{k} cached {old!r} vs {new!r}" for k, (old, new) in stale.items())
            raise MarkerlessError(
                f"dense feature cache {cache_dir} was built with other settings ({detail}): register the scene again",
                reason=Reason.SCENE_OUTDATED,
            )

    def _keyframe(self, cache_dir: Path, index: int) -> _Features:
        """Features of a cached keyframe, from memory when recently used (least recently used evicted first)."""
        key = (str(cache_dir), index)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = cache_dir / f"kf{index:05d}.pt"
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise MarkerlessError(f"dense feature cache {path} unreadable ({exc}): register the scene again") from exc
        dtype = torch.float16 if self.half else torch.float32
        feats = _Features(
            raw["coarse"].to(self.device, dtype),
            raw["fine"].to(self.device, dtype),
            raw["scale"].numpy(),
            (int(raw["size"][0]), int(raw["size"][1])),
        )
        self._memory[key] = feats
        self._memory_bytes += feats.nbytes
        while self._memory_bytes > int(self.conf["feature_cache_mb"]) * 2**20 and len(self._memory) > 1:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= old.nbytes
        return feats

    def match(
        self, query_rgb: np.ndarray, keyframe_ids: Sequence[int], cache_dir: Path
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Match a query image against cached keyframes.

        Returns, per keyframe in ``keyframe_ids`` order: query keypoints ``(M, 2)``, keyframe keypoints ``(M, 2)``
        (float64, original pixels, hloc convention; keyframe ones quantised) and scores ``(M,)`` float32.
        """
        cache_dir = Path(cache_dir)
        self._check_cache(cache_dir)
        query = self._extract(query_rgb)
        keyframes = [self._keyframe(cache_dir, i) for i in keyframe_ids]
        raw: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [None] * len(keyframes)  # type: ignore[list-item]
        groups: dict[tuple[int, ...], list[int]] = {}
        for slot, kf in enumerate(keyframes):
            groups.setdefault(tuple(kf.coarse.shape[2:]), []).append(slot)
        with torch.inference_mode(), self._autocast():
            for shape, slots in groups.items():
                hw = canvas_size([shape, tuple(query.coarse.shape[2:])], self.model.min_coarse_tokens)
                q_feats, q_mask = self.model.pad_features({"coarse": query.coarse, "fine": query.fine}, hw)
                for start in range(0, len(slots), self.batch_size):
                    chunk = slots[start : start + self.batch_size]
                    k_feats, k_mask = self.model.pad_features(
                        {
                            "coarse": torch.cat([keyframes[s].coarse for s in chunk]),
                            "fine": torch.cat([keyframes[s].fine for s in chunk]),
                        },
                        hw,
                    )
                    n = len(chunk)
                    out = self.model.match(
                        k_feats,
                        {k: v.expand(n, -1, -1, -1) for k, v in q_feats.items()},
                        k_mask,
                        q_mask.expand(n, -1, -1),
                    )
                    b_ids = out["batch_indexes"].cpu().numpy()
                    kp0 = out["keypoints0"].float().cpu().numpy().astype(np.float64)
                    kp1 = out["keypoints1"].float().cpu().numpy().astype(np.float64)
                    conf = out["confidence"].float().cpu().numpy()
                    for b, slot in enumerate(chunk):
                        sel = b_ids == b
                        raw[slot] = (kp1[sel], kp0[sel], conf[sel])
        results = []
        for kf, (q_kps, k_kps, scores) in zip(keyframes, raw, strict=True):
            q_kps, k_kps = to_original(q_kps, query.scale), to_original(k_kps, kf.scale)
            h, w = query.size
            inside = (q_kps >= -0.5).all(1) & (q_kps[:, 0] <= w - 0.5) & (q_kps[:, 1] <= h - 0.5)
            results.append(
                quantize_matches(
                    q_kps[inside], k_kps[inside], scores[inside], self.conf["cell_size"], self.conf["max_error"]
                )
            )
        return results
