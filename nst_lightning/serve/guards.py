"""The web app's outer walls: which Host and Origin headers it answers (DNS rebinding, cross-site pages), how
many bytes a request may send (counted as they arrive, whatever the framing), messages without server paths, and
a client's broken connection logged in one line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
ANY_HOST = "*"
# An absolute POSIX path in a message (not part of a URL, a ratio or a word): shown by its last part only.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~>-])/[^\s'\"`,;()<>\[\]{}|]+")


class Scrubber:
    """Takes server paths out of a message a client sees: a job's own files by their names, an offered weights
    file by its name, the data folder as ``<data>``, and any other absolute path by its last part."""

    def __init__(self, data: str | os.PathLike | None = None, weights: Mapping[str, str] | None = None) -> None:
        self.named: list[tuple[str, str]] = []
        for name, target in (weights or {}).items():
            if os.path.isabs(target):
                self.named += [(target, name), (os.path.realpath(target), name)]
        if data is not None:
            self.named += [(str(Path(data).resolve()), "<data>"), (os.path.abspath(data), "<data>")]

    def scrub(self, text: str, folder: Path | None = None) -> str:
        pairs = list(self.named)
        if folder is not None:
            pairs = [(str(folder) + os.sep, ""), (str(folder.resolve()) + os.sep, ""), *pairs]
        for path, shown in sorted(pairs, key=lambda pair: -len(pair[0])):  # the longest (most precise) first
            text = text.replace(path, shown)
        return _ABSOLUTE_PATH.sub(lambda found: Path(found.group(0)).name or "<path>", text)


def _refuse(status: int, detail: str, key: str | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "key": key}, status_code=status)


def host_name(value: str) -> str | None:
    """The name or address of a ``Host`` header or an ``Origin``'s authority (lower case, no port, no brackets)."""
    try:
        return urlsplit(f"//{value}").hostname
    except ValueError:
        return None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostOriginGuard:
    """ASGI middleware. ``Host`` must be an IP address, ``localhost``, or a name of ``allowed_hosts`` (``*``: any):
    a page of another site that gets its own name to resolve to this server (DNS rebinding) is refused. A write
    (any method but GET, HEAD, OPTIONS) whose ``Origin`` is another site than the ``Host`` it was sent to (or a
    name of ``allowed_hosts``) is refused, so a page elsewhere cannot post jobs; requests without ``Origin``
    (curl, scripts) pass. ``allowed_hosts`` None: no ``Host`` check (the Origin check stays)."""

    def __init__(self, app: Any, allowed_hosts: Iterable[str] | None = None) -> None:
        self.app = app
        self.hosts = None if allowed_hosts is None else {host_name(h) or h.lower() for h in allowed_hosts}

    def host_allowed(self, name: str | None) -> bool:
        if self.hosts is None or ANY_HOST in self.hosts:
            return True
        if not name:
            return False
        return _is_address(name) or name == "localhost" or name.endswith(".localhost") or name in self.hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None and not self.host_allowed(host_name(host)):
            shown = host_name(host) or host[:100]
            response = _refuse(
                403,
                f"this server does not answer to the name {shown!r}: start it with --allowed-host {shown} to allow it",
                "host",
            )
            return await response(scope, receive, send)
        origin = headers.get("origin")
        if scope["method"] not in SAFE_METHODS and origin is not None and not self.same_site(origin, host):
            detail = (
                f"a page of another site ({origin[:100]}) cannot change this server's jobs: use the server's "
                "own page, or a client that sends no Origin"
            )
            response = _refuse(403, detail, "origin")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def same_site(self, origin: str, host: str | None) -> bool:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (a sandboxed page, a file) and anything odd
        if host is not None and parts.netloc.lower() == host.lower():
            return True
        name = parts.hostname
        return bool(self.hosts and name and name in self.hosts - {ANY_HOST})


class BodyTooLarge(HTTPException):
    """A request body over the limit, found while it arrives (FastAPI passes HTTP exceptions through its form
    parsing, which turns any other error into a 400)."""

    def __init__(self, limit: int, what: str) -> None:
        super().__init__(413, f"the request is over the upload limit ({what}): send smaller or fewer images")
        self.limit = limit


class BodyLimit:
    """ASGI middleware: a request body may hold at most ``limit`` bytes; ``Content-Length`` over it is refused
    at once, and the bytes of any body (chunked too) are counted as they arrive and stopped at the limit with
    413, before the rest is read or spooled to disk."""

    def __init__(self, app: Any, limit: int, what: str) -> None:
        self.app = app
        self.limit = limit
        self.what = what

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await _refuse(413, BodyTooLarge(self.limit, self.what).detail)(scope, receive, send)
        received = 0
        started = False

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit, self.what)
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as err:
            if started:
                raise
            await _refuse(413, err.detail)(scope, receive, send)


def quiet_protocol_faults(server: Any, log: Callable[[str], None]) -> None:
    """Has ``server`` (a ``uvicorn.Server``; run it as usual, with its own event loop) log a client's broken HTTP
    connection in one line to ``log``; any other fault of its event loop goes to the loop's default handler.

    A client that goes on sending a body after its answer trips uvicorn's h11 protocol ("can't handle event type
    Response when role=SERVER and state=MUST_CLOSE": 1 such body in 80 to 300 on this machine); the connection's
    transport reports it to asyncio's loop, whose default handler prints a traceback, past uvicorn's loggers."""
    serve = server.serve

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        message = str(context.get("message", ""))
        if "protocol.data_received" not in message and not type(error).__module__.startswith("h11"):
            loop.default_exception_handler(context)
            return
        log(message + (f" ({type(error).__name__}: {error})" if error is not None else ""))

    async def serve_quietly(sockets: list[Any] | None = None) -> None:  # Server.run's own call, in its loop
        asyncio.get_running_loop().set_exception_handler(handler)
        await serve(sockets=sockets)

    server.serve = serve_quietly
