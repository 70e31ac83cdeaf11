"""The FastAPI twin of app.py, for the benchmark: the same request model, thread, agent, writer, encoder, keep-alives.

Only the framework differs: FastAPI parses and validates the body, Starlette's middleware does
CORS and the Host check, and Starlette's StreamingResponse sends the stream. The run below is
app.py's view for the turns the benchmarks send (a new thread, or messages added to one), built
from the functions app.py defines; it leaves out the view's edit case, its step bound and its error frames.
"""

from typing import Any

from assistant_stream import RunController, create_run
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

import app

twin = FastAPI()
twin.add_middleware(TrustedHostMiddleware, allowed_hosts=app.config.ALLOWED_HOSTS)
twin.add_middleware(
    CORSMiddleware,
    allow_origins=app.config.CORS_ORIGINS,
    allow_credentials=True,
    allow_methods=["*"],
    allow_headers=["*"],
)


@twin.post("/assistant")
async def assistant(body: app.AssistantRequest) -> StreamingResponse:
    """Apply the commands, run the agent, and stream the state changes, as app.py's view does."""
    state: dict[str, Any] | None = body.state.model_dump(exclude_unset=True) if body.state is not None else None
    sent = state.get("messages", []) if state else []
    thread = app.apply_commands(sent, body.commands)

    async def run(controller: RunController) -> None:
        if controller.state is None:
            controller.state = {"messages": thread}
        else:
            controller.state["messages"].extend(thread[len(sent) :])
        written = 0
        for _ in range(app.config.MAX_MODEL_STEPS):  # the view's steps, without its step-bound error
            if not app.reply_awaited(messages := list(controller.state["messages"])):
                return
            written += await app.write_reply(controller, app.run_agent(messages, body), app.REPLY_LIMIT - written)
            written += await app.run_server_tools(controller, app.REPLY_LIMIT - written)

    stream = app.ENCODER.encode_stream(create_run(run, state=state))
    stream = app.with_keepalives(stream) if app.config.HEARTBEAT_SECONDS else stream
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream, media_type=f"{app.ENCODER.get_media_type()}; charset=utf-8", headers=headers)


@twin.get("/health")
async def health() -> JSONResponse:
    """What the benchmark polls until the server is up."""
    return JSONResponse({"status": "healthy"})
