"""The HTTP layer of the Serve app: the FastAPI app the ingress deployment serves, the app's error shape
(``{"error": ...}`` with a status that says what to send instead, FastAPI's own refusals included) and the
request-body limit.

No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations.
"""

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_BODY_BYTES = 256 * 1024

api = FastAPI(title="rec-rllib", description="Recommendations from the RL-trained transformer policy.")


PAGE = (Path(__file__).parent / "web" / "index.html").read_text()
"""The web page at ``/``: plain HTML and JavaScript over the same endpoints (no build step)."""


@api.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE)


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:  # its loc is ("body", <character offset>), its msg "JSON decode error"
        at = next((p for p in bad_json.get("loc", ())[1:] if isinstance(p, int)), None)
        reason = (bad_json.get("ctx") or {}).get("error", "not JSON")
        where = f" at character {at}" if at is not None else ""
        return JSONResponse(
            {
                "error": f"the request body is not valid JSON ({reason}{where}); send a JSON object, "
                'e.g. {"user": "196", "k": 10}',
                "see": "/docs for the request schemas",
            },
            status_code=400,
        )
    problems = [
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in errors
    ]
    return JSONResponse(
        {"error": "invalid request: " + "; ".join(problems), "see": "/docs for the request schemas"},
        status_code=422,
    )


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (no such path, a method the path does not take, a body it could not read) in the
    app's error shape."""
    message = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in message:  # e.g. a body that is not UTF-8
        message = (
            "the request body could not be read: send UTF-8 encoded JSON with content-type application/json"
        )
    elif exc.status_code == 404:
        message = (
            f"{message}: the endpoints are POST /recommend, /query, /feedback, /items and GET /healthz, "
            "/ (a web page)"
        )
    return JSONResponse(
        {"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


class _LimitBody:
    """Refuse bodies over MAX_BODY_BYTES before they are read (a plain ASGI middleware: Starlette's
    ``BaseHTTPMiddleware`` would cost every request an extra task and stream wrapper)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                response = JSONResponse(
                    {"error": f"request body over {MAX_BODY_BYTES} bytes; send at most {MAX_BODY_BYTES}"},
                    status_code=413,
                )
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


api.add_middleware(_LimitBody)


def json_response(answer: BaseModel) -> Response:
    """A response model sent as its JSON (FastAPI would dump, validate and serialise it again)."""
    return Response(answer.model_dump_json(), media_type="application/json")
