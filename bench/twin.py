"""The FastAPI twin of app.py, for the benchmark: the same request model, run and encoder.

Only the framework differs: FastAPI parses and validates the body, Starlette's middleware does
CORS and the Host check, and Starlette's StreamingResponse sends the stream.
"""

from functools import partial
from typing import Any

from assistant_stream import create_run
from assistant_stream.serialization.heartbeat import add_keepalive
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import StreamingResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

import app

twin = FastAPI()
twin.add_middleware(TrustedHostMiddleware, allowed_hosts=app.ALLOWED_HOSTS)
twin.add_middleware(
    CORSMiddleware, allow_origins=app.CORS_ORIGINS, allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
)


@twin.post("/assistant")
async def assistant(body: app.AssistantRequest) -> StreamingResponse:
    """The same run as app.py's view, streamed by Starlette."""
    state = body.state.model_dump(exclude_unset=True) if body.state is not None else None
    stream = app.ENCODER.encode_stream(create_run(partial(app.run_turn, request=body), state=state))
    if app.HEARTBEAT_SECONDS:
        stream = add_keepalive(stream, app.HEARTBEAT_SECONDS, app.ENCODER.get_keepalive_token())
    return StreamingResponse(
        stream,
        media_type=f"{app.ENCODER.get_media_type()}; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@twin.get("/health")
async def health() -> dict[str, Any]:
    """The same answer as app.py's health view."""
    return {
        "status": "healthy",
        "service": "assistant-transport-backend-django",
        "version": app.__version__,
        "agent": "mock",
        "model": None,
        "protocol": app.STREAM_PROTOCOL,
    }
