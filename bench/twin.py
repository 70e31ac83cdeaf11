"""The FastAPI twin of app.py, for the benchmark: the same request model, run and encoder.

Only the framework differs: FastAPI parses and validates the body, Starlette's middleware does
CORS and the Host check, and Starlette's StreamingResponse sends the stream.
"""

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

import app

twin = FastAPI()
twin.add_middleware(TrustedHostMiddleware, allowed_hosts=app.ALLOWED_HOSTS)
twin.add_middleware(
    CORSMiddleware, allow_origins=app.CORS_ORIGINS, allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
)


@twin.post("/assistant")
async def assistant(body: app.AssistantRequest) -> StreamingResponse:
    """The same encoded run as app.py's view, streamed by Starlette."""
    state = body.state.model_dump(exclude_unset=True) if body.state is not None else None
    media_type = f"{app.ENCODER.get_media_type()}; charset=utf-8"
    return StreamingResponse(app.encoded_reply(body, state), media_type=media_type, headers=app.STREAM_HEADERS)


@twin.get("/health")
async def health() -> Response:
    """The same bytes as app.py's health view, encoded once there too."""
    return Response(app.HEALTH, media_type="application/json")
