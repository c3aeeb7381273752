"""The operator's view on the HTTP front door: each camera's overlay (REST, in the OpenAPI document) and the console
page at `/` with its sign-in and its buttons (HTML, outside the document).

- `GET /v1/cameras/{cameraId}/calibration/overlay`: the PNG of the camera's current calibration (overlays.py);
  404 {code, message} for a camera that is unknown or was never calibrated since the service started.
- `GET /`: the console (console.py) from a snapshot of the daemon's core: scenes from the store and scenes.yaml,
  cameras from scenes.yaml and the worker's last frames (last_frames.py), health and queue, the plan of each
  scene with its calibrated cameras.
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
from datetime import datetime
from html import escape
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from markerless import __version__
from markerless.errors import Reason
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
from markerless.service.last_frames import Attempt
from markerless.service.overlays import OverlayUnavailable, version_dir
from markerless.service.requests import ResolvedFrame

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
    if camera_id not in core.scenes.cameras and core.last_frames.get(camera_id) is None:
        raise ApiError(404, f"Camera not found: {camera_id!r} is not in scenes.yaml and sent no frame",
                       Reason.UNKNOWN_CAMERA)


# --- the snapshot -----------------------------------------------------------------------------------------------


def snapshot(core: HttpCore, plans: _Plans) -> ConsoleSnapshot:
    """The console's view of the core now."""
    store = core.backend.store
    scene_ids = sorted(set(core.scenes.scenes) | set(store.scene_ids()))
    camera_ids = sorted(set(core.scenes.cameras) | set(core.last_frames.camera_ids()))
    cameras = [_camera(core, c) for c in camera_ids]
    scenes = [_scene(core, s) for s in scene_ids]
    alive, connected, stopping = core.alive(), core.connected(), core.stopping.is_set()
    health = HealthView(status="down" if not alive or stopping else "ok" if connected else "degraded",
                        worker_alive=alive, broker_connected=connected,
                        uptime_s=max(0.0, core.clock() - core.started), version=__version__)
    queue = QueueView(pending=len(core.queue), capacity=core.settings.worker.queue_size,
                      registrations=sum(1 for s in scene_ids if core.registrar.registering(s)))
    return ConsoleSnapshot(refresh_s=REFRESH_S, scenes=scenes, cameras=cameras, health=health, queue=queue,
                           signed_in=core.token is not None,
                           plan_svg=plans.svg(core, [s.scene_id for s in scenes if s.version]))


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


def _camera(core: HttpCore, camera_id: str) -> CameraView:
    configured = core.scenes.cameras.get(camera_id)
    frames = core.last_frames.get(camera_id)
    held = core.results.calibration(camera_id)
    view: dict[str, Any] = {"camera_id": camera_id, "scene_id": configured.scene if configured else None}
    if frames is not None:
        view["scene_id"] = frames.latest.scene_id
        good = frames.calibrated
        if good is not None and good.result is not None:
            r = good.result
            view |= dict(state="calibrated", calibrated_at=good.at, position_sigma_m=r.position_sigma_m,
                         rotation_sigma_deg=r.rotation_sigma_deg, num_inliers=r.num_inliers,
                         num_matches=r.num_matches, intrinsics_source=r.intrinsics_source,
                         warnings=list(r.warnings), overlay_url=overlay_url(camera_id))
            view["edge_score"] = core.overlays.edge_score(camera_id) if core.overlays else None
        else:
            view["state"] = "failed"
        if frames.failed is not None:
            view |= dict(last_reason=frames.failed.reason, last_message=frames.failed.message)
            if good is None and frames.failed.result is not None:
                view["warnings"] = list(frames.failed.result.warnings)
    if held is not None and held.status == "calibrating":
        view["state"] = "pending"
    return CameraView(**view)


class _Plans:
    """Each registered scene's plan view with its calibrated cameras, drawn once per scene version and set of
    calibrations (a few kept)."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[Any, ...], str] = OrderedDict()
        self._lock = threading.Lock()

    def svg(self, core: HttpCore, scene_ids: list[str]) -> str | None:
        parts = []
        for scene_id in scene_ids:
            plan = self._scene(core, scene_id)
            if plan is not None:
                heading = f'<h3 class="muted">{escape(scene_id)}</h3>' if len(scene_ids) > 1 else ""
                parts.append(heading + plan)
        return "\n".join(parts) or None

    def _scene(self, core: HttpCore, scene_id: str) -> str | None:
        info = core.backend.store.info(scene_id)
        folder = version_dir(core.backend.store, scene_id, info.version) if info is not None else None
        if folder is None:
            return None  # no scan stored (or not yet): nothing to draw
        calibrated = [a for c in core.last_frames.camera_ids()
                      if (f := core.last_frames.get(c)) is not None and (a := f.calibrated) is not None
                      and a.scene_id == scene_id]
        key = (scene_id, info.version, tuple((a.camera_id, a.seq) for a in calibrated))
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        try:
            plan = _draw_plan(folder, calibrated)
        except Exception:  # noqa: BLE001 - a plan that cannot be drawn must not take the console down
            log.exception("plan view of scene %s failed", scene_id)
            return None
        with self._lock:
            self._kept[key] = plan
            while len(self._kept) > _PLANS_KEPT:
                self._kept.popitem(last=False)
        return plan


def _draw_plan(folder: Any, calibrated: list[Attempt]) -> str:
    from markerless.pipeline.overlay import scene_mesh
    from markerless.pipeline.plan_view import PlanCamera, plan_view_svg
    from markerless.scene.camera import Camera

    cameras = []
    for a in calibrated:
        r = a.result
        pose = r.pose_matrix() if r is not None else None
        if r is None or pose is None or r.intrinsics is None or a.width is None or a.height is None:
            continue
        cameras.append(PlanCamera(a.camera_id, Camera.from_matrix(r.intrinsics, a.width, a.height, r.distortion),
                                  pose, ok=not r.warnings))
    return plan_view_svg(scene_mesh(folder), cameras)

