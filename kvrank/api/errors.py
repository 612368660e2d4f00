"""The API's errors: every one is `{"error": {type, message, limit?, param?}}` with a 4xx/5xx status.

`ApiError` is what routes and admission raise; `install_error_handlers` turns it, FastAPI's validation errors,
HTTP errors and anything unexpected into that body. `ERRORS` documents the bodies in OpenAPI.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvrank.api.schemas import ErrorResponse
from kvrank.errors import KvrankError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, limit: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.limit, self.param = status, type_, message, limit, param
        self.headers = headers or {}


def error_response(status: int, type_: str, message: str, limit: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, "limit": limit, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description, **extra}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Malformed JSON or a body that is not UTF-8."),
    401: _error("Missing or wrong API key (only when keys are configured)."),
    413: _error("Body larger than `max_body_bytes`."),
    422: _error("Invalid field, unknown field, or a limit exceeded (`error.limit` names it)."),
    500: _error("Internal error (logged on the server)."),
    503: _error("Queue full, the queued work would not let this request finish before `request_timeout_s`, "
                "shutting down, or not ready; retry after `Retry-After` seconds.",
                headers={"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}),
    504: _error("The request took longer than `request_timeout_s`."),
}


def invalid(err: KvrankError, params: Mapping[str, str]) -> ApiError:
    """A library error as a 422; its `param` (the library's argument name) as the request's field (`params`
    maps the names that differ, e.g. `top_k` -> `top_n`)."""
    param = err.param
    return ApiError(422, "invalid_request", str(err), param=params.get(param, param) if param else None)


def limit_exceeded(param: str, value: int, unit: str, limit: str, bound: int, hint: str = "") -> ApiError:
    """A 422 for a request over one of the server's limits, naming the field, the limit and its variable."""
    unit = f" {unit}" if unit else ""
    what = f"{param} has {value}{unit}" if unit else f"{param} is {value}"
    env = f"KVRANK_{limit.upper()}"
    return ApiError(422, "limit_exceeded", f"{what}; the limit {limit} is {bound} ({env}){' ' + hint if hint else ''}",
                    limit=limit, param=param)


# ---------------------------------------------------------------------------------------------- handlers
def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.type, err.message, err.limit, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = _first_error(errors)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = _param(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx")
            detail = ctx.get("error", "") if isinstance(ctx, dict) else ""
            return error_response(400, "invalid_request", f"malformed JSON at character {loc[0] if loc else '?'}: "
                                  f"{detail}")
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r}; see the schema at /docs"
        elif not loc and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
            message = "the body must be a JSON object sent with Content-Type: application/json"
        else:
            message = f"{param or 'body'}: {first.get('msg')}"
        others = {_param(e.get("loc", ())) for e in errors if e.get("type") not in _BRANCH_MISMATCH} - {param}
        more = f" (and {len(others)} more)" if others else ""
        return error_response(422, "invalid_request", message + more, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        types = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "limit_exceeded"}
        message, limit = str(err.detail), None
        if err.status_code == 400 and "parsing the body" in message:
            message = _unparsable(err.__cause__)
        if err.status_code == 413:
            max_bytes = request.app.state.settings.max_body_bytes
            message = f"the body is larger than max_body_bytes={max_bytes} bytes (KVRANK_MAX_BODY_BYTES)"
            limit = "max_body_bytes"
        return error_response(err.status_code, types.get(err.status_code, "invalid_request"), message, limit,
                              headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s: %s", request.method, request.url.path, err, exc_info=err)
        return error_response(500, "internal", "internal error; it is logged on the server")


# Type mismatches of one branch of a union (`str | dict[str, str]`): the other branch's error says more.
_BRANCH_MISMATCH = {"string_type", "model_type", "model_attributes_type", "dict_type"}


def _first_error(errors: Sequence[Any]) -> dict[str, Any]:
    """The error to report: the first, unless a union branch's type mismatch hides a more telling one (for
    `documents[0]: {"text": 1}` the object branch's `documents[0].text`, not "documents[0] is not a string")."""
    if not errors:
        return {"loc": (), "msg": "invalid request", "type": ""}

    def rank(error: dict[str, Any]) -> int:  # a value error; a wrong type inside an object; an object, wrong
        if error.get("type") not in _BRANCH_MISMATCH:
            return 0
        return 2 if isinstance(error.get("input"), dict) and len(errors) > 1 else 1

    return min(errors, key=rank)


def _param(loc: Sequence[Any]) -> str | None:
    """A pydantic error location as the request field: `documents[3].text`, `rerank.depth` (union branch tags
    such as `str`, `dict[...]` or `list[...]` left out)."""
    param = ""
    for i, part in enumerate(loc):
        if part == "body" and i == 0:
            continue
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in str(part) or (i > 0 and isinstance(loc[i - 1], int) and part == "str"):
            continue  # a union branch: `list[...]`, `function-before[...]`, or a member type
        else:
            name = str(part).encode("utf-8", "backslashreplace").decode("utf-8")  # a key may be a lone surrogate
            param += f".{name}" if param else name
    return param or None


def _unparsable(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a body (it answers 400 "There was an error parsing the body")."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 JSON (byte {cause.start}: {cause.reason}); send UTF-8"
    if isinstance(cause, RecursionError):
        return ("the JSON is nested too deeply to parse; a request body needs only a few levels (objects and "
                "lists of documents)")
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return (f"the JSON holds an integer of more than {sys.get_int_max_str_digits()} digits, more than the "
                "parser reads; send integers in the range of their field")
    return f"the body could not be parsed as JSON ({type(cause).__name__ if cause else 'unknown error'}: {cause})"
