"""FastAPI's body validation errors in the OpenAI error shape.

FastAPI answers a body that fails its pydantic model with its own 422 body
(`{"detail": [...]}`), which OpenAI-style clients cannot parse. This turns the
first problem into a 400 `invalid_request_error` naming the field, like every
other error the wrapper sends.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.errors import APIError


def validation_error_to_api_error(exc: RequestValidationError) -> APIError:
    problems = list(exc.errors())
    if not problems:
        return APIError(400, "The request body is invalid.", code="invalid_request")
    first = problems[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    # loc starts with where the value came from ("body", "query", "path"); the rest names the field.
    field = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = f"'{field}': " if field else ""
    more = f" ({len(problems) - 1} more problem(s) in the request)" if len(problems) > 1 else ""
    return APIError(400, f"Invalid request: {where}{message}.{more}", param=field, code="invalid_request")


async def request_validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Exception handler: `app.add_exception_handler(RequestValidationError, request_validation_error_handler)`."""
    error = validation_error_to_api_error(exc)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
