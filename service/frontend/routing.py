"""The ASGI entry point: hot routes matched here (a dict lookup, or a template match for the v2 infer paths) and
run by the kit; every other request goes to FastAPI. The OpenAPI document is FastAPI's, with the hot routes'
operations and every declared body schema (msgspec Structs) merged in, so /docs shows one API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import orjson
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import Receive, Scope, Send

from service.frontend.kit import HotRoute, Kit
from service.logs import new_request_id, valid_request_id


class Template:
    """A path template (``/v2/models/{name}/infer``) matched segment by segment."""

    def __init__(self, path: str) -> None:
        self.segments = path.split("/")
        self.names = {i: s[1:-1] for i, s in enumerate(self.segments) if s.startswith("{") and s.endswith("}")}

    def match(self, path: str) -> dict[str, str] | None:
        parts = path.split("/")
        if len(parts) != len(self.segments):
            return None
        params = {}
        for i, (want, got) in enumerate(zip(self.segments, parts, strict=True)):
            if i in self.names:
                if not got:
                    return None
                params[self.names[i]] = got
            elif want != got:
                return None
        return params


async def method_not_allowed(scope: Scope, send: Send, allowed: set[str]) -> None:
    """405 in the native error shape, with Allow, as FastAPI answers it for its own routes."""
    given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
    rid = given if given and valid_request_id(given) else new_request_id()
    body = orjson.dumps({"error": "Method Not Allowed", "type": "http_error", "request_id": rid})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"allow", ", ".join(sorted(allowed)).encode()),
        (b"x-request-id", rid.encode()),
    ]
    await send({"type": "http.response.start", "status": 405, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Front:
    """Hot routes below the framework, the rest to FastAPI."""

    def __init__(self, kit: Kit, api: FastAPI) -> None:
        self.kit = kit
        self.api = api
        self.routes: list[HotRoute] = []
        self._exact: dict[tuple[str, str], HotRoute] = {}
        self._templates: list[tuple[str, Template, HotRoute]] = []
        self._schemas: list[type[msgspec.Struct]] = []
        self.state = api.state  # FastAPI's attributes that tests and tooling read stay reachable
        api.openapi = self.openapi  # type: ignore[method-assign]

    def add(self, route: HotRoute) -> None:
        self.routes.append(route)
        if "{" in route.path:
            self._templates.append((route.method, Template(route.path), route))
        else:
            self._exact[(route.method, route.path)] = route

    def document(self, schemas: Sequence[type[msgspec.Struct]]) -> None:
        """Body declarations the OpenAPI document refers to (``#/components/schemas/NAME``)."""
        self._schemas += [s for s in schemas if s not in self._schemas]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            route = self._exact.get((method, path))
            if route is not None:
                await self.kit.serve(route, scope, receive, send)
                return
            allowed = {m for m, p in self._exact if p == path}
            for want, template, route in self._templates:
                if (params := template.match(path)) is not None:
                    if want == method:
                        await self.kit.serve(route, scope, receive, send, params)
                        return
                    allowed.add(want)
            if allowed:  # a hot route's path with another method
                await method_not_allowed(scope, send, allowed)
                return
        await self.api(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document plus the hot routes and the declared schemas (built once, then cached)."""
        api = self.api
        if api.openapi_schema is None:
            doc = get_openapi(
                title=api.title, version=api.version, summary=api.summary, routes=api.routes, tags=api.openapi_tags
            )
            for route in self.routes:
                doc.setdefault("paths", {}).setdefault(route.path, {})[route.method.lower()] = route.openapi
            _, components = msgspec.json.schema_components(self._schemas, ref_template="#/components/schemas/{name}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
            api.openapi_schema = doc
        return api.openapi_schema

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)
