"""The FastAPI app: thin routes over ``OpenAIServing``, one place mapping errors to HTTP."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import hmac
import uuid

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from mesh import __version__
from mesh.engine.base import Engine
from mesh.errors import BodyTooLarge, InvalidRequest, MeshError, Unauthorized
from mesh.server import protocol as p
from mesh.server.dashboard import STATIC, Dashboard
from mesh.server.metrics import Metrics
from mesh.server.serving import OpenAIServing, error_body

log = logging.getLogger(__name__)


def _error_response(exc: MeshError) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
    return JSONResponse(error_body(exc), status_code=exc.status_code, headers=headers)


MAX_BODY = 8 * 1024 * 1024  # bytes; a 10 MB prompt is refused before it is read whole
PAGE_PATHS = ("/", "/dashboard")  # the page holds no data; /dashboard/state does
OPEN_PREFIXES = ("/dashboard/static/",)


class _Guard:
    """ASGI middleware: an X-Request-Id on every response, API keys, a body size limit
    enforced while the body streams in (never read whole first)."""

    def __init__(self, app, api_keys: frozenset[str], max_body: int, metrics=None,
                 open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.api_keys, self.max_body = app, api_keys, max_body
        self.open_paths = frozenset(open_paths) | frozenset(PAGE_PATHS)
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", ())}
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        rid = rid[:128]
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                if self.metrics is not None:
                    self.metrics.responses.labels(str(message["status"])).inc()
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"x-request-id", rid.encode("latin-1", "replace"))]
            await send(message)

        async def refuse(exc: MeshError):
            await _error_response(exc)(scope, receive, send_with_id)

        path = scope["path"]
        if (self.api_keys and path not in self.open_paths
                and not path.startswith(OPEN_PREFIXES) and scope.get("method") != "OPTIONS"):
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(token.encode(), k.encode()) for k in self.api_keys):
                return await refuse(Unauthorized(
                    "a valid API key is required: Authorization: Bearer <key>"))
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            return await refuse(BodyTooLarge(
                f"the request body is {int(declared)} bytes; the limit is {self.max_body}"))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send_with_id)
        except _TooLarge:
            await refuse(BodyTooLarge(f"the request body is over the limit of "
                                      f"{self.max_body} bytes"))


class _TooLarge(Exception):
    pass


def build_app(engine: Engine, api_keys: list[str] | tuple[str, ...] = (),
              max_body: int = MAX_BODY, cors_origins: list[str] | tuple[str, ...] = (),
              open_paths: tuple[str, ...] = ("/health",),
              keepalive: float | None = None) -> FastAPI:
    """``open_paths`` answer without an API key; ``cors_origins`` may call from a browser
    (none by default: no CORS headers, so other sites' pages cannot read the API)."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await engine.start()
        yield
        await engine.close()

    app = FastAPI(title="mesh", version=__version__, lifespan=lifespan)
    metrics = Metrics(engine)
    app.add_middleware(_Guard, api_keys=frozenset(api_keys), max_body=max_body,
                       metrics=metrics, open_paths=tuple(open_paths))
    if cors_origins:  # added last: outermost, so preflights and 401s carry the headers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"])
    serving = OpenAIServing(engine, metrics) if keepalive is None else \
        OpenAIServing(engine, metrics, keepalive)
    app.state.engine, app.state.serving = engine, serving

    @app.exception_handler(MeshError)
    async def _mesh_error(_: Request, exc: MeshError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        if err.get("type") == "json_invalid":
            return _error_response(InvalidRequest(
                f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip()))
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        msg = err.get("msg", "invalid request")
        return _error_response(InvalidRequest(f"{'.'.join(loc) or 'body'}: {msg}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        err = MeshError(str(exc.detail), code={404: "not_found",
                                               405: "method_not_allowed"}.get(exc.status_code))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error"
        return _error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(MeshError("internal error"))

    @app.get("/health")
    async def health():
        return {"status": "draining" if serving.draining else "ok", "model": engine.model_id,
                **engine.info()}

    dashboard = Dashboard(engine, metrics)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page():
        return FileResponse(STATIC / "dashboard.html")

    @app.get("/dashboard/state", include_in_schema=False)
    async def dashboard_state():
        return dashboard.state("draining" if serving.draining else "ok")

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return p.ModelList(data=[p.ModelCard(id=engine.model_id, meta=engine.info())]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.model_id:
            from mesh.errors import ModelNotFound

            raise ModelNotFound(f"model {model_id!r} does not exist", param="model")
        return p.ModelCard(id=engine.model_id, meta=engine.info()).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(req: p.ChatCompletionRequest, raw: Request):
        return await serving.chat(req, raw)

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest, raw: Request):
        return await serving.completion(req, raw)

    @app.post("/tokenize")
    async def tokenize(req: p.TokenizeRequest):
        return await serving.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(req: p.DetokenizeRequest):
        return serving.detokenize(req)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return serving.tokenizer_info()

    return app
