"""The HTTP front door's server: uvicorn on its own thread and event loop, started and stopped with the daemon.

The socket is bound in `start()` (on the caller's thread), so a taken port or unreadable certificate fails the
daemon's start-up with an OSError/ValueError, like the metrics port, instead of dying quietly in a thread. TLS
(http.certfile/keyfile) and mutual TLS (http.client_ca_file) are uvicorn's; without them the server is plain HTTP,
meant for local use. uvicorn installs no signal handlers off the main thread: SIGTERM reaches `markerless serve`,
whose `Daemon.stop()` answers what is queued (pushing those results), then stops this server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import socketio
import uvicorn
from fastapi import APIRouter

from markerless.service.http_api import SOCKETIO_PATH, HttpCore, create_app, create_socketio

log = logging.getLogger(__name__)

_GRACE_S = 5.0  # open connections get this long to finish once the daemon has answered everything


class HttpServer:
    """REST v1 + Socket.IO over `core`; `routers` add routes to the same app (http_api.create_app)."""

    def __init__(self, core: HttpCore, routers: Sequence[APIRouter] = ()) -> None:
        self.core = core
        self.app = create_app(core, routers)
        self.sio = create_socketio(core)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: socket.socket | None = None
        self._pushing: set[concurrent.futures.Future[Any]] = set()  # emits scheduled and not yet done
        self._pushing_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (after `start()`)."""
        if self._socket is None:
            raise RuntimeError("HttpServer.start() was not called")
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        s = self.core.settings.http
        tls: dict[str, Any] = {}
        if s.certfile is not None:
            tls = {"ssl_certfile": str(s.certfile), "ssl_keyfile": str(s.keyfile)}
            if s.client_ca_file is not None:
                tls |= {"ssl_ca_certs": str(s.client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        asgi = socketio.ASGIApp(self.sio, other_asgi_app=self.app, socketio_path=SOCKETIO_PATH)
        config = uvicorn.Config(asgi, host=s.host, port=s.port or 0, log_config=None, lifespan="off",
                                timeout_graceful_shutdown=_GRACE_S, server_header=False, **tls)
        config.load()  # certificates read now: a bad file fails start-up here
        sock = socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.host, s.port or 0))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"http: cannot listen on {s.host}:{s.port}: {exc.strerror}") from exc
        self._socket = sock
        self._server = uvicorn.Server(config)
        loop = self._loop = asyncio.new_event_loop()
        self.core.results.push = self._push
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(loop, sock, started), name="markerless-http",
                                        daemon=True)
        self._thread.start()
        started.wait(30.0)
        log.info("HTTP front door on %s://%s:%s", "https" if tls else "http", s.host, self.port)

    def _run(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        assert self._server is not None
        try:
            loop.call_soon(started.set)
            loop.run_until_complete(self._serve(sock))
        except BaseException:  # noqa: BLE001 - uvicorn exits with SystemExit on start-up failures
            log.exception("the HTTP server stopped")
        finally:
            started.set()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        await self._server.serve(sockets=[sock])
        await self.sio.shutdown()  # Socket.IO's background tasks (pings, the service task)

    def _push(self, event: str, data: dict[str, Any], room: str) -> None:
        """Emit a Socket.IO event from any thread (the worker's, the registrar's)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self.sio.emit(event, data, room=room), loop)
        except RuntimeError:  # the loop closed meanwhile: nobody is connected any more
            return
        with self._pushing_lock:
            self._pushing.add(future)
        future.add_done_callback(self._pushed)

    def _pushed(self, future: concurrent.futures.Future[Any]) -> None:
        with self._pushing_lock:
            self._pushing.discard(future)

    def stop(self) -> None:
        """Send the pushes already scheduled (the daemon's last answers), finish open requests (bounded), close."""
        self.core.results.push = None
        with self._pushing_lock:
            pushing = list(self._pushing)
        concurrent.futures.wait(pushing, timeout=_GRACE_S)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=_GRACE_S + 5.0)
        if self._socket is not None:
            self._socket.close()
