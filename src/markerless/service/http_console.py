"""The operator's view on the HTTP front door: each camera's overlay (REST, in the OpenAPI document) and the console
page at `/` with its sign-in and its buttons (HTML, outside the document).

- `GET /v1/cameras/{cameraId}/calibration/overlay`: the PNG of the camera's current calibration (overlays.py);
  404 {code, message} for a camera that is unknown or was never calibrated since the service started.
- `GET /`: the console (console.py) from a snapshot of the daemon's core: scenes from the store and scenes.yaml;
  cameras from scenes.yaml, the calibrations kept in the store (scene.calibrations, what `markerless cameras`
  lists: state, scene version, frames, fused sigma, last confirmed, last failure; shared by the replicas and kept
  over restarts, so every replica shows the same, also right after a restart) joined with this process's last
  frames (last_frames.py: the overlay, which draws the last frame's own result, its inliers and warnings, and the
  reason of a newer failed frame); health and queue; the plan of each scene with its calibrated cameras.
- `POST /console/scenes/{sceneId}/register`, `POST /console/cameras/{cameraId}/recalibrate`: the console's
  buttons (HTML form posts), answered 303 back to `/`. Register is the REST / MQTT registration command;
  Recalibrate queues the camera's last frame again (a browser has no new frame to send) with the intrinsics it
  came with, through the same queue and worker, its result in `GET /v1/cameras/{id}/calibration` and
  Socket.IO's `calibration_result` (not on the MQTT pose topic: nobody asked there).
- `GET/POST /login`, `POST /logout`: with `http.token_file` set, a browser signs in once with the token (it
  cannot send a bearer header) and gets a session cookie (http_api.console_session).

Sync routes: FastAPI runs them in its thread pool, so drawing an overlay or a plan never holds up the event loop,
and never the worker (which only records its frames).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from markerless import __version__
from markerless.errors import MarkerlessError, Reason
from markerless.pipeline.calibration_watch import Calibration
from markerless.scene.calibrations import CalibrationStore
from markerless.service.console import (
    CameraView,
    ConsoleSnapshot,
    HealthView,
    QueueView,
    SceneView,
    render_console,
    render_login,
)
from markerless.service.http_api import (
    SESSION_COOKIE,
    SESSION_S,
    ApiError,
    CameraId,
    HttpCore,
    SceneId,
    console_session,
    enqueue,
    get_core,
    register_scene,
    token_accepted,
)
from markerless.service.last_frames import CameraFrames
from markerless.service.overlays import OverlayUnavailable, version_dir
from markerless.service.requests import ResolvedFrame
from markerless.service.watch import is_watched

log = logging.getLogger(__name__)

Core = Annotated[HttpCore, Depends(get_core)]
REFRESH_S = 10  # the console reloads itself this often
_PLANS_KEPT = 8  # plan views kept, by scene version and the calibrations drawn on it


def overlay_url(camera_id: str) -> str:
    return f"/v1/cameras/{quote(camera_id, safe='')}/calibration/overlay"


def console_routers() -> list[APIRouter]:
    """The overlay route (REST) and the console's routes (HTML, left out of the OpenAPI document)."""
    api = APIRouter(tags=["Camera"])
    page = APIRouter(include_in_schema=False)
    plans = _Plans()

    @api.get("/v1/cameras/{cameraId}/calibration/overlay", response_class=Response,
             responses={200: {"content": {"image/png": {}},
                              "description": "The frame of the camera's current calibration at its own size, the "
                              "scan drawn through the returned camera, inliers and outliers marked, a caption."},
                        304: {"description": "Unchanged since the ETag sent in If-None-Match."}})
    def overlay(cameraId: CameraId, request: Request, core: Core) -> Response:  # noqa: N803 - SceneScape's names
        """The camera's calibration as an image: its current calibration's frame with the scan drawn over it (a
        newer frame that failed does not replace it). 404 for an unknown camera or one not calibrated since
        the service started."""
        _known_camera(core, cameraId)
        if core.overlays is None:
            raise ApiError(404, "overlays are not drawn by this service")
        try:
            attempt = core.overlays.calibration(cameraId)
            tag = f'"{attempt.seq}"'
            if request.headers.get("if-none-match") == tag:
                return Response(status_code=304, headers={"ETag": tag})
            drawn = core.overlays.overlay(attempt)
        except OverlayUnavailable as exc:
            raise ApiError(404, exc.message, exc.reason) from exc
        return Response(drawn.png, media_type="image/png",
                        headers={"ETag": tag, "Cache-Control": "no-cache",
                                 "X-Edge-Agreement": f"{drawn.edge_score:.3f}"})

    @page.get("/", response_class=HTMLResponse)
    def console(core: Core) -> HTMLResponse:
        return HTMLResponse(render_console(snapshot(core, plans)), headers={"Cache-Control": "no-store"})

    @page.post("/console/scenes/{sceneId}/register")
    def register(sceneId: SceneId, core: Core) -> RedirectResponse:  # noqa: N803
        _not_stopping(core)
        register_scene(core, sceneId)
        return RedirectResponse("/", status_code=303)

    @page.post("/console/cameras/{cameraId}/recalibrate")
    def recalibrate(cameraId: CameraId, core: Core) -> RedirectResponse:  # noqa: N803
        _not_stopping(core)
        _known_camera(core, cameraId)
        frames = core.last_frames.get(cameraId)
        if frames is None:
            raise ApiError(404, f"no frame of camera {cameraId!r} to run again: send one (MQTT, or POST "
                           f"/v1/cameras/{cameraId}/calibration)")
        last = frames.latest
        enqueue(core, cameraId, ResolvedFrame(last.scene_id, last.intrinsics, last.distortion, last.intrinsics_mode,
                                              last.image), f"console-{uuid.uuid4().hex[:12]}")
        return RedirectResponse("/", status_code=303)

    @page.get("/login", response_class=HTMLResponse)
    def login_form(core: Core) -> Response:
        if core.token is None:
            return RedirectResponse("/", status_code=303)
        return HTMLResponse(render_login(None))

    @page.post("/login")
    async def login(request: Request, core: Core) -> Response:
        if core.token is None:
            return RedirectResponse("/", status_code=303)
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
        if not token_accepted(core, (form.get("token") or [""])[0].strip()):
            log.info("console sign-in refused from %s", request.client.host if request.client else "?")
            return HTMLResponse(render_login("Wrong token."), status_code=401)
        expires = int(time.time()) + SESSION_S
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, console_session(core, expires), max_age=SESSION_S, path="/",
                            secure=core.settings.http.certfile is not None, httponly=True, samesite="strict")
        return response

    @page.post("/logout")
    def logout(core: Core) -> Response:
        response = RedirectResponse("/login" if core.token is not None else "/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", secure=core.settings.http.certfile is not None,
                               httponly=True, samesite="strict")
        return response

    return [api, page]


def _not_stopping(core: HttpCore) -> None:
    if core.stopping.is_set():
        raise ApiError(503, "the service is stopping", Reason.SHUTTING_DOWN)


def _known_camera(core: HttpCore, camera_id: str) -> None:
    if (camera_id not in core.scenes.cameras and core.last_frames.get(camera_id) is None
            and not CalibrationStore(core.settings.store.root).path(camera_id).exists()):
        raise ApiError(404, f"Camera not found: {camera_id!r} is not in scenes.yaml, sent no frame and has no "
                       "stored calibration", Reason.UNKNOWN_CAMERA)


# --- the snapshot -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Camera:
    """What the console knows of one camera: its stored calibration (None: none, or not watched) and this
    process's last frames of it (None: none since the service started)."""

    camera_id: str
    stored: Calibration | None
    frames: CameraFrames | None
    watched: bool


def snapshot(core: HttpCore, plans: _Plans) -> ConsoleSnapshot:
    """The console's view of the core now."""
    store = core.backend.store
    scene_ids = sorted(set(core.scenes.scenes) | set(store.scene_ids()))
    stored = _stored_calibrations(core)
    camera_ids = sorted(set(core.scenes.cameras) | set(core.last_frames.camera_ids()) | set(stored))
    known = [_known(core, c, stored.get(c)) for c in camera_ids]
    versions = {s: (info.version if (info := store.info(s)) is not None else None) for s in scene_ids}
    cameras = [_camera(core, c, versions) for c in known]
    scenes = [_scene(core, s) for s in scene_ids]
    alive, connected, stopping = core.alive(), core.connected(), core.stopping.is_set()
    health = HealthView(status="down" if not alive or stopping else "ok" if connected else "degraded",
                        worker_alive=alive, broker_connected=connected,
                        uptime_s=max(0.0, core.clock() - core.started), version=__version__)
    queue = QueueView(pending=len(core.queue), capacity=core.settings.worker.queue_size,
                      registrations=sum(1 for s in scene_ids if core.registrar.registering(s)))
    return ConsoleSnapshot(refresh_s=REFRESH_S, scenes=scenes, cameras=cameras, health=health, queue=queue,
                           signed_in=core.token is not None,
                           plan_svg=plans.svg(core, [s.scene_id for s in scenes if s.version], known))


def _stored_calibrations(core: HttpCore) -> dict[str, Calibration]:
    """Every camera's calibration kept in the store (shared by the replicas, kept over restarts), by camera id."""
    kept = {}
    try:
        records = list(CalibrationStore(core.settings.store.root).records())
    except (OSError, ValueError):  # the store unreachable, or a record changed to a damaged one meanwhile
        log.exception("reading the stored calibrations failed")
        return {}
    for record in records:
        try:
            calibration = Calibration.from_dict(record)
        except (KeyError, TypeError, ValueError) as exc:  # written by another version, or damaged
            log.warning("camera %r: stored calibration unreadable (%s)", record.get("camera_id"), exc)
            continue
        kept[calibration.camera_id] = calibration
    return kept


def _known(core: HttpCore, camera_id: str, stored: Calibration | None) -> _Camera:
    watched = is_watched(core.settings.calibration, core.scenes, camera_id)
    return _Camera(camera_id, stored if watched else None, core.last_frames.get(camera_id), watched)


def _scene(core: HttpCore, scene_id: str) -> SceneView:
    info = core.backend.store.info(scene_id)
    held = core.results.registration(scene_id)
    registered = getattr(info, "registered_at", None)
    state = "ready" if info is not None else "absent"
    if core.registrar.registering(scene_id):
        state = "registering"
    elif held is not None and held.status == "error":
        state = "failed"
    message = ""
    if held is not None and (state != "ready" or held.status != "success"):
        message = held.message or ""
    return SceneView(scene_id=scene_id, version=info.version if info else None,
                     num_keyframes=getattr(info, "num_keyframes", None),
                     registered_at=datetime.fromisoformat(registered) if registered else None, state=state,
                     message=message)


def _camera(core: HttpCore, known: _Camera, versions: dict[str, str | None]) -> CameraView:
    """A camera's card: state, sigma, frames and age from its stored calibration (the watch's, the same on every
    replica and after a restart); the overlay, inliers, warnings and the reason of a newer failed frame from this
    process's last frames. A camera without a stored calibration (not watched, or forgotten) shows its last
    frames' own state."""
    camera_id, cal, frames = known.camera_id, known.stored, known.frames
    configured = core.scenes.cameras.get(camera_id)
    held = core.results.calibration(camera_id)
    view: dict[str, Any] = {"camera_id": camera_id, "scene_id": configured.scene if configured else None,
                            "watched": known.watched, "calibrating": held is not None and held.status == "calibrating"}
    if frames is not None:
        view["scene_id"] = frames.latest.scene_id
        good = frames.calibrated
        if good is not None and good.result is not None:
            r = good.result
            view |= dict(state="calibrated", calibrated_at=good.at, position_sigma_m=r.position_sigma_m,
                         rotation_sigma_deg=r.rotation_sigma_deg, num_inliers=r.num_inliers,
                         num_matches=r.num_matches, intrinsics_source=r.intrinsics_source,
                         warnings=list(r.warnings), overlay_url=overlay_url(camera_id), overlay_at=good.at)
            view["edge_score"] = core.overlays.edge_score(camera_id) if core.overlays else None
        else:
            view["state"] = "failed"
        if frames.failed is not None:
            view |= dict(last_reason=frames.failed.reason, last_message=frames.failed.message)
            if good is None and frames.failed.result is not None:
                view["warnings"] = list(frames.failed.result.warnings)
    if cal is not None:
        current = versions.get(cal.scene_id)
        view |= dict(state=cal.state, scene_id=cal.scene_id, scene_version=cal.scene_version,
                     outdated=current is not None and current != cal.scene_version, frames=cal.frames,
                     solved_at=_when(cal.first_solved_at), calibrated_at=_when(cal.updated_at),
                     failures=cal.failures, position_sigma_m=cal.position_sigma_m,
                     rotation_sigma_deg=cal.rotation_sigma_deg, intrinsics_source=cal.intrinsics_source)
        if cal.last_failure is not None:  # failed frames since it was last confirmed, from any replica
            view |= dict(last_reason=cal.last_failure, last_message=cal.last_failure_message or "")
    return CameraView(**view)


def _when(at: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(at) if at else None
    except ValueError:
        return None


class _Plans:
    """Each registered scene's plan view with its calibrated cameras, drawn once per scene version and set of
    calibrations (a few kept)."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[Any, ...], str] = OrderedDict()
        self._lock = threading.Lock()

    def svg(self, core: HttpCore, scene_ids: list[str], cameras: list[_Camera]) -> str | None:
        parts = []
        for scene_id in scene_ids:
            plan = self._scene(core, scene_id, cameras)
            if plan is not None:
                heading = f'<h3 class="muted">{escape(scene_id)}</h3>' if len(scene_ids) > 1 else ""
                parts.append(heading + plan)
        return "\n".join(parts) or None

    def _scene(self, core: HttpCore, scene_id: str, cameras: list[_Camera]) -> str | None:
        info = core.backend.store.info(scene_id)
        folder = version_dir(core.backend.store, scene_id, info.version) if info is not None else None
        if folder is None or info is None:
            return None  # no scan stored (or not yet): nothing to draw
        drawn = [p for c in cameras if (p := _plan_camera(c, scene_id, info.version)) is not None]
        key = (scene_id, info.version, tuple((p.camera_id, p.key) for p in drawn))
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        try:
            plan = _draw_plan(folder, drawn)
        except Exception:  # noqa: BLE001 - a plan that cannot be drawn must not take the console down
            log.exception("plan view of scene %s failed", scene_id)
            return None
        with self._lock:
            self._kept[key] = plan
            while len(self._kept) > _PLANS_KEPT:
                self._kept.popitem(last=False)
        return plan


@dataclass(frozen=True)
class _Drawn:
    """A camera on a scene's plan: its pose and camera in the scene's current version (raw.glb frame)."""

    camera_id: str
    key: tuple[Any, ...]  # changes when what is drawn changes
    quaternion: tuple[float, ...]
    translation: tuple[float, ...]
    intrinsics: Any
    distortion: tuple[float, ...]
    width: int
    height: int
    ok: bool


def _plan_camera(known: _Camera, scene_id: str, version: str) -> _Drawn | None:
    """The camera as the plan draws it: its stored calibration when solved in this scene version, else its last
    frame's own result here; None when it has neither in this version."""
    good = known.frames.calibrated if known.frames is not None else None
    size = (good.width, good.height) if good is not None and good.width and good.height else None
    cal = known.stored
    if cal is not None and (cal.scene_id, cal.scene_version) == (scene_id, version):
        # the frame size is not stored: the last frame's, else twice the principal point (near the centre)
        width, height = size or (round(2 * cal.intrinsics[0][2]), round(2 * cal.intrinsics[1][2]))
        return _Drawn(known.camera_id, ("stored", cal.revision, width, height), cal.quaternion, cal.translation,
                      cal.intrinsics, cal.distortion, width, height, ok=cal.state == "calibrated")
    r = good.result if good is not None else None
    if (good is None or r is None or size is None or r.quaternion is None or r.translation is None
            or r.intrinsics is None or good.scene_id != scene_id or r.scene_version != version):
        return None
    return _Drawn(known.camera_id, ("frame", good.seq), tuple(r.quaternion), tuple(r.translation), r.intrinsics,
                  tuple(r.distortion or ()), size[0], size[1], ok=not r.warnings)


def _draw_plan(folder: Any, drawn: list[_Drawn]) -> str:
    from markerless.pipeline.overlay import scene_mesh
    from markerless.pipeline.plan_view import PlanCamera, plan_view_svg
    from markerless.scene.camera import Camera
    from markerless.scene.geometry import quat_trans_to_pose

    cameras = []
    for d in drawn:
        try:
            camera = Camera.from_matrix(d.intrinsics, d.width, d.height, d.distortion)
        except (MarkerlessError, ValueError):  # bad intrinsics: not drawable (the card shows the camera)
            continue
        cameras.append(PlanCamera(d.camera_id, camera, quat_trans_to_pose(d.quaternion, d.translation), ok=d.ok))
    return plan_view_svg(scene_mesh(folder), cameras)
