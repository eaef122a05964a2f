"""What goes wrong in a request, and how it is told: OpenAI-style JSON error objects.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "model",
               "code": "model_not_found"}}            with the HTTP status of ApiError

`api_error(exc)` maps what the engine and the scheduler raise (UnknownAdapterError,
ContextLengthError, QueueFullError, ...) to an ApiError; anything else is a 500.
Standard library and edgepeft.runtime only (no FastAPI): the scheduler raises these too.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgepeft.finite import NonFiniteError
from edgepeft.runtime.errors import ContextLengthError, UnknownAdapterError

INVALID = "invalid_request_error"


class QueueFullError(Exception):
    """The bounded queue holds `max_queue` waiting requests already (429)."""


class ShuttingDownError(Exception):
    """The server is draining for shutdown and takes no new request (503)."""


class RequestTimeoutError(Exception):
    """A request ran past its deadline (504)."""


class RequestCancelledError(Exception):
    """The client went away; the request was stopped (nobody reads the answer)."""


class ApiError(Exception):
    """An error the server answers with `status` and the OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def unknown_model(name: object, names: Iterable[str]) -> ApiError:
    have = ", ".join(sorted(names))
    return ApiError(
        404,
        f"the model {name!r} does not exist; loaded models: {have}. Name the base or one "
        "of its adapters (GET /v1/models lists them), or load one with POST "
        "/v1/load_lora_adapter",
        param="model",
        code="model_not_found",
    )


def api_error(exc: BaseException, param: str | None = None) -> ApiError:
    """The ApiError a failed request answers with; `param`: the field a ValueError is about."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return ApiError(
            429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
        )
    if isinstance(exc, ShuttingDownError):
        return ApiError(503, str(exc), "server_error", code="shutting_down")
    if isinstance(exc, RequestTimeoutError):
        return ApiError(504, str(exc), "timeout_error", code="timeout")
    if isinstance(exc, RequestCancelledError):
        return ApiError(499, str(exc), INVALID, code="client_closed_request")
    if isinstance(exc, UnknownAdapterError):  # unloaded between its check and its turn
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, NonFiniteError):  # the model's fault, not the request's
        return ApiError(500, str(exc), "server_error", code="non_finite_logits")
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), param=param, code="context_length_exceeded")
    if isinstance(exc, (ValueError, TypeError)):
        return ApiError(400, str(exc), param=param)
    return ApiError(500, f"{type(exc).__name__}: {exc}", "server_error", code="internal_error")


__all__ = [
    "ApiError",
    "QueueFullError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "ShuttingDownError",
    "api_error",
    "unknown_model",
]
