"""The HTTP front door's app: SceneScape's REST v1 routes and Socket.IO events over the daemon's core.

Routes only validate, enqueue and map results: a calibration becomes the same `CalibrationRequest` an MQTT frame
becomes (`resolve_frame`), in the same `RequestQueue`, answered by the same worker through `Replies` into
`HttpResults`; a registration is the same `RegistrationJob` for the same `Registrar`. Every error is
`{"code", "message"}` (+ `reason`): 400 bad id / body / image / intrinsics, 401 missing or wrong token, 404 unknown
scene or camera, 413 body over worker.max_payload_bytes (refused from its Content-Length, or counted while
streaming, before it is read whole), 429 queue full, 503 stopping.

More routes (the console page, overlays: http_console.py) join the same app as `APIRouter`s:
`create_app(core, routers)` includes them, and their routes reach the daemon's core with the dependency
`Depends(get_core)`; the token check, the body limit and the error format apply to them too. A browser, which
cannot send a bearer header, signs in once at /login with the token and gets a session cookie instead
(`console_session`: HttpOnly, SameSite=Strict, 12 h, derived from the token, never the token itself); a
cookie-authenticated request that changes something must come from the same origin.
The OpenAPI document of the routes: `service/openapi.py`.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Annotated, Any

import socketio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from markerless import __version__
from markerless.errors import MarkerlessError, Reason
from markerless.image_headers import ImageHeaderError, read_image_header
from markerless.service.backend import Backend
from markerless.service.http_models import (
    ID_MAX,
    ID_PATTERN,
    CalibrationBody,
    CalibrationState,
    ErrorBody,
    RegisterCamera,
    RegisterScene,
    RegistrationState,
    ServiceStatus,
)
from markerless.service.http_results import HttpResults, camera_room, scene_room
from markerless.service.last_frames import LastFrames
from markerless.service.overlays import Overlays
from markerless.service.registrar import Registrar, RegistrationJob
from markerless.service.replies import Replies
from markerless.service.requests import CalibrationRequest, Refusal, RequestQueue, ResolvedFrame, resolve_frame
from markerless.service.scenes_file import ScenesFile
from markerless.service.settings import Settings

log = logging.getLogger(__name__)

SOCKETIO_PATH = "v1/socket.io"
_STATUS_OF_REFUSAL = {Reason.UNKNOWN_CAMERA: 404, Reason.SHUTTING_DOWN: 503, Reason.OVERLOADED: 429,
                      Reason.BUSY: 429}


@dataclass(frozen=True)
class HttpCore:
    """The daemon's parts the HTTP front door works with (the same objects the MQTT side uses)."""

    settings: Settings
    scenes: ScenesFile
    queue: RequestQueue
    replies: Replies
    registrar: Registrar
    backend: Backend
    results: HttpResults
    alive: Callable[[], bool]  # the watchdog's view of the worker
    stopping: threading.Event
    clock: Callable[[], float]
    token: SecretStr | None
    last_frames: LastFrames = field(default_factory=LastFrames)  # each camera's last frames (the worker's)
    overlays: Overlays | None = None  # draws them (None: no overlays, e.g. the OpenAPI document's app)
    connected: Callable[[], bool] = lambda: True  # the MQTT side's broker connection
    started: float = 0.0  # `clock()` when the service started


class ApiError(Exception):
    """An error answer: HTTP status, reason and message."""

    def __init__(self, status: int, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


def get_core(request: Request) -> HttpCore:
    """The dependency through which a route reaches the daemon's core."""
    core: HttpCore | None = getattr(request.app.state, "core", None)
    if core is None:
        raise ApiError(503, "the service is not running")
    return core


_bearer = HTTPBearer(auto_error=False, description="http.token_file's token, when the service sets one.")


def token_accepted(core: HttpCore, presented: str | None) -> bool:
    """True when no token is set, or `presented` is it (compared in constant time)."""
    if core.token is None:
        return True
    return presented is not None and hmac.compare_digest(presented.encode(), core.token.get_secret_value().encode())


SESSION_COOKIE = "markerless_session"
SESSION_S = 12 * 3600  # a console sign-in lasts a working day


def console_session(core: HttpCore, expires: int) -> str:
    """The session cookie's value until `expires` (unix time): that time and an HMAC of it keyed by the token, so
    the cookie never carries the token, expires, and dies with a rotated token."""
    assert core.token is not None
    mac = hmac.new(core.token.get_secret_value().encode(), f"markerless console {expires}".encode(), hashlib.sha256)
    return f"{expires}.{mac.hexdigest()}"


def session_accepted(core: HttpCore, cookie_header: str) -> bool:
    """True when the Cookie header holds an unexpired session of this token (compared in constant time)."""
    if core.token is None or not cookie_header:
        return False
    try:
        morsel = SimpleCookie(cookie_header).get(SESSION_COOKIE)
    except CookieError:
        return False
    value = morsel.value if morsel is not None else ""
    expires, _, _ = value.partition(".")
    if not expires.isdigit() or int(expires) < time.time():
        return False
    return hmac.compare_digest(value.encode(), console_session(core, int(expires)).encode())


def _not_stopping(core: Annotated[HttpCore, Depends(get_core)]) -> None:
    if core.stopping.is_set():
        raise ApiError(503, "the service is stopping", Reason.SHUTTING_DOWN)


SceneId = Annotated[str, PathParam(min_length=1, max_length=ID_MAX, pattern=ID_PATTERN, description="Scene id.")]
CameraId = Annotated[str, PathParam(min_length=1, max_length=ID_MAX, pattern=ID_PATTERN, description="Camera id.")]
Core = Annotated[HttpCore, Depends(get_core)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [(400, "Bad id, body, image or intrinsics"), (401, "Missing or wrong bearer token"),
                       (404, "Unknown scene or camera"), (413, "Body over worker.max_payload_bytes"),
                       (429, "Queue full"), (503, "The service is stopping")]
}


def create_app(core: HttpCore | None = None, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The FastAPI app of the REST routes and `routers`; without `core` only its OpenAPI document is usable."""
    app = FastAPI(
        title="markerless",
        version=__version__,
        description="SceneScape's auto-calibration REST v1, served by markerless beside its MQTT API. Socket.IO at "
        "/v1/socket.io: client events register_scene {scene_id}, register_camera {camera_id}; pushes "
        "service_ready {status, version}, register_result {scene_id, data: RegistrationState}, calibration_result "
        "{camera_id, result: CalibrationState}.",
        dependencies=[Depends(_bearer)],  # documents the scheme; `BearerCheck` enforces it before any body is read
        responses=_ERRORS,
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
    )
    app.state.core = core
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    _install_error_handlers(app)
    if core is not None:
        app.add_middleware(BodyLimit, limit=core.settings.worker.max_payload_bytes)
        app.add_middleware(BearerCheck, core=core)
        if core.settings.http.cors_origins:  # outermost: preflights need no token, refusals carry CORS headers
            app.add_middleware(CORSMiddleware, allow_origins=list(core.settings.http.cors_origins),
                               allow_methods=["GET", "POST", "PATCH"], allow_headers=["Authorization", "Content-Type"])

    @app.get("/v1/status", response_model=ServiceStatus, tags=["Service"])
    def status(core: Core) -> ServiceStatus:
        """Whether the worker takes requests."""
        return _service_status(core)

    @app.post("/v1/scenes/{sceneId}/registration", status_code=202, response_model=RegistrationState,
              response_model_exclude_none=True, tags=["Scene"], dependencies=[Depends(_not_stopping)])
    def register(sceneId: SceneId, core: Core) -> RegistrationState:  # noqa: N803 - SceneScape's path names
        """Register the scene's scan from scenes.yaml (nothing is redone when dataset and config are unchanged);
        202 `registering` (or `busy`: queued behind another scene), then poll GET or listen for register_result."""
        return register_scene(core, sceneId)

    @app.patch("/v1/scenes/{sceneId}/registration", status_code=202, response_model=RegistrationState,
               response_model_exclude_none=True, tags=["Scene"], dependencies=[Depends(_not_stopping)])
    def update(sceneId: SceneId, core: Core) -> RegistrationState:  # noqa: N803
        """The scene was edited: re-register it when its dataset or config changed (as MQTT `update`)."""
        state = register_scene(core, sceneId)
        return state.model_copy(update={"message": "Scene update triggered"}) if state.status == "registering" \
            else state

    @app.get("/v1/scenes/{sceneId}/registration", response_model=RegistrationState,
             response_model_exclude_none=True, tags=["Scene"])
    def registration(sceneId: SceneId, core: Core) -> RegistrationState:  # noqa: N803
        """The scene's latest registration status."""
        _known_scene(core, sceneId)
        held = core.results.registration(sceneId)
        if held is not None:
            return held
        if core.registrar.registering(sceneId):
            return RegistrationState(sceneId=sceneId, status="registering", message="Registration is in progress")
        info = core.backend.store.info(sceneId)
        if info is not None:
            return RegistrationState(sceneId=sceneId, status="success", message="Registration is complete",
                                     scene_version=info.version)
        return RegistrationState(sceneId=sceneId, status="not_started", message="Not registered yet")

    @app.post("/v1/cameras/{cameraId}/calibration", status_code=202, response_model=CalibrationState,
              response_model_exclude_none=True, tags=["Camera"], dependencies=[Depends(_not_stopping)])
    def calibrate(cameraId: CameraId, body: CalibrationBody, core: Core) -> CalibrationState:  # noqa: N803
        """Localize one image of the camera (its scene from scenes.yaml); 202 `calibrating` once queued, then
        poll GET or listen for calibration_result."""
        return _calibrate(core, cameraId, body)

    @app.get("/v1/cameras/{cameraId}/calibration", response_model=CalibrationState,
             response_model_exclude_none=True, tags=["Camera"])
    def calibration(cameraId: CameraId, core: Core) -> CalibrationState:  # noqa: N803
        """The camera's latest HTTP calibration."""
        _known_camera(core, cameraId)
        held = core.results.calibration(cameraId)
        return held or CalibrationState(cameraId=cameraId, sceneId=core.scenes.cameras[cameraId].scene,
                                        status="not_started", message="No calibration requested yet")

    for router in routers:
        app.include_router(router)
    return app


def _service_status(core: HttpCore) -> ServiceStatus:
    running = core.alive() and not core.stopping.is_set()
    return ServiceStatus(status="running" if running else "error", version=__version__)


def _known_scene(core: HttpCore, scene_id: str) -> None:
    if scene_id not in core.scenes.scenes and core.backend.store.info(scene_id) is None:
        raise ApiError(404, f"Scene not found: {scene_id!r} is neither in scenes.yaml nor registered",
                       Reason.SCENE_NOT_FOUND)


def _known_camera(core: HttpCore, camera_id: str) -> None:
    if camera_id not in core.scenes.cameras:
        raise ApiError(404, f"Camera not found: {camera_id!r} is not in scenes.yaml", Reason.UNKNOWN_CAMERA)


def register_scene(core: HttpCore, scene_id: str) -> RegistrationState:
    """Start (or queue) the registration of `scene_id` from scenes.yaml, as MQTT's `register`; raises ApiError."""
    _known_scene(core, scene_id)
    request_id = f"http-{uuid.uuid4().hex[:12]}"
    refusal = core.registrar.submit(RegistrationJob.configured(core.scenes, scene_id, False, request_id))
    if refusal is not None:
        raise ApiError(_STATUS_OF_REFUSAL.get(refusal[0], 500), refusal[1], refusal[0])
    return core.results.registering(scene_id, request_id)


def _calibrate(core: HttpCore, camera_id: str, body: CalibrationBody) -> CalibrationState:
    _known_camera(core, camera_id)
    request_id = body.request_id or f"http-{uuid.uuid4().hex[:12]}"
    try:
        resolved = resolve_frame(camera_id, body.frame(request_id), core.scenes)
        header = read_image_header(resolved.image)
        if resolved.intrinsics is not None:
            core.backend.make_camera(resolved.intrinsics, header.width, header.height, resolved.distortion)
    except Refusal as exc:
        raise ApiError(_STATUS_OF_REFUSAL.get(exc.reason, 400), exc.message, exc.reason) from exc
    except ImageHeaderError as exc:
        raise ApiError(400, f"image: {exc}", Reason.BAD_IMAGE) from exc
    except MarkerlessError as exc:  # the intrinsics do not make a camera for this image
        raise ApiError(400, str(exc), exc.reason) from exc
    return enqueue(core, camera_id, resolved, request_id)


def enqueue(core: HttpCore, camera_id: str, resolved: ResolvedFrame, request_id: str) -> CalibrationState:
    """Queue a resolved frame of `camera_id` for the worker, its reply to `HttpResults`; raises ApiError."""
    if core.backend.store.info(resolved.scene_id) is None and not core.registrar.registering(resolved.scene_id):
        raise ApiError(404, f"Scene not found: {resolved.scene_id!r} (camera {camera_id!r}) is not registered",
                       Reason.SCENE_NOT_FOUND)
    ticket, state = core.results.calibrating(camera_id, resolved.scene_id, request_id)
    now = core.clock()
    request = CalibrationRequest(camera_id, resolved.scene_id, resolved.image, resolved.intrinsics,
                                 resolved.distortion, resolved.intrinsics_mode, request_id, now,
                                 now + core.settings.worker.deadline_s, (camera_id, f"http:{ticket}"),
                                 reply_to=core.results.sink(camera_id, ticket), origin="http")
    refusal, superseded = core.queue.put(request)
    if superseded is not None:
        core.replies.reply_failure(superseded, Reason.SUPERSEDED, "a newer request for this camera replaced this one")
    if refusal is not None:
        core.results.withdraw(camera_id, ticket)
        message = (f"calibration queue full ({core.settings.worker.queue_size})" if refusal == Reason.OVERLOADED
                   else "the service is stopping")
        raise ApiError(_STATUS_OF_REFUSAL.get(refusal, 503), message, refusal)
    return state


def _error(status: int, message: str, reason: Reason | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(code=status, message=message, reason=reason).model_dump(mode="json",
                                                                                        exclude_none=True),
                        status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.reason)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        where = {str(e["loc"][1]) for e in errors if len(e.get("loc", ())) > 1}
        reason = Reason.BAD_INTRINSICS if where and where <= {"intrinsics", "distortion"} else (
            Reason.BAD_SCENE_ID if "sceneId" in where else Reason.BAD_REQUEST)
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                 for e in itertools.islice(errors, 5)]
        return _error(400, "invalid request: " + "; ".join(parts), reason)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error (see the service log)", Reason.INTERNAL_ERROR)


class BearerCheck:
    """Answers 401 {code, message} to a request without the token, before its body is read (FastAPI reads and
    parses a body before it runs any dependency)."""

    def __init__(self, app: Any, core: HttpCore) -> None:
        self.app, self.core = app, core

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.core.token is not None and scope["path"] not in PUBLIC_PATHS:
            headers = dict(scope.get("headers") or [])
            scheme, _, presented = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token_accepted(self.core, presented.strip()):
                pass
            elif session_accepted(self.core, headers.get(b"cookie", b"").decode("latin-1")):
                if scope["method"] not in ("GET", "HEAD") and not _same_origin(headers):
                    return await _error(403, "cross-origin request refused: the console's session cookie "
                                        "only works from the console's own pages")(scope, receive, send)
            elif scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):  # a browser: sign in first
                return await RedirectResponse("/login", status_code=303)(scope, receive, send)
            else:
                return await _error(401, "missing or wrong bearer token (Authorization: Bearer <the token in "
                                    "http.token_file>, or sign in at /login)")(scope, receive, send)
        await self.app(scope, receive, send)


PUBLIC_PATHS = frozenset({"/login"})  # the sign-in form and its post: they check the token themselves


def _same_origin(headers: dict[bytes, bytes]) -> bool:
    """A browser's request from the same origin: Sec-Fetch-Site (when sent) says so, and Origin (when sent) is
    this server's host (a request without either does not come from another site's page)."""
    site = headers.get(b"sec-fetch-site", b"same-origin")
    if site not in (b"same-origin", b"none"):
        return False
    origin = headers.get(b"origin")
    if origin is None:
        return True
    return origin.partition(b"://")[2] == headers.get(b"host", b"")


class _TooLarge(Exception):
    """Raised from `receive` once a streamed body passes the limit."""


class BodyLimit:
    """Refuses a body over `limit` bytes with 413 {code, message} before it is read whole: at once when its
    Content-Length says so, else as soon as the streamed bytes pass it (whatever the app answered meanwhile, e.g.
    a parse error of the cut body, is dropped for the 413)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, f"{int(declared)} bytes")
        total, exceeded = 0, False

        async def counted() -> dict[str, Any]:
            nonlocal total, exceeded
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def unless_exceeded(message: dict[str, Any]) -> None:
            if not exceeded:
                await send(message)

        try:
            await self.app(scope, counted, unless_exceeded)
        except _TooLarge:
            pass
        if exceeded:
            await self._refuse(send, f"more than {self.limit} bytes (streamed)")

    async def _refuse(self, send: Any, size: str) -> None:
        await _error(413, f"request body of {size} exceeds worker.max_payload_bytes={self.limit}",
                     Reason.TOO_LARGE)({"type": "http"}, None, send)


# --- Socket.IO ------------------------------------------------------------------------------------------------


def create_socketio(core: HttpCore) -> socketio.AsyncServer:
    """SceneScape's Socket.IO events: `register_scene` / `register_camera` subscribe the client to a scene's
    `register_result` and a camera's `calibration_result` pushes (and answer with the current state)."""
    origins = list(core.settings.http.cors_origins) or None  # None: same origin only ([] would disable the check)
    sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins=origins, logger=False, engineio_logger=False)

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        presented = auth.get("token") if isinstance(auth, dict) else None
        header = environ.get("HTTP_AUTHORIZATION", "")
        if presented is None and header.lower().startswith("bearer "):
            presented = header[7:].strip()
        if not token_accepted(core, presented):
            raise socketio.exceptions.ConnectionRefusedError("missing or wrong bearer token")
        await sio.emit("service_ready", _service_status(core).model_dump(mode="json"), to=sid)

    async def subscribe(sid: str, data: Any, event: str, request: type[RegisterScene | RegisterCamera], key: str,
                        room: Callable[[str], str], held: Callable[[str], BaseModel | None],
                        answer: str) -> dict[str, Any]:
        """Both subscription events: join the room of the id under `key`, answer with what is held for it now."""
        try:
            target: str = getattr(request.model_validate(data), key)
        except ValidationError as exc:
            return ErrorBody(code=400, message=f"{event}: {exc.errors()[0]['msg']}").model_dump(
                mode="json", exclude_none=True)
        await sio.enter_room(sid, room(target))
        now = held(target)
        return {key: target, answer: now.model_dump(mode="json", exclude_none=True) if now else None}

    @sio.event
    async def register_scene(sid: str, data: Any) -> dict[str, Any]:
        return await subscribe(sid, data, "register_scene", RegisterScene, "scene_id", scene_room,
                               core.results.registration, "data")

    @sio.event
    async def register_camera(sid: str, data: Any) -> dict[str, Any]:
        return await subscribe(sid, data, "register_camera", RegisterCamera, "camera_id", camera_room,
                               core.results.calibration, "result")

    return sio


# --- OpenAPI --------------------------------------------------------------------------------------------------


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, without the 422 it documents for every route: invalid requests get 400 here."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in doc["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema
