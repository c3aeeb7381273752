"""Global retrieval: which keyframes look like the query.

`vlad` needs no pretrained weights: a 64-word vocabulary is trained with k-means on the scene's own RootSIFT
descriptors at registration, and every image is encoded as an intra-normalised, power-normalised VLAD
(Arandjelovic & Zisserman, "All about VLAD"). Within one site that is as discriminative as NetVLAD and costs
nothing at query time: it reuses the query's SIFT descriptors. `netvlad` runs hloc's NetVLAD with the official
weights (markerless.models.netvlad). Ranking is hloc's `pairs_from_retrieval`: dot product, top-K, self-matches
excluded, scores below `min_score` dropped -- without its crash when K exceeds the database size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

confs: dict[str, dict[str, Any]] = {
    "vlad": {
        "output": "global-feats-vlad",
        "num_clusters": 64,  # vocabulary size; descriptor dim = 64 x 128
        # k-means sample, drawn with a fixed seed: ~300 per word estimate each centre well; the cost is then
        # bounded whatever the scene size (docs/measurements.md)
        "max_train_descriptors": 20_000,
        "kmeans_iterations": 25,
        "seed": 0,
    },
    "netvlad": {
        "output": "global-feats-netvlad",
        "model": {"name": "netvlad", "weights": "netvlad-pitts30k"},
        "preprocessing": {"resize_max": 1024},
    },
}


def train_vocabulary(
    descriptors: np.ndarray, conf: dict[str, Any] = confs["vlad"], progress: Callable[[float], None] | None = None
) -> np.ndarray:
    """k-means centres (K, D) of a random sample of the scene's local descriptors.

    k-means takes seconds on a CPU, so it runs in rounds of a few iterations (each round resumes from the
    previous labels) and calls `progress(fraction)` after each: a registration never falls silent here.
    """
    rng = np.random.default_rng(conf["seed"])
    k = conf["num_clusters"]
    if len(descriptors) < k:
        raise ValueError(f"{len(descriptors)} descriptors are too few to train a {k}-word vocabulary")
    if len(descriptors) > conf["max_train_descriptors"]:
        descriptors = descriptors[rng.choice(len(descriptors), conf["max_train_descriptors"], replace=False)]
    data = descriptors.astype(np.float32)
    cv2.setRNGSeed(conf["seed"])
    total, per_round = conf["kmeans_iterations"], 5
    labels, flags = None, cv2.KMEANS_PP_CENTERS
    for done in range(0, total, per_round):
        rounds = min(per_round, total - done)
        criteria = (cv2.TERM_CRITERIA_MAX_ITER + cv2.TERM_CRITERIA_EPS, rounds, 1e-4)
        _, labels, centers = cv2.kmeans(data, k, labels, criteria, 1, flags)
        flags = cv2.KMEANS_USE_INITIAL_LABELS
        if progress is not None:
            progress((done + rounds) / total)
    return centers.astype(np.float32)


def vlad(descriptors: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """VLAD of one image's descriptors (N, D): residuals summed per nearest centre, intra-normalised,
    signed-square-rooted, L2-normalised -> (K * D,) float32."""
    k, d = centers.shape
    out = np.zeros((k, d), dtype=np.float32)
    if len(descriptors):
        dist = (descriptors**2).sum(1)[:, None] - 2 * descriptors @ centers.T + (centers**2).sum(1)[None]
        assign = dist.argmin(axis=1)
        members = np.zeros((len(descriptors), k), dtype=np.float32)
        members[np.arange(len(descriptors)), assign] = 1.0
        # residual sums as one product (np.add.at per descriptor was most of a registration's VLAD time)
        out = (members.T @ descriptors - np.bincount(assign, minlength=k)[:, None] * centers).astype(np.float32)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    out = np.sign(out) * np.sqrt(np.abs(out))
    flat = out.ravel()
    return flat / max(float(np.linalg.norm(flat)), 1e-12)


def top_k(
    query: np.ndarray, database: np.ndarray, k: int, exclude: np.ndarray | None = None, min_score: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k most similar database rows (dot product), best first.

    k is clamped to the database size; `exclude` (bool per row) removes self-matches; rows scoring below
    `min_score` are dropped, so fewer than k may come back (as in hloc).
    """
    scores = database @ query
    if exclude is not None:
        scores = np.where(exclude, -np.inf, scores)
    scores = np.where(scores < min_score, -np.inf, scores)
    k = min(k, len(scores))
    idx = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, dtype=int)
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    idx = idx[np.isfinite(scores[idx])]
    return idx, scores[idx]


def pairs_from_retrieval(
    query_names: list[str],
    query_desc: np.ndarray,
    db_names: list[str],
    db_desc: np.ndarray,
    num_matched: int,
    min_score: float = 0.0,
) -> list[tuple[str, str]]:
    """hloc's pairs_from_retrieval over descriptors in memory: one matrix product, self-matches excluded."""
    db_index = np.asarray(db_names)
    pairs: list[tuple[str, str]] = []
    for name, desc in zip(query_names, query_desc, strict=True):
        idx, _ = top_k(desc, db_desc, num_matched, exclude=db_index == name, min_score=min_score)
        pairs.extend((name, db_names[i]) for i in idx)
    return pairs
