"""Retrieval ranking (hloc's pairs_from_retrieval semantics) and the weight-free VLAD descriptor."""

from __future__ import annotations

import numpy as np
import pytest

from markerless.pipeline.retrieval import pairs_from_retrieval, top_k, train_vocabulary, vlad


def test_top_k_clamps_excludes_and_orders() -> None:
    db = np.eye(5, dtype=np.float32)
    q = np.array([0.1, 0.9, 0.5, -0.2, 0.3], dtype=np.float32)
    idx, scores = top_k(q, db, k=50)  # k beyond the database size: no crash, negative score dropped
    assert idx.tolist() == [1, 2, 4, 0] and np.all(np.diff(scores) <= 0)
    idx, _ = top_k(q, db, k=2, exclude=np.array([False, True, False, False, False]))
    assert idx.tolist() == [2, 4]


def test_pairs_from_retrieval_excludes_self_matches() -> None:
    rng = np.random.default_rng(0)
    desc = rng.standard_normal((6, 16)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    names = [f"db/{i}.jpg" for i in range(6)]
    pairs = pairs_from_retrieval(names[:2], desc[:2], names, desc, num_matched=10, min_score=-1.0)
    assert ("db/0.jpg", "db/0.jpg") not in pairs and len(pairs) == 10
    assert [p for p in pairs if p[0] == "db/1.jpg"][0][1] != "db/1.jpg"


def test_vlad_retrieves_the_same_place() -> None:
    rng = np.random.default_rng(0)
    places = [np.abs(rng.standard_normal((400, 128))).astype(np.float32) for _ in range(8)]
    places = [p / np.linalg.norm(p, axis=1, keepdims=True) for p in places]
    vocab = train_vocabulary(np.concatenate(places), {"num_clusters": 16, "max_train_descriptors": 2000,
                                                       "kmeans_iterations": 10, "seed": 0})
    db = np.stack([vlad(p, vocab) for p in places])
    assert db.shape == (8, 16 * 128) and np.allclose(np.linalg.norm(db, axis=1), 1, atol=1e-5)
    for i, p in enumerate(places):  # a noisy half of the same image ranks its own place first
        noisy = p[:200] + 0.05 * np.abs(rng.standard_normal((200, 128))).astype(np.float32)
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        assert top_k(vlad(noisy, vocab), db, 1)[0][0] == i
    with pytest.raises(ValueError, match="too few"):
        train_vocabulary(places[0][:10], {"num_clusters": 16, "max_train_descriptors": 10, "kmeans_iterations": 5,
                                         "seed": 0})
