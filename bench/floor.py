"""The floor of the token benchmark: the least a relay does, on raw asyncio, with no framework and no library.

Usage: python bench/floor.py PORT   (OPENAI_BASE_URL names the fake model of bench/model.py)

On uvloop, as uvicorn[standard] runs app.py. POST /assistant reads the request, asks the model for a
streamed chat completion of the user's text, and writes each text delta to the client as one
data-stream line, the `append-text` operation app.py would write for it, in one HTTP chunk. No
state, no validation, no keep-alives, no errors handled: what is left is reading the model's SSE and
writing the client's lines. When the client hangs up, the model's connection is closed. GET /health
answers, so the benchmark knows it is up.
"""

import asyncio
import json
import os
import sys
from urllib.parse import urlsplit

import uvloop
from model import listen, read_request

MODEL = urlsplit(os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8003/v1"))


async def relay(text: str, writer: asyncio.StreamWriter, client: asyncio.StreamReader) -> None:
    """Stream the model's deltas for this text to the client, until the end or until the client goes."""
    model_reader, model_writer = await asyncio.open_connection(MODEL.hostname, MODEL.port)
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": text}], "stream": True})
    head = f"POST {MODEL.path}/chat/completions HTTP/1.1\r\nHost: model\r\nContent-Type: application/json"
    model_writer.write(f"{head}\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    hung_up = asyncio.ensure_future(client.read(1))  # b"" as soon as the client closes
    try:
        await model_reader.readuntil(b"\r\n\r\n")
        unfinished = b""
        while not hung_up.done() and (size := int(await model_reader.readuntil(b"\r\n"), 16)):
            *lines, unfinished = (unfinished + await model_reader.readexactly(size + 2)).split(b"\n")
            for line in lines:
                if not line.startswith(b"data: {"):
                    continue
                choices = json.loads(line[6:])["choices"]
                if content := choices and choices[0]["delta"].get("content"):
                    operation = {"type": "append-text", "path": ["messages", "1", "content"], "value": content}
                    data = f"aui-state:{json.dumps([operation])}\n".encode()
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
    finally:
        hung_up.cancel()
        model_writer.close()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one connection: its requests, one after another."""
    try:
        while True:
            head, body = await read_request(reader)
            if head.startswith(b"GET /health"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                continue
            message = json.loads(body)["commands"][0]["message"]
            text = "".join(part["text"] for part in message["parts"])
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            await relay(text, writer, reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


if __name__ == "__main__":
    uvloop.run(listen(serve, int(sys.argv[1])))
