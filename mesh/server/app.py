"""The FastAPI app: thin routes over ``OpenAIServing``, one place mapping errors to HTTP."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mesh import __version__
from mesh.engine.base import Engine
from mesh.errors import InvalidRequest, MeshError
from mesh.server import protocol as p
from mesh.server.serving import OpenAIServing, error_body

log = logging.getLogger(__name__)


def _error_response(exc: MeshError) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
    return JSONResponse(error_body(exc), status_code=exc.status_code, headers=headers)


def build_app(engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await engine.close()

    app = FastAPI(title="mesh", version=__version__, lifespan=lifespan)
    serving = OpenAIServing(engine)
    app.state.engine = engine

    @app.exception_handler(MeshError)
    async def _mesh_error(_: Request, exc: MeshError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        msg = err.get("msg", "invalid request")
        return _error_response(InvalidRequest(f"{'.'.join(loc) or 'body'}: {msg}", param=param))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(MeshError("internal error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id, **engine.info()}

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

    return app
