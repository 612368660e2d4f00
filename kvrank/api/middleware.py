"""ASGI middleware of the API, outermost first: `ObserveMiddleware` (metrics), `BodyLimitMiddleware`
(`max_body_bytes`), CORS (Starlette's), `AuthMiddleware` (bearer keys), and `ReplicaMiddleware` (the answering
replica's name) around everything."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Collection

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvrank.api.errors import error_response
from kvrank.api.metrics import Metrics
from kvrank.api.page import is_page_path

OPEN_PATHS = ("/healthz", "/readyz")  # never need a key
REPLICA_HEADER = "X-Kvrank-Replica"


class ObserveMiddleware:
    """Counts and times every request by route, method and status (outermost, so it sees 401s and 413s); a path
    not in `routes` is counted as `other`."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Collection[str]):
        self.app, self.metrics, self.routes = app, metrics, frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        start, status = loop.time(), 500
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            labels = (route, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(loop.time() - start)


class BodyLimitMiddleware:
    """Refuses bodies over `max_body_bytes`: by Content-Length before reading, or while streaming (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> JSONResponse:
        return error_response(413, "limit_exceeded", f"the body is larger than max_body_bytes={self.max_bytes} "
                              "bytes (KVRANK_MAX_BODY_BYTES)", limit="max_body_bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = self.too_large() if length.isdigit() else error_response(
                400, "invalid_request", "the Content-Length header is not a number")
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413)  # FastAPI's body reader re-raises it; `http_error` answers
            return message

        await self.app(scope, counted, send)


class AuthMiddleware:
    """`Authorization: Bearer KEY` on every route but health, when keys are configured. Each configured key's
    SHA-256 is compared with the presented key's in constant time (all keys, no early exit); keys are never
    logged or echoed."""

    def __init__(self, app: ASGIApp, keys: list[str]):
        self.app = app
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def allowed(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for digest in self.digests:
            ok |= hmac.compare_digest(digest, presented)
        return ok and scheme.lower() == "bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] in OPEN_PATHS or is_page_path(scope["path"])
                or scope["method"] == "OPTIONS"):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        if not self.allowed(header):
            response = error_response(401, "unauthorized", "missing or invalid API key; send "
                                      "`Authorization: Bearer <key>` with a key from KVRANK_API_KEYS",
                                      headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ReplicaMiddleware:
    """Names the replica that answered in an `X-Kvrank-Replica` header (behind Ray Serve's proxy, which spreads
    requests over replicas, a client can tell them apart)."""

    def __init__(self, app: ASGIApp, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, named if scope["type"] == "http" else send)
