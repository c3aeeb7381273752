"""Helpers for the HTTP front-door tests: polling a REST resource, checking an error body, recording Socket.IO
pushes. Everything talks to a real server over a real socket."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import socketio
from mqtt_fixtures import WAIT_S
from serve_helpers import until

SOCKETIO_PATH = "/v1/socket.io"


def poll(client: httpx.Client, url: str, busy: str, timeout: float = WAIT_S) -> dict[str, Any]:
    """GET `url` until its status is no longer `busy` (bounded)."""
    return until(lambda: (d := client.get(url).json())["status"] != busy and d, f"{url} past {busy}", timeout)


def is_error(response: httpx.Response, code: int) -> dict[str, Any]:
    """The response is `code` with SceneScape's {code, message} body; returns the body."""
    body = response.json()
    assert response.status_code == code and body["code"] == code and body["message"], (response.status_code, body)
    return body


class Pushes:
    """A python-socketio client that records every push of the events it is told to listen to."""

    def __init__(self, *events: str) -> None:
        self.client = socketio.Client()
        self.received: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        for event in events:
            self.client.on(event, self._recorder(event))

    def _recorder(self, event: str) -> Callable[[Any], None]:
        def record(data: Any) -> None:
            with self._cond:
                self.received.append((event, data))
                self._cond.notify_all()

        return record

    def connect(self, url: str, **kwargs: Any) -> Pushes:
        self.client.connect(url, socketio_path=SOCKETIO_PATH, wait_timeout=WAIT_S, **kwargs)
        return self

    def of(self, event: str, predicate: Callable[[Any], bool] = lambda d: True) -> list[Any]:
        with self._cond:
            return [d for e, d in self.received if e == event and predicate(d)]

    def wait(self, event: str, predicate: Callable[[Any], bool] = lambda d: True, timeout: float = WAIT_S) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: self.of(event, predicate), timeout):
                raise AssertionError(f"no {event} push within {timeout} s: {self.received}")
            return self.of(event, predicate)[0]

    def close(self) -> None:
        self.client.disconnect()
