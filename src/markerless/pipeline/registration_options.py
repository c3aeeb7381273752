"""How a scan is registered beyond SceneScape's scene fields; light, so that the service settings can import it.

The processes and upload limits are the service's `registration` settings too: `SIFT_PROCESSES` and
`UPLOAD_LIMITS` are each field's one definition, its default included, for both models.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from markerless.scene.limits import IngestLimits

SIFT_PROCESSES = Field(
    None, ge=1, title="SIFT processes",
    description="Processes extracting keyframe features during a registration (1: in the registering process); "
    "empty: one per CPU this process may use. Fewer leave CPUs to calibrations running meanwhile; the result does "
    "not depend on it.",
)
UPLOAD_LIMITS = Field(
    default_factory=IngestLimits, title="Upload limits",
    description="What an uploaded scan may declare (sizes, counts, pixels, mesh triangles); refused otherwise, "
    "before its data is read.",
)


class RegistrationOptions(BaseModel):
    """Registration settings that are not part of SceneScape's six scene fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    use_depth: bool = Field(True, description="False: 3D points from mesh ray casting only (as SceneScape does).")
    limits: IngestLimits = UPLOAD_LIMITS
    workers: int | None = SIFT_PROCESSES
