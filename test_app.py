"""Tests for app.py, through a real uvicorn server read chunk by chunk with a real HTTP client."""

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from assistant_stream.serialization import AssistantTransportEncoder, DataStreamEncoder
from django.core.signals import request_finished, request_started
from pydantic import BaseModel, model_serializer

# Hermetic settings: a developer's .env never overrides a variable that is already set,
# and an empty one means "use the default".
SETTINGS = [
    "HOST",
    "PORT",
    "ALLOWED_HOSTS",
    "CORS_ORIGINS",
    "MOCK_DELAY",
    "STREAM_PROTOCOL",
    "HEARTBEAT_SECONDS",
    "MAX_REQUEST_BYTES",
    "OPENAI_API_KEY",
    "OPENAI_MODEL",
    "OPENAI_BASE_URL",
    "OPENAI_TIMEOUT",
    "OPENAI_MAX_RETRIES",
    "MAX_MODEL_STEPS",
    "TOOL_TIMEOUT",
    "TOOL_THREADS",
    "TOOL_THREADS_TOTAL",
    "TOOL_RESULT_LIMIT",
]
os.environ.update(dict.fromkeys(SETTINGS, ""))
import app  # noqa: E402

Json = Any
HERE = Path(__file__).parent
FRONTEND = "http://localhost:3000"
PROTOCOLS = ["data-stream", "assistant-transport"]


# --- A real server on a free port -----------------------------------------------------------


@dataclass
class Server:
    url: str
    loop: asyncio.AbstractEventLoop

    def cpu_seconds(self) -> float:
        """CPU time the server's event loop thread has used so far."""

        async def thread_id() -> int:
            return threading.get_native_id()

        tid = asyncio.run_coroutine_threadsafe(thread_id(), self.loop).result(timeout=5)
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime and stime

    def task_count(self) -> int:
        """Tasks alive in the server's event loop, not counting the one asking."""

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(timeout=5)


@contextmanager
def serving(asgi_app: Callable[..., Awaitable[None]]) -> Iterator[Server]:
    """Run an ASGI app under uvicorn in a thread, on a free port of this machine."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    uvicorn_server = uvicorn.Server(uvicorn.Config(asgi_app, lifespan="off", log_level="warning"))
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await uvicorn_server.serve(sockets=[listener])

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uvicorn_server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert uvicorn_server.started, "uvicorn did not start"
    yield Server(f"http://127.0.0.1:{listener.getsockname()[1]}", loops[0])
    uvicorn_server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    with serving(app.application) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        yield http


@pytest.fixture(autouse=True)
def defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from the shipped defaults (keep-alives every 15 s too), with a mock that does not wait."""
    monkeypatch.setattr(app.config, "MOCK_DELAY", 0)


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    encoder = AssistantTransportEncoder() if request.param == "assistant-transport" else DataStreamEncoder()
    monkeypatch.setattr(app, "ENCODER", encoder)
    return str(request.param)


# --- Reading a reply the way the client does ------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    state: Json = None
    operations: list[Json] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    keepalives: int = 0

    @property
    def body(self) -> str:
        return b"".join(chunk for _, chunk in self.chunks).decode()

    @property
    def messages(self) -> list[Json]:
        return list(self.state["messages"])

    @property
    def kinds(self) -> list[str]:
        return [message["type"] for message in self.messages]


def apply_operation(target: Json, path: list[str], operation: Json) -> Json:
    """Apply one state operation with the client's strict rules."""
    if not path:
        if operation["type"] == "set":
            return operation["value"]
        assert operation["type"] == "append-text", operation
        assert isinstance(target, str), f"append-text onto {target!r} at {operation['path']}"
        return target + operation["value"]
    container = {} if target is None else target
    key, rest = path[0], path[1:]
    if isinstance(container, list):
        index = int(key)
        assert str(index) == key, f"not an array index: {key} in {operation['path']}"
        assert 0 <= index <= len(container), f"index {key} out of bounds in {operation['path']}"
        items = [*container, None] if index == len(container) else list(container)
        items[index] = apply_operation(items[index], rest, operation)
        return items
    assert isinstance(container, dict), f"path {operation['path']} goes through {container!r}"
    return {**container, key: apply_operation(container.get(key), rest, operation)}


def decode(reply: Reply, state: Json, protocol: str) -> None:
    """Replay the stream onto the state the request sent; fail on anything the client would drop."""
    if protocol == "data-stream":
        for line in reply.body.splitlines():
            if not line:
                reply.keepalives += 1
                continue
            kind, _, payload = line.partition(":")
            if kind == "aui-state":
                reply.operations += json.loads(payload)
            elif kind == "3":
                reply.errors.append(json.loads(payload))
            else:
                raise AssertionError(f"unexpected data-stream line {line!r}")
    else:
        events = reply.body.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], "SSE stream must end with [DONE]"
        for event in events[:-2]:
            if event.startswith(":"):
                reply.keepalives += 1
                continue
            assert event.startswith("data: "), f"unexpected SSE event {event!r}"
            frame = json.loads(event.removeprefix("data: "))
            if frame["type"] == "update-state":
                reply.operations += frame["operations"]
            elif frame["type"] == "error":
                reply.errors.append(frame["error"])
            else:
                raise AssertionError(f"unexpected frame {frame}")
    for operation in reply.operations:
        state = apply_operation(state, operation["path"], operation)
    reply.state = state


def appended(reply: Reply, field_name: str) -> list[str]:
    """The pieces streamed into fields of this name by append-text operations."""
    return [op["value"] for op in reply.operations if op["type"] == "append-text" and op["path"][-1] == field_name]


def send(client: httpx.Client, body: Json, protocol: str = "data-stream", **headers: str) -> Reply:
    """POST /assistant and read the reply chunk by chunk, noting when each arrived."""
    with client.stream("POST", "/assistant", json=body, headers=headers) as response:
        reply = Reply(response.status_code, response.headers)
        for chunk in response.iter_raw():
            reply.chunks.append((time.monotonic(), chunk))
    if reply.status == 200:
        decode(reply, body.get("state"), protocol)
    return reply


def user_says(text: str, parent_id: str | None = None, source_id: str | None = None) -> Json:
    message = {"role": "user", "parts": [{"type": "text", "text": text}]}
    return {"type": "add-message", "message": message, "parentId": parent_id, "sourceId": source_id}


def tool_result(call_id: str, result: Json, is_error: bool = False, **extra: Json) -> Json:
    return {"type": "add-tool-result", "toolCallId": call_id, "result": result, "isError": is_error, **extra}


def chat(client: httpx.Client, state: Json, *commands: Json, protocol: str = "data-stream", **extra: Json) -> Reply:
    reply = send(client, {"commands": list(commands), "state": state, **extra}, protocol)
    assert reply.status == 200, reply.body
    assert reply.errors == []
    return reply


def text(message: Json) -> str:
    """The text of a message's content, as convertLangChainMessages reads it."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(b["text"] for b in content if b["type"] == "text")


def calls(state: Json) -> list[Json]:
    """Every tool call of every ai message."""
    return [call for message in state["messages"] if message["type"] == "ai" for call in message.get("tool_calls", [])]


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll until the condition holds or the time is up; say whether it held."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def longest_stall(server: Server, action: Callable[[], object]) -> float:
    """Do something, and say how long the server's event loop went without a turn meanwhile, in seconds."""
    stop, gaps = threading.Event(), [0.0]

    async def ticker() -> None:  # in the server's event loop, as another user's stream would be
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    ticking = asyncio.run_coroutine_threadsafe(ticker(), server.loop)
    try:
        action()
    finally:
        stop.set()
        ticking.result(timeout=5)
    return max(gaps)


# --- The conversation: LangChain messages, as convertLangChainMessages reads them -----------


def test_health_says_which_agent_serves(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "healthy",
        "service": "assistant-transport-backend-django",
        "version": app.__version__,
        "agent": "mock",
        "model": None,
        "protocol": "data-stream",
    }


def test_health_answers_head_without_a_body(client: httpx.Client) -> None:
    response = client.head("/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == b""


@pytest.mark.parametrize("start", [{"state": None}, {}], ids=["state-null", "state-absent"])
def test_new_thread_gets_a_human_message_and_an_ai_reply(client: httpx.Client, start: Json, protocol: str) -> None:
    reply = send(client, {"commands": [user_says("hello there")], **start}, protocol)
    assert reply.status == 200
    human, ai = reply.messages
    assert human["type"] == "human"
    assert human["content"] == [{"type": "text", "text": "hello there"}]
    assert ai["type"] == "ai"
    assert ai["content"] == 'You said: "hello there".'
    assert ai["tool_calls"] == []


def test_reply_grows_by_append_text_in_pieces_over_time(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.config, "MOCK_DELAY", 0.05)
    reply = chat(client, None, user_says("one two three four five six"))
    assert appended(reply, "content") == ["You", " said:", ' "one', " two", " three", " four", " five", ' six".']
    text_chunks = [at for at, chunk in reply.chunks if b"append-text" in chunk]
    assert len(text_chunks) >= 8, "each word should arrive in its own chunk"
    assert text_chunks[-1] - text_chunks[0] >= 0.3, "the pieces arrived in one lump"


def test_long_messages_are_quoted_only_in_part(client: httpx.Client) -> None:
    reply = chat(client, None, user_says("word " * 5000))
    assert text(reply.messages[0]) == "word " * 5000
    assert len(text(reply.messages[1])) < 600


def test_images_become_image_url_blocks(client: httpx.Client) -> None:
    image = "data:image/png;base64,iVBORw0KGgo="
    message = {"role": "user", "parts": [{"type": "text", "text": "look"}, {"type": "image", "image": image}]}
    reply = chat(client, None, {"type": "add-message", "message": message})
    assert reply.messages[0]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": image}},
    ]


@pytest.mark.parametrize("ascii_only", [True, False], ids=["escaped", "raw-utf8"])
def test_text_outside_ascii_arrives_as_typed(client: httpx.Client, ascii_only: bool) -> None:
    body = json.dumps({"commands": [user_says("Café … 東京")]}, ensure_ascii=ascii_only).encode()
    with client.stream("POST", "/assistant", content=body, headers={"Content-Type": "application/json"}) as response:
        reply = Reply(response.status_code, response.headers, [(0, chunk) for chunk in response.iter_raw()])
    decode(reply, None, "data-stream")
    assert text(reply.messages[0]) == "Café … 東京"


def test_every_added_message_has_a_unique_id(client: httpx.Client) -> None:
    first = chat(client, None, user_says("one"))
    second = chat(client, first.state, user_says("two"))
    ids = [message["id"] for message in second.messages]
    assert len(ids) == 4
    assert all(ids)
    assert len(set(ids)) == 4


def test_a_new_turn_sends_only_the_new_messages(client: httpx.Client) -> None:
    first = chat(client, None, user_says("one"))
    second = chat(client, first.state, user_says("two"))
    written = {tuple(operation["path"][:2]) for operation in second.operations}
    assert written == {("messages", "2"), ("messages", "3")}, "earlier messages must not be sent again"


def test_unknown_state_fields_are_kept(client: httpx.Client) -> None:
    human = {"id": "m1", "type": "human", "content": "hi", "additional_kwargs": {"pinned": True}, "note": 1}
    state: Json = {"messages": [human], "draft": {"title": "kept"}}
    reply = chat(client, state, user_says("again", parent_id="m1"))
    assert reply.state["draft"] == {"title": "kept"}
    assert reply.messages[0] == human


def test_all_commands_of_a_request_are_applied_in_order(client: httpx.Client) -> None:
    reply = chat(client, None, user_says("first"), user_says("second"))
    assert [text(message) for message in reply.messages] == ["first", "second", 'You said: "second".']


def test_edit_drops_the_messages_after_its_parent(client: httpx.Client) -> None:
    first = chat(client, None, user_says("one"))
    second = chat(client, first.state, user_says("two"))
    parent, replaced = second.messages[1]["id"], second.messages[2]["id"]
    edited = chat(client, second.state, user_says("two, edited", parent_id=parent, source_id=replaced))
    assert [text(message) for message in edited.messages] == [
        "one",
        'You said: "one".',
        "two, edited",
        'You said: "two, edited".',
    ]


def test_editing_the_first_message_starts_the_thread_over(client: httpx.Client) -> None:
    first = chat(client, None, user_says("one"))
    second = chat(client, first.state, user_says("two"))
    edited = chat(client, second.state, user_says("uno", parent_id=None, source_id=second.messages[0]["id"]))
    assert [text(message) for message in edited.messages] == ["uno", 'You said: "uno".']


def test_parent_id_naming_no_message_appends(client: httpx.Client) -> None:
    first = chat(client, None, user_says("one"))
    second = chat(client, first.state, user_says("two", parent_id="not-in-the-thread"))
    assert [text(message) for message in second.messages][:3] == ["one", 'You said: "one".', "two"]


def test_custom_command_is_accepted_and_changes_nothing(client: httpx.Client) -> None:
    first = chat(client, None, user_says("one"))
    reply = chat(client, first.state, {"type": "set-mood", "mood": "cheerful"})
    assert reply.state == first.state


def test_a_custom_command_alone_never_starts_the_agent(client: httpx.Client) -> None:
    unanswered: Json = {"messages": [{"id": "m1", "type": "human", "content": "hello?"}]}  # as a failed run leaves it
    for commands in ([{"type": "set-mood", "mood": "cheerful"}], []):
        reply = chat(client, unanswered, *commands)
        assert reply.state == unanswered, "the agent spoke without being asked"


def test_a_message_id_the_client_sends_becomes_the_human_messages_id(client: httpx.Client) -> None:
    named = user_says("hello")
    named["message"]["id"] = "msg-from-the-client"
    first = chat(client, None, named)
    assert first.messages[0]["id"] == "msg-from-the-client"
    again = chat(client, first.state, named)
    assert again.messages[2]["id"] not in ("msg-from-the-client", None), "an id the thread holds is not reused"
    assert len({message["id"] for message in again.messages}) == len(again.messages)


def test_request_fields_the_backend_does_not_read_are_accepted(client: httpx.Client) -> None:
    extra: dict[str, Any] = {"threadId": "t1", "parentId": None, "runConfig": {}, "Test-Body": "test-value"}
    reply = chat(client, None, user_says("hi"), **extra)
    assert text(reply.messages[1]) == 'You said: "hi".'


# --- The weather tool round trip ----------------------------------------------------------------


def test_the_examples_weather_suggestion_calls_get_weather(client: httpx.Client, protocol: str) -> None:
    reply = chat(client, None, user_says("What's the weather like in San Francisco today?"), protocol=protocol)
    ai = reply.messages[-1]
    assert text(ai) == 'You said: "What\'s the weather like in San Francisco today?".'
    (call,) = ai["tool_calls"]
    assert call["name"] == "get_weather"
    assert call["id"].startswith("call_")
    assert json.loads(call["partial_json"]) == call["args"] == {"location": "San Francisco"}
    assert len(appended(reply, "partial_json")) >= 2, "the arguments should stream in pieces"
    assert reply.kinds == ["human", "ai"], "the frontend runs the tool, so the run stops at the call"


def test_tool_result_becomes_a_tool_message_then_a_new_ai_reply(client: httpx.Client, protocol: str) -> None:
    asked = chat(client, None, user_says("weather in Oslo?"), protocol=protocol)
    (call,) = calls(asked.state)
    result = {"location": "Oslo", "temperature": 3, "unit": "celsius"}
    answered = chat(client, asked.state, tool_result(call["id"], result), protocol=protocol)
    assert answered.kinds == ["human", "ai", "tool", "ai"]
    tool = answered.messages[2]
    assert tool | {"id": None} == {
        "id": None,
        "type": "tool",
        "tool_call_id": call["id"],
        "name": "get_weather",
        "content": result,
        "status": "success",
    }
    assert (
        answered.messages[3]["content"]
        == 'get_weather answered: {"location": "Oslo", "temperature": 3, "unit": "celsius"}'
    )
    again = chat(client, answered.state, {"type": "refresh"}, protocol=protocol)
    assert again.state == answered.state, "the run loop must end after the closing sentence"


@pytest.mark.parametrize("result", ["Sunny", 21.5, [1, 2], None, True, {"nested": {"deep": [1]}}])
def test_tool_result_is_kept_exactly_as_sent(client: httpx.Client, result: Json) -> None:
    asked = chat(client, None, user_says("weather?"))
    answered = chat(client, asked.state, tool_result(calls(asked.state)[0]["id"], result))
    assert answered.messages[2]["content"] == result


def test_tool_error_is_marked_and_reported_to_the_user(client: httpx.Client) -> None:
    asked = chat(client, None, user_says("weather in Rome?"))
    answered = chat(client, asked.state, tool_result(calls(asked.state)[0]["id"], "service down", is_error=True))
    assert answered.messages[2]["status"] == "error"
    assert answered.messages[3]["content"] == "get_weather answered: service down"


def test_tool_result_artifact_is_kept(client: httpx.Client) -> None:
    asked = chat(client, None, user_says("weather?"))
    answered = chat(client, asked.state, tool_result(calls(asked.state)[0]["id"], "ok", artifact={"chart": [1, 2]}))
    assert answered.messages[2]["artifact"] == {"chart": [1, 2]}


def test_a_repeated_tool_result_replaces_the_first(client: httpx.Client) -> None:
    asked = chat(client, None, user_says("weather?"))
    call_id = calls(asked.state)[0]["id"]
    answered = chat(client, asked.state, tool_result(call_id, "first"), tool_result(call_id, "second"))
    assert answered.kinds == ["human", "ai", "tool", "ai"]
    assert answered.messages[2]["content"] == "second"


def test_a_message_after_a_tool_round_keeps_the_round(client: httpx.Client) -> None:
    asked = chat(client, None, user_says("weather?"))
    answered = chat(client, asked.state, tool_result(calls(asked.state)[0]["id"], "sunny"))
    # assistant-ui shows the ai, tool and ai messages as one reply with the first one's id: its parent.
    parent = answered.messages[1]["id"]
    thanked = chat(client, answered.state, user_says("thanks", parent_id=parent))
    assert thanked.kinds == ["human", "ai", "tool", "ai", "human", "ai"]
    assert thanked.messages[:4] == answered.messages


def test_editing_the_message_after_a_tool_round_keeps_the_round(client: httpx.Client) -> None:
    asked = chat(client, None, user_says("weather?"))
    answered = chat(client, asked.state, tool_result(calls(asked.state)[0]["id"], "sunny"))
    thanked = chat(client, answered.state, user_says("thanks", parent_id=answered.messages[1]["id"]))
    edit = user_says("thank you", parent_id=answered.messages[1]["id"], source_id=thanked.messages[4]["id"])
    edited = chat(client, thanked.state, edit)
    assert [text(message) for message in edited.messages[4:]] == ["thank you", 'You said: "thank you".']
    assert edited.messages[:4] == answered.messages


def test_no_tool_call_when_the_frontend_does_not_offer_get_weather(client: httpx.Client) -> None:
    tools = {
        "get_weather": {"description": "weather", "parameters": {"type": "object"}, "disabled": True},
        "search": {"parameters": {"type": "object"}},
    }
    reply = chat(client, None, user_says("weather in Lima?"), tools=tools)
    assert calls(reply.state) == []


# --- Streams: headers, keep-alives, errors inside a run, disconnects -----------------------------


def test_a_reply_is_no_bigger_than_a_small_multiple_of_its_request(client: httpx.Client) -> None:
    messages = [{"id": f"m{index}", "type": "human", "content": "x" * 100} for index in range(2000)]
    # 100 edits, each naming the second-to-last message: each one cuts the thread and adds a message.
    edits = [user_says(f"edit {index}", parent_id=f"m{1997}") for index in range(100)]
    body = {"commands": edits, "state": {"messages": messages}}
    reply = send(client, body)
    assert reply.status == 200
    assert len(reply.body) < 2 * len(json.dumps(body)), "the thread went out more than once"


def test_what_the_mock_echoes_is_capped(client: httpx.Client) -> None:
    asked = chat(client, None, user_says("What is the weather in " + "Very " * 200_000 + "Big Town?"))
    (call,) = calls(asked.state)
    assert len(call["args"]["location"]) < 200
    assert len(asked.messages[1]["content"]) < 1000
    answered = chat(client, asked.state, tool_result(call["id"], "sunny " * 300_000))
    assert len(answered.messages[3]["content"]) < 700
    assert len(answered.body) < 2 * len("sunny " * 300_000), "the result went out more than once"


def test_stream_headers_tell_proxies_not_to_buffer(client: httpx.Client, protocol: str) -> None:
    reply = chat(client, None, user_says("hi"), protocol=protocol)
    media_type = "text/plain" if protocol == "data-stream" else "text/event-stream"
    assert reply.headers["content-type"] == f"{media_type}; charset=utf-8"
    assert reply.headers["cache-control"] == "no-cache"
    assert reply.headers["x-accel-buffering"] == "no"


def test_keepalives_flow_while_the_run_is_idle(
    client: httpx.Client, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.config, "MOCK_DELAY", 0.3)
    monkeypatch.setattr(app.config, "HEARTBEAT_SECONDS", 0.05)
    reply = chat(client, None, user_says("slow"), protocol=protocol)
    assert reply.keepalives >= 4
    assert text(reply.messages[1]) == 'You said: "slow".'


def test_keepalives_come_between_the_lines_of_a_streaming_reply_too(
    client: httpx.Client, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.config, "MOCK_DELAY", 0.02)
    monkeypatch.setattr(app.config, "HEARTBEAT_SECONDS", 0.03)
    words = " ".join(f"word{n}" for n in range(25))
    reply = chat(client, None, user_says(words), protocol=protocol)
    assert reply.keepalives >= 5, "one timer a stream ticks whether the reply is busy or idle"
    assert text(reply.messages[1]) == f'You said: "{words}".'


def test_error_mid_run_reaches_the_client_and_keeps_the_conversation(
    client: httpx.Client, protocol: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def failing_agent(thread: Json, request: Json) -> AsyncIterator[Json]:
        yield {"choices": [{"index": 0, "delta": {"content": "Half a"}}]}
        raise RuntimeError("model exploded")

    first = chat(client, None, user_says("one"), protocol=protocol)
    monkeypatch.setattr(app, "run_agent", failing_agent)
    reply = send(client, {"commands": [user_says("two")], "state": first.state}, protocol)
    assert reply.status == 200
    assert reply.errors == ["The assistant failed while replying. The server log has the details."]
    assert [text(message) for message in reply.messages] == ["one", 'You said: "one".', "two", "Half a"]
    assert "model exploded" in caplog.text
    assert "Traceback" in caplog.text
    assert client.get("/health").status_code == 200


def test_client_disconnect_stops_the_run(server: Server, client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.config, "MOCK_DELAY", 0.05)
    baseline = server.task_count()
    with client.stream("POST", "/assistant", json={"commands": [user_says("word " * 200)]}) as response:
        next(response.iter_raw())
        assert server.task_count() > baseline, "the run is under way"
    client.close()  # the tab closes: the connection goes away
    assert wait_until(lambda: server.task_count() == baseline, 1), "a task outlived the disconnected stream"


def test_open_streams_do_not_each_hold_a_thread(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    def sync_receiver(**kwargs: object) -> None:
        """A plain sync receiver, as a project adds: Django runs it in a worker thread."""

    monkeypatch.setattr(app.config, "MOCK_DELAY", 0.5)
    request_started.connect(sync_receiver)
    threads_before = threading.active_count()
    try:
        with httpx.Client(base_url=server.url, timeout=10, limits=httpx.Limits(max_connections=200)) as http:
            body = {"commands": [user_says("a b c")]}
            streams = [http.stream("POST", "/assistant", json=body) for _ in range(100)]
            # Keep each iterator: once collected, it would close its connection, and the stream with it.
            readers = [stream.__enter__().iter_raw() for stream in streams]
            for reader in readers:
                next(reader)
            assert threading.active_count() - threads_before <= 3
            for stream in streams:
                stream.__exit__(None, None, None)
    finally:
        request_started.disconnect(sync_receiver)


def test_signal_receivers_you_connect_still_run(client: httpx.Client) -> None:
    seen: list[str] = []

    def on_start(scope: Json, **kwargs: object) -> None:
        if scope["query_string"] == b"probe=signals":  # this test's request, not a stream another test left
            seen.append("started")

    def on_finish(**kwargs: object) -> None:
        if seen:
            seen.append("finished")

    request_started.connect(on_start)
    request_finished.connect(on_finish)
    try:
        assert client.get("/health", params={"probe": "signals"}).status_code == 200
        wait_until(lambda: len(seen) >= 2, 1)  # request_finished comes when Django closes the response
    finally:
        request_started.disconnect(on_start)
        request_finished.disconnect(on_finish)
    assert seen[:2] == ["started", "finished"]


# --- Errors before the stream: JSON, with CORS headers, and the server keeps going ---------------


@dataclass
class Refusal:
    """A request the server refuses before any stream starts, and what the refusal must say."""

    method: str
    path: str
    body: bytes = b""
    status: int = 400
    headers: dict[str, str] = field(default_factory=dict)
    details: Json = None  # the exact details, where the refusal names what was wrong
    allow: str | None = None  # the Allow header of a 405
    error: str | None = None  # the exact error, where a wrong reason to refuse would also give the status


REFUSALS = {
    "invalid-json": Refusal("POST", "/assistant", b"{nope"),
    "not-utf8": Refusal(  # valid but for its encoding: read with replacement characters, it would pass
        "POST",
        "/assistant",
        b'{"commands": [], "system": "\xff"}',
        error="Body is not a JSON object",
        details="invalid unicode code point",  # then where: the column differs between pydantic-core versions
    ),
    "nested-too-deep": Refusal(
        "POST", "/assistant", b'{"commands": [], "state": {"x": ' + b"[" * 300 + b"]" * 300 + b"}}"
    ),
    "missing-commands": Refusal("POST", "/assistant", b'{"state": null}'),
    "wrong-types": Refusal("POST", "/assistant", b'{"commands": "add-message"}'),
    "malformed-add-message": Refusal("POST", "/assistant", b'{"commands": [{"type": "add-message"}]}'),
    "assistant-role-message": Refusal(
        "POST", "/assistant", b'{"commands": [{"type": "add-message", "message": {"role": "assistant", "parts": []}}]}'
    ),
    "state-message-without-type": Refusal(
        "POST", "/assistant", b'{"commands": [], "state": {"messages": [{"role": "robot"}]}}'
    ),
    "too-many-commands": Refusal("POST", "/assistant", json.dumps({"commands": [{"type": "x"}] * 101}).encode()),
    "a-command-without-a-type": Refusal("POST", "/assistant", b'{"commands": [{"text": "hi"}]}'),
    "a-command-whose-type-is-not-a-string": Refusal("POST", "/assistant", b'{"commands": [{"type": 7}]}'),
    "unknown-tool-call": Refusal(
        "POST",
        "/assistant",
        b'{"commands": [{"type": "add-tool-result", "toolCallId": "call_gone"}]}',
        details=["call_gone"],
    ),
    "nan-in-a-tool-result": Refusal(
        "POST",
        "/assistant",
        b'{"commands": [{"type": "add-tool-result", '
        b'"toolCallId": "c1", "result": [1, NaN]}], "state": {"messages": [{"type": "ai", "content": "", '
        b'"tool_calls": [{"id": "c1", "name": "t"}]}]}}',
    ),
    "infinity-in-state": Refusal("POST", "/assistant", b'{"commands": [], "state": {"zoom": -Infinity}}'),
    "an-array-for-a-body": Refusal(
        "POST", "/assistant", b"[]", error="Body is not a JSON object", details="list where a JSON object belongs"
    ),
    "not-json-content-type": Refusal("POST", "/assistant", b'{"commands": []}', 415, {"Content-Type": "text/plain"}),
    "wrong-method": Refusal("GET", "/assistant", status=405, allow="POST"),
    "wrong-method-health": Refusal("DELETE", "/health", status=405, allow="GET, HEAD"),
    "unknown-path": Refusal("GET", "/nope", status=404),
    "host-not-allowed": Refusal("GET", "/health", headers={"Host": "evil.example"}),
}


def refuse(client: httpx.Client, case: Refusal, **headers: str) -> httpx.Response:
    all_headers = {"Content-Type": "application/json", **case.headers, **headers}
    return client.request(case.method, case.path, content=case.body, headers=all_headers)


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_bad_request_gets_a_json_error_and_the_server_keeps_serving(client: httpx.Client, case: Refusal) -> None:
    response = refuse(client, case)
    assert response.status_code == case.status
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["error"], str)
    assert response.json()["error"]
    if isinstance(case.details, str):
        assert response.json()["details"].startswith(case.details)
    elif case.details is not None:
        assert response.json()["details"] == case.details
    if case.error is not None:
        assert response.json()["error"] == case.error
    assert response.headers.get("allow") == case.allow
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_error_responses_carry_cors_headers(client: httpx.Client, case: Refusal) -> None:
    response = refuse(client, case, Origin=FRONTEND)
    assert response.status_code == case.status
    assert response.headers["access-control-allow-origin"] == FRONTEND
    assert "Origin" in response.headers["vary"]


def test_a_bad_host_is_told_which_setting_to_change(client: httpx.Client) -> None:
    response = client.get("/health", headers={"Host": "chat.example.com"})
    assert response.status_code == 400
    assert "You may need to add 'chat.example.com' to ALLOWED_HOSTS" in response.json()["details"]


def test_schema_errors_list_a_few_dozen_problems_and_count_them(client: httpx.Client) -> None:
    state = {"messages": [{"role": "robot"}] * 5000}  # each lacks its type and content
    response = client.post("/assistant", json={"commands": [], "state": state})
    assert response.status_code == 400
    assert "10000 problem(s), the first 20 listed" in response.json()["error"]
    assert len(response.json()["details"]) == 20
    assert len(response.content) < 5000, "the refusal must not grow with the request"


@pytest.mark.parametrize("parts", [100, 101, 500_000])
def test_a_message_holds_at_most_100_parts(client: httpx.Client, parts: int) -> None:
    message = {"role": "user", "parts": [{"type": "image"}] * parts}  # 500,000: 8.5 MB, refused at once
    response = client.post("/assistant", json={"commands": [{"type": "add-message", "message": message}]})
    if parts <= 100:  # the README: "100 parts a message"
        assert response.status_code == 200
        return
    assert response.status_code == 400
    assert [problem["type"] for problem in response.json()["details"]] == ["too_long"]


@pytest.mark.parametrize("count", [100, 101])
def test_a_request_holds_at_most_100_commands(client: httpx.Client, count: int) -> None:
    response = client.post("/assistant", json={"commands": [{"type": "note"}] * count})
    assert response.status_code == (200 if count <= 100 else 400), "the README: 100 commands a request"


def test_a_target_no_route_can_match_gets_the_json_404(server: Server) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404")
    assert b"content-type: application/json" in head.lower()
    assert b"No endpoint at *" in body


def test_schema_errors_name_each_problem(client: httpx.Client) -> None:
    message = {"role": "user", "parts": [{"type": "video"}]}
    body = {"commands": [{"type": "add-message", "message": message}], "tools": 1}
    details = client.post("/assistant", json=body).json()["details"]
    assert [problem["loc"] for problem in details] == [
        ["commands", 0, "add-message", "message", "parts", 0, "type"],
        ["tools"],
    ]


FORGED_CALLS = {
    "a number": {"id": 7, "name": "get_weather"},
    "a list": {"id": ["call_1"], "name": "get_weather"},
    "no id": {"name": "get_weather"},
    "no name": {"id": "call_1"},
}


@pytest.mark.parametrize("call", FORGED_CALLS.values(), ids=FORGED_CALLS.keys())
def test_a_tool_call_no_server_wrote_costs_that_request_only(client: httpx.Client, call: Json) -> None:
    state = {"messages": [{"id": "a1", "type": "ai", "content": "", "tool_calls": [call]}]}
    result = client.post("/assistant", json={"commands": [tool_result("call_1", {"temperature": 21})], "state": state})
    assert result.status_code == 400
    assert result.json()["error"] == "add-tool-result for a tool call that is not in the state"
    reply = chat(client, state, user_says("hi"))
    assert text(reply.messages[-1]) == 'You said: "hi".'


def test_a_tool_result_for_a_call_an_earlier_edit_removed_is_refused(client: httpx.Client) -> None:
    asked = chat(client, None, user_says("weather?"))
    edit = user_says("never mind", source_id=asked.messages[0]["id"])
    body = {"commands": [edit, tool_result(calls(asked.state)[0]["id"], "sunny")], "state": asked.state}
    response = client.post("/assistant", json=body)
    assert response.status_code == 400
    assert response.json()["details"] == [calls(asked.state)[0]["id"]]


def test_body_over_the_size_limit_is_refused_with_413(client: httpx.Client) -> None:
    limit = 10_485_760  # MAX_REQUEST_BYTES's default, as the README gives it
    headers = {"Content-Type": "application/json", "Origin": FRONTEND}
    under = json.dumps({"commands": [], "padding": ""}).encode()
    under = under.replace(b'""', b'"' + b"x" * (limit - len(under)) + b'"')
    assert len(under) == limit
    assert client.post("/assistant", content=under, headers=headers).status_code == 200
    response = client.post("/assistant", content=under.replace(b'"x', b'"xx'), headers=headers)
    assert response.status_code == 413
    assert response.json()["error"] == "Body larger than MAX_REQUEST_BYTES (10485760 bytes)"
    assert response.headers["access-control-allow-origin"] == FRONTEND


# --- CORS ---------------------------------------------------------------------------------------


def preflight(client: httpx.Client, origin: str, method: str = "POST") -> httpx.Response:
    return client.options(
        "/assistant",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type,test-header",
        },
    )


def test_preflight_from_an_allowed_origin_is_answered(client: httpx.Client) -> None:
    response = preflight(client, FRONTEND)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == FRONTEND
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "content-type,test-header"
    assert int(response.headers["access-control-max-age"]) > 0
    assert "Origin" in response.headers["vary"]


@pytest.mark.parametrize(
    ("origin", "method"), [("https://evil.example", "POST"), (FRONTEND, "DELETE"), (FRONTEND, "ST")]
)
def test_a_refused_preflight_carries_no_allow_headers(client: httpx.Client, origin: str, method: str) -> None:
    response = preflight(client, origin, method)
    assert response.status_code == 403
    assert [name for name in response.headers if name.lower().startswith("access-control-allow")] == []
    assert response.json()["error"] == f"CORS preflight from {origin} for {method} refused (see CORS_ORIGINS)"


def test_stream_to_an_allowed_origin_carries_cors_headers(client: httpx.Client) -> None:
    reply = send(client, {"commands": [user_says("hi")]}, Origin=FRONTEND)
    assert reply.headers["access-control-allow-origin"] == FRONTEND
    assert "Origin" in reply.headers["vary"]


def test_other_origins_get_no_cors_headers(client: httpx.Client) -> None:
    reply = send(client, {"commands": [user_says("hi")]}, Origin="https://evil.example")
    assert reply.status == 200
    assert "access-control-allow-origin" not in reply.headers


def test_any_origin_means_star_without_credentials(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.config, "CORS_ORIGINS", ["*"])
    for response in (
        preflight(client, "https://anywhere.example"),
        client.get("/nope", headers={"Origin": "https://a.example"}),
    ):
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers


# --- Running it: python app.py, uvicorn app:application, management commands, settings -----------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_app(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=HERE, env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


class AppClient(httpx.Client):
    """A client of the app in a process of its own, which it knows."""

    process: subprocess.Popen[bytes]
    log: Path  # where its output went, when the test asked for it


@contextmanager
def app_process(
    command: list[str],
    host: str = "127.0.0.1",
    cwd: Path = HERE,
    prefix: str = "",
    log: Path | None = None,
    **env: str | None,
) -> Iterator[AppClient]:
    """Start the app as a user would ("{port}" in the command is a free port), and wait until it answers.

    A setting given as None is left out of the environment altogether, as on a machine that never set it.
    """
    port = free_port()
    output = log.open("w") if log else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, *(part.format(port=port) for part in command)],
        cwd=cwd,
        env={key: value for key, value in {**os.environ, "PORT": str(port), **env}.items() if value is not None},
        stdout=output,
        stderr=output,
    )
    try:
        with AppClient(base_url=f"http://{host}:{port}/{prefix}", timeout=10) as http:
            http.process = process
            assert wait_until(lambda: answers(http), 20), "the server did not start"
            yield http
    finally:
        process.terminate()
        process.wait(timeout=10)


def status_of(process: subprocess.Popen[bytes], field_name: str) -> int:
    """A number from /proc/PID/status: VmRSS in kB, Threads, ..."""
    lines = Path(f"/proc/{process.pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in lines if line.startswith(f"{field_name}:")))


def answers(http: httpx.Client) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.TransportError:
        return False


DOCUMENTED_COMMANDS = {
    "python-app": ["app.py"],
    "uvicorn": ["-m", "uvicorn", "app:application", "--port", "{port}", "--lifespan", "on"],
    "runserver": ["app.py", "runserver"],
    "runserver-port": ["app.py", "runserver", "{port}", "--noreload"],
    "runserver-all-addresses": ["app.py", "runserver", "0.0.0.0:{port}", "--noreload"],
}


@pytest.mark.parametrize("command", DOCUMENTED_COMMANDS.values(), ids=DOCUMENTED_COMMANDS.keys())
def test_the_documented_commands_serve_streams(command: list[str]) -> None:
    with app_process(command) as http:
        assert http.get("/health").json()["agent"] == "mock"
        reply = chat(http, None, user_says("hello"))
        assert text(reply.messages[1]) == 'You said: "hello".'


def test_runserver_binds_the_address_given() -> None:
    with app_process(["app.py", "runserver", "[::1]:{port}", "--noreload"], host="[::1]") as http:
        assert http.get("/health").status_code == 200
        port = http.base_url.port
        with socket.socket() as probe:  # bound to IPv6 loopback only: nothing answers over IPv4
            assert probe.connect_ex(("127.0.0.1", port or 0)) != 0


def test_runserver_refuses_an_address_it_cannot_read() -> None:
    result = run_app("app.py", "runserver", "localhost:port")
    assert result.returncode == 2
    assert "'localhost:port' is not a port (1-65535) or an address:port" in result.stderr


def test_runserver_reloads_a_changed_file_and_survives_a_syntax_error(tmp_path: Path) -> None:
    copy = tmp_path / "app.py"
    source = (HERE / "app.py").read_text()
    version = f'__version__ = "{app.__version__}"'
    copy.write_text(source)

    def serves(http: httpx.Client, expected: str) -> bool:
        try:  # one request: a reload may restart the server between any two
            return bool(http.get("/health").json()["version"] == expected)
        except httpx.TransportError:
            return False

    log = tmp_path / "server.log"
    with app_process([str(copy), "runserver", "{port}"], log=log) as http:
        assert serves(http, app.__version__)
        copy.write_text(source.replace(version, '__version__ = "9.9.9"'))
        assert wait_until(lambda: serves(http, "9.9.9"), 20), "the change was not picked up"
        copy.write_text(source + "\nthis is not python:\n")
        assert wait_until(lambda: "SyntaxError" in log.read_text(), 20), "the broken file was not loaded"
        copy.write_text(source.replace(version, '__version__ = "9.9.10"'))
        assert wait_until(lambda: serves(http, "9.9.10"), 20), "the reloader did not survive the syntax error"


def test_runserver_reloads_when_env_changes_and_not_for_other_files(tmp_path: Path) -> None:
    copy, log = tmp_path / "app.py", tmp_path / "server.log"
    copy.write_text((HERE / "app.py").read_text())

    def protocol(http: httpx.Client) -> str | None:
        try:
            return str(http.get("/health").json()["protocol"])
        except httpx.TransportError:
            return None

    with app_process([str(copy), "runserver", "{port}"], log=log, STREAM_PROTOCOL=None) as http:
        (tmp_path / "test_app.py").write_text("# a test edited beside app.py\n")
        (tmp_path / ".env").write_text("STREAM_PROTOCOL=assistant-transport\n")
        assert wait_until(lambda: protocol(http) == "assistant-transport", 20), "the changed .env was not picked up"
    reloads = [line for line in log.read_text().splitlines() if "Reloading" in line]
    assert reloads, "the reload was not logged"
    assert not [line for line in reloads if "test_app.py" in line], "a file other than app.py and .env restarted it"


def test_runserver_help_describes_the_runserver_that_runs() -> None:
    asked = run_app("app.py", "runserver", "--help").stdout
    assert "--noreload" in asked
    assert "--ipv6" not in asked, "that is Django's own runserver, which this one replaces"


@pytest.mark.parametrize("reload", [[], ["--noreload"]], ids=["with-reload", "without"])
def test_runserver_refuses_a_port_out_of_range(reload: list[str]) -> None:
    result = run_app("app.py", "runserver", "99999", *reload)
    assert result.returncode == 2
    assert "'99999' is not a port (1-65535) or an address:port" in result.stderr


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("PORT", "abc", "Input should be a valid integer, unable to parse string as an integer"),
        ("MOCK_DELAY", "soon", "Input should be a valid number, unable to parse string as a number"),
        ("ALLOWED_HOSTS", ",,,", "should have at least 1 item after validation, not 0"),
        ("STREAM_PROTOCOL", "sse", "Input should be 'data-stream' or 'assistant-transport'"),
        ("HEARTBEAT_SECONDS", "1e-300", "greater than or equal to 1 or Input should be less than or equal to 0"),
        ("HEARTBEAT_SECONDS", "0.5", "greater than or equal to 1 or Input should be less than or equal to 0"),
        ("TOOL_TIMEOUT", "0", "Input should be greater than 0"),
        ("OPENAI_TIMEOUT", "-1", "Input should be greater than 0"),
        ("OPENAI_API_KEY", "sk-proj-ünïcode", "String should match pattern '^[!-~]*$'"),
        ("OPENAI_API_KEY", "sk-proj two words", "String should match pattern '^[!-~]*$'"),
        ("TOOL_THREADS", "0", "Input should be greater than or equal to 1"),
    ],
)
def test_bad_setting_stops_startup_with_one_clear_line(name: str, value: str, reason: str) -> None:
    result = run_app("app.py", "check", **{name: value})
    assert result.returncode != 0
    line = result.stderr.strip()
    assert "\n" not in line, "one line, not a traceback"
    assert line.startswith(f"app.py: invalid setting {name}: "), line
    assert line.endswith(f"{reason}."), "in pydantic's words"
    assert name != "OPENAI_API_KEY" or value not in line, "a key is never printed"


@pytest.mark.parametrize("missing", ["openai", "aiohttp"])
def test_a_key_without_the_openai_extra_stops_startup_with_one_line(tmp_path: Path, missing: str) -> None:
    (tmp_path / f"{missing}.py").write_text(f"raise ImportError('no module named {missing}')\n")  # as if not installed
    result = run_app("app.py", "check", OPENAI_API_KEY="sk-test", PYTHONPATH=str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "app.py: OPENAI_API_KEY is set, but the openai package is not: pip install 'openai[aiohttp]'"
    )


@pytest.mark.parametrize(("name", "value"), [("HEARTBEAT_SECONDS", "0"), ("HEARTBEAT_SECONDS", "1")])
def test_the_edges_of_a_setting_are_accepted(name: str, value: str) -> None:
    result = run_app("app.py", "check", **{name: value})
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def configured() -> Iterator[AppClient]:
    """app.py served with settings an operator sets in the environment."""
    with app_process(
        ["app.py"],
        ALLOWED_HOSTS="chat.example.com,127.0.0.1",
        STREAM_PROTOCOL="assistant-transport",
        HEARTBEAT_SECONDS="0",
        MOCK_DELAY="0.3",
    ) as http:
        yield http


def test_allowed_hosts_from_the_environment_replace_the_local_ones(configured: AppClient) -> None:
    assert configured.get("/health", headers={"Host": "chat.example.com"}).status_code == 200
    refused = configured.get("/health", headers={"Host": "localhost"})  # one of the defaults, not in the setting
    assert (refused.status_code, refused.json()["error"]) == (400, "Host not allowed (see ALLOWED_HOSTS)")


def test_stream_protocol_from_the_environment_is_what_goes_on_the_wire(configured: AppClient) -> None:
    reply = chat(configured, None, user_says("hi"), protocol="assistant-transport")  # decodes SSE, or fails
    assert reply.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert text(reply.messages[1]) == 'You said: "hi".'


def test_a_heartbeat_of_0_sends_no_keepalives(configured: AppClient) -> None:
    reply = chat(configured, None, user_says("one two three"), protocol="assistant-transport")  # 1.5 s of pieces
    assert reply.keepalives == 0, "the README: 0, none"


def readme_defaults() -> dict[str, str]:
    """The README's configuration table: each setting's default as it is written there."""
    readme = (HERE / "README.md").read_text()
    table = readme[readme.index("| setting | default | meaning |") :].split("\n\n")[0]
    return dict(re.findall(r"^\| `(\w+)` \| `?([^`|]*)`? \|", table, re.MULTILINE))


def test_the_defaults_are_the_readmes() -> None:
    # Read from the settings class: a 15 s keep-alive or a 10 MiB body cannot be waited for in every test run.

    def shown(value: Json) -> str:  # as the README writes it
        if isinstance(value, list):
            return ",".join(value)
        return f"{value:g}" if isinstance(value, float) else str(value) or "empty"

    defaults = {name: shown(setting.default) for name, setting in app.Config.model_fields.items()}
    assert defaults == readme_defaults()


def test_the_environment_wins_over_the_env_file(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text((HERE / "app.py").read_text())
    (tmp_path / ".env").write_text("STREAM_PROTOCOL=assistant-transport\nCORS_ORIGINS=https://from-the-file.example\n")
    with app_process(["app.py"], cwd=tmp_path, STREAM_PROTOCOL="data-stream", CORS_ORIGINS=None) as http:
        assert http.get("/health").json()["protocol"] == "data-stream", "the environment's"
        assert preflight(http, "https://from-the-file.example").status_code == 204, "the file's, where it alone says"


def test_app_py_doubles_as_manage_py() -> None:
    result = run_app("app.py", "check")
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_the_readmes_fastapi_table_gives_each_section_of_app_py_and_quotes_only_what_is_there() -> None:
    source = (HERE / "app.py").read_text()
    lines, readme = source.splitlines(), (HERE / "README.md").read_text()
    table = readme[readme.index("| section | FastAPI `main.py` | Django `app.py` |") :].split("\n\n")[0]
    ranges = []
    for row in table.splitlines()[2:]:
        ours = row.split(" | ")[2]
        numbers = re.match(r"(\d+)–(\d+):", ours)  # noqa: RUF001
        assert numbers, f"no line range in {ours!r}"
        first, last = int(numbers[1]), int(numbers[2])
        ranges.append((first, last))
        for quoted in re.findall(r"`([^`]+)`", ours):
            assert quoted in source, f"the README quotes {quoted!r}, which app.py does not hold"
    headers = [number for number, line in enumerate(lines, 1) if line.startswith("# --- ")]
    assert [first for first, _ in ranges] == [1, *headers], "a row for each section, at its header line"
    ends = [header - 1 for header in headers] + [len(lines) + 1]
    for (first, last), next_start in zip(ranges, ends, strict=True):
        assert lines[last - 1].strip(), f"the range {first}–{last} ends on a blank line"  # noqa: RUF001
        assert not "".join(lines[last : next_start - 1]).strip(), f"the range {first}–{last} stops short"  # noqa: RUF001


def test_every_setting_is_documented_and_kept_out_of_the_tests() -> None:
    example, readme = (HERE / ".env.example").read_text(), (HERE / "README.md").read_text()
    for name in app.Config.model_fields:
        assert f"\n{name}=" in example, f"{name} is not in .env.example"
        assert f"| `{name}` |" in readme, f"{name} is not in the README's table"
    assert sorted(SETTINGS) == sorted(app.Config.model_fields), "a developer's .env could reach the tests"


def test_readme_shows_the_server_tool_app_py_ships() -> None:
    assert readme_code("class CurrentTime(BaseModel):") in (HERE / "app.py").read_text()


# --- The OpenAI agent, against a local server that streams like the OpenAI API -------------------


@dataclass
class Completion:
    """One scripted answer: streamed deltas (and an error event after them), or an HTTP error."""

    deltas: list[Json] = field(default_factory=list)
    finish_reason: str = "stop"
    delay: float = 0
    status: int = 200
    error: Json = None
    head_delay: float = 0  # seconds before the response starts: a hung model server
    raw: bytes = b""  # sent as is before the deltas: a broken stream, or lines the client skips
    raw_piece: int = 0  # if set, raw goes out in pieces of this many bytes, each sent on its own
    content_type: str = "text/event-stream"


def says(*tokens: str, delay: float = 0) -> Completion:
    return Completion([{"role": "assistant", "content": ""}, *({"content": token} for token in tokens)], delay=delay)


def calls_tools(*tool_calls: tuple[str, str, list[str]]) -> Completion:
    """Tool calls as the API streams them: id and name first, then the arguments in pieces."""
    deltas: list[Json] = [{"role": "assistant", "content": None}]
    for index, (call_id, name, pieces) in enumerate(tool_calls):
        function = {"name": name, "arguments": ""}
        deltas.append({"tool_calls": [{"index": index, "id": call_id, "type": "function", "function": function}]})
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]} for piece in pieces]
    return Completion(deltas, finish_reason="tool_calls")


def fails(status: int, message: str) -> Completion:
    return Completion(status=status, error={"message": message, "type": "error", "param": None, "code": None})


@dataclass
class FakeOpenAI:
    """An OpenAI-compatible server: streams scripted chat.completion.chunk events, records requests."""

    script: list[Completion] = field(default_factory=list)
    respond: Callable[[Json], Completion] | None = None  # if set, the answer to each request, once script is empty
    requests: list[Json] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    disconnected_at: float | None = None
    sent_bytes: int = 0

    async def __call__(
        self, scope: Json, receive: Callable[[], Awaitable[Json]], send: Callable[[Json], Awaitable[None]]
    ) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.requests.append(json.loads(body))
        self.authorizations.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        answer = self.script.pop(0) if self.script else (self.respond or (lambda _: says("ok")))(self.requests[-1])
        await asyncio.sleep(answer.head_delay)
        if answer.content_type != "text/event-stream":  # a 200 that is not a stream: a login page, a proxy
            headers = [(b"content-type", answer.content_type.encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"<html><body>Please sign in</body></html>"})
            return
        if answer.status != 200:  # "{authorization}" in the message quotes the header, as some proxies do
            error = {**answer.error, "message": answer.error["message"].format(authorization=self.authorizations[-1])}
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": answer.status, "headers": headers})
            await send({"type": "http.response.body", "body": json.dumps({"error": error}).encode()})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        hung_up = asyncio.ensure_future(receive())  # resolves with http.disconnect when the client goes
        choices = [
            *({"delta": delta, "finish_reason": None} for delta in answer.deltas),
            {"delta": {}, "finish_reason": answer.finish_reason},
        ]
        events: list[Json] = [{"choices": [{"index": 0, "logprobs": None, **choice}]} for choice in choices]
        # The usage chunk that ends a stream asked for with stream_options.include_usage: no choices.
        events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})
        if answer.error is not None:  # an error after the 200, as the API sends one mid-stream
            events[-2:] = [{"error": answer.error}]
        step = answer.raw_piece or len(answer.raw) or 1
        for start in range(0, len(answer.raw), step):
            await send({"type": "http.response.body", "body": answer.raw[start : start + step], "more_body": True})
            if answer.raw_piece:
                time.sleep(0.0002)  # noqa: ASYNC251 (apart in time, so that the client reads each alone; a fake may wait)
        for event in events:
            done, _ = await asyncio.wait({hung_up}, timeout=answer.delay)
            if done:
                self.disconnected_at = time.monotonic()
                return
            if "error" not in event:
                event |= {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000}
                event |= {"model": "gpt-4o-mini", "system_fingerprint": "fp_fake"}
            chunk = f"data: {json.dumps(event)}\n\n".encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.sent_bytes += len(chunk)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        hung_up.cancel()


@pytest.fixture(scope="session")
def fake_openai_server() -> Iterator[tuple[FakeOpenAI, Server]]:
    fake = FakeOpenAI()
    with serving(fake) as running:
        yield fake, running


@pytest.fixture
def fake_openai(
    fake_openai_server: tuple[FakeOpenAI, Server], server: Server, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeOpenAI]:
    """The OpenAI agent serves the next requests, with the fake as its model server."""
    fake, running = fake_openai_server
    fake.script, fake.requests, fake.authorizations, fake.disconnected_at, fake.sent_bytes = [], [], [], None, 0
    fake.respond = None
    model_client = openai.AsyncOpenAI(
        api_key="sk-server",
        base_url=f"{running.url}/v1",
        max_retries=0,
        timeout=5,
        http_client=openai.DefaultAioHttpClient(),  # as app.py makes it
    )
    monkeypatch.setattr(app, "model_client", model_client)
    monkeypatch.setattr(app, "run_agent", app.openai_agent)
    yield fake
    asyncio.run_coroutine_threadsafe(model_client.close(), server.loop).result(timeout=5)


def test_openai_reply_streams_token_by_token(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [says("Hel", "lo", " from", " the", " model", delay=0.05)]
    reply = chat(client, None, user_says("hi"))
    assert reply.messages[1]["content"] == "Hello from the model"
    assert appended(reply, "content") == ["Hel", "lo", " from", " the", " model"]
    text_chunks = [at for at, chunk in reply.chunks if b"append-text" in chunk]
    assert text_chunks[-1] - text_chunks[0] >= 0.15, "the tokens arrived in one lump"
    assert fake_openai.requests[0]["model"] == "gpt-4o-mini"
    assert fake_openai.requests[0]["stream"] is True


def test_history_maps_to_openai_messages_one_for_one(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    image = "data:image/png;base64,iVBORw0KGgo="
    weather = {
        "id": "call_1",
        "name": "get_weather",
        "args": {"location": "Oslo"},
        "partial_json": '{"location": "Oslo"}',
    }
    state = {
        "messages": [
            {
                "id": "h1",
                "type": "human",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            },
            {"id": "a0", "type": "ai", "content": ""},  # a step that failed before its first token
            {
                "id": "a1",
                "type": "ai",
                "content": "Checking.",
                "tool_calls": [weather, {"id": "call_2", "name": "get_time", "args": {}}],
            },
            {
                "id": "t1",
                "type": "tool",
                "tool_call_id": "call_1",
                "name": "get_weather",
                "content": {"temp": 3},
                "status": "success",
            },
            {
                "id": "t2",
                "type": "tool",
                "tool_call_id": "call_2",
                "name": "get_time",
                "content": "raw",
                "status": "success",
                "model_content": [{"type": "text", "text": "12:00"}],
            },
            {
                "id": "a2",
                "type": "ai",
                "content": "It is 3 degrees at noon.",
                "tool_calls": [{"id": "call_3", "name": "get_radar", "args": {}}],
            },
            {
                "id": "t3",
                "type": "tool",
                "tool_call_id": "call_3",
                "name": "get_radar",
                "content": "radar offline",
                "status": "error",
            },
            {
                "id": "a3",
                "type": "ai",
                "content": [{"type": "text", "text": "Shall I map it?"}],
                "tool_calls": [{"id": "call_4", "name": "get_map", "args": {}}],
            },
        ]
    }
    chat(client, state, user_says("No, thanks!"), system="You are terse.")
    assert fake_openai.requests[0]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather here?"}, {"type": "image_url", "image_url": {"url": image}}],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {
            "role": "assistant",
            "content": "It is 3 degrees at noon.",
            "tool_calls": [{"id": "call_3", "type": "function", "function": {"name": "get_radar", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_3", "content": "Error: radar offline"},
        {
            "role": "assistant",
            "content": "Shall I map it?",
            "tool_calls": [{"id": "call_4", "type": "function", "function": {"name": "get_map", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_4", "content": "The tool was not run."},
        {"role": "user", "content": [{"type": "text", "text": "No, thanks!"}]},
    ]


def test_enabled_tools_are_offered_with_their_schemas(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    schema = {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}
    tools = {
        "get_weather": {"description": "Weather for a place", "parameters": schema},
        "delete_all": {"description": "Dangerous", "parameters": {"type": "object"}, "disabled": True},
    }
    chat(client, None, user_says("hi"), tools=tools)
    assert fake_openai.requests[0]["tools"][0] == {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather for a place", "parameters": schema},
    }
    assert [tool["function"]["name"] for tool in fake_openai.requests[0]["tools"]] == [
        "get_weather",
        "get_current_time",
    ], "the disabled tool is left out; the server's own tools come after the frontend's"


def test_server_tools_are_offered_with_their_pydantic_schema(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    chat(client, None, user_says("hi"))
    assert fake_openai.requests[0]["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_current_time",
                "description": "Get the current date and time in a time zone.",
                "strict": True,
                "parameters": {
                    "type": "object",
                    "title": "CurrentTime",
                    "description": "Get the current date and time in a time zone.",
                    "properties": {
                        "timezone": {
                            "type": "string",
                            "title": "Timezone",
                            "description": "An IANA time zone name, such as Asia/Tokyo or Europe/Paris",
                        }
                    },
                    "required": ["timezone"],
                    "additionalProperties": False,
                },
            },
        }
    ]


def test_tool_call_arguments_stream_in_pieces_and_the_run_stops(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [calls_tools(("call_w", "get_weather", ['{"loc', 'ation"', ': "Li', 'ma"', "}"]))]
    reply = chat(client, None, user_says("Weather in Lima?"))
    (call,) = calls(reply.state)
    assert appended(reply, "partial_json") == ['{"loc', 'ation"', ': "Li', 'ma"', "}"]
    assert re.fullmatch("call_[0-9a-f]{32}", call.pop("id")), "the call's id in the state is the backend's own"
    assert call == {
        "name": "get_weather",
        "args": {"location": "Lima"},
        "partial_json": '{"location": "Lima"}',
    }
    assert reply.kinds == ["human", "ai"]
    assert len(fake_openai.requests) == 1, "the frontend runs the tool; the backend must not call the model again"


def test_two_tool_calls_in_one_turn(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [calls_tools(("call_a", "get_weather", ['{"location": "Oslo"}']), ("call_b", "get_time", []))]
    reply = chat(client, None, user_says("Weather and time?"))
    assert [(call["name"], call["args"]) for call in calls(reply.state)] == [
        ("get_weather", {"location": "Oslo"}),
        ("get_time", {}),
    ]
    assert len({call["id"] for call in calls(reply.state)} - {"call_a", "call_b"}) == 2, "two ids of the backend's"


def test_tool_results_continue_the_run_in_a_new_ai_message(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [
        calls_tools(("call_a", "get_weather", ['{"location": "Lima"}']), ("call_b", "get_time", [])),
        says("Sunny", " in Lima at noon."),
    ]
    asked = chat(client, None, user_says("Weather and time in Lima?"))
    weather, time_call = (call["id"] for call in calls(asked.state))
    half = chat(client, asked.state, tool_result(weather, {"sky": "sunny"}))
    assert half.kinds == ["human", "ai", "tool"], "one call still waits for its result: the model must wait too"
    answered = chat(client, half.state, tool_result(time_call, "12:00"))
    assert len(fake_openai.requests) == 2
    assert fake_openai.requests[1]["messages"][-2:] == [
        {"role": "tool", "tool_call_id": weather, "content": '{"sky": "sunny"}'},
        {"role": "tool", "tool_call_id": time_call, "content": "12:00"},
    ]
    assert answered.kinds == ["human", "ai", "tool", "tool", "ai"]
    assert answered.messages[-1]["content"] == "Sunny in Lima at noon."


def test_model_reads_the_tool_results_model_content(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [calls_tools(("call_c", "render_chart", ["{}"])), says("Done.")]
    asked = chat(client, None, user_says("Chart it"))
    content, (call,) = [{"type": "text", "text": "A bar chart."}], calls(asked.state)
    answered = chat(client, asked.state, tool_result(call["id"], {"svg": "<svg>…</svg>"}, modelContent=content))
    assert answered.messages[2]["content"] == {"svg": "<svg>…</svg>"}, "the UI keeps the result itself"
    assert fake_openai.requests[1]["messages"][-1] == {
        "role": "tool",
        "tool_call_id": call["id"],
        "content": "A bar chart.",
    }


@pytest.mark.parametrize("arguments", ['{"zoom": NaN}', '{"zoom": -Infinity}', "[1, 2]", '{"zoom": '])
def test_tool_arguments_the_client_cannot_decode_are_refused(
    client: httpx.Client, fake_openai: FakeOpenAI, protocol: str, arguments: str
) -> None:
    fake_openai.script = [calls_tools(("call_m", "render_map", [arguments]))]
    reply = send(client, {"commands": [user_says("map it")], "state": None}, protocol)
    (error,) = reply.errors
    assert error.startswith("The model request failed: The arguments for render_map are not a JSON object")
    (call,) = calls(reply.state)
    assert call["partial_json"] == arguments, "the text streamed; it is a string, which the client reads"
    assert call["args"] == {}, "the arguments the client cannot read were never set"


def test_a_conversation_goes_on_after_a_step_with_broken_arguments(
    client: httpx.Client, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script = [calls_tools(("call_m", "render_map", ['{"zoom": '])), says("Sorry, here it is.")]
    failed = send(client, {"commands": [user_says("map it")], "state": None})
    (error,) = failed.errors
    assert error.startswith("The model request failed: The arguments for render_map are not a JSON object")
    assert failed.messages[1]["status"]["reason"] == "error"
    again = chat(client, failed.state, user_says("try again"))
    assert again.messages[-1]["content"] == "Sorry, here it is."
    call = fake_openai.requests[1]["messages"][1]["tool_calls"][0]["function"]
    assert call == {"name": "render_map", "arguments": "{}"}, "the model server would refuse the cut-off JSON"


def test_call_settings_pass_through(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    settings_ = {
        "maxTokens": 50,
        "temperature": 0.3,
        "topP": 0.9,
        "presencePenalty": 0.1,
        "frequencyPenalty": 0.2,
        "seed": 7,
    }
    chat(client, None, user_says("hi"), callSettings=settings_)
    sent = fake_openai.requests[0]
    assert {
        key: sent[key]
        for key in ("max_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed")
    } == {
        "max_tokens": 50,
        "temperature": 0.3,
        "top_p": 0.9,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "seed": 7,
    }


def test_only_the_sampling_settings_reach_the_model(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    sampling = {"temperature": 0.3, "headers": {"x": "y"}, "topK": 5, "seed": None}
    chat(client, None, user_says("hi"), callSettings=sampling)
    sent = fake_openai.requests[0]
    assert sent["temperature"] == 0.3
    assert not {"headers", "top_k", "topK", "seed"} & sent.keys(), "what the chat API does not take is left out"


def test_client_sent_api_key_and_base_url_are_ignored(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    config = {"apiKey": "sk-stranger", "baseUrl": "http://127.0.0.1:9/v1", "modelName": "gpt-evil"}
    reply = chat(client, None, user_says("hi"), config=config, apiKey="sk-stranger", baseUrl="http://127.0.0.1:9/v1")
    assert reply.messages[1]["content"] == "ok"
    assert fake_openai.authorizations == ["Bearer sk-server"]
    assert fake_openai.requests[0]["model"] == "gpt-4o-mini"


MODEL_ERRORS = {
    "bad-key": (
        fails(401, "Incorrect API key provided: sk-se***er."),
        "The model server answered 401: Incorrect API key provided: sk-se***er.",
    ),
    "rate-limit": (
        fails(429, "Rate limit reached for requests"),
        "The model server answered 429: Rate limit reached for requests",
    ),
    "server-error": (fails(500, "The server had an error"), "The model server answered 500: The server had an error"),
    "stalls-mid-stream": (says("late", delay=2), "The model request failed: ReadTimeout while the reply streamed"),
    "not-a-stream": (
        Completion(content_type="text/html; charset=utf-8"),
        "The model request failed: The model server answered text/html; charset=utf-8, not a stream",
    ),
    "a-line-that-never-ends": (
        Completion([{"content": "Hi"}], raw=b"data: " + b"x" * (2 * 1024 * 1024)),
        "The model request failed: The model server sent a line over 1048576 bytes",
    ),
    "error-mid-stream": (
        Completion([{"content": "Partial"}], error={"message": "The model crashed", "type": "server_error"}),
        "The model request failed: The model crashed",
    ),
}


@pytest.mark.parametrize("case", MODEL_ERRORS.values(), ids=MODEL_ERRORS.keys())
def test_model_errors_become_a_readable_error_frame(
    client: httpx.Client,
    fake_openai: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
    caplog: pytest.LogCaptureFixture,
    case: tuple[Completion, str],
) -> None:
    failure, message = case
    monkeypatch.setattr(app.model_client, "timeout", 0.5)
    fake_openai.script = [failure]
    reply = send(client, {"commands": [user_says("hi")], "state": None}, protocol)
    assert reply.status == 200
    (error,) = reply.errors
    assert error == message or error.startswith(f"{message} ("), "a transport's own words may follow, in brackets"
    assert reply.messages[0]["content"] == [{"type": "text", "text": "hi"}], "the user's message must survive"
    assert "Run failed" in caplog.text
    assert "sk-server" not in reply.body


REPLY_LIMIT = 200_000  # the README: "200,000 bytes of JSON for all a request writes"


def stored_size(value: Json) -> int:
    """The bytes a value costs in the state's JSON, as the client's JSON.stringify sends it back."""
    return len(json.dumps(value, ensure_ascii=False).encode())


@pytest.mark.parametrize("character", ["y", "é", "\x01"], ids=["ascii", "two-bytes", "six-bytes-escaped"])
def test_a_reply_past_the_limit_ends_with_a_readable_error_and_what_it_stored_fits(
    client: httpx.Client, fake_openai: FakeOpenAI, character: str
) -> None:
    fake_openai.script = [says(*[character * 1000] * (REPLY_LIMIT // 1000 + 10))]
    reply = send(client, {"commands": [user_says("go on")], "state": None})
    assert reply.errors == ["The model request failed: The reply passed 200000 bytes"]
    stored = stored_size(reply.messages[1]["content"]) - 2  # the text, without its quotes
    assert REPLY_LIMIT - 6000 <= stored <= REPLY_LIMIT, "what came is kept, counted as the JSON it costs"
    goes_on(client, fake_openai, reply.state)


@pytest.mark.parametrize(
    "failure",
    [fails(500, "x" * 900_000), Completion([{"content": "Hi"}], error={"message": "x" * 900_000})],
    ids=["an-error-status", "an-error-in-the-stream"],
)
def test_a_model_servers_endless_error_text_is_cut_to_2000_characters(
    client: httpx.Client, fake_openai: FakeOpenAI, failure: Completion
) -> None:
    fake_openai.script = [failure]
    reply = send(client, {"commands": [user_says("hi")], "state": None})
    (error,) = reply.errors
    assert error.startswith(("The model server answered 500: xxx", "The model request failed: xxx"))
    assert len(error) == 2000, "the README's cap on an error the user reads"
    assert reply.messages[1]["status"]["error"] == error
    goes_on(client, fake_openai, reply.state)


def test_a_long_line_in_small_pieces_costs_what_short_lines_do(
    server: Server, client: httpx.Client, fake_openai: FakeOpenAI
) -> None:
    # 1 MB of lines the client skips (SSE comments), in 200-byte pieces: one long line, or 5,000 short ones.
    long_line = b": " + b"x" * 999_997 + b"\n"
    short_lines = (b": " + b"x" * 197 + b"\n") * 5000

    def cpu(raw: bytes) -> float:
        fake_openai.script = [Completion([{"content": "ok"}], raw=raw, raw_piece=200)]
        before = server.cpu_seconds()
        assert chat(client, None, user_says("hi")).messages[1]["content"] == "ok"
        return server.cpu_seconds() - before

    short, long = cpu(short_lines), cpu(long_line)
    print(f"the server's CPU for 1 MB in 200-byte pieces: short lines {short:.2f} s, one long line {long:.2f} s")
    assert long < 2 * short + 0.1, "each piece of a long line made the server read the whole line again"


def test_unreachable_model_server_becomes_an_error_frame(
    client: httpx.Client, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    assert app.model_client is not None, "the fake_openai fixture set it"
    unreachable = app.model_client.with_options(base_url=f"http://127.0.0.1:{port}/v1")  # the same aiohttp client
    monkeypatch.setattr(app, "model_client", unreachable)
    reply = send(client, {"commands": [user_says("hi")], "state": None})
    (error,) = reply.errors
    assert error.startswith("The model request failed: ")
    assert f"Cannot connect to host 127.0.0.1:{port}" in error, "the words that say what went wrong"
    assert text(reply.messages[0]) == "hi"


def test_disconnect_closes_the_upstream_request_within_a_second(
    server: Server, client: httpx.Client, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script = [says(*["token "] * 200, delay=0.05)]
    baseline = server.task_count()
    with client.stream("POST", "/assistant", json={"commands": [user_says("talk")], "state": None}) as response:
        for chunk in response.iter_raw():
            if b"append-text" in chunk:
                break
    client.close()
    closed_at = time.monotonic()
    assert wait_until(lambda: fake_openai.disconnected_at is not None, 2), "the upstream request was never closed"
    assert fake_openai.disconnected_at is not None
    print(f"disconnect to upstream close: {(fake_openai.disconnected_at - closed_at) * 1000:.0f} ms")
    assert fake_openai.disconnected_at - closed_at < 1
    assert wait_until(lambda: server.task_count() == baseline, 1), "a task outlived the disconnected stream"


def test_a_hung_model_server_is_reported_within_the_timeout_setting(
    fake_openai_server: tuple[FakeOpenAI, Server],
) -> None:
    fake, running = fake_openai_server
    fake.requests, fake.script = [], [Completion(head_delay=3), Completion(head_delay=3)]
    with app_process(
        ["app.py"],
        OPENAI_API_KEY="sk-env",
        OPENAI_BASE_URL=f"{running.url}/v1",
        OPENAI_TIMEOUT="0.5",
        OPENAI_MAX_RETRIES="1",
    ) as http:
        started = time.monotonic()
        reply = send(http, {"commands": [user_says("hello")], "state": None})
        elapsed = time.monotonic() - started
    (error,) = reply.errors
    assert error.startswith("The model request failed: Request timed out."), error
    assert len(fake.requests) == 2, "one retry, as OPENAI_MAX_RETRIES says"
    assert elapsed < 2.5, f"two 0.5 s attempts took {elapsed:.1f} s"


def test_a_client_that_stops_reading_costs_no_more_than_the_requests_200000_bytes(
    fake_openai_server: tuple[FakeOpenAI, Server],
) -> None:
    fake, running = fake_openai_server
    fake.script, fake.sent_bytes = [says(*["x" * 65536] * 1600)], 0  # 105 MB of reply, as fast as it goes
    port = free_port()
    env = {**os.environ, "PORT": str(port), "OPENAI_API_KEY": "sk-env", "OPENAI_BASE_URL": f"{running.url}/v1"}
    process = subprocess.Popen([sys.executable, "app.py"], cwd=HERE, env=env, stderr=subprocess.DEVNULL)

    def rss_mb() -> float:
        status = Path(f"/proc/{process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024

    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert wait_until(lambda: answers(http), 20)
            before = rss_mb()
            with http.stream("POST", "/assistant", json={"commands": [user_says("talk")], "state": None}) as response:
                # The stream started; now the client reads no more. (Keep the iterator: once collected,
                # it would close the connection.)
                unread = response.iter_raw()
                next(unread)
                time.sleep(2)
                grown, sent = rss_mb() - before, fake.sent_bytes
    finally:
        process.terminate()
        process.wait(timeout=10)
    print(f"the model sent {sent / 1e6:.1f} of 105 MB; the server grew {grown:.1f} MB")
    assert sent < 25e6, "the model was read on while the client read nothing"
    assert grown < 30, "the server buffered what its client did not take"


@pytest.fixture(scope="session")
def keyed_app(
    tmp_path_factory: pytest.TempPathFactory, fake_openai_server: tuple[FakeOpenAI, Server]
) -> Iterator[AppClient]:
    """python app.py with a key, a model and a model server of the environment's, and its log."""
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    with app_process(
        ["app.py"],
        log=log,
        OPENAI_API_KEY="sk-env-secret",
        OPENAI_BASE_URL=f"{fake_openai_server[1].url}/v1",
        OPENAI_MODEL="local-model",
        CORS_ORIGINS="http://localhost:5173",
    ) as http:
        http.log = log
        yield http


def test_startup_logs_what_is_active_and_no_secret(keyed_app: AppClient) -> None:
    line = next(line for line in keyed_app.log.read_text().splitlines() if "Agent:" in line)
    assert "Agent: openai, model local-model; server tools: get_current_time; data-stream; " in line
    assert "; CORS_ORIGINS=http://localhost:5173; " in line
    assert "ALLOWED_HOSTS=localhost,127.0.0.1,[::1]" in line
    assert "sk-env-secret" not in keyed_app.log.read_text()


def test_openai_settings_choose_the_agent(keyed_app: AppClient, fake_openai_server: tuple[FakeOpenAI, Server]) -> None:
    fake, _ = fake_openai_server
    fake.script = [says("Hi", " there")]
    assert keyed_app.get("/health").json() | {"version": None} == {
        "status": "healthy",
        "service": "assistant-transport-backend-django",
        "version": None,
        "agent": "openai",
        "model": "local-model",
        "protocol": "data-stream",
    }
    reply = chat(keyed_app, None, user_says("hello"))
    assert reply.messages[1]["content"] == "Hi there"
    assert fake.requests[-1]["model"] == "local-model"
    assert fake.authorizations[-1] == "Bearer sk-env-secret"


def test_an_error_that_quotes_the_key_shows_its_name_instead(
    keyed_app: AppClient, fake_openai_server: tuple[FakeOpenAI, Server]
) -> None:
    fake, _ = fake_openai_server
    fake.script = [fails(401, "The proxy refused Authorization: {authorization}")]
    reply = send(keyed_app, {"commands": [user_says("hi")], "state": None})
    assert fake.authorizations[-1] == "Bearer sk-env-secret", "the model server did get the key"
    assert reply.errors == ["The model server answered 401: The proxy refused Authorization: Bearer [OPENAI_API_KEY]"]
    assert "sk-env-secret" not in reply.body


# --- Server tools: Python the model calls, run in the backend; and reasoning ------------------------


class OrderNumber(BaseModel):
    """Look up an order by its number."""

    number: int


@dataclass
class ToolLog:
    """What the test's own server tools saw: the calls that started, and those cancelled."""

    started: list[int] = field(default_factory=list)
    cancelled_at: list[float] = field(default_factory=list)
    build_seconds: list[float] = field(default_factory=list)
    at_once: int = 0
    most_at_once: int = 0


@pytest.fixture
def tools(monkeypatch: pytest.MonkeyPatch) -> ToolLog:
    """Server tools declared as a user declares them, beside get_current_time."""
    log, partner = ToolLog(), asyncio.Event()

    async def lookup_order(arguments: OrderNumber) -> Json:
        log.started.append(arguments.number)
        if arguments.number < 100:  # numbers under 100 wait until a second call has started
            if len(log.started) == 2:
                partner.set()
            await partner.wait()
        return {"order": arguments.number, "state": "shipped"}

    async def slow_order(arguments: OrderNumber) -> Json:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            log.cancelled_at.append(time.monotonic())
            raise
        return {"order": arguments.number}

    def sync_order(arguments: OrderNumber) -> Json:
        log.started.append(arguments.number)
        time.sleep(arguments.number / 1000)
        if arguments.number == 13:
            raise LookupError(f"No order {arguments.number}")
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no event loop in this thread: the server's loop runs on meanwhile
            return {"order": arguments.number, "on_event_loop": False}
        return {"order": arguments.number, "on_event_loop": True}

    def odd_order(arguments: OrderNumber) -> Json:  # what a clumsy tool may do or return, by number
        log.started.append(arguments.number)
        if arguments.number == 1:
            argparse.ArgumentParser().parse_args(["--zone", "Atlantis"])  # exits, as argparse does on bad input
        if arguments.number == 2:
            raise KeyboardInterrupt
        if arguments.number == 7:
            return next(iter([]))  # StopIteration, which asyncio will not carry in a future
        if arguments.number == 8:
            raise FileNotFoundError("/srv/caf\udce9.txt")  # a path decoded with surrogateescape
        return {3: "x" * 1_000_000, 4: nested(190), 5: "half an emoji: \ud83d", 6: Receipt(order=6)}[arguments.number]

    async def odd_async_order(arguments: OrderNumber) -> Json:
        if arguments.number == 1:
            raise asyncio.CancelledError  # as a tool whose own inner task was cancelled would
        try:  # number 2 ignores its cancellation, and answers late
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(1)
        log.started.append(arguments.number)
        return {"order": arguments.number, "late": True}

    counting = threading.Lock()

    def counted_order(arguments: OrderNumber) -> Json:  # notes how many of these run at once
        with counting:
            log.at_once += 1
            log.most_at_once = max(log.most_at_once, log.at_once)
        time.sleep(0.2)
        with counting:
            log.at_once -= 1
        return {"order": arguments.number}

    def sized_order(arguments: OrderNumber) -> Json:  # a result of about this many kilobytes
        return "x" * (arguments.number * 1000)

    def crowded_order(arguments: OrderNumber) -> Json:  # a result far over TOOL_RESULT_LIMIT, in small pieces
        started = time.perf_counter()
        items = [{"n": n} for n in range(2_000_000)]
        log.build_seconds.append(time.perf_counter() - started)
        return items

    async def crowded_async_order(arguments: OrderNumber) -> Json:
        return crowded_order(arguments)

    for function in (
        lookup_order,
        slow_order,
        sync_order,
        odd_order,
        odd_async_order,
        sized_order,
        counted_order,
        crowded_order,
        crowded_async_order,
    ):
        monkeypatch.setitem(app.SERVER_TOOLS, function.__name__, (OrderNumber, function))
    return log


class Receipt(BaseModel):
    """A tool's result as a pydantic model, which notes the thread that turns it into JSON."""

    order: int

    @model_serializer
    def serialize(self) -> dict[str, Any]:
        return {"order": self.order, "serialized_in": threading.current_thread().name}


def order(call_id: str, name: str, number: int) -> tuple[str, str, list[str]]:
    return call_id, name, ['{"num', f'ber": {number}}}']


def test_the_mock_answers_the_time_question_in_one_request(client: httpx.Client, protocol: str) -> None:
    reply = chat(client, None, user_says("What time is it in Tokyo?"), protocol=protocol)
    assert reply.kinds == ["human", "ai", "tool", "ai"], "the backend ran the tool and answered, all in one request"
    asked, answer, closing = reply.messages[1:]
    assert asked["tool_calls"][0]["args"] == {"timezone": "Asia/Tokyo"}
    assert answer["name"] == "get_current_time"
    assert answer["status"] == "success"
    assert answer["tool_call_id"] == asked["tool_calls"][0]["id"]
    now_in_tokyo = datetime.fromisoformat(answer["content"]["time"])
    assert now_in_tokyo.utcoffset() == timedelta(hours=9)
    assert abs(now_in_tokyo - datetime.now(UTC)) < timedelta(minutes=1)
    assert closing["content"] == f"get_current_time answered: {json.dumps(answer['content'])}"


@pytest.mark.parametrize(
    ("question", "name", "arguments"),
    [
        ("What's the weather for Oslo?", "get_weather", {"location": "Oslo"}),
        ("Is the weather fine at Lake Tahoe today?", "get_weather", {"location": "Lake Tahoe"}),
        ("How is the weather?", "get_weather", {"location": "San Francisco"}),
        ("What time is it in New York?", "get_current_time", {"timezone": "America/New_York"}),
        ("What time is it?", "get_current_time", {"timezone": "UTC"}),
    ],
)
def test_the_mock_reads_the_place_after_in_for_or_at(
    client: httpx.Client, question: str, name: str, arguments: Json
) -> None:
    (call, *_) = calls(chat(client, None, user_says(question)).state)
    assert (call["name"], call["args"]) == (name, arguments), "the README's choices"


def test_a_time_zone_that_does_not_exist_is_an_error_the_model_reads(client: httpx.Client) -> None:
    reply = chat(client, None, user_says("What time is it in Atlantis?"))
    assert reply.kinds == ["human", "ai", "tool", "ai"]
    assert reply.messages[2]["status"] == "error"
    message = "get_current_time failed: ZoneInfoNotFoundError: 'No time zone found with key Atlantis'"
    assert reply.messages[2]["content"] == message
    assert reply.messages[3]["content"] == f"get_current_time answered: {message}", "the model reads what it raised"


def test_the_mock_runs_the_server_tool_and_leaves_the_frontend_tool_to_the_browser(client: httpx.Client) -> None:
    asked = chat(client, None, user_says("What are the weather and the time in Paris?"))
    assert asked.kinds == ["human", "ai", "tool"], "the run stops for the browser's tool"
    weather, time_call = asked.messages[1]["tool_calls"]
    assert (weather["name"], weather["args"]) == ("get_weather", {"location": "Paris"})
    assert asked.messages[2]["tool_call_id"] == time_call["id"]
    assert asked.messages[2]["content"]["timezone"] == "Europe/Paris"
    answered = chat(client, asked.state, tool_result(weather["id"], {"temperature": 9}))
    assert answered.kinds == ["human", "ai", "tool", "tool", "ai"]
    assert answered.messages[-1]["content"] == 'get_weather answered: {"temperature": 9}'


def test_server_tool_steps_run_until_the_model_answers_in_text(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [
        calls_tools(("call_1", "get_current_time", ['{"timezone":', ' "Asia/Tokyo"}'])),
        calls_tools(("call_2", "get_current_time", ['{"timezone": "Europe/Paris"}'])),
        says("Tokyo is", " 8 hours ahead of Paris."),
    ]
    reply = chat(client, None, user_says("How far ahead of Paris is Tokyo?"))
    assert reply.kinds == ["human", "ai", "tool", "ai", "tool", "ai"]
    assert reply.messages[-1]["content"] == "Tokyo is 8 hours ahead of Paris."
    assert len(fake_openai.requests) == 3, "one request to the backend, three steps of the model"
    for step, zone in enumerate(["Asia/Tokyo", "Europe/Paris"], start=1):
        call, result = reply.messages[2 * step - 1]["tool_calls"][0], reply.messages[2 * step]
        assert (result["tool_call_id"], result["status"], result["content"]["timezone"]) == (
            call["id"],
            "success",
            zone,
        )
        read = fake_openai.requests[step]["messages"][-1]
        assert read == {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result["content"])}


def test_two_server_tools_in_one_step_run_side_by_side(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each of the two calls waits until the other has started: run one after the other, the first times out.
    monkeypatch.setattr(app.config, "TOOL_TIMEOUT", 2)
    fake_openai.script = [
        calls_tools(order("call_a", "lookup_order", 7), order("call_b", "lookup_order", 8)),
        says("Both shipped."),
    ]
    reply = chat(client, None, user_says("Where are orders 7 and 8?"))
    assert sorted(tools.started) == [7, 8]
    assert reply.kinds == ["human", "ai", "tool", "tool", "ai"]
    assert [(m["tool_call_id"], m["content"]) for m in reply.messages[2:4]] == [
        (calls(reply.state)[0]["id"], {"order": 7, "state": "shipped"}),
        (calls(reply.state)[1]["id"], {"order": 8, "state": "shipped"}),
    ]
    assert [m["role"] for m in fake_openai.requests[1]["messages"]] == ["user", "assistant", "tool", "tool"]


def test_a_server_tool_and_a_frontend_tool_in_one_step(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [
        calls_tools(("call_t", "get_current_time", ['{"timezone": "UTC"}']), ("call_w", "get_weather", ["{}"])),
        says("Noon and sunny."),
    ]
    weather = {"get_weather": {"description": "Weather", "parameters": {"type": "object"}}}
    asked = chat(client, None, user_says("Time and weather?"), tools=weather)
    time_call, weather_call = (call["id"] for call in calls(asked.state))
    assert asked.kinds == ["human", "ai", "tool"], "the server tool ran; the browser's tool is left to the browser"
    assert asked.messages[2]["tool_call_id"] == time_call
    assert len(fake_openai.requests) == 1, "the model waits for the browser's result"
    answered = chat(client, asked.state, tool_result(weather_call, {"sky": "sunny"}), tools=weather)
    assert answered.messages[-1]["content"] == "Noon and sunny."
    assert [m.get("tool_call_id") for m in fake_openai.requests[1]["messages"][-2:]] == [time_call, weather_call]


def test_a_server_tool_that_raises_gives_the_model_an_error_result(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog
) -> None:
    fake_openai.script = [calls_tools(order("call_x", "sync_order", 13)), says("There is no order 13.")]
    reply = chat(client, None, user_says("Where is order 13?"))
    failed = reply.messages[2]
    assert (failed["status"], failed["content"]) == ("error", "sync_order failed: LookupError: No order 13")
    assert fake_openai.requests[1]["messages"][-1]["content"] == "Error: sync_order failed: LookupError: No order 13"
    assert reply.messages[-1]["content"] == "There is no order 13."


def test_server_tool_arguments_its_model_refuses_give_an_error_result(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog
) -> None:
    fake_openai.script = [calls_tools(("call_x", "sync_order", ['{"number": "seven"}'])), says("Which order?")]
    reply = chat(client, None, user_says("Where is order seven?"))
    failed = reply.messages[2]
    assert failed["status"] == "error"
    assert failed["content"].startswith(
        "sync_order failed: ValidationError: 1 validation error for OrderNumber\nnumber"
    )
    assert tools.started == [], "the tool never ran on arguments its model refused"
    assert reply.messages[-1]["content"] == "Which order?"


def test_a_sync_server_tool_runs_off_the_event_loop(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog
) -> None:
    fake_openai.script = [calls_tools(order("call_s", "sync_order", 5)), says("Found it.")]
    reply = chat(client, None, user_says("Where is order 5?"))
    assert reply.messages[2]["status"] == "success"
    assert reply.messages[2]["content"] == {"order": 5, "on_event_loop": False}


@pytest.mark.parametrize("name", ["slow_order", "sync_order"])
def test_a_server_tool_past_its_time_gives_an_error_result(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr(app.config, "TOOL_TIMEOUT", 0.2)
    fake_openai.script = [calls_tools(order("call_s", name, 900)), says("It is taking too long.")]
    started = time.monotonic()
    reply = chat(client, None, user_says("Where is order 900?"))
    assert time.monotonic() - started < 0.9, "the model was kept waiting past the tool's time"
    failed = reply.messages[2]
    assert failed["status"] == "error"
    assert failed["content"] == f"{name} did not finish within TOOL_TIMEOUT (0.2 seconds)"
    assert reply.messages[-1]["content"] == "It is taking too long."
    if name == "slow_order":
        assert len(tools.cancelled_at) == 1, "an async tool past its time is cancelled"


@pytest.mark.parametrize(
    ("name", "number", "raised"),
    [
        ("odd_order", 1, "SystemExit: 2"),
        ("odd_order", 2, "KeyboardInterrupt: "),
        ("odd_order", 7, "RuntimeError: coroutine raised StopIteration"),
        ("odd_order", 8, "FileNotFoundError: /srv/caf?.txt"),
        ("odd_async_order", 1, "CancelledError: "),
    ],
    ids=["system-exit", "keyboard-interrupt", "stop-iteration", "a-lone-surrogate", "cancelled-error"],
)
def test_whatever_a_tool_raises_is_an_error_result_and_the_server_lives_on(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog, name: str, number: int, raised: str
) -> None:
    fake_openai.script = [calls_tools(order("call_x", name, number)), says("That went wrong.")]
    reply = chat(client, None, user_says(f"Where is order {number}?"))
    assert reply.messages[2]["status"] == "error"
    assert reply.messages[2]["content"] == f"{name} failed: {raised}"
    assert reply.messages[-1]["content"] == "That went wrong.", "the run went on to the model's answer"
    assert client.get("/health").status_code == 200
    goes_on(client, fake_openai, reply.state)


def test_an_async_tool_that_ignores_its_cancellation_is_left_behind(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.config, "TOOL_TIMEOUT", 0.2)
    fake_openai.script = [calls_tools(order("call_s", "odd_async_order", 2)), says("It is taking too long.")]
    started = time.monotonic()
    reply = chat(client, None, user_says("Where is order 2?"))
    assert time.monotonic() - started < 0.9, "the run waited for a tool that ignored its cancellation"
    assert reply.messages[2]["content"] == "odd_async_order did not finish within TOOL_TIMEOUT (0.2 seconds)"
    assert wait_until(lambda: tools.started == [2], 3), "the tool answered late, as it was written to"
    assert reply.messages[-1]["content"] == "It is taking too long.", "its late answer was never stored"


def test_a_tool_result_past_the_limit_is_an_error_result_the_model_reads(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog
) -> None:
    fake_openai.script = [calls_tools(order("call_b", "odd_order", 3)), says("Too big.")]
    reply = chat(client, None, user_says("Where is order 3?"))
    message = "odd_order failed: ValueError: more than 100000 bytes of JSON"  # TOOL_RESULT_LIMIT's default
    assert (reply.messages[2]["status"], reply.messages[2]["content"]) == ("error", message)
    assert fake_openai.requests[1]["messages"][-1]["content"] == f"Error: {message}"


@pytest.mark.parametrize("name", ["crowded_order", "crowded_async_order"])
def test_a_result_far_over_the_limit_is_stopped_there_not_serialized_whole(
    server: Server, client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog, name: str
) -> None:
    fake_openai.script = [calls_tools(order("call_c", name, 1)), says("Too many.")]
    replies: list[Reply] = []
    stall = longest_stall(server, lambda: replies.append(chat(client, None, user_says("All the orders?"))))
    (built,) = tools.build_seconds
    print(f"{name}: building 2,000,000 items took {built * 1000:.0f} ms; the longest stall {stall * 1000:.0f} ms")
    # The tool's own work may hold the loop: building the list (on the loop, for an async tool) and freeing
    # it (which Python does in one go, even in the sync tool's thread). Turning all of it into JSON, as the
    # whole result was before (0.6 to 2.5 s), must not add to that.
    assert stall < (2 * built + 0.15 if name == "crowded_async_order" else built + 0.15)
    assert replies[0].messages[2]["content"] == f"{name} failed: ValueError: more than 100000 bytes of JSON"


def test_a_sync_tools_result_becomes_json_in_its_worker_thread(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog
) -> None:
    fake_openai.script = [calls_tools(order("call_r", "odd_order", 6)), says("Found it.")]
    reply = chat(client, None, user_says("Where is order 6?"))
    assert reply.messages[2]["content"]["order"] == 6
    assert reply.messages[2]["content"]["serialized_in"].startswith("server-tool"), "not on the event loop"


@pytest.mark.parametrize(
    ("number", "status", "content"),
    [
        (4, "error", "odd_order failed: ValueError: recursion limit exceeded"),
        (5, "success", "half an emoji: ?"),
    ],
    ids=["nested-too-deep", "a-lone-surrogate"],
)
def test_a_tool_result_the_next_request_could_not_read_never_reaches_the_state(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog, number: int, status: str, content: str
) -> None:
    fake_openai.script = [calls_tools(order("call_o", "odd_order", number)), says("Here it is.")]
    reply = chat(client, None, user_says(f"Where is order {number}?"))
    assert reply.messages[2]["status"] == status
    assert reply.messages[2]["content"].startswith(content)
    goes_on(client, fake_openai, reply.state)


def test_a_tool_result_refused_for_the_requests_limit_counts_only_as_its_error(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog
) -> None:
    # Three results of 90 kB each: two fit the request's 200,000 bytes, the third is refused, and the model's
    # answer still fits, since the refused one counts as the error that is stored in its place.
    fake_openai.script = [calls_tools(*(order(f"call_{n}", "sized_order", 90) for n in range(3))), says("Two of 3.")]
    reply = chat(client, None, user_says("Orders of 90 kB?"))
    assert [message["status"] for message in reply.messages[2:5]] == ["success", "success", "error"]
    assert reply.messages[4]["content"] == "sized_order answered more than the reply may hold (200000 bytes)"
    assert reply.messages[-1]["content"] == "Two of 3."


def test_the_limit_holds_for_all_of_a_requests_steps_together(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog
) -> None:
    # Two results of 90 kB in two steps, then 30 kB of text: each step fits 200,000 bytes, the request does not.
    fake_openai.script = [
        calls_tools(order("call_1", "sized_order", 90)),
        calls_tools(order("call_2", "sized_order", 90)),
        says("y" * 30_000),
    ]
    reply = send(client, {"commands": [user_says("Two big orders")], "state": None})
    assert reply.errors == ["The model request failed: The reply passed 200000 bytes"]


def test_one_requests_sync_tools_run_4_at_a_time(client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog) -> None:
    fake_openai.script = [calls_tools(*(order(f"call_{n}", "counted_order", n) for n in range(8))), says("Done.")]
    reply = chat(client, None, user_says("Eight orders"))
    assert [message["status"] for message in reply.messages[2:10]] == ["success"] * 8
    assert tools.most_at_once == 4, "the README: TOOL_THREADS, 4"


def test_one_users_slow_sync_tools_never_make_another_users_wait(
    server: Server, fake_openai: FakeOpenAI, tools: ToolLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.config, "TOOL_TIMEOUT", 3)
    slow = [order(f"call_{n}", "sync_order", 1500) for n in range(40)]  # 1.5 s each: more than any shared pool
    fake_openai.script = [calls_tools(*slow)]

    def busy_user() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            chat(http, None, user_says("All my orders, slowly"))

    first = threading.Thread(target=busy_user)
    first.start()
    assert wait_until(lambda: len(tools.started) >= 4, 5), "the first user's tools did not start"
    fake_openai.script = [calls_tools(order("call_q", "sync_order", 5)), says("Order 5 is here.")]
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        reply = chat(http, None, user_says("Where is order 5?"))
    waited = time.monotonic() - started
    first.join(timeout=30)
    assert reply.messages[2]["content"] == {"order": 5, "on_event_loop": False}
    print(f"the second user's quick tool answered in {waited * 1000:.0f} ms")
    assert waited < 1, "the second user's tool waited for the first user's threads"


def test_the_step_bound_ends_the_run_with_a_readable_error(
    client: httpx.Client, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.config, "MAX_MODEL_STEPS", 2)
    fake_openai.script = [calls_tools((f"call_{n}", "get_current_time", ['{"timezone": "UTC"}'])) for n in range(3)]
    reply = send(client, {"commands": [user_says("Keep asking the time")], "state": None})
    message = "The model request failed: The model still called tools after 2 steps (MAX_MODEL_STEPS)"
    assert reply.errors == [message]
    assert len(fake_openai.requests) == 2
    assert reply.kinds == ["human", "ai", "tool", "ai", "tool"], "every step so far is kept"
    assert reply.messages[3]["status"] == {"type": "incomplete", "reason": "error", "error": message}
    assert "status" not in reply.messages[1]
    again = chat(client, reply.state, user_says("Just tell me"))
    assert again.messages[-1]["content"] == "ok", "the conversation goes on"


@pytest.mark.parametrize("spelling", ["reasoning_content", "reasoning"])
def test_reasoning_streams_into_a_reasoning_part_and_never_back_to_the_model(
    client: httpx.Client, fake_openai: FakeOpenAI, spelling: str
) -> None:
    thinking = [{spelling: "The user"}, {spelling: " greets me."}, {spelling: " I greet back."}]
    fake_openai.script = [Completion([{"role": "assistant", "content": ""}, *thinking, {"content": "Hello!"}])]
    reply = chat(client, None, user_says("hi"))
    summary = reply.messages[1]["additional_kwargs"]["reasoning"]["summary"]
    assert summary == [{"type": "summary_text", "text": "The user greets me. I greet back."}]
    assert appended(reply, "text") == ["The user", " greets me.", " I greet back."]
    assert reply.messages[1]["content"] == "Hello!"
    chat(client, reply.state, user_says("how are you?"))
    assert fake_openai.requests[1]["messages"][1] == {"role": "assistant", "content": "Hello!"}


def test_a_frontend_tool_named_like_a_server_tool_gives_way(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog
) -> None:
    frontend = {"lookup_order": {"description": "The browser's lookup", "parameters": {"type": "object"}}}
    fake_openai.script = [calls_tools(order("call_o", "lookup_order", 100)), says("Shipped.")]
    reply = chat(client, None, user_says("Where is order 100?"), tools=frontend)
    chat(client, reply.state, user_says("thanks"), tools=frontend)
    offered = [tool["function"] for tool in fake_openai.requests[0]["tools"]]
    assert [tool.get("description") for tool in offered if tool["name"] == "lookup_order"] == [
        "Look up an order by its number."
    ]
    assert reply.messages[2]["content"] == {"order": 100, "state": "shipped"}, "the server ran it"


def test_disconnect_during_a_server_tool_cancels_it_within_a_second(
    server: Server, client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog
) -> None:
    fake_openai.script = [calls_tools(order("call_s", "slow_order", 1))]
    baseline = server.task_count()
    with client.stream("POST", "/assistant", json={"commands": [user_says("Order 1?")], "state": None}) as response:
        for chunk in response.iter_raw():
            if b'"args"' in chunk and b'"number": 1' in chunk:
                break
    client.close()
    closed_at = time.monotonic()
    assert wait_until(lambda: bool(tools.cancelled_at), 2), "the tool ran on after its client left"
    print(f"disconnect to tool cancelled: {(tools.cancelled_at[0] - closed_at) * 1000:.0f} ms")
    assert tools.cancelled_at[0] - closed_at < 1
    assert wait_until(lambda: server.task_count() == baseline, 1), "a task outlived the disconnected stream"


def test_model_errors_show_on_the_failed_ai_message(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [fails(429, "Rate limit reached for requests")]
    reply = send(client, {"commands": [user_says("hi")], "state": None})
    message = "The model server answered 429: Rate limit reached for requests"
    assert reply.errors == [message]
    assert reply.messages[1]["status"] == {"type": "incomplete", "reason": "error", "error": message}


def piece(index: int | None = 0, call_id: Json = None, name: Json = None, arguments: Json = None) -> Json:
    """One streamed piece of a tool call, with only the fields given (as servers other than OpenAI send them)."""
    function = {key: value for key, value in (("name", name), ("arguments", arguments)) if value is not None}
    fields = (("index", index), ("id", call_id), ("function", function or None))
    return {"tool_calls": [{key: value for key, value in fields if value is not None}]}


def goes_on(client: httpx.Client, fake: FakeOpenAI, state: Json) -> Reply:
    """The next message on a thread: the server accepts the state it wrote, and the model answers."""
    fake.script = [says("Still here.")]
    reply = chat(client, state, user_says("and now?"))
    assert reply.messages[-1]["content"] == "Still here."
    return reply


@pytest.mark.parametrize("index", [0, None], ids=["all-at-index-0", "no-index"])
def test_parallel_calls_at_one_index_are_told_apart_by_their_ids(
    client: httpx.Client, fake_openai: FakeOpenAI, index: int | None
) -> None:
    tokyo, paris = '{"timezone": "Asia/Tokyo"}', '{"timezone": "Europe/Paris"}'
    both = [piece(index, "call_a", "get_current_time", tokyo), piece(index, "call_b", "get_current_time", paris)]
    fake_openai.script = [Completion(both, finish_reason="tool_calls"), says("Both answered.")]
    reply = chat(client, None, user_says("Time in Tokyo and Paris?"))
    assert reply.kinds == ["human", "ai", "tool", "tool", "ai"], "as Ollama streams them: two calls, not one"
    assert [call["args"] for call in calls(reply.state)] == [{"timezone": "Asia/Tokyo"}, {"timezone": "Europe/Paris"}]
    assert [message["status"] for message in reply.messages[2:4]] == ["success", "success"]


def test_a_model_that_reuses_its_call_ids_every_turn_keeps_each_turns_result(
    client: httpx.Client, fake_openai: FakeOpenAI
) -> None:
    weather = {"get_weather": {"description": "Weather", "parameters": {"type": "object"}}}
    fake_openai.script = [calls_tools(("call_0", "get_weather", ['{"location": "Oslo"}'])), says("21 in Oslo.")]
    first = chat(client, None, user_says("Weather in Oslo?"), tools=weather)
    first = chat(client, first.state, tool_result(calls(first.state)[0]["id"], {"temperature": 21}), tools=weather)
    fake_openai.script = [calls_tools(("call_0", "get_weather", ['{"location": "Nuuk"}'])), says("-5 in Nuuk.")]
    second = chat(client, first.state, user_says("And in Nuuk?"), tools=weather)
    new_call = calls(second.state)[-1]
    assert new_call["id"] != calls(first.state)[0]["id"], "each call in the thread has an id of its own"
    answered = chat(client, second.state, tool_result(new_call["id"], {"temperature": -5}), tools=weather)
    results = [message["content"] for message in answered.messages if message["type"] == "tool"]
    assert results == [{"temperature": 21}, {"temperature": -5}], "the new result answered the new call"
    assert answered.messages[-1]["content"] == "-5 in Nuuk."


def test_a_server_call_and_a_browser_call_with_one_id_are_two_calls(
    client: httpx.Client, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script = [
        calls_tools(("call_0", "get_current_time", ['{"timezone": "UTC"}']), ("call_0", "get_weather", ["{}"]))
    ]
    weather = {"get_weather": {"description": "Weather", "parameters": {"type": "object"}}}
    asked = chat(client, None, user_says("Time and weather?"), tools=weather)
    time_call, weather_call = calls(asked.state)
    assert time_call["id"] != weather_call["id"]
    assert asked.kinds == ["human", "ai", "tool"], "the browser's get_weather is still to run"
    assert asked.messages[2]["tool_call_id"] == time_call["id"]


def test_pieces_that_carry_an_empty_id_and_name_go_on_with_their_call(
    client: httpx.Client, fake_openai: FakeOpenAI
) -> None:
    # As DashScope streams Qwen's calls: the pieces after the first carry "id": "" and "name": "".
    pieces = [piece(0, "call_w", "get_weather", '{"loc'), piece(0, "", "", 'ation": '), piece(0, "", "", '"Lima"}')]
    fake_openai.script = [Completion(pieces, finish_reason="tool_calls")]
    reply = chat(client, None, user_says("Weather in Lima?"))
    assert [(call["name"], call["args"]) for call in calls(reply.state)] == [("get_weather", {"location": "Lima"})]


@pytest.mark.parametrize(
    "pieces",
    [
        [piece(0, "call_w", "get_", ""), piece(0, None, "weather", '{"location": "Lima"}')],
        [piece(0, "call_w"), piece(0, None, "get_weather"), piece(0, None, None, '{"location": "Lima"}')],
        [{"tool_calls": [{"index": 0, "id": "call_w", "function": None}]}, piece(0, None, "get_weather", "{}")],
    ],
    ids=["in-two-pieces", "on-a-later-piece", "after-function-null"],
)
def test_a_tool_name_may_arrive_in_pieces(client: httpx.Client, fake_openai: FakeOpenAI, pieces: list[Json]) -> None:
    fake_openai.script = [Completion(pieces, finish_reason="tool_calls")]
    reply = chat(client, None, user_says("Weather in Lima?"))
    assert [call["name"] for call in calls(reply.state)] == ["get_weather"]


@pytest.mark.parametrize("name", [None, 7, {"name": "get_weather"}], ids=["none", "a-number", "an-object"])
def test_a_call_with_no_name_is_an_error_the_user_reads_and_the_thread_goes_on(
    client: httpx.Client, fake_openai: FakeOpenAI, name: Json
) -> None:
    fake_openai.script = [Completion([piece(0, 42, name, "{}")], finish_reason="tool_calls")]
    failed = send(client, {"commands": [user_says("Do something")], "state": None})
    assert failed.errors == ["The model request failed: The model called a tool without naming it"]
    assert all(isinstance(call["id"], str) and isinstance(call["name"], str) for call in calls(failed.state))
    goes_on(client, fake_openai, failed.state)
    assert "tool_calls" not in fake_openai.requests[-1]["messages"][1], "the nameless call is not sent back"


def test_a_step_past_100_calls_ends_readably_and_runs_none_of_them(
    client: httpx.Client, fake_openai: FakeOpenAI, tools: ToolLog
) -> None:
    fake_openai.script = [calls_tools(*(order(f"call_{n}", "sync_order", n) for n in range(101)))]
    failed = send(client, {"commands": [user_says("All the orders")], "state": None})
    assert failed.errors == ["The model request failed: The model called more than 100 tools in one step"]
    assert tools.started == [], "no server tool of that step ran"
    goes_on(client, fake_openai, failed.state)


def nested(levels: int) -> Json:
    value: Json = 1
    for _ in range(levels):
        value = [value]
    return value


def test_arguments_nested_too_deep_for_the_next_request_are_refused(
    client: httpx.Client, fake_openai: FakeOpenAI
) -> None:
    arguments = json.dumps({"path": nested(190)})  # the model's parser reads it; in the state it would be 197 deep
    fake_openai.script = [calls_tools(("call_d", "render_map", [arguments]))]
    failed = send(client, {"commands": [user_says("Draw it")], "state": None})
    (error,) = failed.errors
    assert error.startswith("The model request failed: The arguments for render_map are not a JSON object we can keep")
    assert calls(failed.state)[0]["args"] == {}
    goes_on(client, fake_openai, failed.state)


def test_a_lone_surrogate_in_a_model_servers_error_never_bricks_the_thread(
    client: httpx.Client, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script = [fails(400, "bad \ud800 input")]  # the SDK's JSON parser keeps it; the request's refuses it
    failed = send(client, {"commands": [user_says("hi")], "state": None})
    assert failed.errors == ["The model server answered 400: bad ? input"]
    goes_on(client, fake_openai, failed.state)


@pytest.mark.parametrize("field", ["content", "reasoning_content"])
def test_a_lone_surrogate_from_the_model_never_bricks_the_thread(
    client: httpx.Client, fake_openai: FakeOpenAI, field: str
) -> None:
    fake_openai.script = [Completion([{field: "half an emoji: "}, {field: "\ud83d"}, {field: " then more"}])]
    failed = send(client, {"commands": [user_says("Say something odd")], "state": None})
    (error,) = failed.errors
    assert error.startswith("The model request failed: "), "a readable error, not a broken thread"
    goes_on(client, fake_openai, failed.state)


@pytest.mark.parametrize(("reason", "shown"), [("length", "length"), ("content_filter", "content-filter")])
def test_a_reply_the_model_cut_off_is_marked_incomplete(
    client: httpx.Client, fake_openai: FakeOpenAI, reason: str, shown: str
) -> None:
    fake_openai.script = [Completion([{"content": "The answer is"}], finish_reason=reason)]
    reply = chat(client, None, user_says("Tell me everything"))
    assert reply.messages[1]["content"] == "The answer is"
    assert reply.messages[1]["status"] == {"type": "incomplete", "reason": shown}
    goes_on(client, fake_openai, reply.state)


def test_a_finished_reply_carries_no_status(client: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.script = [says("Done.")]
    assert "status" not in chat(client, None, user_says("hi")).messages[1]


def test_a_long_history_never_stalls_other_streams(
    server: Server, client: httpx.Client, fake_openai: FakeOpenAI
) -> None:
    history: list[Json] = []
    for n in range(1500):
        history.append({"id": f"h{n}", "type": "human", "content": [{"type": "text", "text": f"question {n}"}]})
        history.append({"id": f"a{n}", "type": "ai", "content": f"answer {n}, with a few more words", "tool_calls": []})
    fake_openai.script = [says("ok")]
    stall = longest_stall(server, lambda: chat(client, {"messages": history}, user_says("one more")))
    assert len(fake_openai.requests[0]["messages"]) == 3001
    print(f"longest stall of the event loop with 3,000 messages: {stall * 1000:.0f} ms")
    assert stall < 0.25, "the model request for a long history held up every other stream"


def long_thread(turns: int) -> list[Json]:
    """A thread of many turns, each a question and a reply that called the frontend's tool, answered."""
    thread: list[Json] = []
    for n in range(turns):
        call = {"id": f"call_{n}", "name": "get_weather", "args": {}, "partial_json": "{}"}
        thread.append({"id": f"h{n}", "type": "human", "content": [{"type": "text", "text": f"question {n}"}]})
        thread.append({"id": f"a{n}", "type": "ai", "content": "", "tool_calls": [call]})
        thread.append({"id": f"t{n}", "type": "tool", "tool_call_id": f"call_{n}", "name": "get_weather", "content": 1})
    return thread


@pytest.mark.parametrize("kind", ["add-message", "add-tool-result"])
def test_a_hundred_commands_cost_about_what_one_does_on_a_long_thread(
    server: Server, client: httpx.Client, kind: str
) -> None:
    if kind == "add-message":  # 120,000 short messages, 6 MB; each command an edit that names the one before
        state = {"messages": [{"id": f"m{n}", "type": "human", "content": ""} for n in range(120_000)]}
        commands = [user_says(f"message {n}", parent_id=f"m{119_999 + n}") for n in range(100)]
        for n, command in enumerate(commands):
            command["message"]["id"] = f"m{120_000 + n}"
    else:  # 30,000 messages of 10,000 tool rounds, 2.9 MB; each command retries a result
        state = {"messages": long_thread(10_000)}
        commands = [tool_result(f"call_{n}", {"retried": n}) for n in range(100)]

    def cpu(count: int) -> float:  # the event loop's CPU for the request: steadier than time on a busy machine
        before = server.cpu_seconds()
        assert send(client, {"commands": commands[:count], "state": state}).status == 200
        return server.cpu_seconds() - before

    one, hundred = cpu(1), cpu(100)
    print(f"{kind}: the event loop's CPU with one command {one * 1000:.0f} ms, with 100 {hundred * 1000:.0f} ms")
    assert hundred < 1.5 * one + 0.05, "a command's work grew with the thread"


# --- Deploying as the README shows -----------------------------------------------------------


def readmes_deploy(port: int, **changes: str) -> tuple[dict[str, str], list[str]]:
    """The README's deployment: its settings, and its uvicorn command on this port with some flags changed."""
    readme = (HERE / "README.md").read_text()
    start = readme.index("```bash\nALLOWED_HOSTS=chat.example.com")
    words = readme[start + len("```bash\n") : readme.index("```", start + 3)].replace("\\\n", " ").split()
    settings_ = dict(word.split("=", 1) for word in words if "=" in word and not word.startswith("--"))
    command = [word for word in words if "=" not in word or word.startswith("--")]
    assert command[0] == ".venv/bin/uvicorn"
    for flag, value in {"--port": str(port), **changes}.items():
        command[command.index(flag) + 1] = value
    return settings_, [sys.executable, "-m", "uvicorn", *command[1:]]


def test_the_readmes_deploy_command_serves_with_its_workers_hosts_origins_and_proxy(
    tmp_path: Path, fake_openai_server: tuple[FakeOpenAI, Server]
) -> None:
    port, log = free_port(), tmp_path / "server.log"
    settings_, command = readmes_deploy(port)
    env = {**os.environ, **settings_, "OPENAI_BASE_URL": f"{fake_openai_server[1].url}/v1"}
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=HERE, env=env, stdout=output, stderr=output)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Host": "chat.example.com"}, timeout=10
        ) as http:
            assert wait_until(lambda: answers(http), 20), "the server did not start"
            assert http.get("/health").json()["agent"] == "openai"
            assert http.get("/health", headers={"Host": "127.0.0.1"}).status_code == 400, "only the host it names"
            assert preflight(http, "https://app.example.com").headers["access-control-allow-origin"] == (
                "https://app.example.com"
            )
            http.get("/health", headers={"X-Forwarded-For": "203.0.113.7"})  # through the proxy it names
        assert wait_until(lambda: "203.0.113.7" in log.read_text(), 5), "the proxy's X-Forwarded-For was not believed"
        assert wait_until(lambda: log.read_text().count("Started server process") == 4, 10), "four workers"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_past_the_concurrency_limit_uvicorn_answers_503() -> None:
    port = free_port()
    settings_, command = readmes_deploy(port, **{"--workers": "1", "--limit-concurrency": "2"})
    env = {**os.environ, **settings_, "OPENAI_API_KEY": "", "MOCK_DELAY": "0.5"}
    process = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = json.dumps({"commands": [user_says("a slow reply, word by word")]}).encode()
    request = b"POST /assistant HTTP/1.1\r\nHost: chat.example.com\r\nContent-Type: application/json\r\n"
    request += f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Host": "chat.example.com"}) as http:
            assert wait_until(lambda: answers(http), 20), "the server did not start"
        with contextlib.ExitStack() as stack:
            answered = []
            for _ in range(3):  # streams that stay open: the second is past the limit of 2 with the first
                connection = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
                connection.sendall(request)
                answered.append(connection.recv(4096).split(b"\r\n")[0])
        assert answered == [b"HTTP/1.1 200 OK"] + [b"HTTP/1.1 503 Service Unavailable"] * 2
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- Nothing outlives a stream; tool threads bounded; Ctrl+C; WebSockets -------------------------


def test_clients_that_hang_up_leave_no_memory_behind() -> None:
    state = {"messages": [{"id": f"m{n}", "type": "human", "content": "x" * 1000} for n in range(2000)]}  # 2 MB
    body = json.dumps({"commands": [user_says("word " * 100)], "state": state}).encode()
    with app_process(["app.py"], MOCK_DELAY="0.05") as http:

        def hang_up(times: int) -> None:  # read the stream's first line, then go, as Stop or a closed tab does
            for _ in range(times):
                with http.stream("POST", "/assistant", content=body, headers={"Content-Type": "application/json"}) as r:
                    next(r.iter_raw())

        hang_up(10)  # the allocator's pools fill once
        before = status_of(http.process, "VmRSS") / 1024
        hang_up(30)
        time.sleep(1)  # the runs' cancellation ends; no wait for a full garbage collection (that came at 15 s)
        grown = status_of(http.process, "VmRSS") / 1024 - before
    print(f"30 hang-ups with 2 MB states: the server grew {grown:.0f} MB")
    assert grown < 50, "the hang-ups' states were kept"


def test_streams_that_end_leave_no_task_of_this_app_behind(
    server: Server, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def leftovers() -> int:  # tasks that app.py started, done or not, that something still holds
        tasks = [obj for obj in gc.get_objects() if isinstance(obj, asyncio.Task)]
        return sum(task.get_coro().cr_code.co_filename == app.__file__ for task in tasks)  # type: ignore[union-attr]

    gc.collect()
    gc.disable()  # with the collector off, anything a cycle keeps stays where it can be counted
    try:
        before = leftovers()
        for _ in range(30):
            chat(client, None, user_says("hi"))
        monkeypatch.setattr(app.config, "MOCK_DELAY", 0.05)
        for _ in range(10):
            with (
                httpx.Client(base_url=server.url, timeout=10) as http,
                http.stream("POST", "/assistant", json={"commands": [user_says("word " * 50)]}) as response,
            ):
                next(response.iter_raw())
        assert wait_until(lambda: leftovers() == before, 2), f"{leftovers() - before} tasks outlived their streams"
    finally:
        gc.enable()


PAUSE_TOOL = """
class Pause(BaseModel):
    \"\"\"Wait a while, then say so.\"\"\"

    seconds: float


def pause(arguments: Pause) -> str:
    \"\"\"A sync tool that takes its time, as a slow query does.\"\"\"
    import time

    time.sleep(arguments.seconds)
    return "done"


SERVER_TOOLS["pause"] = (Pause, pause)
"""


def with_server_tools(source: str, tools: str) -> str:
    """app.py with these server tools pasted below SERVER_TOOLS, as the README says."""
    line = next(line for line in source.splitlines() if line.startswith("SERVER_TOOLS"))
    return source.replace(f"{line}\n", f"{line}\n\n{tools}\n", 1)


def pausing(seconds: float, calls: int = 1) -> Callable[[Json], Completion]:
    """A model that answers each question with calls to the pause tool, and their results with a sentence."""
    pauses = [(f"call_{n}", "pause", [json.dumps({"seconds": seconds})]) for n in range(calls)]
    return lambda request: calls_tools(*pauses) if request["messages"][-1]["role"] == "user" else says("Slow.")


def test_sync_tool_threads_stay_under_the_process_cap(
    tmp_path: Path, fake_openai_server: tuple[FakeOpenAI, Server]
) -> None:
    fake, running = fake_openai_server
    (tmp_path / "app.py").write_text(with_server_tools((HERE / "app.py").read_text(), PAUSE_TOOL))
    model = f"{running.url}/v1"
    peak = [0]
    try:
        with app_process(
            ["app.py"],
            cwd=tmp_path,
            TOOL_THREADS_TOTAL="6",
            TOOL_TIMEOUT="0.5",
            OPENAI_API_KEY="sk",
            OPENAI_BASE_URL=model,
        ) as http:
            process = http.process

            def many(count: int, hang_up: bool = False) -> list[Reply]:
                replies: list[Reply] = []

                def one() -> None:
                    with httpx.Client(base_url=str(http.base_url), timeout=30) as own:
                        if not hang_up:
                            replies.append(chat(own, None, user_says("Take your time")))
                            return
                        with own.stream("POST", "/assistant", json={"commands": [user_says("Go slow")]}) as r:
                            next(r.iter_raw())
                            time.sleep(0.2)  # its tools have started

                users = [threading.Thread(target=one) for _ in range(count)]
                for user in users:
                    user.start()
                while any(user.is_alive() for user in users):
                    peak[0] = max(peak[0], status_of(process, "Threads"))
                    time.sleep(0.01)
                return replies

            fake.respond = lambda request: says("ok")
            many(12)  # the same load without tools: the threads every server has under it
            baseline = status_of(process, "Threads")
            fake.respond = pausing(1, calls=8)  # 8 calls of 1 s each a request, 4 at once (TOOL_THREADS)
            replies = many(12)
            for _ in range(3):
                many(4, hang_up=True)
            assert peak[0] <= baseline + 6, f"{peak[0] - baseline} threads for 6 at most (TOOL_THREADS_TOTAL)"
            late = "pause did not finish within TOOL_TIMEOUT (0.5 seconds)"
            assert {message["content"] for reply in replies for message in reply.messages[2:-1]} == {late}
            assert wait_until(lambda: status_of(process, "Threads") <= baseline, 5), "idle tool threads were kept"
    finally:
        fake.respond = None


def test_ctrl_c_stops_the_server_at_once_while_a_sync_tool_still_runs(
    tmp_path: Path, fake_openai_server: tuple[FakeOpenAI, Server]
) -> None:
    fake, running = fake_openai_server
    (tmp_path / "app.py").write_text(with_server_tools((HERE / "app.py").read_text(), PAUSE_TOOL))
    fake.respond = pausing(60)
    try:
        with app_process(
            ["app.py"], cwd=tmp_path, TOOL_TIMEOUT="0.5", OPENAI_API_KEY="sk-env", OPENAI_BASE_URL=f"{running.url}/v1"
        ) as http:
            process = http.process
            reply = chat(http, None, user_says("Wait a minute"))
            assert reply.messages[2]["content"] == "pause did not finish within TOOL_TIMEOUT (0.5 seconds)"
            process.send_signal(signal.SIGINT)  # the tool sleeps on in its thread
            started = time.monotonic()
            process.wait(timeout=30)
            stopped_in = time.monotonic() - started
    finally:
        fake.respond = None
    print(f"Ctrl+C to exit: {stopped_in:.1f} s")
    assert stopped_in < 5


def test_a_websocket_upgrade_is_refused_without_an_error_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with app_process(["app.py"], log=log) as http:
        port = http.base_url.port or 0
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.sendall(
                    b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                assert connection.recv(4096).startswith(b"HTTP/1.1 403 ")
        time.sleep(0.2)
    lines = [line for line in log.read_text().splitlines() if "/chat" in line or "rejected" in line]
    assert len(lines) <= 20, "uvicorn's access line and its 'connection rejected', no more"
    assert "ERROR" not in log.read_text()
    assert "Traceback" not in log.read_text()


# --- Inside an existing Django project, and the README's ORM tool -------------------------------


def run_ok(cwd: Path, *args: str) -> None:
    """Run python with these arguments in a folder, as a user would at a shell, and check it succeeded."""
    run_ok_with(cwd, {}, *args)


def run_ok_with(cwd: Path, env: dict[str, str], *args: str) -> None:
    """run_ok, with these variables in the environment."""
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def readme_code(first_line: str) -> str:
    """The README's Python block that begins with this line."""
    readme = (HERE / "README.md").read_text()
    start = readme.index(f"```python\n{first_line}") + len("```python\n")
    return readme[start : readme.index("```", start)]


def with_the_readme_orm_tool(source: str) -> str:
    """app.py with the README's ORM tool pasted below SERVER_TOOLS."""
    return with_server_tools(source, readme_code("class UserLookup(BaseModel):"))


def asks_when_ada_joined(http: httpx.Client, fake: FakeOpenAI) -> Reply:
    """Ask the model (the fake) about a user, which it answers with the README's ORM tool."""
    fake.requests, fake.script = [], [calls_tools(("call_u", "lookup_user", ['{"username": "ada"}'])), says("Today.")]
    reply = chat(http, None, user_says("When did ada join?"))
    assert "lookup_user" in [tool["function"]["name"] for tool in fake.requests[0]["tools"]]
    assert reply.messages[2]["content"] == {"username": "ada", "joined": datetime.now(UTC).date().isoformat()}
    assert reply.messages[-1]["content"] == "Today."
    return reply


ADD_ADA = "from django.contrib.auth.models import User; User.objects.create_user('ada')"
ADMIN_PASSWORD = "a-long-Admin-password-7"
ADD_ADMIN = (
    f"from django.contrib.auth.models import User; User.objects.create_superuser('admin', password='{ADMIN_PASSWORD}')"
)
HOST_VIEWS = """
import time

from django.http import HttpResponse


def slow(request):  # a page of the project's that takes its time, as Django runs a sync view: in a thread
    time.sleep(1.5)
    return HttpResponse("slept")


urlpatterns += [path("ping/", lambda request: HttpResponse("pong")), path("slow/", slow), path("chat/", include("app"))]
"""
HOST_SERVER = ["-m", "uvicorn", "mysite.asgi:application", "--port", "{port}"]


@pytest.fixture(scope="session")
def host_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A startproject site with app.py included as the README says (and under chat/ too), the README's ORM
    tool, two users (ada, and an admin), and pages of its own; served with its own asgi.py."""
    site = tmp_path_factory.mktemp("site")
    run_ok(site, "-m", "django", "startproject", "mysite", ".")
    (site / "app.py").write_text(with_the_readme_orm_tool((HERE / "app.py").read_text()))
    urls = site / "mysite" / "urls.py"
    urls.write_text(urls.read_text() + readme_code("# urls.py, at the end") + HOST_VIEWS)
    settings_ = site / "mysite" / "settings.py"  # every view in a transaction, as many projects have it
    settings_.write_text(settings_.read_text() + '\nDATABASES["default"]["ATOMIC_REQUESTS"] = True\n')
    run_ok(site, "manage.py", "migrate")
    run_ok(site, "manage.py", "shell", "-c", f"{ADD_ADA}; {ADD_ADMIN}")
    return site


@pytest.fixture(scope="session")
def host(host_site: Path, fake_openai_server: tuple[FakeOpenAI, Server]) -> Iterator[AppClient]:
    """The site, served by uvicorn, with the fake model for app.py's agent."""
    with app_process(
        HOST_SERVER, cwd=host_site, OPENAI_API_KEY="sk-env", OPENAI_BASE_URL=f"{fake_openai_server[1].url}/v1"
    ) as http:
        yield http


def access_control(response: httpx.Response) -> list[str]:
    return [name for name in response.headers if name.lower().startswith("access-control-")]


@pytest.mark.parametrize("prefix", ["", "chat/"], ids=["at-the-root", "under-a-prefix"])
def test_one_include_serves_the_endpoint_inside_an_existing_project(
    host: AppClient, fake_openai_server: tuple[FakeOpenAI, Server], prefix: str
) -> None:
    with httpx.Client(base_url=f"{host.base_url}{prefix}", timeout=10) as http:
        asks_when_ada_joined(http, fake_openai_server[0])
        answer = preflight(http, FRONTEND)
        assert (answer.status_code, answer.headers["access-control-allow-origin"]) == (204, FRONTEND)
        refused = http.get("/assistant", headers={"Origin": FRONTEND})  # app.py's errors keep their CORS headers
        assert (refused.status_code, refused.headers["access-control-allow-origin"]) == (405, FRONTEND)
        assert http.get(host.base_url.join("ping/")).text == "pong"


@pytest.mark.parametrize("origins", [None, "*"], ids=["default-origins", "any-origin"])
def test_the_projects_own_pages_never_answer_the_frontends_origin(
    host_site: Path, host: AppClient, origins: str | None
) -> None:
    with contextlib.ExitStack() as stack:
        site = (
            host
            if origins is None
            else stack.enter_context(app_process(HOST_SERVER, cwd=host_site, CORS_ORIGINS=origins))
        )
        browser = stack.enter_context(httpx.Client(base_url=str(site.base_url), timeout=10))
        browser.get("/admin/login/")  # an admin logs in, as in a browser: the session cookie goes with every request
        login = {"username": "admin", "password": ADMIN_PASSWORD, "csrfmiddlewaretoken": browser.cookies["csrftoken"]}
        assert browser.post("/admin/login/?next=/admin/", data=login).status_code == 302
        for page in ["/admin/", "/admin/auth/user/", "/ping/"]:
            response = browser.get(page, headers={"Origin": FRONTEND})
            assert response.status_code == 200
            assert access_control(response) == [], f"{page} would let the frontend's origin read it"
        asked = browser.options(
            "/admin/auth/user/add/",
            headers={
                "Origin": FRONTEND,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x",
            },
        )
        assert access_control(asked) == [], "app.py answered a preflight for a page of the project"
        assert access_control(browser.get("/health", headers={"Origin": FRONTEND})) != [], "its own keep them"


def test_a_slow_page_of_the_project_holds_up_nothing_else(host: AppClient) -> None:
    slow = threading.Thread(target=lambda: httpx.get(f"{host.base_url}slow/", timeout=10))
    slow.start()
    time.sleep(0.5)  # the page's view is asleep in its thread

    def took(request: Callable[[], object]) -> float:
        started = time.monotonic()
        request()
        return time.monotonic() - started

    waits = {
        "/health": took(lambda: host.get("/health")),
        "/assistant": took(lambda: chat(host, None, user_says("hi"))),
        "/ping/": took(lambda: host.get("/ping/")),
    }
    slow.join()
    print(
        "while a page of the project sleeps 1.5 s: "
        + ", ".join(f"{path} {s * 1000:.0f} ms" for path, s in waits.items())
    )
    assert max(waits.values()) < 0.5, "a request waited for another's sync work"


def test_app_py_reads_only_its_own_settings_inside_a_project(host_site: Path) -> None:
    projects = {"PORT": "$PORT", "ALLOWED_HOSTS": ",,,", "HOST": "not a host"}  # e.g. Heroku's PORT
    run_ok_with(host_site, projects, "manage.py", "check")
    with app_process(HOST_SERVER, cwd=host_site, PORT="$PORT", ALLOWED_HOSTS=",,,", HOST="not a host") as http:
        assert http.get("/health").json()["status"] == "healthy"
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=host_site,
        env={**os.environ, "OPENAI_TIMEOUT": "30s"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "app.py: invalid setting OPENAI_TIMEOUT: Input should be a valid number, unable to parse string as a number."
    )


def test_app_pys_middleware_left_in_a_projects_settings_stops_it_with_one_line(tmp_path: Path, host_site: Path) -> None:
    shutil.copytree(host_site, tmp_path / "site")
    settings_ = (
        tmp_path / "site" / "mysite" / "settings.py"
    )  # as the README of 0.3.0 said, which let CORS in everywhere
    settings_.write_text(settings_.read_text() + 'MIDDLEWARE = ["app.cors_middleware", *MIDDLEWARE]\n')
    result = subprocess.run(
        [sys.executable, "-c", "from mysite.asgi import application"],
        cwd=tmp_path / "site",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip() == "app.py: take app.cors_middleware out of MIDDLEWARE; include('app') is all it needs"


@pytest.mark.parametrize("value", ["nowhere.settings", "", "mysite.settings"], ids=["missing", "empty", "the-sites"])
@pytest.mark.parametrize("command", [["app.py"], ["-m", "uvicorn", "app:application", "--port", "{port}"]])
def test_app_py_serves_itself_whatever_django_settings_module_says(
    host_site: Path, value: str, command: list[str]
) -> None:
    with app_process(command, cwd=host_site, DJANGO_SETTINGS_MODULE=value) as http:
        assert http.get("/health").json()["agent"] == "mock"
        assert http.get("/admin/").json()["error"].startswith("No endpoint at /admin/"), "not the site's admin"


KEPT_CONNECTIONS = """
KEPT = []


class Nothing(BaseModel):
    \"\"\"Takes nothing.\"\"\"


def touch_the_database(arguments: Nothing) -> str:
    \"\"\"A sync tool that opens its thread's database connection, kept to be looked at later.\"\"\"
    from django.db import connections

    connections["default"].ensure_connection()
    KEPT.append(connections["default"])
    return "touched"


def closed_connections(arguments: Nothing) -> list[bool]:
    \"\"\"Whether each connection a tool opened was closed after it.\"\"\"
    return [connection.connection is None for connection in KEPT]


SERVER_TOOLS["touch_the_database"] = (Nothing, touch_the_database)
SERVER_TOOLS["closed_connections"] = (Nothing, closed_connections)
"""


@pytest.fixture(scope="module")
def standalone_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """app.py with a database of its own as the README shows, its ORM tool, and ada in it."""
    site = tmp_path_factory.mktemp("standalone")
    added = [
        line
        for line in readme_code("settings.configure(").splitlines()
        if line.startswith("    ") and "..." not in line
    ]
    database = "".join(f"    {line}\n" for line in added)
    source = with_server_tools(with_the_readme_orm_tool((HERE / "app.py").read_text()), KEPT_CONNECTIONS)
    opening = next(line for line in source.splitlines(keepends=True) if line.startswith("    settings.configure("))
    (site / "app.py").write_text(source.replace(opening, opening + database))
    run_ok(site, "app.py", "migrate")
    run_ok(site, "app.py", "shell", "-c", ADD_ADA)
    return site


def test_the_readme_orm_tool_reads_the_database_standalone(
    standalone_site: Path, fake_openai_server: tuple[FakeOpenAI, Server]
) -> None:
    fake, running = fake_openai_server
    with app_process(["app.py"], cwd=standalone_site, OPENAI_API_KEY="sk", OPENAI_BASE_URL=f"{running.url}/v1") as http:
        asks_when_ada_joined(http, fake)


def test_a_sync_tool_closes_its_database_connection_as_django_does(
    standalone_site: Path, fake_openai_server: tuple[FakeOpenAI, Server]
) -> None:
    fake, running = fake_openai_server
    with app_process(["app.py"], cwd=standalone_site, OPENAI_API_KEY="sk", OPENAI_BASE_URL=f"{running.url}/v1") as http:
        fake.script = [calls_tools(("call_1", "touch_the_database", ["{}"])), says("Touched.")]
        chat(http, None, user_says("Touch the database"))
        fake.script = [calls_tools(("call_2", "closed_connections", ["{}"])), says("Closed.")]
        reply = chat(http, None, user_says("Was it closed?"))
    assert reply.messages[2]["content"] == [True]
