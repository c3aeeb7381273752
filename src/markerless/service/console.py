"""The operator's console: one server-rendered HTML page of the site (scenes, cameras with their overlays, the
plan view, health and queue), rendered from a typed snapshot with the Jinja2 templates shipped in
`service/templates/`.

The page needs nothing from the network (styles inline, the plan view an inline SVG, overlays from the same
server), no JavaScript (it reloads itself with `<meta http-equiv="refresh">`), and its buttons are plain HTML
forms posting to the console's commands (http_console.py): `POST /console/scenes/{id}/register` and
`POST /console/cameras/{id}/recalibrate`. Whoever serves it builds the snapshot; this module only renders it (and
the sign-in form of a service with a token).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SceneView(_Model):
    scene_id: str
    version: str | None = None  # None: never registered
    num_keyframes: int | None = None
    registered_at: datetime | None = None
    state: Literal["ready", "registering", "failed", "outdated", "absent"] = "ready"
    message: str = ""  # the last registration's reason or progress, as the operator should read it


CameraState = Literal["calibrated", "pending", "lost", "failed", "never"]
"""calibrated / pending / lost: the stored calibration's state as the calibration watch keeps it (the same on every
replica and after a restart; pending: the last frame disagreed with it, one more frame that agrees with that one
means the camera moved; lost: its last frames failed to localize). failed: no stored calibration and its last frame
here failed; never: neither a stored calibration nor a frame."""


class CameraView(_Model):
    camera_id: str
    scene_id: str | None = None
    state: CameraState = "never"
    calibrating: bool = False  # a frame of it is queued or running now
    watched: bool = True  # its calibration is kept in the store and watched (False: each frame on its own)
    # the stored calibration (pipeline.calibration_watch.Calibration); without one, the last frame's own values
    scene_version: str | None = None  # the scene version it was solved in
    outdated: bool = False  # that version is no longer the scene's: re-solved on its next frame
    frames: int | None = None  # frames it rests on (None: no stored calibration)
    solved_at: datetime | None = None  # first solved (after a move or a re-registration: the new one's first frame)
    calibrated_at: datetime | None = None  # last confirmed by a frame
    failures: int = 0  # frames that failed to localize since
    position_sigma_m: float | None = None
    rotation_sigma_deg: float | None = None
    intrinsics_source: str | None = None
    # the last frame this process localized (its overlay draws that frame's own result)
    num_inliers: int | None = None
    num_matches: int | None = None
    edge_score: float | None = None  # `pipeline.overlay.edge_alignment_score` of its overlay, when drawn
    warnings: list[str] = Field(default_factory=list)
    last_reason: str | None = None  # reason of the last failed frame
    last_message: str = ""
    overlay_url: str | None = None  # e.g. /v1/cameras/{id}/calibration/overlay; None: nothing to show
    overlay_at: datetime | None = None  # when the overlay's frame was localized


class HealthView(_Model):
    status: Literal["ok", "degraded", "down"] = "ok"
    worker_alive: bool = True
    broker_connected: bool = True
    uptime_s: float | None = None
    version: str = ""


class QueueView(_Model):
    pending: int = 0
    in_flight: int | None = None  # None: not known
    capacity: int | None = None
    registrations: int = 0  # registrations running or waiting


class ConsoleSnapshot(_Model):
    title: str = "markerless"
    generated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    refresh_s: int = Field(default=10, ge=1, le=3600)
    scenes: list[SceneView] = Field(default_factory=list)
    cameras: list[CameraView] = Field(default_factory=list)
    health: HealthView = Field(default_factory=HealthView)
    queue: QueueView = Field(default_factory=QueueView)
    signed_in: bool = False  # behind a token: show the sign-out button
    plan_svg: str | None = None  # from `pipeline.plan_view.plan_view_svg` (trusted: generated, ids escaped there)


def _age(then: datetime | None, now: datetime) -> str:
    if then is None:
        return "never"
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0.0, (now - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


_ENV = Environment(
    loader=PackageLoader("markerless.service", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["segment"] = lambda value: quote(str(value), safe="")  # one URL path segment ('/' escaped too)


def render_console(snapshot: ConsoleSnapshot) -> str:
    """The console page as HTML."""
    template = _ENV.get_template("console.html")
    return template.render(
        s=snapshot,
        plan=Markup(snapshot.plan_svg) if snapshot.plan_svg else None,
        age=lambda then: _age(then, snapshot.generated_at),
    )


def render_login(error: str | None) -> str:
    """The sign-in form of a service with a token (`error`: why the last attempt was refused)."""
    return _ENV.get_template("login.html").render(error=error)
