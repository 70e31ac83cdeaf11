"""A fake OpenAI-compatible model server for the token benchmark, on the standard library alone.

Usage: python bench/model.py PORT

POST /v1/chat/completions streams chat.completion.chunk events as the API does (SSE over a chunked
HTTP/1.1 response, then `data: [DONE]`), and closes the connection after it: that is how it notices
a client hanging up (a read that ends), without racing the next request for the connection's bytes.
The last user message says what to stream: "tokens=N pace=S id=K" is N tokens, S seconds apart
(0: as fast as the client reads), for stream K. Each token is the moment it was sent, in monotonic
nanoseconds, and a space: a client on this machine reads how late the server under test delivered
it. GET /closed answers {K: monotonic ns} for the streams whose client hung up before the end, taken
the moment the connection closed, and forgets them.
"""

import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable

CLOSED: dict[str, int] = {}
CHUNK = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "bench"}
CHUNK |= {"system_fingerprint": "fp_bench"}


def event(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
    """One SSE event, framed as one HTTP chunk."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    data = f"data: {json.dumps(CHUNK | {'choices': [choice]})}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, order: str) -> None:
    """Stream what the order asks for, until the end or until the client hangs up."""
    tokens, pace, stream_id = re.fullmatch(r"tokens=(\d+) pace=([\d.]+) id=(\w+)", order).groups()  # type: ignore[union-attr]
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close"
    writer.write(head + b"\r\n\r\n")
    writer.write(event({"role": "assistant", "content": ""}))
    hung_up = asyncio.ensure_future(reader.read(1))  # b"" as soon as the client closes the connection
    started = time.monotonic()
    try:
        for index in range(int(tokens)):
            wait = started + index * float(pace) - time.monotonic()
            done, _ = await asyncio.wait({hung_up}, timeout=max(wait, 0))
            if done:
                CLOSED[stream_id] = time.monotonic_ns()
                return
            writer.write(event({"content": f"{time.monotonic_ns()} "}))
            await writer.drain()
        writer.write(event({}, "stop") + b"%x\r\n%s\r\n0\r\n\r\n" % (14, b"data: [DONE]\n\n"))
        await writer.drain()
    finally:
        hung_up.cancel()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 request on a connection: its head and its Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    return head, await reader.readexactly(int(length[1]) if length else 0)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer a connection: GET /closed as often as asked, or one completion."""
    try:
        while True:
            head, body = await read_request(reader)
            if head.startswith(b"GET /closed"):  # handed over once: the next load starts from none
                answer = json.dumps(CLOSED).encode()
                CLOSED.clear()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
                continue
            last = json.loads(body)["messages"][-1]["content"]
            order = last if isinstance(last, str) else "".join(block["text"] for block in last)
            await stream(reader, writer, order)
            return
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def listen(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], port: int) -> None:
    """Serve connections on this port of the loopback with the handler, for ever."""
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(listen(serve, int(sys.argv[1])))
