"""Localizer and calibration-watch settings beyond SceneScape's scene fields, light enough for the service settings
to import."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LocalizationOptions(BaseModel):
    """The same for every scene a worker serves; the inlier angle is explained in `pipeline.localization`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inlier_angle_deg: float = Field(
        1.75, gt=0, le=10, title="Inlier threshold",
        description="PnP inlier threshold as an angle (pixels = angle x focal length).",
    )
    pair_min_matches: int = Field(
        12, ge=4, title="Keyframe matches", description="A keyframe with fewer 2D-3D matches is not verified."
    )
    pair_min_inliers: int = Field(
        12, ge=4, title="Keyframe inliers", description="Inliers of a keyframe's own PnP needed to accept its matches."
    )
    pair_min_inlier_ratio: float = Field(
        0.25, ge=0, le=1, title="Keyframe inlier ratio", description="Share of a keyframe's matches they must be."
    )
    pair_max_trials: int = Field(1000, ge=10, title="Keyframe RANSAC trials", description="Per keyframe.")
    early_stop_keyframes: int = Field(
        3, ge=0, title="Early stop",
        description="Retrieved keyframes are matched best first, in rounds; stop once this many verified keyframes "
        "agree on a pose that passes the gates (0: always match all K).",
    )
    early_stop_first_round: int = Field(
        3, ge=1, title="First round",
        description="Keyframes matched in the first round; the second round as many, each later one as many as "
        "visited so far.",
    )
    refine_focal_tolerance: float = Field(
        0.2, gt=0, le=1, title="Focal tolerance in refine",
        description="1-sigma relative uncertainty of a focal length given in intrinsics_mode 'refine' (the prior "
        "of the estimator): a spec sheet's focal length and a varifocal's setting are good to about 20 %.",
    )
    pnp_max_points: int = Field(
        2000, ge=50, title="Final PnP sample",
        description="Correspondences sampled for the final LO-RANSAC; inliers are counted over all of them.",
    )


class WatchOptions(BaseModel):
    """How a camera's calibration is watched; the same for every camera (a camera can turn watching off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, title="Watch calibrations", description="Keep, fuse and watch each camera's "
                          "calibration (a camera's `watch: false` in scenes.yaml turns it off for that camera).")
    false_alarm: float = Field(
        1e-3, gt=0, lt=0.5, title="False alarm rate",
        description="Probability that an unmoved camera's frame fails the consistency test (chi-square, 6 dof); "
        "a false `moved` needs two such frames in a row that agree.",
    )
    floor_position_m: float = Field(
        0.006, ge=0, title="Position floor",
        description="The scan's repeatability: camera-centre difference of two localizations of one unmoved camera "
        "on different keyframes, 1-sigma (docs/calibration.md).",
    )
    floor_rotation_deg: float = Field(
        0.15, ge=0, title="Rotation floor", description="The same for the rotation, 1-sigma, degrees."
    )
    lost_after: int = Field(
        3, ge=1, title="Lost after", description="Consecutive frames that fail to localize before `lost`."
    )
    window: int = Field(20, ge=1, le=1000, title="Window", description="Most recent consistent frames fused.")

    @property
    def threshold(self) -> float:
        """The chi-square (6 dof) quantile a consistent frame's statistic stays within."""
        from scipy.stats import chi2

        return float(chi2.ppf(1.0 - self.false_alarm, 6))
