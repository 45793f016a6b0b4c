"""Typed errors raised anywhere in mesh.

They are mapped to HTTP status and OpenAI's error JSON once, in ``mesh.server``, and to a
one-line message once, in the CLI. Each carries the offending parameter where there is one.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base class: a message for humans plus what the HTTP layer needs."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None
    retry_after: float | None = None  # seconds, sent as Retry-After where set

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(MeshError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(MeshError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class ModelSourceError(MeshError):
    """A model reference cannot be resolved or its files cannot be read."""

    status_code = 400
    error_type = "invalid_request_error"


class HubUnavailable(ModelSourceError):
    code = "hub_unavailable"


class UnsupportedModel(ModelSourceError):
    code = "unsupported_model"


class BackendUnavailable(MeshError):
    """The chosen backend's library is missing or cannot run here."""

    code = "backend_unavailable"


class ModelTooLarge(MeshError):
    status_code = 503
    code = "model_too_large"


class EngineUnavailable(MeshError):
    """The engine cannot serve right now (a node is lost, the model is loading)."""

    status_code = 503
    code = "engine_unavailable"

    def __init__(self, message: str, *, retry_after: float = 5.0, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Overloaded(MeshError):
    """More requests than the engine admits (running + queued): retry later, nothing evicted."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "server_overloaded"

    def __init__(self, message: str, *, retry_after: float = 2.0, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Unauthorized(MeshError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class BodyTooLarge(MeshError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"
