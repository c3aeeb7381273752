"""Accuracy of localization against ground truth: one query's outcome, the accuracy bands, the summaries.

Used by `markerless eval` (register a scan, localize its queries and foreign images here), by the demo (the same
outcomes, built from the pose replies it received over MQTT), by the benches and the tests. The queries file is
`markerless.scene.queries`. Missing poses count as failures (infinite error), as in hloc's evaluation; an image
of another place (`foreign`) is right when it gets no pose. The command line's help text quotes the thresholds,
so numpy and the pipeline are imported inside the functions that use them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from markerless.pipeline.localization import LocalizationResult, Localizer
    from markerless.pipeline.registration_options import RegistrationOptions
    from markerless.scene.camera import Camera
    from markerless.scene.config import SceneConfig
    from markerless.scene.queries import QueryEntry
    from markerless.scene.store import Scene

# (metres, degrees) accuracy bands, strict as in hloc; the first is what "accurate" means everywhere.
ACCURACY_THRESHOLDS = ((0.05, 5.0), (0.10, 10.0))
ACCURATE_METRES, ACCURATE_DEGREES = ACCURACY_THRESHOLDS[0]


def band_key(prefix: str, metres: float, degrees: float) -> str:
    """`<prefix>_5cm_5deg`: the summary key of a band."""
    return f"{prefix}_{round(metres * 100)}cm_{round(degrees)}deg"


@dataclass
class QueryOutcome:
    """One localized image: what came back, against the ground truth when it is known."""

    name: str  # image path relative to the queries file, or `foreign/<file>`
    success: bool
    reason: str | None
    num_matches: int
    num_inliers: int
    inlier_ratio: float
    latency_s: float  # localize call, or (demo) frame published -> pose reply received
    truth: np.ndarray | None = None  # 4x4 camera-to-world (scene frame, OpenCV axes); None when unknown
    estimate: np.ndarray | None = None  # 4x4 camera-to-world returned; None without a pose
    foreign: bool = False  # an image of another place: success means a false pose
    message: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    intrinsics: list[list[float]] | None = None
    distortion: list[float] | None = None
    intrinsics_source: str | None = None
    warnings: list[str] = field(default_factory=list)
    position_sigma_m: float | None = None
    rotation_sigma_deg: float | None = None
    focal_error: float | None = None  # |f / f_true - 1| of the returned camera, when the truth is known
    image_path: Path | None = None  # the image file, for the demo's report
    inlier_points2d: list[list[float]] | None = None  # query pixels of the PnP inliers (hloc convention)
    reference_image: Path | None = None  # best verified keyframe, shown next to the query in the report

    @property
    def errors(self) -> tuple[float, float] | None:
        """(translation m, rotation deg) against the ground truth, when both poses exist."""
        if not self.success or self.estimate is None or self.truth is None:
            return None
        from markerless.scene.geometry import pose_error

        return pose_error(self.estimate, self.truth)

    @property
    def translation_error_m(self) -> float:
        err = self.errors
        return err[0] if err else float("inf")

    @property
    def rotation_error_deg(self) -> float:
        err = self.errors
        return err[1] if err else float("inf")

    @property
    def latency_ms(self) -> float:
        return 1000.0 * self.latency_s

    def within(self, metres: float = ACCURATE_METRES, degrees: float = ACCURATE_DEGREES) -> bool:
        err = self.errors
        return err is not None and err[0] < metres and err[1] < degrees

    @classmethod
    def from_result(cls, name: str, result: LocalizationResult, latency_s: float, truth: np.ndarray | None,
                    true_focal_px: float | None = None, foreign: bool = False) -> QueryOutcome:
        """The outcome of one localization result, against `truth` (camera-to-world) when known."""
        focal_error = None
        if result.success and true_focal_px and result.intrinsics:
            focal_error = abs(result.intrinsics[0][0] / true_focal_px - 1.0)
        return cls(
            name=name, success=result.success, reason=result.reason, message=result.message,
            num_matches=result.num_matches, num_inliers=result.num_inliers, inlier_ratio=result.inlier_ratio,
            latency_s=latency_s, truth=truth, estimate=result.pose_matrix() if result.success else None,
            foreign=foreign, timings_ms=result.timings_ms, intrinsics=result.intrinsics, distortion=result.distortion,
            intrinsics_source=result.intrinsics_source, warnings=result.warnings,
            position_sigma_m=result.position_sigma_m, rotation_sigma_deg=result.rotation_sigma_deg,
            focal_error=focal_error,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: errors None where unknown, poses as nested lists, paths as strings."""
        err = self.errors
        return {
            "name": self.name, "foreign": self.foreign, "success": self.success, "reason": self.reason,
            "message": self.message,
            "translation_error_m": err[0] if err else None, "rotation_error_deg": err[1] if err else None,
            "num_matches": self.num_matches, "num_inliers": self.num_inliers, "inlier_ratio": self.inlier_ratio,
            "latency_s": self.latency_s, "latency_ms": self.latency_ms, "timings_ms": self.timings_ms,
            "intrinsics": self.intrinsics, "distortion": self.distortion,
            "intrinsics_source": self.intrinsics_source, "warnings": self.warnings,
            "position_sigma_m": self.position_sigma_m, "rotation_sigma_deg": self.rotation_sigma_deg,
            "focal_error": self.focal_error,
            "estimate": self.estimate.tolist() if self.estimate is not None else None,
            "truth": self.truth.tolist() if self.truth is not None else None,
        }


def _localize(localizer: Localizer, scene: Scene, name: str, image: np.ndarray, camera: Camera | None, mode: str,
              truth: np.ndarray | None, true_focal_px: float | None = None, foreign: bool = False) -> QueryOutcome:
    start = time.perf_counter()
    result = localizer.localize(scene, image, camera, mode)
    return QueryOutcome.from_result(name, result, time.perf_counter() - start, truth, true_focal_px, foreign)


def localize_queries(
    localizer: Localizer, scene: Scene, queries: list[QueryEntry], root: Path, mode: str | None = None
) -> list[QueryOutcome]:
    """`mode` overrides each query's `intrinsics_mode` (default `refine`, `estimate` without intrinsics)."""
    from markerless.pipeline.image_decoding import decode_image
    from markerless.scene.queries import query_camera, query_pose, true_focal

    out = []
    for item in queries:
        image = decode_image((root / item["image"]).read_bytes())
        camera = query_camera(item, image.shape[1], image.shape[0])
        query_mode = mode or item.get("intrinsics_mode") or ("refine" if camera else "estimate")
        out.append(_localize(localizer, scene, item["image"], image, camera, query_mode, query_pose(item),
                             true_focal(item)))
    return out


def localize_foreign(localizer: Localizer, scene: Scene, folder: Path, intrinsics: list[list[float]] | None,
                     mode: str = "refine") -> list[QueryOutcome]:
    """Images of other places: every one must fail the gates. Intrinsics: the queries' (same camera)."""
    from markerless.pipeline.image_decoding import decode_image
    from markerless.scene.camera import Camera
    from markerless.scene.queries import FOREIGN_DIR, foreign_images

    out = []
    for path in foreign_images(folder):
        image = decode_image(path.read_bytes())
        camera = Camera.from_matrix(intrinsics, image.shape[1], image.shape[0]) if intrinsics else None
        out.append(_localize(localizer, scene, f"{FOREIGN_DIR}/{path.name}", image, camera,
                             mode if camera else "estimate", None, foreign=True))
    return out


@dataclass(frozen=True)
class Summary:
    """The figures over a set of outcomes: queries with ground truth, foreign images apart."""

    queries: int
    localized: int
    within: tuple[float, ...]  # share of the queries in each band of ACCURACY_THRESHOLDS
    median_translation_m: float | None  # over all queries, failures infinite (hloc)
    median_rotation_deg: float | None
    foreign: int
    foreign_rejected: int
    latency_p50_s: float | None  # over the queries with ground truth
    latency_p90_s: float | None
    median_focal_error: float | None
    with_warnings: int  # poses returned with a warning

    @classmethod
    def of(cls, outcomes: Sequence[QueryOutcome]) -> Summary:
        import numpy as np

        known = [o for o in outcomes if o.truth is not None and not o.foreign]
        foreign = [o for o in outcomes if o.foreign]
        t = np.array([o.translation_error_m for o in known])
        r = np.array([o.rotation_error_deg for o in known])
        lat = np.array([o.latency_s for o in known])
        focal = [o.focal_error for o in known if o.focal_error is not None]
        return cls(
            queries=len(known),
            localized=sum(o.success for o in known),
            within=tuple(float(np.mean((t < m) & (r < d))) if len(t) else 0.0 for m, d in ACCURACY_THRESHOLDS),
            median_translation_m=float(np.median(t)) if len(t) else None,
            median_rotation_deg=float(np.median(r)) if len(r) else None,
            foreign=len(foreign),
            foreign_rejected=sum(not o.success for o in foreign),
            latency_p50_s=float(np.percentile(lat, 50)) if len(lat) else None,
            latency_p90_s=float(np.percentile(lat, 90)) if len(lat) else None,
            median_focal_error=float(np.median(focal)) if focal else None,
            with_warnings=sum(bool(o.warnings) for o in known if o.success),
        )

    def as_dict(self) -> dict[str, Any]:
        """The keys of `markerless eval --json` and the benches."""
        out: dict[str, Any] = {"num_queries": self.queries, "localized": self.localized}
        for (metres, degrees), share in zip(ACCURACY_THRESHOLDS, self.within, strict=True):
            out[band_key("recall", metres, degrees)] = share
        out.update({
            "median_translation_cm": None if self.median_translation_m is None else self.median_translation_m * 100,
            "median_rotation_deg": self.median_rotation_deg,
            "foreign_rejected": self.foreign_rejected,
            "foreign_total": self.foreign,
            "latency_p50_s": self.latency_p50_s,
            "latency_p90_s": self.latency_p90_s,
            "median_focal_error": self.median_focal_error,
            "with_warnings": self.with_warnings,
        })
        return out

    def as_report_dict(self) -> dict[str, Any]:
        """The keys of the demo's results.json."""
        out: dict[str, Any] = {"queries": self.queries, "localized": self.localized, "foreign": self.foreign,
                               "foreign_rejected": self.foreign_rejected}
        for (metres, degrees), share in zip(ACCURACY_THRESHOLDS, self.within, strict=True):
            out[band_key("within", metres, degrees)] = share
        if self.median_translation_m is not None:
            out["median_translation_m"] = self.median_translation_m
            out["median_rotation_deg"] = self.median_rotation_deg
        if self.latency_p50_s is not None:
            out["median_latency_ms"] = self.latency_p50_s * 1000
        return out

    def passes(self, fraction: float) -> bool:
        """At least `fraction` of the queries accurate (first band) and every foreign image refused."""
        return self.queries > 0 and self.within[0] >= fraction and self.foreign_rejected == self.foreign

    def in_words(self) -> list[str]:
        """The summary as a reader wants it: shares in percent with their counts, units spelled out."""
        def share(count: float) -> str:
            return f"{count / self.queries:.0%} ({round(count)} of {self.queries})" if self.queries \
                else "n/a (no queries)"

        lines = [f"localized: {share(self.localized)} of the queries with ground truth"]
        for (metres, degrees), fraction in zip(ACCURACY_THRESHOLDS, self.within, strict=True):
            band = f"within {metres * 100:.0f} cm and {degrees:.0f} degrees of the truth"
            lines.append(f"{band}: {share(fraction * self.queries)}")
        if self.median_translation_m is not None and self.median_rotation_deg is not None:
            lines.append(f"median error: {self.median_translation_m * 100:.2f} cm, "
                         f"{self.median_rotation_deg:.3f} degrees")
        if self.foreign:
            lines.append(f"images of other places refused: {self.foreign_rejected} of {self.foreign}")
        if self.latency_p50_s is not None:
            lines.append(f"median time from frame to pose: {self.latency_p50_s * 1000:.0f} ms")
        return lines


def summarise(outcomes: Sequence[QueryOutcome], foreign: Sequence[QueryOutcome] = ()) -> dict[str, Any]:
    """`Summary.of(outcomes + foreign).as_dict()`."""
    return Summary.of([*outcomes, *foreign]).as_dict()


def evaluate(
    scan: Path,
    queries_path: Path,
    config: SceneConfig,
    foreign: Path | None = None,
    options: RegistrationOptions | None = None,
    store_root: Path | None = None,
    weights_dir: Path | None = None,
    mode: str | None = None,
) -> tuple[dict[str, Any], list[QueryOutcome], list[QueryOutcome]]:
    """Register `scan` into a (temporary) store, localize every query and foreign image, summarise."""
    import tempfile

    from markerless.pipeline.features import FeatureModels
    from markerless.pipeline.localization import Localizer
    from markerless.pipeline.registration import register_scene
    from markerless.pipeline.registration_options import RegistrationOptions
    from markerless.scene.queries import load_queries
    from markerless.scene.store import SceneStore

    options = options or RegistrationOptions()
    queries = load_queries(queries_path)
    models = FeatureModels(weights_dir=weights_dir)
    with tempfile.TemporaryDirectory(prefix="markerless-eval-") as tmp:
        store = SceneStore(store_root or Path(tmp))
        start = time.perf_counter()
        register_scene(store, "eval", scan, config, models, options=options)
        register_s = time.perf_counter() - start
        scene = store.load("eval")
        localizer = Localizer(models)
        outcomes = localize_queries(localizer, scene, queries, Path(queries_path).parent, mode)
        intrinsics = queries[0].get("intrinsics") if queries else None
        foreign_out = localize_foreign(localizer, scene, foreign, intrinsics, mode or "refine") if foreign else []
    summary = summarise(outcomes, foreign_out)
    summary["register_s"] = register_s
    summary["peak_rss_mb"] = peak_rss_mb()
    summary["config"] = config.model_dump()
    summary["use_depth"] = options.use_depth
    summary["intrinsics_mode"] = mode
    return summary, outcomes, foreign_out


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
