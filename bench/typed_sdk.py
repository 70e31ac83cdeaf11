"""The typed-SDK read path, for the token benchmark: how app.py read the model's stream before.

The openai package builds a typed ChatCompletionChunk for every SSE event; app.py now reads the raw
`data:` lines with json.loads instead. This agent reads the typed chunks and hands app.py's writer
the text they carry, so the two paths differ only in how a chunk is read. It handles text only,
which is all the benchmark streams.
"""

from collections.abc import AsyncIterator
from typing import Any

import app


async def typed_agent(thread: list[app.Message], request: app.AssistantRequest) -> AsyncIterator[app.Chunk]:
    """Stream a chat completion through the SDK's typed chunks."""
    assert app.model_client is not None, "the typed variant needs OPENAI_API_KEY"
    messages: Any = app.model_messages(thread, request.system)
    stream = await app.model_client.chat.completions.create(
        model=app.config.OPENAI_MODEL, messages=messages, stream=True
    )
    async with stream:
        async for chunk in stream:
            content = chunk.choices[0].delta.content if chunk.choices else None
            yield {"choices": [{"index": 0, "delta": {"content": content}}]}
