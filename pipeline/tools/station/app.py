"""The station's web server: login, the page and its assets, the WebSocket the page lives on, review strips.

Nothing but the login page and the static assets is served to a browser without a staff session (a signed
cookie, valid until the station restarts or the member logs out). The WebSocket carries the hub's updates to the
page, and the page's acknowledgements back, with the session's login as `by`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from pipeline.tools.station.config import StationConfig
from pipeline.tools.station.hub import Browser, Hub
from pipeline.tools.station.users import read_users, verify

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
ACTIONS = ("acknowledge", "silence")


def build_app(hub: Hub, users_file: Path) -> Starlette:
    """The station's ASGI app over `hub`; staff from `users_file` (read at each login: new staff need no restart)."""

    def user_of(scope_session: dict[str, Any]) -> str | None:
        user = scope_session.get("user")
        return user if isinstance(user, str) else None

    async def page(request: Request) -> Response:
        if user_of(request.session) is None:
            return RedirectResponse("/login", status_code=303)
        return FileResponse(STATIC / "station.html")

    async def login_page(request: Request) -> Response:
        return FileResponse(STATIC / "login.html")

    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode(errors="replace"))
        name, password = form.get("user", [""])[0], form.get("password", [""])[0]
        ok = await asyncio.to_thread(lambda: verify(read_users(users_file), name, password))
        if not ok:
            log.warning("station login refused for %r", name[:64])
            return RedirectResponse("/login?failed=1", status_code=303)
        request.session["user"] = name
        log.info("station login: %s", name)
        return RedirectResponse("/", status_code=303)

    async def logout(request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def review(request: Request) -> Response:
        if user_of(request.session) is None:
            return JSONResponse({"error": "log in first"}, status_code=401)
        strip = hub.wall.review(request.path_params["alarm_id"])
        if strip is None:
            return JSONResponse({"error": "no such alarm at this station"}, status_code=404)
        return JSONResponse(strip)

    async def socket(ws: WebSocket) -> None:
        user = user_of(ws.session)
        await ws.accept()
        if user is None:  # closed with a reason the page understands (policy violation: back to the login)
            await ws.close(code=1008, reason="log in first")
            return
        browser = Browser(asyncio.get_running_loop())
        snapshot = hub.attach(browser)
        try:
            await ws.send_text(json.dumps({**snapshot, "user": user}, separators=(",", ":")))
            sender = asyncio.create_task(_send(ws, browser))
            try:
                while True:
                    _handle(hub, user, json.loads(await ws.receive_text()))
            finally:
                sender.cancel()
        except (WebSocketDisconnect, json.JSONDecodeError, RuntimeError):
            pass
        finally:
            hub.detach(browser)

    routes = [Route("/", page), Route("/login", login_page, methods=["GET"]),
              Route("/login", login, methods=["POST"]), Route("/logout", logout, methods=["POST"]),
              Route("/api/review/{alarm_id:path}", review), WebSocketRoute("/ws", socket),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    return Starlette(routes=routes, middleware=[Middleware(SessionMiddleware, secret_key=secrets.token_hex(32),
                                                           session_cookie="ecgmon_station", same_site="strict")])


async def _send(ws: WebSocket, browser: Browser) -> None:
    while True:
        await ws.send_text(await browser.queue.get())


def _handle(hub: Hub, user: str, doc: Any) -> None:
    """A page's request: acknowledge or silence an alarm, or name a bed."""
    if not isinstance(doc, dict):
        return
    if doc.get("action") in ACTIONS and isinstance(doc.get("device"), str) and isinstance(doc.get("alarm_id"), str):
        hub.acknowledge(doc["device"], doc["alarm_id"], doc["action"], user)
    elif doc.get("action") == "rename" and isinstance(doc.get("device"), str):
        order = doc.get("order")
        hub.wall.rename(doc["device"], str(doc.get("label", "")), str(doc.get("patient", "")),
                        order if isinstance(order, int) else 0)


class Station:
    """The hub and the web server, started and stopped together (uvicorn on a thread of its own)."""

    def __init__(self, config: StationConfig) -> None:
        self.config = config
        self.hub = Hub(config.mqtt, config.keep_s, config.silent_s, config.beds_file)
        read_users(config.users_file)  # a missing or malformed users file stops the station at start
        app = build_app(self.hub, config.users_file)
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="websockets-sansio",
                                                     lifespan="off"))
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address (once started)."""
        assert self._socket is not None
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}/"

    def start(self) -> None:
        """Connect to the broker (ConnectError), listen (OSError), then serve the page on a thread: a browser that
        comes before the server turns waits in the socket's backlog."""
        self.hub.start()
        try:
            self._socket = socket.create_server((self.config.host, self.config.port))
        except OSError:
            self.hub.stop()
            raise
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="station-http", daemon=True)
        self._thread.start()
        log.info("station up at %s", self.url)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the pages' connections and stop serving (up to `timeout_s`), then leave the broker."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        if self._socket is not None:
            self._socket.close()
        self.hub.stop()
