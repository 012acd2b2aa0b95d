"""``alignkit serve``: a model behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (plain, or ``stream: true`` as
server-sent events). Generations run one at a time on the :class:`~alignkit.serve.engine.Engine`'s lock;
every refusal is the protocol's error JSON with a 4xx status, and an unexpected failure in one request is a
500 JSON answer to that request, never a dead server.

With an API key (``--api-key-env VAR``: the key is read from that environment variable, never from the
command line, where other users of the machine could read it), every ``/v1`` route needs
``Authorization: Bearer <key>``; ``/health`` stays open for load balancers and says nothing about the model.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations (``request: Request``) at
# run time, and ``Request`` is imported inside build_app (the web framework loads only when a server starts).
import hmac
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from alignkit.serve.engine import Engine, PromptTooLong
from alignkit.serve.protocol import (
    ChatRequest,
    RequestError,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    models_body,
    parse_chat_request,
)

logger = logging.getLogger(__name__)


def build_app(engine: Engine, api_key: str | None = None):
    """The FastAPI application serving ``engine`` (``api_key``: the bearer token every ``/v1`` route needs)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="alignkit serve", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    def refuse(error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            # compare_digest: the time taken does not tell how much of a guessed key was right.
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return refuse(RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                           kind="authentication_error", code="invalid_api_key"))
        try:
            return await call_next(request)
        except Exception:  # a bug in one request: that request fails, the server keeps serving
            logger.exception("request %s %s failed", request.method, request.url.path)
            return JSONResponse(error_body("internal error while answering this request", "server_error"),
                                status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, err: HTTPException) -> JSONResponse:
        # Unknown routes and wrong methods, in the protocol's shape rather than the framework's.
        return refuse(RequestError(err.status_code, str(err.detail)))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return models_body(engine.name, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return refuse(RequestError(400, f"the request body is not valid JSON: {err}"))
        try:
            chat = parse_chat_request(body, engine.name)
            if chat.stream:
                return StreamingResponse(_events(engine, chat, engine.stream(chat.messages, chat.sampling)),
                                         media_type="text/event-stream")
            # In a worker thread: the event loop keeps accepting (and queueing) other requests meanwhile.
            completion = await run_in_threadpool(engine.complete, chat.messages, chat.sampling)
        except RequestError as err:
            return refuse(err)
        except PromptTooLong as err:
            return refuse(RequestError(400, str(err), "messages", "context_length_exceeded"))
        return completion_body(completion, engine.name)

    return app


def _events(engine: Engine, chat: ChatRequest, stream) -> Iterator[str]:
    """A streamed answer as server-sent events: the role, the text pieces, the finish reason, ``[DONE]``.

    A plain iterator: the server runs it in a worker thread. If the client goes away the iterator is closed,
    which closes ``stream`` and so stops the generation."""
    chunk_id, created = completion_id(), int(time.time())

    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    yield event(chunk_body(chunk_id, created, engine.name, {"role": "assistant", "content": ""}))
    try:
        for piece in stream:
            yield event(chunk_body(chunk_id, created, engine.name, {"content": piece}))
    except Exception:  # the status line is already sent: end the stream with an error event instead
        logger.exception("streamed generation failed")
        yield event(error_body("internal error while generating this answer", "server_error"))
        return
    yield event(chunk_body(chunk_id, created, engine.name, {}, stream.finish_reason))
    yield "data: [DONE]\n\n"


def serve(engine: Engine, host: str, port: int, api_key: str | None = None) -> None:
    """Serve ``engine`` until interrupted."""
    import uvicorn

    uvicorn.run(build_app(engine, api_key), host=host, port=port, log_level="warning")
