"""Serve app.py's Django app, or its FastAPI twin, under the same uvicorn settings.

Usage: python bench/serve.py django|fastapi|typed|floor PORT

For the token benchmarks: typed is the Django app with the typed-SDK agent of bench/typed_sdk.py;
floor is bench/floor.py, a relay on raw asyncio (no uvicorn, no probe). With APP_DIR set, the
app.py in that directory is served instead of this repository's (bench/tokens.py's earlier app.py).

Both sit behind the same probe: GET /__probe answers with the number of tasks in the event loop,
so the benchmark can see tasks left behind, with neither framework in the way.
"""

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [os.environ.get("APP_DIR") or str(ROOT), str(ROOT / "bench")]

App = Any  # an ASGI application


def probed(asgi_app: App) -> App:
    """Answer GET /__probe with the loop's task count; pass everything else on."""

    async def with_probe(
        scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] == "http" and scope["path"] == "/__probe":
            body = json.dumps({"tasks": len(asyncio.all_tasks())}).encode()
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": body})
            return
        await asgi_app(scope, receive, send)

    return with_probe


def main() -> None:
    framework, port = sys.argv[1], int(sys.argv[2])
    if framework == "floor":
        import floor

        floor.uvloop.run(floor.listen(floor.serve, port))
        return
    if framework == "fastapi":
        from twin import twin as target
    else:
        import app
        from app import application as target

        if framework == "typed":
            from typed_sdk import typed_agent

            app.run_agent = typed_agent
    uvicorn.run(probed(target), host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
