"""Registration: a Polycam zip becomes a scene version (features, 3D points, retrieval index), atomically.

Stages, each a plain function: ingest (validate + SceneScape layout) -> local features (SIFT) -> 3D points of
every keypoint (depth, then mesh) -> global descriptors (VLAD or NetVLAD) -> dense caches (QTA-LoFTR scenes)
-> manifest -> atomic swap. Everything is computed here once so that a query only matches and solves.

On a CPU the stages overlap, since SIFT is most of the work: worker processes extract each keyframe as soon as
ingest has written it, this process lifts each keyframe's keypoints while the next ones are extracted, and the
global index is built while the features are written.

The manifest records the scene's identity (`pipeline.identity`). A new version of the same zip with the same
identity, e.g. new gates, hard-links the current version's files instead of computing them again: query-time
knobs never re-extract.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from markerless import __version__
from markerless.errors import DatasetError
from markerless.models.weights import resolve as resolve_weights
from markerless.pipeline.features import FeatureModels, SiftWorkers
from markerless.pipeline.identity import confs_identity, scene_identity
from markerless.pipeline.registration_options import RegistrationOptions
from markerless.pipeline.retrieval import train_vocabulary, vlad
from markerless.pipeline.stage_confs import StageConfs, stage_confs
from markerless.scene.config import SceneConfig
from markerless.scene.h5io import write_global_descriptors, write_local_features, write_points3d
from markerless.scene.layout import Keyframe, load_depth, read_rgb
from markerless.scene.polycam import ingest
from markerless.scene.store import MANIFEST, STORE_FORMAT, SceneInfo, SceneStore, check_scene_id, lift_keyframe

Progress = Callable[[str, float], None]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, which container CPU sets restrict), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def needs_registration(
    store: SceneStore,
    scene_id: str,
    dataset: Path,
    config: SceneConfig,
    options: RegistrationOptions = RegistrationOptions(),
) -> bool:
    """True when registering now would not give the current version: none yet, another store format, zip
    content, scene config or identity. Only the zip, the identity or the format make `register_scene` extract
    again; a change of query-time knobs alone gives a new version sharing the stored files."""
    info = store.info(scene_id)
    return (
        info is None
        or info.store_format != STORE_FORMAT
        or info.config != config
        or info.identity != scene_identity(config, options.use_depth)
        or info.dataset_sha256 != file_sha256(dataset)
    )


def required_weights(confs: StageConfs) -> list[str]:
    """Manifest names of the pretrained files a scene of `confs` needs (NetVLAD, a QTA-LoFTR checkpoint)."""
    names = [name for name in [confs.retrieval.get("model", {}).get("weights")] if name]
    if confs.dense is not None:
        names.append(confs.dense["weights"])
    return names


def extract_local(
    dataset_dir: Path, keyframes: list[Keyframe], conf: dict[str, Any], models: FeatureModels,
    submitted: list[Future[dict[str, np.ndarray]]] | None, progress: Progress,
) -> Iterator[tuple[Keyframe, dict[str, np.ndarray]]]:
    """SIFT (`conf`) of every keyframe, in order, as each is ready: from the futures of `SiftWorkers` when given
    (CPU SIFT holds the GIL: processes extract while ingest goes on), else in this process (GPU SIFT, one worker)."""
    if submitted is not None:
        results: Iterator[dict[str, np.ndarray]] = (future.result() for future in submitted)
    else:
        extractor = models.sift(conf)
        results = (extractor(cv2.imread(str(dataset_dir / kf.name), cv2.IMREAD_GRAYSCALE)) for kf in keyframes)
    for done, (kf, feats) in enumerate(zip(keyframes, results, strict=True), start=1):
        progress("features", done / len(keyframes))
        yield kf, feats


def register_scene(
    store: SceneStore,
    scene_id: str,
    dataset: Path,
    config: SceneConfig,
    models: FeatureModels,
    progress: Progress | None = None,
    options: RegistrationOptions = RegistrationOptions(),
) -> SceneInfo:
    """Build a new version of `scene_id` from a Polycam zip and swap it in; the old version serves until then.

    Raises DatasetError for a bad upload, MissingWeightsError when the config needs absent weights, MarkerlessError
    (`bad_scene_config`) for overrides of a dense matcher that its preset lacks.
    """
    check_scene_id(scene_id)
    confs = stage_confs(config)
    identity = confs_identity(confs, options.use_depth)
    report = progress or (lambda stage, fraction: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    dataset = Path(dataset)
    if dataset.is_dir():
        raise DatasetError(f"{dataset}: is a folder; expected a Polycam raw-data export (.zip)")
    if not dataset.is_file():
        raise DatasetError(f"{dataset}: dataset file not found")
    for name in required_weights(confs):  # absent: refused now, not after ingest and feature extraction
        resolve_weights(name, models.weights_dir)
    with store.staging(scene_id, version) as staging, ExitStack() as stack:
        report("ingest", 0.0)
        try:
            dataset_sha = file_sha256(dataset)
        except OSError as exc:
            raise DatasetError(f"{dataset}: cannot read ({exc.strerror or exc})") from exc
        reused = _reuse_current(store, scene_id, dataset_sha, identity, staging)
        if reused is not None:
            timings["total_s"] = time.perf_counter() - start
            manifest = {**reused, "version": version, "dataset": str(dataset), "config": config.model_dump(),
                        "limits": asdict(options.limits), "registered_at": datetime.now(UTC).isoformat(),
                        "reused_from": reused["version"], "timings": timings}
            report("commit", 1.0)
            return store.commit(scene_id, staging, manifest)
        # CPU SIFT runs in worker processes, each keyframe as soon as ingest has written it
        workers, submitted, processes = None, None, options.workers or usable_cpus()
        if confs.needs_sift and processes > 1 and not models.sift(confs.sift).on_gpu:
            workers, submitted = stack.enter_context(SiftWorkers(confs.sift, processes)), []
        ingested = ingest(
            dataset, staging, options.limits, lambda fraction: report("ingest", fraction),
            None if workers is None else lambda kf: submitted.append(workers.submit(staging / kf.name)),
        )
        keyframes = ingested.keyframes
        timings["ingest_s"] = time.perf_counter() - start

        files: list[str] = []
        feats: dict[str, dict[str, np.ndarray]] | None = None
        if not config.dense:
            t0 = time.perf_counter()
            feats, points = {}, {}
            # each keyframe is lifted here while the workers extract the next ones
            local = extract_local(staging, keyframes, confs.sift, models, submitted, report)
            for n, (kf, f) in enumerate(local, start=1):
                feats[kf.name] = f
                depth = load_depth(staging, kf.stem) if options.use_depth and kf.has_depth else None
                points[kf.name], _ = lift_keyframe(kf, f["keypoints"], depth, lambda: ingested.mesh)
                report("points3d", n / len(keyframes))
            timings["features_and_points3d_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            # the global index (k-means and VLAD: OpenCV and NumPy, without the GIL) is built while the features
            # and points are written: the SIFT workers are done, so the second core is free
            with ThreadPoolExecutor(1) as background:
                global_files = background.submit(_register_global, staging, keyframes, confs, models, feats,
                                                 submitted, report)
                write_local_features(staging / "feats-sift.h5", feats)
                write_points3d(staging / "points3d-sift.h5", points)
                files += ["feats-sift.h5", "points3d-sift.h5", *global_files.result()]
            timings["global_and_writes_s"] = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            files += _register_global(staging, keyframes, confs, models, feats, submitted, report)
            timings["global_s"] = time.perf_counter() - t0

        if config.dense:
            t0 = time.perf_counter()
            matcher = models.dense(config.matcher_name, config.matcher_overrides)
            images = [read_rgb(staging / k.name) for k in keyframes]
            matcher.cache_keyframes(images, staging / "qta_loftr")
            timings["dense_cache_s"] = time.perf_counter() - t0

        timings["total_s"] = time.perf_counter() - start
        manifest = {
            "scene_id": scene_id,
            "version": version,
            "markerless_version": __version__,
            "dataset": str(dataset),
            "dataset_sha256": dataset_sha,
            "config": config.model_dump(),
            "use_depth": options.use_depth,
            "limits": asdict(options.limits),
            "num_keyframes": len(keyframes),
            "registered_at": datetime.now(UTC).isoformat(),
            "identity": identity,
            "file_sha256": {name: file_sha256(staging / name) for name in files},
            "timings": timings,
        }
        report("commit", 1.0)
        return store.commit(scene_id, staging, manifest)


def _register_global(
    staging: Path,
    keyframes: list[Keyframe],
    confs: StageConfs,
    models: FeatureModels,
    feats: dict[str, dict[str, np.ndarray]] | None,
    submitted: list[Future[dict[str, np.ndarray]]] | None,
    report: Progress,
) -> list[str]:
    """Global descriptors of every keyframe in `global-feats-<name>.h5` (+ the VLAD vocabulary)."""
    sizes = {k.name: (k.camera.width, k.camera.height) for k in keyframes}
    descriptors: dict[str, np.ndarray] = {}
    files = [f"global-feats-{confs.global_feature}.h5"]
    if confs.global_feature == "vlad":
        if feats is None:  # dense scenes have no stored SIFT: extract it for the vocabulary only
            feats = {kf.name: f for kf, f in extract_local(staging, keyframes, confs.sift, models, submitted, report)}
        report("global", 0.0)  # k-means takes seconds: it reports per round of iterations
        sample = np.concatenate([f["descriptors"] for f in feats.values()])
        clusters = confs.retrieval["num_clusters"]
        if len(sample) < clusters:
            raise DatasetError(f"only {len(sample)} SIFT features in {len(keyframes)} keyframes: too few to index the "
                               f"scene (need {clusters}); are the images blank or noise?")
        vocabulary = train_vocabulary(sample, confs.retrieval,
                                      progress=lambda fraction: report("global", 0.5 * fraction))
        del sample
        np.save(staging / "vlad-vocabulary.npy", vocabulary)
        files.append("vlad-vocabulary.npy")
        for n, (name, f) in enumerate(feats.items(), start=1):
            descriptors[name] = vlad(f["descriptors"], vocabulary)
            report("global", 0.5 + 0.5 * n / len(feats))
    else:
        extractor = models.netvlad()
        batch = 8  # same-size keyframes go through the network together
        for start in range(0, len(keyframes), batch):
            chunk = keyframes[start : start + batch]
            images = [read_rgb(staging / k.name) for k in chunk]
            for kf, desc in zip(chunk, extractor(images), strict=True):
                descriptors[kf.name] = desc
            report("global", (start + len(chunk)) / len(keyframes))
    write_global_descriptors(staging / files[0], descriptors, sizes)
    return files


def _reuse_current(
    store: SceneStore, scene_id: str, dataset_sha: str, identity: dict[str, Any], staging: Path
) -> dict[str, Any] | None:
    """Hard-link the current version's files into `staging` when it holds the same zip, identity and store format
    and its files still hash as recorded (version files are never written after commit); its manifest, else None.
    """
    current = store.info(scene_id)
    if current is None or (current.store_format, current.dataset_sha256, current.identity) != (
        STORE_FORMAT, dataset_sha, identity
    ):
        return None
    try:
        manifest = json.loads((current.path / MANIFEST).read_text())
        if any(file_sha256(current.path / name) != digest for name, digest in manifest["file_sha256"].items()):
            return None
        shutil.copytree(current.path, staging, copy_function=os.link, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(MANIFEST))
    except OSError:  # the version went away meanwhile (replaced twice): compute everything
        for entry in staging.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return None
    return manifest
